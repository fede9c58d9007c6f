//! The simulator's alarm records (`POST /bvcsp/v1/alarm`, spec §10): every alarm it
//! raised, whether or not a socket was open to receive it, paged like the server's lists.
//!
//! Where the real server is unknown the choices are adversarial and switchable: records
//! are listed newest first by default (or oldest first), spelled as records
//! (`device_id`/`timestamp`), as frames (`devID`/`time`) or mixed, and the endpoint can
//! be absent (404), answer an unknown code, or answer something unrecognisable.

use serde_json::{Map, Value, json};

/// How records name their fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum HistorySpelling {
    /// `device_id`, `device_name`, `timestamp`, `desc` (the third-party dashboard's view).
    #[default]
    Records,
    /// The stream's names: `devID`, `devName`, `time`, `desc`.
    Frames,
    /// Every other record one way, then the other.
    Mixed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum HistoryOrder {
    #[default]
    NewestFirst,
    OldestFirst,
}

/// What the endpoint answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum HistoryMode {
    #[default]
    Serve,
    /// HTTP 404, as a server without the endpoint.
    NotFound,
    /// HTTP 200 with this non-zero `code`.
    Code(i64),
    /// HTTP 200, code 0, and a `data` that is no list.
    Garbage,
}

/// The records, oldest first, and how they are served.
#[derive(Debug, Default)]
pub struct AlarmHistory {
    records: Vec<Value>,
    pub spelling: HistorySpelling,
    pub order: HistoryOrder,
    pub mode: HistoryMode,
    /// Include `pageInfo` (with `totalCount`) in replies.
    pub page_info: bool,
    /// The server serves at most this many records a page, whatever is asked.
    pub max_page_size: usize,
}

/// A reply of the endpoint.
pub enum HistoryReply {
    Json(Value),
    NotFound,
}

impl AlarmHistory {
    pub fn new() -> AlarmHistory {
        AlarmHistory {
            page_info: true,
            max_page_size: 500,
            ..AlarmHistory::default()
        }
    }

    /// Remember one alarm raised (an injected alarm frame); `now` stamps one without time.
    pub fn record(&mut self, frame: &Value, now: i64) {
        let Some(obj) = frame.as_object() else {
            return;
        };
        let get = |k: &str| {
            obj.iter()
                .find(|(key, _)| key.eq_ignore_ascii_case(k))
                .map(|(_, v)| v.clone())
        };
        let frames = match self.spelling {
            HistorySpelling::Records => false,
            HistorySpelling::Frames => true,
            HistorySpelling::Mixed => self.records.len() % 2 == 1,
        };
        let (device, name, time) = if frames {
            ("devID", "devName", "time")
        } else {
            ("device_id", "device_name", "timestamp")
        };
        let mut r = Map::new();
        for (out, from) in [
            ("key", "key"),
            ("type", "type"),
            ("desc", "desc"),
            ("status", "status"),
            ("lat", "lat"),
            ("lng", "lng"),
            (device, "devID"),
            (name, "devName"),
        ] {
            if let Some(v) = get(from) {
                r.insert(out.to_string(), v);
            }
        }
        r.insert(time.to_string(), get("time").unwrap_or_else(|| json!(now)));
        self.records.push(Value::Object(r));
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// One page for a request body `{page, pageSize, filter}` (`page` from 0).
    pub fn page(&self, page: i64, page_size: i64) -> HistoryReply {
        match self.mode {
            HistoryMode::NotFound => return HistoryReply::NotFound,
            HistoryMode::Code(code) => {
                return HistoryReply::Json(json!({"code": code, "msg": "unsupported"}));
            }
            HistoryMode::Garbage => {
                return HistoryReply::Json(
                    json!({"code": 0, "msg": "OK", "data": "no records here"}),
                );
            }
            HistoryMode::Serve => {}
        }
        if page < 0 || page_size < 1 {
            return HistoryReply::Json(json!({"code": 4, "msg": "invalid param"}));
        }
        let size = usize::try_from(page_size)
            .unwrap_or(usize::MAX)
            .min(self.max_page_size.max(1));
        let start = usize::try_from(page)
            .unwrap_or(usize::MAX)
            .saturating_mul(size);
        let data: Vec<Value> = match self.order {
            HistoryOrder::OldestFirst => self
                .records
                .iter()
                .skip(start)
                .take(size)
                .cloned()
                .collect(),
            HistoryOrder::NewestFirst => self
                .records
                .iter()
                .rev()
                .skip(start)
                .take(size)
                .cloned()
                .collect(),
        };
        let mut reply = json!({"code": 0, "msg": "OK", "data": data});
        if self.page_info {
            reply["pageInfo"] =
                json!({"page": page, "pageSize": size, "totalCount": self.records.len()});
        }
        HistoryReply::Json(reply)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(r: HistoryReply) -> Vec<Value> {
        match r {
            HistoryReply::Json(v) => v["data"].as_array().cloned().unwrap_or_default(),
            HistoryReply::NotFound => panic!("404"),
        }
    }

    #[test]
    fn pages_newest_first_or_oldest_first_in_either_spelling() {
        let mut h = AlarmHistory::new();
        for i in 0..5 {
            h.record(&json!({"key": format!("k{i}"), "type": 5, "devID": "PU_1", "time": 100 + i, "status": 0}), 0);
        }
        let p0 = data(h.page(0, 2));
        assert_eq!(p0[0]["key"], "k4");
        assert_eq!(p0[0]["device_id"], "PU_1");
        assert_eq!(p0[0]["timestamp"], 104);
        assert_eq!(data(h.page(2, 2)).len(), 1);
        h.order = HistoryOrder::OldestFirst;
        assert_eq!(data(h.page(0, 2))[0]["key"], "k0");
        let mut f = AlarmHistory::new();
        f.spelling = HistorySpelling::Frames;
        f.record(&json!({"key": "x", "devID": "PU_2"}), 42);
        let r = &data(f.page(0, 10))[0];
        assert_eq!(
            (r["devID"].as_str(), r["time"].as_i64()),
            (Some("PU_2"), Some(42))
        );
        assert!(matches!(
            AlarmHistory {
                mode: HistoryMode::NotFound,
                ..AlarmHistory::new()
            }
            .page(0, 1),
            HistoryReply::NotFound
        ));
    }
}
