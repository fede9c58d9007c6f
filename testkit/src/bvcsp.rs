//! An in-process simulator of a BVCSP server: REST under `/bvcsp/v1` and the five
//! WebSocket event streams, on one port, over plain HTTP or self-signed TLS.
//!
//! It exists for the integration tests and for `bvcsp2mqtt demo`. It models what
//! `shared/spec/bvcsp.md` §14 asks for, and it is deliberately *adversarial*: wherever the
//! real server's behaviour is unknown, the simulator picks the reading that is hardest on
//! a client, and every such choice can be switched through a knob on [`BvcspSim`].
//!
//! # What it serves
//!
//! | path | behaviour |
//! |---|---|
//! | `POST /bvcsp/v1/auth/login` | SHA256_T only, within `clock_window`; code 14 otherwise |
//! | `POST /bvcsp/v1/auth/refresh` | per [`RefreshMode`] |
//! | `POST /bvcsp/v1/auth/logout` | any or no body; invalidates the token |
//! | `POST /bvcsp/v1/pu/list` | paged device records, `page` counts from 0 |
//! | `POST /bvcsp/v1/alarm` | the alarm records: every alarm injected, paged (see [`super::alarm_history`]) |
//! | `GET` + upgrade on each [`Stream::default_path`] (trailing `/` allowed) | WebSocket |
//!
//! Every REST reply is HTTP 200 with `{"code","msg","data"}` unless a [`RestFault`] is set.
//! Unknown paths get HTTP 404.
//!
//! # Choices where the real server is unknown
//!
//! - Request keys (`login`, `pu/list`) are matched case-insensitively, as the Go server
//!   seems to; `timestamp` must be a JSON integer. A non-JSON body is code 4; any other
//!   login failure, a stale timestamp included, is code 14.
//! - The `Authorization` header is the raw token; a `Bearer ` prefix is *not* stripped.
//! - `pu/list` without `needStatus: true` omits `status`, and without `pageSize` uses 20.
//! - Refresh in [`RefreshMode::Code9`] also invalidates the presented token, and so does
//!   [`BvcspSim::force_code9`]; either way the client must log in again.
//! - A `?token=` query is form-decoded like Go's `url.Query()`: a raw `+` becomes a space,
//!   so a client that forgets to percent-encode gets a 401.
//! - [`SubprotocolMode::Wrong`] sends a bogus subprotocol even when none was offered, which
//!   is the "server sent a subprotocol nobody asked for" case.
//! - A socket whose token expires stays open, answers Pings and accepts keepalives, but
//!   gets no more events (the "silent socket" of spec §5).
//! - Token lifetimes are exact [`Duration`]s (sub-second lifetimes work for fast tests);
//!   the reply's `timeout` is the lifetime in whole seconds, at least 1.
//! - `refreshes`, `logouts` and `rest_calls` count every request that reached the handler,
//!   whatever the reply. `logins_ok` counts code-0 logins, `logins_failed` all others.
//!   Requests answered by a [`RestFault`] only show in `rest_calls`.
//!
//! # Example
//!
//! ```no_run
//! use bvcsp2mqtt_testkit::protocol::Stream;
//! use bvcsp2mqtt_testkit::bvcsp::{BvcspSim, SimDevice, SimOptions};
//! # async fn demo() -> std::io::Result<()> {
//! let sim = BvcspSim::start(SimOptions {
//!     devices: vec![SimDevice::new("PU_55AA0000", "Helmet 07", true)],
//!     ..SimOptions::default()
//! })
//! .await?;
//! // … point the bridge at sim.url(), then:
//! sim.wait_until("alarm socket open", std::time::Duration::from_secs(5), |s| {
//!     s.counters().open_sockets["alarm"] == 1
//! })
//! .await;
//! sim.inject(Stream::Alarm, serde_json::json!({"key": "a1", "type": 4106, "devID": "PU_55AA0000"}));
//! # Ok(()) }
//! ```
//!
//! # Time
//!
//! Token expiry, idle close and the restart window use [`tokio::time::Instant`], so they
//! follow a paused tokio clock. SHA256_T and AppId timestamps are Unix seconds from the
//! wall clock, as on a real server. Records handed to tests ([`UpgradeRecord::at`],
//! [`BvcspSim::down_attempts`]) use [`std::time::Instant`].

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rand::RngCore;
use serde_json::{Map, Value, json};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::alarm_history::{
    AlarmHistory, HistoryMode, HistoryOrder, HistoryReply, HistorySpelling,
};
use crate::protocol::Stream;
use crate::protocol::auth::{app_signature, decode_app_token, expected_login_hash, stored_digest};

const LOGIN_PATH: &str = "/bvcsp/v1/auth/login";
const REFRESH_PATH: &str = "/bvcsp/v1/auth/refresh";
const LOGOUT_PATH: &str = "/bvcsp/v1/auth/logout";
const PU_LIST_PATH: &str = "/bvcsp/v1/pu/list";
const ALARM_HISTORY_PATH: &str = "/bvcsp/v1/alarm";

/// A client that never finishes its TLS handshake or its upgrade must not pin a task.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a close handshake may take before the TCP connection is dropped anyway.
const CLOSE_GRACE: Duration = Duration::from_secs(1);
/// How long `restart` waits for aborted tasks to release their sockets.
const ABORT_WAIT: Duration = Duration::from_secs(2);
const MAX_BODY: usize = 1 << 20;
const DEFAULT_PAGE_SIZE: i64 = 20;
/// The first six token bytes encode to `++++////`, so every token needs escaping in a URL.
const TOKEN_PREFIX: [u8; 6] = [0xfb, 0xef, 0xbe, 0xff, 0xff, 0xff];
const WRONG_SUBPROTOCOL: &str = "bvcsp-sim-wrong-subprotocol";

/// A device as `pu/list` reports it.
#[derive(Clone, Debug, PartialEq)]
pub struct SimDevice {
    pub id: String,
    pub name: String,
    pub gid: String,
    pub online: bool,
    /// 0/0 means "no position", as on the real server.
    pub lat: f64,
    pub lng: f64,
    /// Overrides the `gps.time` and `lastTime` the device list reports (any JSON, so a
    /// test can send microseconds, junk or strings).
    pub time_override: Option<Value>,
}

impl SimDevice {
    /// A device in group `G_1` with no position.
    pub fn new(id: &str, name: &str, online: bool) -> Self {
        SimDevice {
            id: id.to_owned(),
            name: name.to_owned(),
            gid: "G_1".to_owned(),
            online,
            lat: 0.0,
            lng: 0.0,
            time_override: None,
        }
    }
}

/// How a WebSocket upgrade treats `Sec-WebSocket-Protocol`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubprotocolMode {
    /// Echo the offered value (what a browser-compatible server must do).
    Echo,
    /// Answer 101 without the header: tungstenite clients fail with `NoSubProtocol`.
    Withhold,
    /// Answer 101 with a value that was not offered (even if nothing was offered).
    Wrong,
    /// Refuse every upgrade with 401, whatever the token.
    Reject401,
    /// Refuse every upgrade with 403, whatever the token.
    Reject403,
}

/// What `POST /auth/refresh` does with a valid token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefreshMode {
    /// Issue a new token; the old one stays valid until its own expiry.
    NewToken,
    /// Return the same token with its expiry pushed to now + lifetime.
    SameToken,
    /// Reply code 9 and invalidate the presented token.
    Code9,
    /// Reply HTTP 500.
    ServerError,
    /// Never reply (until restart or shutdown drops the connection).
    Hang,
}

/// A fault applied to every REST call, login included, before any other processing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestFault {
    /// HTTP 500 with a plain-text body.
    ServerError,
    /// HTTP 200 with an HTML body, as a misconfigured proxy would send.
    NotJson,
    /// Wait this long, then handle the call normally.
    Slow(Duration),
}

/// Start-up configuration. Most of it can be changed later through [`BvcspSim`]'s knobs.
#[derive(Clone, Debug)]
pub struct SimOptions {
    pub username: String,
    pub password: String,
    /// `(app_id, app_key)`: when set, self-built AppId tokens are accepted too.
    pub app_credentials: Option<(String, String)>,
    pub token_lifetime: Duration,
    /// Allowed |timestamp − now| for SHA256_T logins and AppId tokens.
    pub clock_window: Duration,
    pub devices: Vec<SimDevice>,
    /// Include `pageInfo` in `pu/list` replies.
    pub page_info: bool,
    /// Serve HTTPS/WSS with a fresh self-signed CA:TRUE certificate.
    pub tls: bool,
    /// Close a socket that has received nothing for this long.
    pub idle_close: Option<Duration>,
}

impl Default for SimOptions {
    fn default() -> Self {
        SimOptions {
            username: "admin".to_owned(),
            password: "123456".to_owned(),
            app_credentials: None,
            token_lifetime: Duration::from_secs(14_400),
            clock_window: Duration::from_secs(300),
            devices: Vec::new(),
            page_info: true,
            tls: false,
            idle_close: Some(Duration::from_secs(60)),
        }
    }
}

/// A snapshot of the simulator's counters. Per-stream maps always hold all five streams.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SimCounters {
    pub logins_ok: u64,
    pub logins_failed: u64,
    pub refreshes: u64,
    pub logouts: u64,
    /// Code-9 replies sent, on any endpoint.
    pub rest_code9: u64,
    /// Successful upgrades per stream name.
    pub ws_upgrades: BTreeMap<String, u64>,
    /// Upgrades refused with 400, 401, 403 or 404.
    pub ws_rejected: u64,
    /// Currently open sockets per stream name.
    pub open_sockets: BTreeMap<String, usize>,
    /// Frames written to a socket per stream name.
    pub delivered: BTreeMap<String, u64>,
    /// Every REST request per path, counted before faults apply (so hammering shows even
    /// while the server answers 500).
    pub rest_calls: BTreeMap<String, u64>,
}

/// One WebSocket upgrade attempt.
#[derive(Clone, Debug)]
pub struct UpgradeRecord {
    /// `None` for an unknown path.
    pub stream: Option<String>,
    pub at: std::time::Instant,
    /// The offered `Sec-WebSocket-Protocol` value(s), joined with `", "`.
    pub subprotocol: Option<String>,
    /// The `token` query parameter, percent-decoded.
    pub query_token: Option<String>,
    pub accepted: bool,
}

/// A running simulator. Clones share the same server; dropping the last clone shuts it down.
#[derive(Clone)]
pub struct BvcspSim {
    inner: Arc<SimServer>,
    _owner: Arc<Owner>,
}

/// Background tasks hold `SimServer`, not `Owner`, so the server stops once tests let go of it.
struct Owner(Arc<SimServer>);

impl Drop for Owner {
    fn drop(&mut self) {
        self.0.shutdown_now();
    }
}

struct TlsInfo {
    acceptor: tokio_rustls::TlsAcceptor,
    fingerprint: String,
    pem: String,
}

struct SimServer {
    state: Mutex<State>,
    cancel: CancellationToken,
    addr: SocketAddr,
    tls: Option<TlsInfo>,
    /// Wall-clock anchor for `lastTime`/`gps.time`, so replies are stable within a run.
    started_unix: i64,
    next_id: AtomicU64,
}

struct TokenInfo {
    expires: Instant,
    /// AppId tokens are stateless on the wire, so revoking one means remembering it.
    app: bool,
}

enum Ctrl {
    Kick(Option<u16>),
    Stall(bool),
    /// Re-read knobs such as the idle timeout.
    Wake,
}

struct SocketEntry {
    stream: Stream,
    token: String,
    out: mpsc::UnboundedSender<Message>,
    ctrl: mpsc::UnboundedSender<Ctrl>,
    subscribed: BTreeSet<String>,
    stalled: bool,
}

struct State {
    username: String,
    digest: String,
    app_credentials: Option<(String, String)>,
    token_lifetime: Duration,
    clock_window: Duration,
    devices: Vec<SimDevice>,
    page_info: bool,
    idle_close: Option<Duration>,
    subprotocol_mode: SubprotocolMode,
    accept_header: bool,
    accept_query: bool,
    connection_header: String,
    disabled: HashSet<Stream>,
    /// Upgrades on these streams are refused with this HTTP status (REST still works).
    refused: HashMap<Stream, u16>,
    history: AlarmHistory,
    refresh_mode: RefreshMode,
    rest_fault: Option<RestFault>,
    force_code9: u32,
    tokens: HashMap<String, TokenInfo>,
    revoked_app: HashSet<String>,
    counters: SimCounters,
    uplink: BTreeMap<Stream, Vec<String>>,
    upgrades: Vec<UpgradeRecord>,
    down_attempts: Vec<std::time::Instant>,
    down_until: Option<Instant>,
    sockets: HashMap<u64, SocketEntry>,
    /// Every connection and socket task; `None` while the spawner has not stored the handle.
    tasks: HashMap<u64, Option<AbortHandle>>,
    shut_down: bool,
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn per_stream<T: Default>() -> BTreeMap<String, T> {
    Stream::ALL
        .iter()
        .map(|s| (s.name().to_owned(), T::default()))
        .collect()
}

impl State {
    fn new(opts: SimOptions) -> Self {
        let counters = SimCounters {
            ws_upgrades: per_stream(),
            open_sockets: per_stream(),
            delivered: per_stream(),
            ..SimCounters::default()
        };
        State {
            digest: stored_digest(&opts.username, &opts.password),
            username: opts.username,
            app_credentials: opts.app_credentials,
            token_lifetime: opts.token_lifetime,
            clock_window: opts.clock_window,
            devices: opts.devices,
            page_info: opts.page_info,
            idle_close: opts.idle_close,
            subprotocol_mode: SubprotocolMode::Echo,
            accept_header: true,
            accept_query: true,
            connection_header: "Upgrade".to_owned(),
            disabled: HashSet::new(),
            refused: HashMap::new(),
            history: AlarmHistory::new(),
            refresh_mode: RefreshMode::NewToken,
            rest_fault: None,
            force_code9: 0,
            tokens: HashMap::new(),
            revoked_app: HashSet::new(),
            counters,
            uplink: BTreeMap::new(),
            upgrades: Vec::new(),
            down_attempts: Vec::new(),
            down_until: None,
            sockets: HashMap::new(),
            tasks: HashMap::new(),
            shut_down: false,
        }
    }

    fn timeout_secs(&self) -> u64 {
        self.token_lifetime.as_secs().max(1)
    }

    fn issue_token(&mut self) -> String {
        let mut raw = [0u8; 16];
        raw[..TOKEN_PREFIX.len()].copy_from_slice(&TOKEN_PREFIX);
        rand::thread_rng().fill_bytes(&mut raw[TOKEN_PREFIX.len()..]);
        let token = base64::engine::general_purpose::STANDARD.encode(raw);
        let expires = Instant::now() + self.token_lifetime;
        self.tokens.insert(
            token.clone(),
            TokenInfo {
                expires,
                app: false,
            },
        );
        token
    }

    /// Validity of a token the server already knows (sockets only hold such tokens).
    fn token_live(&self, token: &str, now: Instant) -> bool {
        self.tokens.get(token).is_some_and(|t| now < t.expires)
    }

    /// Full check, admitting a never-seen AppId token if it verifies.
    fn token_valid(&mut self, token: &str) -> bool {
        let now = Instant::now();
        if let Some(info) = self.tokens.get(token) {
            return now < info.expires;
        }
        self.admit_app_token(token, now)
    }

    fn admit_app_token(&mut self, token: &str, now: Instant) -> bool {
        let Some((app_id, app_key)) = self.app_credentials.as_ref() else {
            return false;
        };
        if self.revoked_app.contains(token) {
            return false;
        }
        let Some(parts) = decode_app_token(token) else {
            return false;
        };
        if parts.app_id != *app_id
            || parts.sign != app_signature(app_id, app_key, parts.timestamp, parts.rand_num)
        {
            return false;
        }
        let now_unix = unix_now();
        if (parts.timestamp - now_unix).unsigned_abs() > self.clock_window.as_secs() {
            return false;
        }
        // Valid for the lifetime counted from the token's own timestamp, not from first use.
        let remaining = self.token_lifetime.as_secs_f64() + (parts.timestamp - now_unix) as f64;
        if remaining <= 0.0 {
            return false;
        }
        self.tokens.insert(
            token.to_owned(),
            TokenInfo {
                expires: now + Duration::from_secs_f64(remaining),
                app: true,
            },
        );
        true
    }

    fn invalidate(&mut self, token: &str) {
        let was_app = self.tokens.remove(token).map(|t| t.app);
        if was_app == Some(true) || (was_app.is_none() && decode_app_token(token).is_some()) {
            self.revoked_app.insert(token.to_owned());
        }
    }

    fn invalidate_all(&mut self) {
        for (token, info) in self.tokens.drain() {
            if info.app {
                self.revoked_app.insert(token);
            }
        }
    }

    /// The gate in front of every authenticated endpoint. `force_code9` is consumed by any
    /// call that reaches an authenticated endpoint, valid token or not.
    fn authorize(&mut self, token: Option<&str>) -> Option<String> {
        if self.force_code9 > 0 {
            self.force_code9 -= 1;
            if let Some(t) = token {
                self.invalidate(t);
            }
            return None;
        }
        let token = token?;
        self.token_valid(token).then(|| token.to_owned())
    }

    fn code9(&mut self) -> Value {
        self.counters.rest_code9 += 1;
        json!({"code": 9, "msg": "authentication failed or token expired"})
    }

    fn login(&mut self, body: &[u8]) -> Value {
        let Some(obj) = parse_object(body) else {
            self.counters.logins_failed += 1;
            return json!({"code": 4, "msg": "invalid param"});
        };
        let user = get_ci(&obj, "username").and_then(Value::as_str);
        let hash = get_ci(&obj, "password_encrypted").and_then(Value::as_str);
        let ts = get_ci(&obj, "timestamp").and_then(as_int);
        let ok = match (user, hash, ts) {
            (Some(user), Some(hash), Some(ts)) => {
                user == self.username
                    && hash == expected_login_hash(&self.digest, ts)
                    && (ts - unix_now()).unsigned_abs() <= self.clock_window.as_secs()
            }
            _ => false,
        };
        if !ok {
            self.counters.logins_failed += 1;
            return json!({"code": 14, "msg": "wrong account or password"});
        }
        self.counters.logins_ok += 1;
        let token = self.issue_token();
        json!({"code": 0, "msg": "OK", "data": {"token": token, "timeout": self.timeout_secs()}})
    }

    fn logout(&mut self, token: Option<&str>) -> Value {
        self.counters.logouts += 1;
        match self.authorize(token) {
            Some(t) => {
                self.invalidate(&t);
                json!({"code": 0, "msg": "OK"})
            }
            None => self.code9(),
        }
    }

    fn pu_list(&mut self, token: Option<&str>, body: &[u8], started_unix: i64) -> Value {
        if self.authorize(token).is_none() {
            return self.code9();
        }
        let obj = if body.iter().all(u8::is_ascii_whitespace) {
            Map::new()
        } else {
            match parse_object(body) {
                Some(o) => o,
                None => return json!({"code": 4, "msg": "invalid param"}),
            }
        };
        let page = get_ci(&obj, "page").and_then(as_int).unwrap_or(0);
        let page_size = get_ci(&obj, "pageSize")
            .and_then(as_int)
            .unwrap_or(DEFAULT_PAGE_SIZE);
        let need_status = get_ci(&obj, "needStatus")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if page < 0 || page_size < 1 {
            return json!({"code": 4, "msg": "invalid param"});
        }
        let start = usize::try_from(page.saturating_mul(page_size)).unwrap_or(usize::MAX);
        let records: Vec<Value> = self
            .devices
            .iter()
            .skip(start)
            .take(usize::try_from(page_size).unwrap_or(usize::MAX))
            .map(|d| device_record(d, need_status, started_unix))
            .collect();
        let mut reply = json!({"code": 0, "msg": "OK", "data": records});
        if self.page_info {
            reply["pageInfo"] =
                json!({"page": page, "pageSize": page_size, "totalCount": self.devices.len()});
        }
        reply
    }
}

impl State {
    /// `None`: the endpoint is switched off (404).
    fn alarm_history(&mut self, token: Option<&str>, body: &[u8]) -> Option<Value> {
        if self.history.mode == HistoryMode::NotFound {
            return None;
        }
        if self.authorize(token).is_none() {
            return Some(self.code9());
        }
        let Some(obj) = parse_object(body) else {
            return Some(json!({"code": 4, "msg": "invalid param"}));
        };
        let page = get_ci(&obj, "page").and_then(as_int).unwrap_or(0);
        let size = get_ci(&obj, "pageSize")
            .and_then(as_int)
            .unwrap_or(DEFAULT_PAGE_SIZE);
        match self.history.page(page, size) {
            HistoryReply::Json(v) => Some(v),
            HistoryReply::NotFound => None,
        }
    }
}

fn device_record(d: &SimDevice, need_status: bool, started_unix: i64) -> Value {
    let has_fix = d.lat != 0.0 || d.lng != 0.0;
    let last_time = if d.online {
        started_unix
    } else {
        started_unix - 3600
    };
    let mut rec = json!({
        "id": d.id,
        "gid": d.gid,
        "name": d.name,
        "desc": "",
        "classID": 0,
        "channels": [],
        "gps": {"lng": d.lng, "lat": d.lat, "time": if has_fix { last_time } else { 0 }},
        "lastTime": last_time,
    });
    if let Some(t) = &d.time_override {
        rec["gps"]["time"] = t.clone();
        rec["lastTime"] = t.clone();
    }
    if need_status {
        rec["status"] = json!(u8::from(d.online));
    }
    rec
}

fn parse_object(body: &[u8]) -> Option<Map<String, Value>> {
    match serde_json::from_slice(body) {
        Ok(Value::Object(o)) => Some(o),
        _ => None,
    }
}

/// The server is Go underneath and matches JSON keys case-insensitively.
fn get_ci<'a>(obj: &'a Map<String, Value>, key: &str) -> Option<&'a Value> {
    obj.get(key).or_else(|| {
        obj.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v)
    })
}

fn as_int(v: &Value) -> Option<i64> {
    v.as_i64().or_else(|| {
        v.as_f64()
            .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
            .map(|f| f as i64)
    })
}

/// `application/x-www-form-urlencoded` decoding, as Go's `url.Query()` does it.
fn form_decode(s: &str) -> String {
    fn hex_val(c: u8) -> Option<u8> {
        (c as char).to_digit(16).map(|d| d as u8)
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b'%' if i + 2 < b.len() => match (hex_val(b[i + 1]), hex_val(b[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 3;
                }
                _ => {
                    out.push(b'%');
                    i += 1;
                }
            },
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (form_decode(k) == name).then(|| form_decode(v))
    })
}

fn stream_for_path(path: &str) -> Option<Stream> {
    let trimmed = path.strip_suffix('/').unwrap_or(path);
    Stream::ALL
        .into_iter()
        .find(|s| s.default_path() == trimmed)
}

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

fn json_reply(v: &Value) -> Response<Full<Bytes>> {
    respond(
        StatusCode::OK,
        "application/json; charset=utf-8",
        v.to_string(),
    )
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    respond(status, "text/plain; charset=utf-8", text)
}

fn header_has_token(req: &Request<Incoming>, name: header::HeaderName, token: &str) -> bool {
    req.headers().get_all(name).iter().any(|v| {
        v.to_str().is_ok_and(|s| {
            s.split(',')
                .any(|part| part.trim().eq_ignore_ascii_case(token))
        })
    })
}

fn is_upgrade_request(req: &Request<Incoming>) -> bool {
    req.method() == Method::GET && header_has_token(req, header::UPGRADE, "websocket")
}

impl SimServer {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic in one handler must not take the whole simulator down with it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Unregister every connection and socket; the caller aborts the returned tasks once
    /// the lock is released (an abort may drop a task inline, and its guard locks too).
    fn take_everything(st: &mut State) -> Vec<(u64, AbortHandle)> {
        st.sockets.clear();
        st.tasks
            .iter()
            .filter_map(|(id, h)| h.as_ref().map(|h| (*id, h.clone())))
            .collect()
    }

    fn shutdown_now(&self) {
        self.cancel.cancel();
        let handles = {
            let mut st = self.lock();
            st.shut_down = true;
            Self::take_everything(&mut st)
        };
        for (_, h) in handles {
            h.abort();
        }
    }
}

/// Removes a task (and its socket, if any) from the registry however the task ends,
/// including by abort.
struct TaskGuard {
    inner: Arc<SimServer>,
    id: u64,
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        let mut st = self.inner.lock();
        st.tasks.remove(&self.id);
        st.sockets.remove(&self.id);
    }
}

fn spawn_tracked<F>(inner: &Arc<SimServer>, id: u64, fut: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    inner.lock().tasks.insert(id, None);
    let guard = TaskGuard {
        inner: inner.clone(),
        id,
    };
    let handle = tokio::spawn(async move {
        let _guard = guard;
        fut.await;
    });
    let shut_down = {
        let mut st = inner.lock();
        // If the task already finished, its guard removed the slot: do not resurrect it.
        if let Some(slot) = st.tasks.get_mut(&id) {
            *slot = Some(handle.abort_handle());
        }
        st.shut_down
    };
    if shut_down {
        handle.abort();
    }
}

async fn accept_loop(inner: Arc<SimServer>, listener: TcpListener) {
    loop {
        let accepted = tokio::select! {
            _ = inner.cancel.cancelled() => return,
            r = listener.accept() => r,
        };
        let (tcp, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(error = %e, "bvcsp sim: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        {
            let mut st = inner.lock();
            if st.down_until.is_some_and(|t| Instant::now() < t) {
                st.down_attempts.push(std::time::Instant::now());
                drop(st);
                drop(tcp);
                continue;
            }
        }
        let id = inner.next_id();
        let conn_inner = inner.clone();
        spawn_tracked(&inner, id, serve_connection(conn_inner, tcp, peer));
    }
}

async fn serve_connection(inner: Arc<SimServer>, tcp: TcpStream, peer: SocketAddr) {
    // Small WS frames should leave at once, not wait for Nagle.
    let _ = tcp.set_nodelay(true);
    let Some(tls) = inner.tls.as_ref() else {
        serve_http(inner, TokioIo::new(tcp)).await;
        return;
    };
    let acceptor = tls.acceptor.clone();
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => serve_http(inner, TokioIo::new(stream)).await,
        Ok(Err(e)) => debug!(%peer, error = %e, "bvcsp sim: TLS handshake failed"),
        Err(_) => debug!(%peer, "bvcsp sim: TLS handshake timed out"),
    }
}

async fn serve_http<I>(inner: Arc<SimServer>, io: TokioIo<I>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc_inner = inner.clone();
    let svc = hyper::service::service_fn(move |req| {
        let inner = svc_inner.clone();
        async move { Ok::<_, Infallible>(handle_request(inner, req).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .serve_connection(io, svc)
        .with_upgrades();
    tokio::select! {
        r = conn => if let Err(e) = r {
            debug!(error = %e, "bvcsp sim: HTTP connection ended with an error");
        },
        _ = inner.cancel.cancelled() => {}
    }
}

enum Route {
    Login,
    Refresh,
    Logout,
    PuList,
    AlarmHistory,
}

async fn handle_request(
    inner: Arc<SimServer>,
    mut req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let ws_stream = stream_for_path(&path);
    if is_upgrade_request(&req) {
        return handle_upgrade(&inner, &mut req, ws_stream);
    }
    if ws_stream.is_some() && req.method() == Method::GET {
        return plain(StatusCode::BAD_REQUEST, "websocket upgrade expected");
    }
    let route = match path.as_str() {
        LOGIN_PATH => Route::Login,
        REFRESH_PATH => Route::Refresh,
        LOGOUT_PATH => Route::Logout,
        PU_LIST_PATH => Route::PuList,
        ALARM_HISTORY_PATH => Route::AlarmHistory,
        _ => return plain(StatusCode::NOT_FOUND, "404 page not found"),
    };
    if req.method() != Method::POST {
        return plain(StatusCode::NOT_FOUND, "404 page not found");
    }
    let fault = {
        let mut st = inner.lock();
        *st.counters.rest_calls.entry(path.clone()).or_default() += 1;
        st.rest_fault
    };
    match fault {
        Some(RestFault::ServerError) => {
            return plain(StatusCode::INTERNAL_SERVER_ERROR, "internal server error");
        }
        Some(RestFault::NotJson) => {
            return respond(
                StatusCode::OK,
                "text/html; charset=utf-8",
                "<html><body><h1>502 Bad Gateway</h1></body></html>",
            );
        }
        Some(RestFault::Slow(d)) => {
            tokio::select! {
                _ = tokio::time::sleep(d) => {}
                _ = inner.cancel.cancelled() => {
                    return plain(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
                }
            }
        }
        None => {}
    }
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            debug!(error = %e, "bvcsp sim: could not read request body");
            return plain(StatusCode::BAD_REQUEST, "bad body");
        }
    };
    let reply = match route {
        Route::Login => inner.lock().login(&body),
        Route::Logout => inner.lock().logout(token.as_deref()),
        Route::PuList => inner
            .lock()
            .pu_list(token.as_deref(), &body, inner.started_unix),
        Route::Refresh => return refresh(&inner, token.as_deref()).await,
        Route::AlarmHistory => match inner.lock().alarm_history(token.as_deref(), &body) {
            Some(v) => v,
            None => return plain(StatusCode::NOT_FOUND, "404 page not found"),
        },
    };
    json_reply(&reply)
}

async fn refresh(inner: &Arc<SimServer>, token: Option<&str>) -> Response<Full<Bytes>> {
    let reply = {
        let mut st = inner.lock();
        st.counters.refreshes += 1;
        let Some(token) = st.authorize(token) else {
            return json_reply(&st.code9());
        };
        match st.refresh_mode {
            RefreshMode::NewToken => {
                let new = st.issue_token();
                json!({"code": 0, "msg": "OK", "data": {"token": new, "timeout": st.timeout_secs()}})
            }
            RefreshMode::SameToken => {
                let expires = Instant::now() + st.token_lifetime;
                if let Some(info) = st.tokens.get_mut(&token) {
                    info.expires = expires;
                }
                json!({"code": 0, "msg": "OK", "data": {"token": token, "timeout": st.timeout_secs()}})
            }
            RefreshMode::Code9 => {
                st.invalidate(&token);
                st.code9()
            }
            RefreshMode::ServerError => {
                return plain(StatusCode::INTERNAL_SERVER_ERROR, "internal server error");
            }
            RefreshMode::Hang => Value::Null,
        }
    };
    if reply.is_null() {
        // Hang: only restart or shutdown (which drop the connection) end this.
        inner.cancel.cancelled().await;
        return plain(StatusCode::SERVICE_UNAVAILABLE, "shutting down");
    }
    json_reply(&reply)
}

fn handle_upgrade(
    inner: &Arc<SimServer>,
    req: &mut Request<Incoming>,
    stream: Option<Stream>,
) -> Response<Full<Bytes>> {
    let offered_parts: Vec<String> = req
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|p| p.trim().to_owned())
        .filter(|p| !p.is_empty())
        .collect();
    let offered = (!offered_parts.is_empty()).then(|| offered_parts.join(", "));
    let query_token = req.uri().query().and_then(|q| query_param(q, "token"));
    let key = req
        .headers()
        .get(header::SEC_WEBSOCKET_KEY)
        .map(|k| k.as_bytes().to_vec());
    let version_ok = req
        .headers()
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_some_and(|v| v.as_bytes() == b"13");
    let connection_ok = header_has_token(req, header::CONNECTION, "upgrade");

    let mut st = inner.lock();
    let mut record = UpgradeRecord {
        stream: stream.map(|s| s.name().to_owned()),
        at: std::time::Instant::now(),
        subprotocol: offered.clone(),
        query_token: query_token.clone(),
        accepted: false,
    };
    let reject = |st: &mut State, record: UpgradeRecord, status: StatusCode, text: &'static str| {
        st.upgrades.push(record);
        st.counters.ws_rejected += 1;
        plain(status, text)
    };

    let Some(stream) = stream.filter(|s| !st.disabled.contains(s)) else {
        return reject(&mut st, record, StatusCode::NOT_FOUND, "404 page not found");
    };
    if let Some(status) = st
        .refused
        .get(&stream)
        .and_then(|s| StatusCode::from_u16(*s).ok())
    {
        return reject(&mut st, record, status, "upgrade refused");
    }
    let (Some(key), true, true) = (key, version_ok, connection_ok) else {
        return reject(
            &mut st,
            record,
            StatusCode::BAD_REQUEST,
            "bad websocket handshake",
        );
    };
    match st.subprotocol_mode {
        SubprotocolMode::Reject401 => {
            return reject(&mut st, record, StatusCode::UNAUTHORIZED, "unauthorized");
        }
        SubprotocolMode::Reject403 => {
            return reject(&mut st, record, StatusCode::FORBIDDEN, "forbidden");
        }
        _ => {}
    }

    let mut chosen: Option<(String, bool)> = None;
    if st.accept_header {
        for part in &offered_parts {
            if st.token_valid(part) {
                chosen = Some((part.clone(), true));
                break;
            }
        }
    }
    if chosen.is_none()
        && st.accept_query
        && let Some(q) = query_token.as_deref()
        && st.token_valid(q)
    {
        chosen = Some((q.to_owned(), false));
    }
    let Some((token, from_header)) = chosen else {
        return reject(&mut st, record, StatusCode::UNAUTHORIZED, "unauthorized");
    };

    let echo = match st.subprotocol_mode {
        SubprotocolMode::Echo if from_header => Some(token.clone()),
        SubprotocolMode::Echo => offered_parts.first().cloned(),
        SubprotocolMode::Wrong => Some(WRONG_SUBPROTOCOL.to_owned()),
        _ => None,
    };
    let mut resp = Response::new(Full::new(Bytes::new()));
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(
        header::CONNECTION,
        HeaderValue::from_str(&st.connection_header)
            .unwrap_or_else(|_| HeaderValue::from_static("Upgrade")),
    );
    if let Ok(v) = HeaderValue::from_str(&derive_accept_key(&key)) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    if let Some(v) = echo.and_then(|e| HeaderValue::from_str(&e).ok()) {
        h.insert(header::SEC_WEBSOCKET_PROTOCOL, v);
    }

    // Registered before the 101 goes out, so an inject right after the client's handshake
    // already reaches this socket (frames wait in the channel until the task runs).
    let id = inner.next_id();
    let (out_tx, out_rx) = mpsc::unbounded_channel();
    let (ctrl_tx, ctrl_rx) = mpsc::unbounded_channel();
    st.sockets.insert(
        id,
        SocketEntry {
            stream,
            token,
            out: out_tx,
            ctrl: ctrl_tx,
            subscribed: BTreeSet::new(),
            stalled: false,
        },
    );
    *st.counters
        .ws_upgrades
        .entry(stream.name().to_owned())
        .or_default() += 1;
    record.accepted = true;
    st.upgrades.push(record);
    drop(st);

    let on_upgrade = hyper::upgrade::on(req);
    let task_inner = inner.clone();
    spawn_tracked(inner, id, async move {
        let upgraded = match tokio::time::timeout(HANDSHAKE_TIMEOUT, on_upgrade).await {
            Ok(Ok(u)) => u,
            Ok(Err(e)) => {
                debug!(error = %e, "bvcsp sim: upgrade failed");
                return;
            }
            Err(_) => {
                debug!("bvcsp sim: upgrade timed out");
                return;
            }
        };
        let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        run_socket(task_inner, id, stream, ws, out_rx, ctrl_rx).await;
    });
    resp
}

async fn close_socket<S>(ws: &mut WebSocketStream<S>, code: u16, reason: &str)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let frame = CloseFrame {
        code: code.into(),
        reason: reason.into(),
    };
    let _ = tokio::time::timeout(CLOSE_GRACE, async {
        if ws.close(Some(frame)).await.is_ok() {
            // Let the client's close reply arrive, so it sees a clean close handshake.
            while let Some(Ok(_)) = ws.next().await {}
        }
    })
    .await;
}

fn apply_subscription(set: &mut BTreeSet<String>, text: &str) {
    let Ok(Value::Object(obj)) = serde_json::from_str::<Value>(text) else {
        return;
    };
    let Some(add) = get_ci(&obj, "badd").and_then(Value::as_bool) else {
        return;
    };
    let Some(ids) = get_ci(&obj, "puid").and_then(Value::as_array) else {
        return;
    };
    for id in ids.iter().filter_map(Value::as_str) {
        if add {
            set.insert(id.to_owned());
        } else {
            set.remove(id);
        }
    }
}

/// Frames written per flush at most when many are queued.
const FLOOD_BATCH: u64 = 256;

async fn run_socket<S>(
    inner: Arc<SimServer>,
    id: u64,
    stream: Stream,
    mut ws: WebSocketStream<S>,
    mut out_rx: mpsc::UnboundedReceiver<Message>,
    mut ctrl_rx: mpsc::UnboundedReceiver<Ctrl>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut last_rx = Instant::now();
    let mut stalled = inner.lock().sockets.get(&id).is_some_and(|e| e.stalled);
    loop {
        let idle_deadline = inner.lock().idle_close.map(|d| last_rx + d);
        let idle = async move {
            match idle_deadline {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = inner.cancel.cancelled() => break,
            ctrl = ctrl_rx.recv() => match ctrl {
                // The registry entry is gone (restart): drop TCP without a close frame.
                None | Some(Ctrl::Kick(None)) => break,
                Some(Ctrl::Kick(Some(code))) => {
                    close_socket(&mut ws, code, "closed by server").await;
                    break;
                }
                Some(Ctrl::Stall(s)) => {
                    stalled = s;
                    if !s {
                        last_rx = Instant::now();
                    }
                }
                Some(Ctrl::Wake) => {}
            },
            msg = ws.next(), if !stalled => {
                last_rx = Instant::now();
                match msg {
                    Some(Ok(Message::Text(text))) => {
                        let mut st = inner.lock();
                        st.uplink.entry(stream).or_default().push(text.as_str().to_owned());
                        if stream == Stream::Location
                            && let Some(entry) = st.sockets.get_mut(&id)
                        {
                            apply_subscription(&mut entry.subscribed, text.as_str());
                        }
                    }
                    // Pings are answered by tungstenite on the next poll; close replies too.
                    Some(Ok(_)) => {}
                    Some(Err(e)) => {
                        debug!(stream = stream.name(), error = %e, "bvcsp sim: socket read failed");
                        break;
                    }
                    None => break,
                }
            },
            frame = out_rx.recv(), if !stalled => {
                let Some(frame) = frame else { break };
                // Under a flood, write what is queued in one go (as a busy server's TCP
                // stack would coalesce it): still one WebSocket message per frame.
                let mut batch = 1u64;
                let mut result = ws.feed(frame).await;
                while result.is_ok() && batch < FLOOD_BATCH {
                    match out_rx.try_recv() {
                        Ok(next) => {
                            batch += 1;
                            result = ws.feed(next).await;
                        }
                        Err(_) => break,
                    }
                }
                if let Err(e) = result.and(ws.flush().await) {
                    debug!(stream = stream.name(), error = %e, "bvcsp sim: socket write failed");
                    break;
                }
                *inner.lock().counters.delivered.entry(stream.name().to_owned()).or_default() += batch;
            },
            _ = idle, if !stalled => {
                close_socket(&mut ws, 1000, "idle timeout").await;
                break;
            },
        }
    }
}

/// Which Location sockets a frame goes to.
enum LocationFilter {
    Device(String),
    AnySubscription,
}

fn make_tls() -> io::Result<TlsInfo> {
    let c = crate::cert::self_signed("bvcsp-sim", true)?;
    Ok(TlsInfo {
        acceptor: c.acceptor,
        fingerprint: c.fingerprint,
        pem: c.pem,
    })
}

impl BvcspSim {
    /// Start on `127.0.0.1` with an ephemeral port.
    pub async fn start(opts: SimOptions) -> io::Result<BvcspSim> {
        Self::start_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), opts).await
    }

    /// Start on a given address (the `demo` command uses a fixed port).
    pub async fn start_on(addr: SocketAddr, opts: SimOptions) -> io::Result<BvcspSim> {
        let tls = if opts.tls { Some(make_tls()?) } else { None };
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(SimServer {
            state: Mutex::new(State::new(opts)),
            cancel: CancellationToken::new(),
            addr,
            tls,
            started_unix: unix_now(),
            next_id: AtomicU64::new(1),
        });
        tokio::spawn(accept_loop(inner.clone(), listener));
        Ok(BvcspSim {
            _owner: Arc::new(Owner(inner.clone())),
            inner,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// `http://127.0.0.1:PORT` or `https://…`; an unspecified bind address maps to 127.0.0.1.
    pub fn url(&self) -> String {
        let scheme = if self.inner.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let ip = match self.inner.addr.ip() {
            ip if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            ip => ip,
        };
        format!("{scheme}://{}", SocketAddr::new(ip, self.inner.addr.port()))
    }

    /// Lowercase hex SHA-256 of the leaf certificate's DER, when serving TLS.
    pub fn cert_fingerprint_sha256(&self) -> Option<String> {
        self.inner.tls.as_ref().map(|t| t.fingerprint.clone())
    }

    pub fn cert_pem(&self) -> Option<String> {
        self.inner.tls.as_ref().map(|t| t.pem.clone())
    }

    pub fn set_subprotocol_mode(&self, m: SubprotocolMode) {
        self.inner.lock().subprotocol_mode = m;
    }

    pub fn set_accept_header_token(&self, yes: bool) {
        self.inner.lock().accept_header = yes;
    }

    pub fn set_accept_query_token(&self, yes: bool) {
        self.inner.lock().accept_query = yes;
    }

    /// The `Connection` value of the 101; anything but `Upgrade` trips tungstenite clients.
    pub fn set_connection_header(&self, value: &str) {
        self.inner.lock().connection_header = value.to_owned();
    }

    /// A disabled stream answers 404 on upgrade. Open sockets are left alone.
    pub fn set_stream_enabled(&self, stream: Stream, yes: bool) {
        let mut st = self.inner.lock();
        if yes {
            st.disabled.remove(&stream);
        } else {
            st.disabled.insert(stream);
        }
    }

    /// Refuse upgrades on `stream` with HTTP `status` (say 503) until called with `None`;
    /// REST and the other streams work on. Open sockets are left alone.
    pub fn refuse_upgrades(&self, stream: Stream, status: Option<u16>) {
        let mut st = self.inner.lock();
        match status {
            Some(s) => st.refused.insert(stream, s),
            None => st.refused.remove(&stream),
        };
    }

    /// How the alarm records are served (see [`super::alarm_history`]).
    pub fn set_history_mode(&self, m: HistoryMode) {
        self.inner.lock().history.mode = m;
    }

    pub fn set_history_order(&self, o: HistoryOrder) {
        self.inner.lock().history.order = o;
    }

    /// Applies to alarms raised from now on.
    pub fn set_history_spelling(&self, s: HistorySpelling) {
        self.inner.lock().history.spelling = s;
    }

    /// `pageInfo` with `totalCount` in alarm-record replies, or not.
    pub fn set_history_page_info(&self, yes: bool) {
        self.inner.lock().history.page_info = yes;
    }

    /// How many alarms the server has recorded.
    pub fn history_len(&self) -> usize {
        self.inner.lock().history.len()
    }

    /// Record an alarm as raised without delivering it to any socket (it happened while
    /// nobody listened).
    pub fn raise_unseen(&self, frame: Value) {
        self.inner.lock().history.record(&frame, unix_now());
    }

    pub fn set_refresh_mode(&self, m: RefreshMode) {
        self.inner.lock().refresh_mode = m;
    }

    /// Applies to tokens issued or extended from now on.
    pub fn set_token_lifetime(&self, d: Duration) {
        self.inner.lock().token_lifetime = d;
    }

    /// The next `n` calls to an authenticated endpoint reply code 9 and invalidate the
    /// token they carried.
    pub fn force_code9(&self, n: u32) {
        self.inner.lock().force_code9 = n;
    }

    /// Every known token is invalid from now on; sockets opened with one stay open but
    /// get no more events.
    pub fn expire_all_tokens(&self) {
        self.inner.lock().invalidate_all();
    }

    pub fn set_rest_fault(&self, f: Option<RestFault>) {
        self.inner.lock().rest_fault = f;
    }

    pub fn set_devices(&self, devices: Vec<SimDevice>) {
        self.inner.lock().devices = devices;
    }

    /// Applies at once to open sockets too.
    pub fn set_idle_close(&self, d: Option<Duration>) {
        let mut st = self.inner.lock();
        st.idle_close = d;
        for e in st.sockets.values() {
            let _ = e.ctrl.send(Ctrl::Wake);
        }
    }

    /// Freeze (or thaw) the sockets open right now: no reads, no writes, no pongs, no idle
    /// close. Sockets opened later are not stalled. Injects skip stalled sockets.
    pub fn stall_sockets(&self, yes: bool) {
        let mut st = self.inner.lock();
        for e in st.sockets.values_mut() {
            e.stalled = yes;
            let _ = e.ctrl.send(Ctrl::Stall(yes));
        }
    }

    /// Close the open sockets of one stream (or all): with a close frame carrying
    /// `close_code`, or by dropping TCP without one when `None`.
    pub fn kick_sockets(&self, stream: Option<Stream>, close_code: Option<u16>) {
        let st = self.inner.lock();
        for e in st.sockets.values() {
            if stream.is_none_or(|s| s == e.stream) {
                let _ = e.ctrl.send(Ctrl::Kick(close_code));
            }
        }
    }

    /// Drop every connection at once (no close frames), invalidate all tokens, and refuse
    /// new TCP connections for `down_for` (each is accepted and dropped, and recorded in
    /// [`down_attempts`](Self::down_attempts)). Returns once the connections are gone.
    pub async fn restart(&self, down_for: Duration) {
        let handles = {
            let mut st = self.inner.lock();
            st.down_until = Some(Instant::now() + down_for);
            st.invalidate_all();
            SimServer::take_everything(&mut st)
        };
        let ids: Vec<u64> = handles.iter().map(|(id, _)| *id).collect();
        for (_, h) in handles {
            h.abort();
        }
        let end = std::time::Instant::now() + ABORT_WAIT;
        loop {
            let pending = {
                let st = self.inner.lock();
                ids.iter().any(|id| st.tasks.contains_key(id))
            };
            if !pending || std::time::Instant::now() >= end {
                break;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Send a JSON event as one text frame to every open, non-stalled socket of `stream`
    /// whose token is still valid. On Location, only sockets that subscribed the frame's
    /// `devId` (key matched case-insensitively) get it; a frame without one goes to every
    /// socket that subscribed anything. Returns the number of sockets it was queued to.
    ///
    /// Every alarm injected is also kept in the alarm records, delivered or not.
    pub fn inject(&self, stream: Stream, frame: Value) -> usize {
        if stream == Stream::Alarm {
            let mut st = self.inner.lock();
            let now = unix_now();
            match &frame {
                Value::Array(items) => items.iter().for_each(|f| st.history.record(f, now)),
                f => st.history.record(f, now),
            }
        }
        let filter = frame
            .as_object()
            .and_then(|o| get_ci(o, "devId"))
            .and_then(Value::as_str)
            .map_or(LocationFilter::AnySubscription, |d| {
                LocationFilter::Device(d.to_owned())
            });
        self.deliver(stream, Message::text(frame.to_string()), &filter)
    }

    /// Send any frame (non-JSON text, binary, empty, oversize …) under the same token rules.
    /// On Location it goes to every socket that subscribed anything.
    pub fn inject_raw(&self, stream: Stream, frame: Message) -> usize {
        self.deliver(stream, frame, &LocationFilter::AnySubscription)
    }

    fn deliver(&self, stream: Stream, msg: Message, filter: &LocationFilter) -> usize {
        let now = Instant::now();
        let guard = self.inner.lock();
        let st = &*guard;
        st.sockets
            .values()
            .filter(|e| e.stream == stream && !e.stalled && st.token_live(&e.token, now))
            .filter(|e| {
                stream != Stream::Location
                    || match filter {
                        LocationFilter::Device(d) => e.subscribed.contains(d),
                        LocationFilter::AnySubscription => !e.subscribed.is_empty(),
                    }
            })
            .filter(|e| e.out.send(msg.clone()).is_ok())
            .count()
    }

    pub fn counters(&self) -> SimCounters {
        let st = self.inner.lock();
        let mut c = st.counters.clone();
        c.open_sockets = per_stream();
        for e in st.sockets.values() {
            *c.open_sockets
                .entry(e.stream.name().to_owned())
                .or_default() += 1;
        }
        c
    }

    /// Every text frame the client sent on `stream`, in order, keepalives included.
    pub fn uplink(&self, stream: Stream) -> Vec<String> {
        self.inner
            .lock()
            .uplink
            .get(&stream)
            .cloned()
            .unwrap_or_default()
    }

    /// The union of puids subscribed on the currently open Location sockets.
    pub fn subscribed(&self) -> BTreeSet<String> {
        self.inner
            .lock()
            .sockets
            .values()
            .filter(|e| e.stream == Stream::Location)
            .flat_map(|e| e.subscribed.iter().cloned())
            .collect()
    }

    pub fn upgrades(&self) -> Vec<UpgradeRecord> {
        self.inner.lock().upgrades.clone()
    }

    pub fn down_attempts(&self) -> Vec<std::time::Instant> {
        self.inner.lock().down_attempts.clone()
    }

    pub fn login_attempts(&self) -> u64 {
        let st = self.inner.lock();
        st.counters.logins_ok + st.counters.logins_failed
    }

    pub fn logouts(&self) -> u64 {
        self.inner.lock().counters.logouts
    }

    /// Poll `f` every 10 ms until it holds; panic naming `what` after `deadline` (measured
    /// on the wall clock, so it also works under a paused tokio clock).
    pub async fn wait_until<F: Fn(&BvcspSim) -> bool>(&self, what: &str, deadline: Duration, f: F) {
        super::eventually(what, deadline, || f(self)).await
    }

    /// Stop accepting and drop every connection. Also happens when the last clone drops.
    pub fn shutdown(&self) {
        self.inner.shutdown_now();
    }
}

impl std::fmt::Debug for BvcspSim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BvcspSim")
            .field("url", &self.url())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::auth::{app_token, login_hash as sha256_t};
    use tokio_tungstenite::tungstenite::Error as WsError;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::error::{ProtocolError, SubProtocolError};

    const WAIT: Duration = Duration::from_secs(5);

    type Ws = WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

    async fn post(sim: &BvcspSim, path: &str, token: Option<&str>, body: Value) -> Value {
        let mut req = reqwest::Client::new()
            .post(format!("{}{path}", sim.url()))
            .json(&body);
        if let Some(t) = token {
            req = req.header("Authorization", t);
        }
        let resp = req.send().await.expect("request");
        assert_eq!(resp.status(), 200);
        resp.json().await.expect("json reply")
    }

    async fn login(sim: &BvcspSim, password: &str, ts: i64) -> Value {
        let body = json!({
            "username": "admin",
            "password_encrypted": sha256_t("admin", password, ts),
            "timestamp": ts,
        });
        post(sim, LOGIN_PATH, None, body).await
    }

    async fn token(sim: &BvcspSim) -> String {
        let reply = login(sim, "123456", unix_now()).await;
        reply["data"]["token"].as_str().expect("token").to_owned()
    }

    fn ws_url(sim: &BvcspSim, stream: Stream) -> String {
        format!(
            "{}{}",
            sim.url().replacen("http", "ws", 1),
            stream.default_path()
        )
    }

    async fn connect_header(
        sim: &BvcspSim,
        stream: Stream,
        token: &str,
    ) -> Result<(Ws, hyper::Response<Option<Vec<u8>>>), WsError> {
        let mut req = ws_url(sim, stream).into_client_request().expect("request");
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_str(token).expect("header value"),
        );
        tokio_tungstenite::connect_async(req).await
    }

    async fn open(sim: &BvcspSim, stream: Stream, token: &str) -> Ws {
        connect_header(sim, stream, token).await.expect("upgrade").0
    }

    /// The next text frame, skipping control frames.
    async fn next_text(ws: &mut Ws) -> String {
        loop {
            let msg = tokio::time::timeout(WAIT, ws.next())
                .await
                .expect("frame in time")
                .expect("socket open")
                .expect("frame ok");
            if let Message::Text(t) = msg {
                return t.as_str().to_owned();
            }
        }
    }

    #[tokio::test]
    async fn login_checks_password_and_timestamp() {
        let sim = BvcspSim::start(SimOptions::default()).await.expect("start");
        let now = unix_now();

        let ok = login(&sim, "123456", now).await;
        assert_eq!(ok["code"], 0);
        let token = ok["data"]["token"].as_str().expect("token");
        assert!(token.contains('+') && token.contains('/') && token.contains('='));
        assert_eq!(ok["data"]["timeout"], 14_400);

        assert_eq!(login(&sim, "wrong", now).await["code"], 14);
        assert_eq!(login(&sim, "123456", now - 1000).await["code"], 14);

        // Keys are matched case-insensitively, like the Go server.
        let shouty = json!({
            "Username": "admin",
            "PASSWORD_ENCRYPTED": sha256_t("admin", "123456", now),
            "TimeStamp": now,
        });
        assert_eq!(post(&sim, LOGIN_PATH, None, shouty).await["code"], 0);

        let c = sim.counters();
        assert_eq!((c.logins_ok, c.logins_failed), (2, 2));
        assert_eq!(sim.login_attempts(), 4);
    }

    #[tokio::test]
    async fn pu_list_pages_with_page_info() {
        let devices = vec![
            SimDevice::new("PU_1", "one", true),
            SimDevice::new("PU_2", "two", false),
            SimDevice::new("PU_3", "three", true),
        ];
        let sim = BvcspSim::start(SimOptions {
            devices,
            ..SimOptions::default()
        })
        .await
        .expect("start");
        let t = token(&sim).await;

        let first = json!({"page": 0, "pageSize": 2, "needStatus": true});
        let p0 = post(&sim, PU_LIST_PATH, Some(&t), first).await;
        assert_eq!(p0["code"], 0);
        let data = p0["data"].as_array().expect("array");
        assert_eq!(data.len(), 2);
        assert_eq!(data[0]["id"], "PU_1");
        assert_eq!(data[0]["status"], 1);
        assert_eq!(data[1]["status"], 0);
        assert_eq!(p0["pageInfo"]["totalCount"], 3);

        let second = json!({"page": 1, "pageSize": 2, "needStatus": true});
        let p1 = post(&sim, PU_LIST_PATH, Some(&t), second).await;
        let data = p1["data"].as_array().expect("array");
        assert_eq!(data.len(), 1);
        assert_eq!(data[0]["id"], "PU_3");
        assert_eq!(data[0]["gid"], "G_1");
    }

    #[tokio::test]
    async fn code9_for_expired_invalidated_and_forced() {
        let sim = BvcspSim::start(SimOptions::default()).await.expect("start");
        let body = json!({"page": 0, "pageSize": 10});

        // A zero lifetime expires at issue: deterministic without sleeping.
        sim.set_token_lifetime(Duration::ZERO);
        let reply = login(&sim, "123456", unix_now()).await;
        assert_eq!(reply["data"]["timeout"], 1);
        let t = reply["data"]["token"].as_str().expect("token").to_owned();
        assert_eq!(
            post(&sim, PU_LIST_PATH, Some(&t), body.clone()).await["code"],
            9
        );

        sim.set_token_lifetime(Duration::from_secs(60));
        let t = token(&sim).await;
        assert_eq!(
            post(&sim, PU_LIST_PATH, Some(&t), body.clone()).await["code"],
            0
        );
        sim.force_code9(1);
        assert_eq!(
            post(&sim, PU_LIST_PATH, Some(&t), body.clone()).await["code"],
            9
        );
        // Forced code 9 invalidated the token too.
        assert_eq!(
            post(&sim, PU_LIST_PATH, Some(&t), body.clone()).await["code"],
            9
        );

        let t = token(&sim).await;
        sim.expire_all_tokens();
        assert_eq!(
            post(&sim, PU_LIST_PATH, Some(&t), body.clone()).await["code"],
            9
        );
        assert_eq!(post(&sim, PU_LIST_PATH, None, body).await["code"], 9);
        assert_eq!(sim.counters().rest_code9, 5);
    }

    #[tokio::test]
    async fn refresh_modes_and_logout() {
        let sim = BvcspSim::start(SimOptions::default()).await.expect("start");
        let body = json!({"page": 0, "pageSize": 10});
        let t1 = token(&sim).await;

        let r = post(&sim, REFRESH_PATH, Some(&t1), json!({})).await;
        let t2 = r["data"]["token"].as_str().expect("token").to_owned();
        assert_ne!(t1, t2);
        assert_eq!(
            post(&sim, PU_LIST_PATH, Some(&t1), body.clone()).await["code"],
            0
        );

        sim.set_refresh_mode(RefreshMode::SameToken);
        let r = post(&sim, REFRESH_PATH, Some(&t2), json!({})).await;
        assert_eq!(r["data"]["token"], t2.as_str());

        // The official client logs out with a form content type and no body.
        let resp = reqwest::Client::new()
            .post(format!("{}{LOGOUT_PATH}", sim.url()))
            .header("Authorization", &t2)
            .header("Content-Type", "application/x-www-form-urlencoded")
            .send()
            .await
            .expect("logout");
        let v: Value = resp.json().await.expect("json");
        assert_eq!(v["code"], 0);
        assert_eq!(post(&sim, PU_LIST_PATH, Some(&t2), body).await["code"], 9);
        assert_eq!(sim.logouts(), 1);
        assert_eq!(sim.counters().refreshes, 2);
    }

    #[tokio::test]
    async fn app_token_is_accepted() {
        let (id, key) = (
            "31yOb7ulVXoBLYcRbmFesMu8",
            "dpFhBlov5zOLBqYJXimg6udabM9g30FDJNgt2g",
        );
        let sim = BvcspSim::start(SimOptions {
            app_credentials: Some((id.to_owned(), key.to_owned())),
            ..SimOptions::default()
        })
        .await
        .expect("start");
        let body = json!({"page": 0, "pageSize": 10});
        let good = app_token(id, key, "test", unix_now(), 123_456);
        assert_eq!(
            post(&sim, PU_LIST_PATH, Some(&good), body.clone()).await["code"],
            0
        );
        let stale = app_token(id, key, "test", unix_now() - 1000, 123_456);
        assert_eq!(
            post(&sim, PU_LIST_PATH, Some(&stale), body.clone()).await["code"],
            9
        );
        let forged = app_token(id, "other-key", "test", unix_now(), 123_456);
        assert_eq!(
            post(&sim, PU_LIST_PATH, Some(&forged), body.clone()).await["code"],
            9
        );
        sim.expire_all_tokens();
        assert_eq!(post(&sim, PU_LIST_PATH, Some(&good), body).await["code"], 9);
    }

    #[tokio::test]
    async fn rest_faults() {
        let sim = BvcspSim::start(SimOptions::default()).await.expect("start");
        let url = format!("{}{LOGIN_PATH}", sim.url());
        let client = reqwest::Client::new();
        sim.set_rest_fault(Some(RestFault::ServerError));
        let r = client.post(&url).body("{}").send().await.expect("send");
        assert_eq!(r.status(), 500);
        sim.set_rest_fault(Some(RestFault::NotJson));
        let r = client.post(&url).body("{}").send().await.expect("send");
        assert_eq!(r.status(), 200);
        assert!(r.json::<Value>().await.is_err());
        sim.set_rest_fault(None);
        let r = client
            .post(format!("{}/bvcsp/v1/nope", sim.url()))
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), 404);
        assert_eq!(sim.counters().rest_calls.get(LOGIN_PATH), Some(&2));
        assert_eq!(sim.login_attempts(), 0);
    }

    #[tokio::test]
    async fn subprotocol_echo_withhold_wrong_and_query() {
        let sim = BvcspSim::start(SimOptions::default()).await.expect("start");
        let t = token(&sim).await;

        let (_ws, resp) = connect_header(&sim, Stream::Alarm, &t).await.expect("echo");
        assert_eq!(
            resp.headers()
                .get("sec-websocket-protocol")
                .map(|v| v.as_bytes()),
            Some(t.as_bytes())
        );

        sim.set_subprotocol_mode(SubprotocolMode::Withhold);
        let err = connect_header(&sim, Stream::Alarm, &t)
            .await
            .expect_err("withheld");
        assert!(
            matches!(
                err,
                WsError::Protocol(ProtocolError::SecWebSocketSubProtocolError(
                    SubProtocolError::NoSubProtocol
                ))
            ),
            "{err}"
        );

        sim.set_subprotocol_mode(SubprotocolMode::Wrong);
        let err = connect_header(&sim, Stream::Alarm, &t)
            .await
            .expect_err("wrong");
        assert!(
            matches!(
                err,
                WsError::Protocol(ProtocolError::SecWebSocketSubProtocolError(
                    SubProtocolError::InvalidSubProtocol
                ))
            ),
            "{err}"
        );

        // Query token, percent-encoded: works without the header.
        sim.set_subprotocol_mode(SubprotocolMode::Echo);
        let mut url = reqwest::Url::parse(&ws_url(&sim, Stream::Im)).expect("url");
        url.query_pairs_mut().append_pair("token", &t);
        let (_ws, resp) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .expect("query");
        assert!(resp.headers().get("sec-websocket-protocol").is_none());
        let rec = sim.upgrades().last().cloned().expect("record");
        assert_eq!(rec.query_token.as_deref(), Some(t.as_str()));
        assert!(rec.accepted);

        // An unencoded query token loses its `+` and is refused.
        let raw = format!("{}?token={t}", ws_url(&sim, Stream::Im));
        match tokio_tungstenite::connect_async(raw).await {
            Err(WsError::Http(resp)) => assert_eq!(resp.status(), 401),
            other => panic!("expected 401, got {:?}", other.map(|_| ())),
        }

        sim.set_subprotocol_mode(SubprotocolMode::Reject403);
        match connect_header(&sim, Stream::Alarm, &t).await {
            Err(WsError::Http(resp)) => assert_eq!(resp.status(), 403),
            other => panic!("expected 403, got {:?}", other.map(|_| ())),
        }

        sim.set_subprotocol_mode(SubprotocolMode::Echo);
        sim.set_stream_enabled(Stream::Conference, false);
        match connect_header(&sim, Stream::Conference, &t).await {
            Err(WsError::Http(resp)) => assert_eq!(resp.status(), 404),
            other => panic!("expected 404, got {:?}", other.map(|_| ())),
        }

        sim.set_connection_header("Upgrade, keep-alive");
        let err = connect_header(&sim, Stream::Alarm, &t)
            .await
            .expect_err("strict client");
        assert!(
            matches!(
                err,
                WsError::Protocol(ProtocolError::MissingConnectionUpgradeHeader)
            ),
            "{err}"
        );

        let c = sim.counters();
        assert_eq!(c.ws_upgrades["alarm"], 4);
        assert_eq!(c.ws_upgrades["im"], 1);
        assert_eq!(c.ws_rejected, 3);
    }

    #[tokio::test]
    async fn location_delivers_only_subscribed_devices() {
        let sim = BvcspSim::start(SimOptions::default()).await.expect("start");
        let t = token(&sim).await;
        let mut a = open(&sim, Stream::Location, &t).await;
        let mut b = open(&sim, Stream::Location, &t).await;
        a.send(Message::text(r#"{"badd":true,"puid":["PU_A","PU_X"]}"#))
            .await
            .expect("send");
        b.send(Message::text(r#"{"badd":true,"puid":["PU_B"]}"#))
            .await
            .expect("send");
        a.send(Message::text(r#"{"badd":false,"puid":["PU_X"]}"#))
            .await
            .expect("send");
        let want: BTreeSet<String> = ["PU_A", "PU_B"].map(String::from).into();
        sim.wait_until("both subscribed", WAIT, |s| s.subscribed() == want)
            .await;

        assert_eq!(
            sim.inject(Stream::Location, json!({"devId": "PU_A", "lat": 1.5})),
            1
        );
        assert_eq!(sim.inject(Stream::Location, json!({"devID": "PU_X"})), 0);
        assert_eq!(
            sim.inject(Stream::Location, json!({"devId": "PU_B", "lat": 2.5})),
            1
        );
        assert!(next_text(&mut a).await.contains("PU_A"));
        // B's first frame is its own device: the PU_A fix never reached it.
        assert!(next_text(&mut b).await.contains("PU_B"));
        assert_eq!(sim.uplink(Stream::Location).len(), 3);

        drop(a);
        sim.wait_until("A closed", WAIT, |s| {
            s.counters().open_sockets["location"] == 1
        })
        .await;
        assert_eq!(sim.subscribed(), ["PU_B"].map(String::from).into());
    }

    #[tokio::test]
    async fn expired_token_leaves_a_silent_socket() {
        let sim = BvcspSim::start(SimOptions::default()).await.expect("start");
        let t = token(&sim).await;
        let mut ws = open(&sim, Stream::Alarm, &t).await;
        assert_eq!(sim.inject(Stream::Alarm, json!({"key": "k1"})), 1);
        assert!(next_text(&mut ws).await.contains("k1"));

        sim.expire_all_tokens();
        assert_eq!(sim.inject(Stream::Alarm, json!({"key": "k2"})), 0);
        ws.send(Message::text("")).await.expect("keepalive");
        ws.send(Message::Ping(Bytes::from_static(b"hi")))
            .await
            .expect("ping");
        let frame = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("pong in time");
        let Some(Ok(Message::Pong(pong))) = frame else {
            panic!("expected a pong, got {frame:?}");
        };
        assert_eq!(&pong[..], b"hi");
        sim.wait_until("keepalive recorded", WAIT, |s| {
            s.uplink(Stream::Alarm) == vec![String::new()]
        })
        .await;
        let c = sim.counters();
        assert_eq!(c.open_sockets["alarm"], 1);
        assert_eq!(c.delivered["alarm"], 1);
    }

    #[tokio::test]
    async fn kick_idle_close_and_restart() {
        let sim = BvcspSim::start(SimOptions::default()).await.expect("start");
        let t = token(&sim).await;

        let mut ws = open(&sim, Stream::Alarm, &t).await;
        sim.kick_sockets(Some(Stream::Alarm), Some(4001));
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("in time")
        {
            Some(Ok(Message::Close(Some(f)))) => assert_eq!(u16::from(f.code), 4001),
            other => panic!("expected a close frame, got {other:?}"),
        }

        sim.set_idle_close(Some(Duration::from_millis(100)));
        let mut ws = open(&sim, Stream::Im, &t).await;
        match tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("in time")
        {
            Some(Ok(Message::Close(Some(f)))) => assert_eq!(u16::from(f.code), 1000),
            other => panic!("expected an idle close, got {other:?}"),
        }
        sim.set_idle_close(None);

        let mut ws = open(&sim, Stream::Alarm, &t).await;
        sim.restart(Duration::from_millis(300)).await;
        let after = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("in time");
        assert!(
            !matches!(after, Some(Ok(Message::Close(_)))),
            "restart must not send a close frame"
        );
        assert_eq!(sim.counters().open_sockets["alarm"], 0);
        let body = json!({"page": 0, "pageSize": 1});
        let client = reqwest::Client::new();
        let url = format!("{}{PU_LIST_PATH}", sim.url());
        assert!(client.post(&url).json(&body).send().await.is_err());
        assert!(!sim.down_attempts().is_empty());

        // Back up after the window; the old token did not survive.
        let end = std::time::Instant::now() + WAIT;
        let reply: Value = loop {
            let sent = client
                .post(&url)
                .header("Authorization", &t)
                .json(&body)
                .send()
                .await;
            if let Ok(r) = sent {
                break r.json().await.expect("json");
            }
            assert!(std::time::Instant::now() < end, "server did not come back");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(reply["code"], 9);
    }

    #[tokio::test]
    async fn stalled_socket_is_a_half_open_link() {
        let sim = BvcspSim::start(SimOptions::default()).await.expect("start");
        let t = token(&sim).await;
        let mut ws = open(&sim, Stream::Alarm, &t).await;
        sim.stall_sockets(true);
        assert_eq!(sim.inject(Stream::Alarm, json!({"key": "lost"})), 0);
        ws.send(Message::Ping(Bytes::from_static(b"p")))
            .await
            .expect("ping");
        // A negative check needs some window; 300 ms is far beyond a loopback round trip.
        let quiet = tokio::time::timeout(Duration::from_millis(300), ws.next()).await;
        assert!(quiet.is_err(), "a stalled socket answered: {quiet:?}");

        sim.stall_sockets(false);
        let frame = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("pong after thaw");
        assert!(matches!(frame, Some(Ok(Message::Pong(_)))), "{frame:?}");
        assert_eq!(sim.inject(Stream::Alarm, json!({"key": "k"})), 1);
        assert!(next_text(&mut ws).await.contains("\"k\""));

        sim.kick_sockets(None, None);
        let end = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("in time");
        assert!(
            !matches!(end, Some(Ok(Message::Close(_)))),
            "a TCP drop must not carry a close frame"
        );
    }

    #[tokio::test]
    async fn tls_serves_a_self_signed_ca_cert() {
        let sim = BvcspSim::start(SimOptions {
            tls: true,
            ..SimOptions::default()
        })
        .await
        .expect("start");
        assert!(sim.url().starts_with("https://127.0.0.1:"));
        assert_eq!(sim.cert_fingerprint_sha256().map(|f| f.len()), Some(64));
        assert!(
            sim.cert_pem()
                .is_some_and(|p| p.contains("BEGIN CERTIFICATE"))
        );
        let client = reqwest::Client::builder()
            .tls_danger_accept_invalid_certs(true)
            .build()
            .expect("client");
        let ts = unix_now();
        let body = json!({
            "username": "admin",
            "password_encrypted": sha256_t("admin", "123456", ts),
            "timestamp": ts,
        });
        let v: Value = client
            .post(format!("{}{LOGIN_PATH}", sim.url()))
            .json(&body)
            .send()
            .await
            .expect("send")
            .json()
            .await
            .expect("json");
        assert_eq!(v["code"], 0);
    }

    /// Test-only: trust whatever the simulator presents (the bridge pins the fingerprint).
    #[derive(Debug)]
    struct AcceptAny(Arc<rustls::crypto::CryptoProvider>);

    impl rustls::client::danger::ServerCertVerifier for AcceptAny {
        fn verify_server_cert(
            &self,
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &[rustls::pki_types::CertificateDer<'_>],
            _: &rustls::pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &rustls::pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &rustls::pki_types::CertificateDer<'_>,
            dss: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }

    #[tokio::test]
    async fn wss_upgrade_and_delivery() {
        let sim = BvcspSim::start(SimOptions {
            tls: true,
            ..SimOptions::default()
        })
        .await
        .expect("start");
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
            .with_no_client_auth();
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(cfg.clone())
            .build()
            .expect("client");
        let ts = unix_now();
        let body = json!({
            "username": "admin",
            "password_encrypted": sha256_t("admin", "123456", ts),
            "timestamp": ts,
        });
        let v: Value = client
            .post(format!("{}{LOGIN_PATH}", sim.url()))
            .json(&body)
            .send()
            .await
            .expect("send")
            .json()
            .await
            .expect("json");
        let t = v["data"]["token"].as_str().expect("token");

        let mut req = ws_url(&sim, Stream::OnlineStatus)
            .into_client_request()
            .expect("request");
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_str(t).expect("header"),
        );
        let connector = tokio_tungstenite::Connector::Rustls(Arc::new(cfg));
        let (mut ws, _) =
            tokio_tungstenite::connect_async_tls_with_config(req, None, false, Some(connector))
                .await
                .expect("wss upgrade");
        assert_eq!(
            sim.inject(Stream::OnlineStatus, json!({"type": "PU", "status": 1})),
            1
        );
        assert!(next_text(&mut ws).await.contains("PU"));
    }

    #[test]
    fn form_decoding_matches_go() {
        assert_eq!(form_decode("a%2Bb%2F%3D%3D"), "a+b/==");
        assert_eq!(form_decode("a+b"), "a b");
        assert_eq!(form_decode("100%"), "100%");
        assert_eq!(
            query_param("x=1&token=a%2B", "token").as_deref(),
            Some("a+")
        );
        assert_eq!(
            stream_for_path("/bvcsp/v1/ws/gpsdata/"),
            Some(Stream::Location)
        );
        assert_eq!(stream_for_path("/bvcsp/v1/ws/event/gpsdata"), None);
    }
}
