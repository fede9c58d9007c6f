//! BVCSP REST calls: login, refresh, logout and the device list.

use std::time::Duration;

use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use serde_json::{Value, json};

use super::auth;
use super::model::DeviceRecord;
use crate::config::{BvcspConfig, BvcspPaths, Secret};
use crate::json::{as_i64, field};
use crate::recovery::{Classify, HttpFailure, Recovery, WaitReason};

#[derive(Debug, thiserror::Error)]
pub enum RestError {
    #[error("request failed: {0}")]
    Transport(#[source] HttpFailure),
    #[error("HTTP status {0}")]
    Status(u16),
    #[error("reply is not JSON ({0} bytes)")]
    NotJson(usize),
    #[error("server replied code {code} ({msg})")]
    Code { code: i64, msg: String },
    #[error("reply has no usable token")]
    NoToken,
    #[error("reply has no list of records")]
    NoList,
    #[error("reply is larger than {limit} bytes")]
    TooLarge { limit: usize },
}

/// The largest REST reply read, in bytes. A device-list page of 1 000 devices is well
/// under a megabyte; a server sending more is broken or hostile, and the reply is an
/// error for that request rather than unbounded memory.
pub const MAX_REPLY_BYTES: usize = 32 << 20;

/// Read a reply body, refusing to hold more than `limit` bytes.
async fn read_capped(mut resp: reqwest::Response, limit: usize) -> Result<Vec<u8>, RestError> {
    if resp.content_length().is_some_and(|n| n > limit as u64) {
        return Err(RestError::TooLarge { limit });
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(transport)? {
        if body.len() + chunk.len() > limit {
            return Err(RestError::TooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The session's reading of a failed call (backfill reads the alarm records' failures
/// its own way: see `backfill::classify`).
impl Classify for RestError {
    fn recovery(&self) -> Recovery {
        match self {
            RestError::Code { code: 9, .. } | RestError::Status(401 | 403) => Recovery::Relogin,
            RestError::Code { code: 14 | 17, .. } => {
                Recovery::WaitLong(WaitReason::CredentialsRefused)
            }
            _ => Recovery::Retry,
        }
    }
}

fn transport(e: reqwest::Error) -> RestError {
    RestError::Transport(HttpFailure(e))
}

/// A token and how long the server says it lives.
#[derive(Debug, Clone)]
pub struct Grant {
    pub token: Secret,
    pub lifetime: Option<Duration>,
}

pub struct RestClient {
    http: reqwest::Client,
    base: reqwest::Url,
    paths: BvcspPaths,
}

impl RestClient {
    pub fn new(
        cfg: &BvcspConfig,
        tls: Option<rustls::ClientConfig>,
    ) -> Result<RestClient, reqwest::Error> {
        crate::tls::install_process_provider();
        let mut b = reqwest::Client::builder()
            .user_agent(concat!("bvcsp2mqtt/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(cfg.request_timeout)
            .timeout(cfg.request_timeout)
            .pool_max_idle_per_host(2);
        if let Some(tls) = tls {
            b = b.tls_backend_preconfigured(tls);
        }
        Ok(RestClient {
            http: b.build()?,
            base: cfg.base_url().clone(),
            paths: cfg.paths.clone(),
        })
    }

    fn url(&self, path: &str) -> reqwest::Url {
        let mut u = self.base.clone();
        u.set_path(path);
        u.set_query(None);
        u
    }

    /// POST `body` to `path`; returns the whole reply object when `code == 0`.
    async fn call(
        &self,
        path: &str,
        token: Option<&Secret>,
        body: Option<Value>,
    ) -> Result<Value, RestError> {
        let mut req = self.http.post(self.url(path));
        if let Some(t) = token {
            let mut v = HeaderValue::from_str(t.expose()).map_err(|_| RestError::NoToken)?;
            v.set_sensitive(true);
            req = req.header(AUTHORIZATION, v);
        }
        req = match body {
            Some(b) => req
                .header(CONTENT_TYPE, "application/json")
                .body(b.to_string()),
            None => req.header(CONTENT_TYPE, "application/x-www-form-urlencoded"),
        };
        let resp = req.send().await.map_err(transport)?;
        let status = resp.status();
        let bytes = read_capped(resp, MAX_REPLY_BYTES).await?;
        parse_reply(status.as_u16(), &bytes)
    }

    /// SHA256_T login.
    pub async fn login(
        &self,
        username: &str,
        password: &Secret,
        now_unix: i64,
    ) -> Result<Grant, RestError> {
        let body = json!({
            "username": username,
            "password_encrypted": auth::sha256_t(username, password.expose(), now_unix),
            "timestamp": now_unix,
        });
        let v = self.call(&self.paths.login, None, Some(body)).await?;
        grant_from(&v).ok_or(RestError::NoToken)
    }

    /// Refresh: a new token when the reply carries one, else the same token extended.
    pub async fn refresh(&self, token: &Secret) -> Result<Grant, RestError> {
        let v = self
            .call(&self.paths.refresh, Some(token), Some(json!({})))
            .await?;
        let data = field(&v, "data");
        let new = data
            .and_then(|d| field(d, "token"))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(Secret::new)
            .unwrap_or_else(|| token.clone());
        Ok(Grant {
            token: new,
            lifetime: data.and_then(lifetime_of),
        })
    }

    pub async fn logout(&self, token: &Secret) -> Result<(), RestError> {
        self.call(&self.paths.logout, Some(token), None)
            .await
            .map(|_| ())
    }

    /// One page of `pu/list`; the second value is `totalCount` when the reply has it.
    pub async fn device_page(
        &self,
        token: &Secret,
        page: u32,
        page_size: u32,
    ) -> Result<(Vec<DeviceRecord>, usize, Option<u64>), RestError> {
        let body = json!({"page": page, "pageSize": page_size, "needStatus": true});
        let v = self
            .call(&self.paths.device_list, Some(token), Some(body))
            .await?;
        device_page_of(&v)
    }

    /// One page of the alarm records (`page` from 0), with `totalCount` when the reply
    /// has it. Records are returned as the server sent them.
    pub async fn alarm_page(
        &self,
        token: &Secret,
        page: u32,
        page_size: u32,
    ) -> Result<(Vec<Value>, Option<u64>), RestError> {
        let body = json!({"page": page, "pageSize": page_size, "filter": {}});
        let v = self
            .call(&self.paths.alarm_history, Some(token), Some(body))
            .await?;
        let items = list_items(&v).ok_or(RestError::NoList)?;
        Ok((items, total_count(&v)))
    }
}

/// The records of one `pu/list` reply, their number (parsed or not) and `totalCount`.
/// A `data` that is not a list (nor one nested in an object) is an error, not an empty
/// page: taken for the end of the list, it would make every device look gone.
#[doc(hidden)]
pub fn device_page_of(v: &Value) -> Result<(Vec<DeviceRecord>, usize, Option<u64>), RestError> {
    let items = list_items(v).ok_or(RestError::NoList)?;
    let count = items.len();
    Ok((
        items
            .into_iter()
            .filter_map(DeviceRecord::from_value)
            .collect(),
        count,
        total_count(v),
    ))
}

/// A reply's status and body: the whole reply object when the status is 2xx and
/// `code == 0`. The pure part of every call, kept apart from the I/O so it can be fuzzed.
pub fn parse_reply(status: u16, bytes: &[u8]) -> Result<Value, RestError> {
    if !(200..300).contains(&status) {
        // A JSON error envelope on a non-2xx status still tells us more than the status.
        if let Ok(v) = serde_json::from_slice::<Value>(bytes)
            && let Some(code) = field(&v, "code").and_then(as_i64)
            && code != 0
        {
            return Err(code_error(code, &v));
        }
        return Err(RestError::Status(status));
    }
    let v: Value = serde_json::from_slice(bytes).map_err(|_| RestError::NotJson(bytes.len()))?;
    match field(&v, "code").and_then(as_i64) {
        Some(0) => Ok(v),
        Some(code) => Err(code_error(code, &v)),
        None => Err(RestError::NotJson(bytes.len())),
    }
}

/// The records of a paged list reply: `data` itself, or a list nested one level down;
/// `null` or no `data` is an empty page.
#[doc(hidden)]
pub fn list_items(v: &Value) -> Option<Vec<Value>> {
    match field(v, "data") {
        None | Some(Value::Null) => Some(Vec::new()),
        Some(Value::Array(a)) => Some(a.clone()),
        Some(d) => field(d, "list")
            .or_else(|| field(d, "items"))
            .or_else(|| field(d, "records"))
            .and_then(Value::as_array)
            .cloned(),
    }
}

#[doc(hidden)]
pub fn total_count(v: &Value) -> Option<u64> {
    field(v, "pageInfo")
        .and_then(|p| field(p, "totalCount"))
        .and_then(as_i64)
        .map(|n| n.max(0) as u64)
}

fn code_error(code: i64, v: &Value) -> RestError {
    let msg = field(v, "msg")
        .or_else(|| field(v, "message"))
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    RestError::Code { code, msg }
}

fn lifetime_of(data: &Value) -> Option<Duration> {
    field(data, "timeout")
        .and_then(as_i64)
        .filter(|n| *n > 0)
        .map(|n| Duration::from_secs(n as u64))
}

#[doc(hidden)]
pub fn grant_from(v: &Value) -> Option<Grant> {
    let data = field(v, "data")?;
    let token = field(data, "token")?.as_str().filter(|s| !s.is_empty())?;
    Some(Grant {
        token: Secret::new(token),
        lifetime: lifetime_of(data),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_classified() {
        let code = |c| RestError::Code {
            code: c,
            msg: String::new(),
        };
        assert_eq!(code(9).recovery(), Recovery::Relogin);
        assert_eq!(
            code(14).recovery(),
            Recovery::WaitLong(WaitReason::CredentialsRefused)
        );
        assert_eq!(code(11).recovery(), Recovery::Retry);
        assert_eq!(RestError::Status(401).recovery(), Recovery::Relogin);
        assert_eq!(RestError::Status(502).recovery(), Recovery::Retry);
        assert_eq!(RestError::NotJson(3).recovery(), Recovery::Retry);
    }

    #[test]
    fn a_device_list_reply_that_is_not_a_list_is_an_error() {
        let page = |v: Value| device_page_of(&v).map(|(r, n, t)| (r.len(), n, t));
        assert!(matches!(
            page(json!({"code": 0, "data": {"rows": [{"id": "PU_1"}]}})),
            Err(RestError::NoList)
        ));
        assert!(matches!(
            page(json!({"code": 0, "data": "PU_1"})),
            Err(RestError::NoList)
        ));
        assert_eq!(
            page(json!({"code": 0, "data": null})).unwrap(),
            (0, 0, None)
        );
        let two = json!([{"id": "PU_1"}, {"id": "PU_2"}]);
        assert_eq!(
            page(json!({"code": 0, "data": {"list": two}, "pageInfo": {"totalCount": 5}})).unwrap(),
            (2, 2, Some(5))
        );
    }

    #[test]
    fn grants_read_token_and_lifetime() {
        let g =
            grant_from(&json!({"code": 0, "data": {"token": "a+b/c=", "timeout": 14400}})).unwrap();
        assert_eq!(g.token.expose(), "a+b/c=");
        assert_eq!(g.lifetime, Some(Duration::from_secs(14400)));
        let g = grant_from(&json!({"code": 0, "data": {"token": "t", "timeout": "60"}})).unwrap();
        assert_eq!(g.lifetime, Some(Duration::from_secs(60)));
        assert!(grant_from(&json!({"code": 0, "data": {}})).is_none());
    }
}
