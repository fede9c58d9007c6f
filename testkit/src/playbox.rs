//! An in-process simulator of a NovaStar Taurus LED play box: the HTTPS terminal API on a
//! self-signed certificate, and the AVON UDP discovery listener.
//!
//! It exists for the integration tests and for `bvcsp2mqtt demo`, and models what
//! `shared/spec/playbox.md` §14 asks for. Like the BVCSP simulator it is *adversarial*:
//! where the real box's behaviour is unknown it picks the reading that is hardest on a
//! client, and each such choice is a knob on [`PlayboxOptions`] or [`PlayboxSim`].
//!
//! # What it serves
//!
//! | path | behaviour |
//! |---|---|
//! | `POST /terminal/core/v1/user/login` | documented login: `loginType` 2, integer `clientId` (404 when `documented_login` is off) |
//! | `POST /terminal/core/v1/login` | fallback login: `loginType` 9, string `clientId` (404 when `fallback_login` is off) |
//! | the chosen [`BRIGHTNESS_PATHS`] entry | `GET` → `{"ratio"}` (+ `brightness`, `solidity`, `orderId` when rich); `POST {"ratio","solidity"?}` |
//! | the chosen [`SCREEN_PATHS`] entry | `GET` → `{"state"}`; `POST {"state": "OPEN"\|"CLOSE"}` (any case) |
//! | the chosen [`VOLUME_PATHS`] entry | `GET` → `{"ratio"}`; `POST {"ratio"}` (absent when `volume` is `None`) |
//! | the chosen [`INFO_PATHS`] entry | `GET` → `sn`, `productName`, `aliasName`, `mainVersion` (`main` on v2), `mac`, `model` |
//! | [`NEVER_CALL_PATHS`] (and `/terminal/core/v1/play/transfer/…`) | any method: recorded in [`PlayboxSim::sets`], then code 0 |
//!
//! Everything else, the candidate paths that were not chosen included, is HTTP 404 with a
//! plain-text body. Replies are HTTP 200 `{"code","message","data"?}`.
//!
//! # Choices where the real box is unknown
//!
//! - Request order: count the request, then [`PlayboxSim::set_hang`], then the
//!   `User-Agent` check (HTTP 400, plain text), then routing. A 404 comes before the token
//!   check; on an existing value path the method is checked (405) before the token.
//! - Login checks, in order: lockout (code 17, even for a malformed or correct request),
//!   JSON object (3), `clientId` type (3), `loginType` 2 or 9 (3), `sn` (empty or not a
//!   string: 3 "invalid sn"; different: 1 "sn not match"; absent: fine), `username` and
//!   `password` strings (3), credentials (24).
//! - The attempt that reaches `lockout_after` consecutive code-24 failures still answers
//!   24; the lock starts after it. While locked every attempt answers 17 and is counted,
//!   but the lock is not extended. When the lock ends, the failure count starts from 0.
//! - [`PlayboxSim::login_failures`] counts code-24 replies only (wrong credentials);
//!   [`PlayboxSim::login_attempts`] counts every request to an existing login path.
//! - Tokens are per `clientId`, compared as strings: integer `1` and string `"1"` are the
//!   same client. A missing, unknown, replaced or expired token answers `expired_code`.
//! - Integer-only firmware rejects a ratio with a fractional part (45.5) with code 3 and
//!   accepts an integral one written as a float (`45.0`), as a Java `int` field parsed
//!   with Gson would.
//! - A brightness `solidity` that is present but not a bool is code 3.
//! - [`PlayboxSim::sets`] records every POST to any candidate value path, including the
//!   candidates that answer 404 (a client must never probe by writing), and every request
//!   to a never-call path, whatever its method and token. Bodies are recorded as JSON,
//!   a non-JSON body as a JSON string, an empty one as `null`.
//! - Out-of-band [`PlayboxSim::set_brightness`] is treated as saved (it survives a
//!   reboot); only HTTP sets without `"solidity": true` revert.
//! - [`PlayboxSim::reboot`] also lifts a lockout, clears the failure count and ends a
//!   hang ([`PlayboxSim::set_hang`]): the box really restarted.
//! - [`PlayboxSim::set_password`] leaves existing tokens valid.
//! - [`PlayboxSim::viplex_login`] logs in in-process and bypasses the lockout and the
//!   counters, so tests count only what the bridge did.
//! - A `*_path` index out of range means that function has no endpoint at all.
//! - `missing_path_code` answers the candidates that do not exist with that code (HTTP
//!   200) instead of 404, after the POST is recorded and before the token check.
//! - [`PlayboxSim::set_value_code`] answers after the token check, for GET and POST;
//!   [`PlayboxSim::set_huge_replies`] after that, for GET only.
//!
//! # Time
//!
//! Token lifetimes, the lockout and the reboot window use [`tokio::time::Instant`], so
//! they follow a paused tokio clock. The token's epoch-milliseconds prefix is wall clock.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use rand::RngCore;
use serde_json::{Map, Value, json};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::protocol::avon;

pub const BRIGHTNESS_PATHS: [&str; 2] = [
    "/terminal/core/v1/screen/brightness",
    "/terminal/core/v1/brightness",
];
pub const SCREEN_PATHS: [&str; 3] = [
    "/terminal/core/v1/screen/power",
    "/terminal/core/v1/screen/status",
    "/terminal/core/v1/screen/power-state",
];
pub const VOLUME_PATHS: [&str; 2] = [
    "/terminal/core/v1/device/volume",
    "/terminal/core/v1/volume",
];
pub const INFO_PATHS: [&str; 2] = ["/terminal/core/v1/version", "/terminal/core/v2/device/info"];

/// Paths from spec §11 the bridge must never call. They answer code 0 (after the token
/// check) and land in [`PlayboxSim::sets`]. Anything under [`NEVER_CALL_PREFIXES`] too.
pub const NEVER_CALL_PATHS: [&str; 11] = [
    "/terminal/core/v1/device/reboot",
    "/terminal/core/v1/advance/restoreFactory",
    "/terminal/core/v1/screen/power-policy",
    "/terminal/core/v1/screen/power/policy",
    "/terminal/core/v1/screen/brightness-policy",
    "/terminal/emergency/v1/device/upgrade",
    "/terminal/core/v1/play/program/list/delete",
    "/terminal/core/v1/play/start",
    "/terminal/core/v1/play/stop",
    "/terminal/tools/v1/file/uploadUseBinary",
    "/terminal/core/v1/ssh/service/status",
];
pub const NEVER_CALL_PREFIXES: [&str; 1] = ["/terminal/core/v1/play/transfer/"];

pub const LOGIN_PATH: &str = "/terminal/core/v1/user/login";
pub const FALLBACK_LOGIN_PATH: &str = "/terminal/core/v1/login";

/// A client that never finishes its TLS handshake must not pin a task for ever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `reboot` waits for the old connections to be gone.
const ABORT_WAIT: Duration = Duration::from_secs(2);
const MAX_BODY: usize = 1 << 20;

/// Start-up configuration; see the module docs for what each knob changes.
#[derive(Clone, Debug)]
pub struct PlayboxOptions {
    pub sn: String,
    pub username: String,
    pub password: String,
    pub product_name: String,
    pub alias_name: String,
    /// Brightness `ratio` in percent.
    pub brightness: f64,
    /// `"OPEN"`, `"CLOSE"` or `"UNKNOW"`.
    pub screen: String,
    /// `None`: no volume endpoint at all (every volume candidate answers 404).
    pub volume: Option<f64>,
    /// Consecutive wrong-credential logins that trigger the lockout (0: never).
    pub lockout_after: u32,
    pub lockout_for: Duration,
    /// `None`: tokens never expire.
    pub token_lifetime: Option<Duration>,
    /// The code for a missing, unknown or expired token.
    pub expired_code: i64,
    /// Index into [`BRIGHTNESS_PATHS`] of the one path that exists.
    pub brightness_path: usize,
    /// Index into [`SCREEN_PATHS`].
    pub screen_path: usize,
    /// Index into [`VOLUME_PATHS`].
    pub volume_path: usize,
    /// Index into [`INFO_PATHS`].
    pub info_path: usize,
    /// `POST /terminal/core/v1/user/login` exists (else 404).
    pub documented_login: bool,
    /// `POST /terminal/core/v1/login` exists (else 404).
    pub fallback_login: bool,
    /// Old firmware: a ratio with a fractional part on set is code 3.
    pub integer_only_brightness: bool,
    /// GET brightness adds `brightness` (0–255), `solidity` and `orderId`.
    pub rich_brightness: bool,
    /// A missing or empty `User-Agent` gets HTTP 400 with a plain-text body.
    pub reject_empty_user_agent: bool,
    /// Answer AVON searches on a UDP socket bound to `127.0.0.1:0`.
    pub udp_discovery: bool,
    /// The code a locked login answers: 17 (ERR_FORBIDDEN) or 67 (ERR_LOGIN_LOCKED).
    pub lockout_code: i64,
    /// `Some(code)`: the candidate paths that do not exist answer HTTP 200 with this
    /// code (e.g. 12 or 36) instead of HTTP 404.
    pub missing_path_code: Option<i64>,
}

impl Default for PlayboxOptions {
    fn default() -> Self {
        PlayboxOptions {
            sn: "2ZTA00000X0A00000000".to_owned(),
            username: "admin".to_owned(),
            password: "SN2008@+".to_owned(),
            product_name: "T2-4G".to_owned(),
            alias_name: "T2-4G_00000000".to_owned(),
            brightness: 50.0,
            screen: "OPEN".to_owned(),
            volume: Some(30.0),
            lockout_after: 3,
            lockout_for: Duration::from_secs(60),
            token_lifetime: None,
            expired_code: 39,
            brightness_path: 0,
            screen_path: 0,
            volume_path: 0,
            info_path: 0,
            documented_login: true,
            fallback_login: true,
            integer_only_brightness: false,
            rich_brightness: false,
            reject_empty_user_agent: true,
            udp_discovery: true,
            lockout_code: 17,
            missing_path_code: None,
        }
    }
}

/// A running play box. Clones share one box; dropping the last clone shuts it down.
#[derive(Clone)]
pub struct PlayboxSim {
    inner: Arc<SimServer>,
    _owner: Arc<Owner>,
}

/// Background tasks hold `SimServer`, not `Owner`, so the box stops once tests let go of it.
struct Owner(Arc<SimServer>);

impl Drop for Owner {
    fn drop(&mut self) {
        self.0.cancel.cancel();
    }
}

#[derive(Clone)]
struct TlsInfo {
    acceptor: tokio_rustls::TlsAcceptor,
    /// The same certificate, the handshake signed with another key.
    impostor: tokio_rustls::TlsAcceptor,
    fingerprint: String,
}

/// The connections of one boot: cancelled together on reboot.
#[derive(Clone)]
struct Epoch {
    kill: CancellationToken,
    tracker: TaskTracker,
}

impl Epoch {
    fn new(parent: &CancellationToken) -> Self {
        Epoch {
            kill: parent.child_token(),
            tracker: TaskTracker::new(),
        }
    }
}

struct SimServer {
    state: Mutex<State>,
    /// Shutdown; every epoch's token is a child of it.
    cancel: CancellationToken,
    addr: SocketAddr,
    udp_addr: Option<SocketAddr>,
    tls: Mutex<TlsInfo>,
    hang: watch::Sender<bool>,
}

struct TokenInfo {
    issued: Instant,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum LoginForm {
    /// `/user/login`, `loginType` 2, integer `clientId`.
    Documented,
    /// `/login`, `loginType` 9, string `clientId`.
    Fallback,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Func {
    Brightness,
    Screen,
    Volume,
    Info,
}

enum Reply {
    Json(Value),
    Status(StatusCode, &'static str),
    /// A successful reply padded to about this many bytes, streamed (chunked, no length).
    Huge(usize),
}

/// Every reply body the simulator sends.
type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

struct State {
    sn: String,
    username: String,
    password: String,
    product_name: String,
    alias_name: String,
    brightness: f64,
    saved_brightness: f64,
    screen: String,
    volume: Option<f64>,
    volume_endpoint: bool,
    lockout_after: u32,
    lockout_for: Duration,
    token_lifetime: Option<Duration>,
    expired_code: i64,
    brightness_path: usize,
    screen_path: usize,
    volume_path: usize,
    info_path: usize,
    documented_login: bool,
    fallback_login: bool,
    integer_only_brightness: bool,
    rich_brightness: bool,
    reject_empty_user_agent: bool,
    lockout_code: i64,
    missing_path_code: Option<i64>,
    /// Set at run time: every request to an existing value path answers this code.
    value_code: Option<i64>,
    /// Set at run time: every GET of an existing value path answers a body this big.
    huge_replies: Option<usize>,
    /// Set at run time: handshakes are signed with a key that is not the certificate's.
    impostor: bool,

    consecutive_failures: u32,
    locked_until: Option<Instant>,
    tokens: HashMap<String, TokenInfo>,
    /// clientId (string form) → its current token.
    by_client: HashMap<String, String>,

    epoch: Epoch,
    down_until: Option<Instant>,
    down_conns: u64,

    login_attempts: u64,
    login_failures: u64,
    lockouts: u64,
    tls_handshakes: u64,
    tls_failures: u64,
    requests: BTreeMap<String, u64>,
    sets: Vec<(String, Value)>,
    user_agents: Vec<String>,
}

fn ok() -> Value {
    json!({"code": 0, "message": ""})
}

fn ok_data(data: Value) -> Value {
    json!({"code": 0, "message": "", "data": data})
}

fn code(code: i64, message: &str) -> Value {
    json!({"code": code, "message": message})
}

fn parse_object(body: &[u8]) -> Option<Map<String, Value>> {
    match serde_json::from_slice(body) {
        Ok(Value::Object(o)) => Some(o),
        _ => None,
    }
}

fn body_value(body: &[u8]) -> Value {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Value::Null;
    }
    serde_json::from_slice(body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()))
}

fn ratio_of(obj: &Map<String, Value>) -> Option<f64> {
    obj.get("ratio")
        .and_then(Value::as_f64)
        .filter(|r| (0.0..=100.0).contains(r))
}

fn is_never_call(path: &str) -> bool {
    NEVER_CALL_PATHS.contains(&path) || NEVER_CALL_PREFIXES.iter().any(|p| path.starts_with(p))
}

fn new_token() -> String {
    let ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let mut raw = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut raw);
    format!(
        "{ms:013}{}",
        base64::engine::general_purpose::STANDARD.encode(raw)
    )
}

impl State {
    fn new(opts: PlayboxOptions, epoch: Epoch) -> Self {
        State {
            sn: opts.sn,
            username: opts.username,
            password: opts.password,
            product_name: opts.product_name,
            alias_name: opts.alias_name,
            brightness: opts.brightness,
            saved_brightness: opts.brightness,
            screen: opts.screen,
            volume_endpoint: opts.volume.is_some(),
            volume: opts.volume,
            lockout_after: opts.lockout_after,
            lockout_for: opts.lockout_for,
            token_lifetime: opts.token_lifetime,
            expired_code: opts.expired_code,
            brightness_path: opts.brightness_path,
            screen_path: opts.screen_path,
            volume_path: opts.volume_path,
            info_path: opts.info_path,
            documented_login: opts.documented_login,
            fallback_login: opts.fallback_login,
            integer_only_brightness: opts.integer_only_brightness,
            rich_brightness: opts.rich_brightness,
            reject_empty_user_agent: opts.reject_empty_user_agent,
            lockout_code: opts.lockout_code,
            missing_path_code: opts.missing_path_code,
            value_code: None,
            huge_replies: None,
            impostor: false,
            consecutive_failures: 0,
            locked_until: None,
            tokens: HashMap::new(),
            by_client: HashMap::new(),
            epoch,
            down_until: None,
            down_conns: 0,
            login_attempts: 0,
            login_failures: 0,
            lockouts: 0,
            tls_handshakes: 0,
            tls_failures: 0,
            requests: BTreeMap::new(),
            sets: Vec::new(),
            user_agents: Vec::new(),
        }
    }

    fn locked(&self) -> bool {
        self.locked_until.is_some_and(|t| Instant::now() < t)
    }

    fn down(&self) -> bool {
        self.down_until.is_some_and(|t| Instant::now() < t)
    }

    fn token_valid(&self, token: &str) -> bool {
        self.tokens.get(token).is_some_and(|t| {
            self.token_lifetime
                .is_none_or(|life| Instant::now() < t.issued + life)
        })
    }

    fn clear_tokens(&mut self) {
        self.tokens.clear();
        self.by_client.clear();
    }

    /// A new token for `client`; the client's previous token stops working.
    fn issue_token(&mut self, client: String) -> String {
        let token = new_token();
        if let Some(old) = self.by_client.insert(client, token.clone()) {
            self.tokens.remove(&old);
        }
        self.tokens.insert(
            token.clone(),
            TokenInfo {
                issued: Instant::now(),
            },
        );
        token
    }

    fn expired(&self) -> Value {
        code(self.expired_code, "token expired")
    }

    fn login(&mut self, form: LoginForm, body: &[u8]) -> Value {
        self.login_attempts += 1;
        if self.locked() {
            return code(
                self.lockout_code,
                "too many login attempts, try again later",
            );
        }
        let Some(obj) = parse_object(body) else {
            return code(3, "invalid param");
        };
        let client = match (form, obj.get("clientId")) {
            (LoginForm::Documented, Some(v @ Value::Number(n))) if n.is_i64() || n.is_u64() => {
                v.to_string()
            }
            (LoginForm::Fallback, Some(Value::String(s))) => s.clone(),
            _ => return code(3, "invalid clientId"),
        };
        let want_type = match form {
            LoginForm::Documented => 2,
            LoginForm::Fallback => 9,
        };
        if obj.get("loginType").and_then(Value::as_i64) != Some(want_type) {
            return code(3, "invalid loginType");
        }
        match obj.get("sn") {
            None => {}
            Some(Value::String(s)) if s.is_empty() => return code(3, "invalid sn"),
            Some(Value::String(s)) if *s != self.sn => return code(1, "sn not match"),
            Some(Value::String(_)) => {}
            Some(_) => return code(3, "invalid sn"),
        }
        let (Some(user), Some(pass)) = (
            obj.get("username").and_then(Value::as_str),
            obj.get("password").and_then(Value::as_str),
        ) else {
            return code(3, "invalid param");
        };
        if user != self.username || pass != self.password {
            self.login_failures += 1;
            self.consecutive_failures += 1;
            if self.lockout_after > 0 && self.consecutive_failures >= self.lockout_after {
                self.consecutive_failures = 0;
                self.locked_until = Some(Instant::now() + self.lockout_for);
                self.lockouts += 1;
            }
            return json!({
                "code": 24,
                "message": "username or password error",
                "data": {"logined": false, "validation": false},
            });
        }
        self.consecutive_failures = 0;
        let token = self.issue_token(client);
        ok_data(json!({
            "logined": true,
            "validation": true,
            "sn": self.sn,
            "username": self.username,
            "token": token,
        }))
    }

    /// Which function `path` is a candidate of, and whether it is the one that exists.
    fn value_path(&self, path: &str) -> Option<(Func, bool)> {
        let lists: [(Func, &[&str], usize, bool); 4] = [
            (
                Func::Brightness,
                &BRIGHTNESS_PATHS,
                self.brightness_path,
                true,
            ),
            (Func::Screen, &SCREEN_PATHS, self.screen_path, true),
            (
                Func::Volume,
                &VOLUME_PATHS,
                self.volume_path,
                self.volume_endpoint,
            ),
            (Func::Info, &INFO_PATHS, self.info_path, true),
        ];
        lists.iter().find_map(|(func, paths, chosen, enabled)| {
            let i = paths.iter().position(|p| *p == path)?;
            Some((*func, *enabled && i == *chosen))
        })
    }

    fn route(&mut self, method: &Method, path: &str, token: Option<&str>, body: &[u8]) -> Reply {
        let login = match path {
            LOGIN_PATH if self.documented_login => Some(LoginForm::Documented),
            FALLBACK_LOGIN_PATH if self.fallback_login => Some(LoginForm::Fallback),
            _ => None,
        };
        if let Some(form) = login {
            if method != Method::POST {
                return Reply::Status(StatusCode::METHOD_NOT_ALLOWED, "405 method not allowed");
            }
            return Reply::Json(self.login(form, body));
        }
        if is_never_call(path) {
            self.sets.push((path.to_owned(), body_value(body)));
            if !token.is_some_and(|t| self.token_valid(t)) {
                return Reply::Json(self.expired());
            }
            return Reply::Json(ok());
        }
        let Some((func, exists)) = self.value_path(path) else {
            return Reply::Status(StatusCode::NOT_FOUND, "404 not found");
        };
        if *method == Method::POST && func != Func::Info {
            self.sets.push((path.to_owned(), body_value(body)));
        }
        if !exists {
            if let Some(c) = self.missing_path_code {
                return Reply::Json(code(c, "not supported"));
            }
            return Reply::Status(StatusCode::NOT_FOUND, "404 not found");
        }
        let allowed = *method == Method::GET || (*method == Method::POST && func != Func::Info);
        if !allowed {
            return Reply::Status(StatusCode::METHOD_NOT_ALLOWED, "405 method not allowed");
        }
        if !token.is_some_and(|t| self.token_valid(t)) {
            return Reply::Json(self.expired());
        }
        if let Some(c) = self.value_code {
            return Reply::Json(code(c, "simulated failure"));
        }
        let get = *method == Method::GET;
        if let Some(n) = self.huge_replies.filter(|_| get) {
            return Reply::Huge(n);
        }
        Reply::Json(match func {
            Func::Brightness if get => self.get_brightness(),
            Func::Brightness => self.set_brightness(body),
            Func::Screen if get => ok_data(json!({"state": self.screen})),
            Func::Screen => self.set_screen(body),
            Func::Volume if get => ok_data(json!({"ratio": self.volume})),
            Func::Volume => self.set_volume(body),
            Func::Info => self.info(),
        })
    }

    fn get_brightness(&self) -> Value {
        let mut data = json!({"ratio": self.brightness});
        if self.rich_brightness {
            data["brightness"] = json!((self.brightness * 255.0 / 100.0).round() as i64);
            data["solidity"] = json!(false);
            data["orderId"] = json!(-1);
        }
        ok_data(data)
    }

    fn set_brightness(&mut self, body: &[u8]) -> Value {
        let Some(obj) = parse_object(body) else {
            return code(3, "invalid param");
        };
        let Some(ratio) = ratio_of(&obj) else {
            return code(3, "invalid ratio");
        };
        if self.integer_only_brightness && ratio.fract() != 0.0 {
            return code(3, "invalid ratio");
        }
        let solidity = match obj.get("solidity") {
            None => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return code(3, "invalid solidity"),
        };
        self.brightness = ratio;
        if solidity {
            self.saved_brightness = ratio;
        }
        ok()
    }

    fn set_screen(&mut self, body: &[u8]) -> Value {
        let state = parse_object(body)
            .and_then(|o| o.get("state").and_then(Value::as_str).map(str::to_owned))
            .map(|s| s.to_ascii_uppercase());
        match state.as_deref() {
            Some(s @ ("OPEN" | "CLOSE")) => {
                self.screen = s.to_owned();
                ok()
            }
            _ => code(3, "invalid state"),
        }
    }

    fn set_volume(&mut self, body: &[u8]) -> Value {
        match parse_object(body).as_ref().and_then(ratio_of) {
            Some(r) => {
                self.volume = Some(r);
                ok()
            }
            None => code(3, "invalid ratio"),
        }
    }

    fn info(&self) -> Value {
        let version_key = if self.info_path == 1 {
            "main"
        } else {
            "mainVersion"
        };
        let mut data = json!({
            "sn": self.sn,
            "productName": self.product_name,
            "aliasName": self.alias_name,
            "mac": "00:11:22:33:44:55",
            "model": "T2",
        });
        data[version_key] = json!("V4.6.2");
        ok_data(data)
    }

    fn discovery_body(&self, https_port: u16) -> Value {
        json!({
            "aliasName": self.alias_name,
            "encodeType": 0,
            "ftpPort": 16602,
            "height": 256,
            "key": "novaStar",
            "logined": false,
            "loginedUsernames": [""],
            "modelId": 38411,
            "platform": "rk312x",
            "privacy": true,
            "productName": self.product_name,
            "rotation": 0,
            "sn": self.sn,
            "syssetFtpPort": 16604,
            "syssetTcpPort": 16607,
            "tcpPort": 16606,
            "terminalEntrancePortHttps": https_port,
            "terminalEntrancePortWebSocket": 16675,
            "width": 192,
        })
    }
}

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut resp = Response::new(Full::new(body.into()).boxed());
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// `{"code":0,"message":"","data":{"ratio":50,"pad":"xxx…"}}`, about `size` bytes, in
/// 64 KiB chunks with no `Content-Length`: valid, and only a size cap can refuse it.
fn huge(size: usize) -> Response<Body> {
    use futures_util::stream;
    use hyper::body::Frame;
    const CHUNK: usize = 64 << 10;
    let head = Bytes::from_static(br#"{"code":0,"message":"","data":{"ratio":50,"pad":""#);
    let tail = Bytes::from_static(br#""}}"#);
    let pad = Bytes::from(vec![b'x'; CHUNK]);
    let chunks = std::iter::once(head)
        .chain(std::iter::repeat_n(pad, size / CHUNK))
        .chain(std::iter::once(tail))
        .map(|b| Ok::<_, Infallible>(Frame::data(b)));
    let body = http_body_util::StreamBody::new(stream::iter(chunks));
    let mut resp = Response::new(BodyExt::boxed(body));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json;charset=utf-8"),
    );
    resp
}

fn plain(status: StatusCode, text: &'static str) -> Response<Body> {
    respond(status, "text/plain; charset=utf-8", text)
}

impl SimServer {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic in one handler must not take the whole simulator down with it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn tls(&self) -> TlsInfo {
        self.tls.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

fn make_tls() -> io::Result<TlsInfo> {
    let c = crate::cert::self_signed("taurus-sim", false)?;
    Ok(TlsInfo {
        acceptor: c.acceptor,
        impostor: c.impostor,
        fingerprint: c.fingerprint,
    })
}

async fn accept_loop(inner: Arc<SimServer>, listener: TcpListener) {
    loop {
        let accepted = tokio::select! {
            _ = inner.cancel.cancelled() => return,
            r = listener.accept() => r,
        };
        let tcp = match accepted {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                warn!(error = %e, "playbox sim: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (epoch, window) = {
            let mut st = inner.lock();
            let window = match st.down_until {
                Some(until) if Instant::now() < until => {
                    st.down_conns += 1;
                    Some((until, st.down_conns.is_multiple_of(2)))
                }
                _ => None,
            };
            (st.epoch.clone(), window)
        };
        match window {
            // Booting, odd attempts: accept, then reset.
            Some((_, false)) => {
                let _ = tcp.set_zero_linger();
                drop(tcp);
            }
            // Booting, even attempts: accept and say nothing until the window ends.
            Some((until, true)) => {
                let kill = epoch.kill.clone();
                epoch.tracker.spawn(async move {
                    tokio::select! {
                        _ = tokio::time::sleep_until(until) => {}
                        _ = kill.cancelled() => {}
                    }
                    let _ = tcp.set_zero_linger();
                    drop(tcp);
                });
            }
            None => {
                let kill = epoch.kill.clone();
                epoch
                    .tracker
                    .spawn(serve_connection(inner.clone(), tcp, kill));
            }
        }
    }
}

async fn serve_connection(inner: Arc<SimServer>, tcp: TcpStream, kill: CancellationToken) {
    let _ = tcp.set_nodelay(true);
    let tls = inner.tls();
    let acceptor = if inner.lock().impostor {
        tls.impostor
    } else {
        tls.acceptor
    };
    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp));
    let stream = tokio::select! {
        _ = kill.cancelled() => return,
        r = handshake => match r {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                debug!(error = %e, "playbox sim: TLS handshake failed");
                inner.lock().tls_failures += 1;
                return;
            }
            Err(_) => {
                debug!("playbox sim: TLS handshake timed out");
                return;
            }
        },
    };
    inner.lock().tls_handshakes += 1;
    let svc_inner = inner.clone();
    let svc_kill = kill.clone();
    let svc = hyper::service::service_fn(move |req| {
        let inner = svc_inner.clone();
        let kill = svc_kill.clone();
        async move { Ok::<_, Infallible>(handle_request(inner, req, kill).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), svc);
    tokio::select! {
        r = conn => if let Err(e) = r {
            debug!(error = %e, "playbox sim: HTTP connection ended with an error");
        },
        _ = kill.cancelled() => {}
    }
}

async fn handle_request(
    inner: Arc<SimServer>,
    req: Request<Incoming>,
    kill: CancellationToken,
) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let user_agent = req
        .headers()
        .get(header::USER_AGENT)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .filter(|ua| !ua.trim().is_empty());
    let reject_ua = {
        let mut st = inner.lock();
        *st.requests.entry(path.clone()).or_default() += 1;
        if let Some(ua) = &user_agent
            && !st.user_agents.contains(ua)
        {
            st.user_agents.push(ua.clone());
        }
        st.reject_empty_user_agent && user_agent.is_none()
    };

    let mut hang = inner.hang.subscribe();
    if *hang.borrow_and_update() {
        tokio::select! {
            _ = hang.wait_for(|h| !*h) => {}
            _ = kill.cancelled() => return plain(StatusCode::SERVICE_UNAVAILABLE, "rebooting"),
        }
    }
    if reject_ua {
        return plain(StatusCode::BAD_REQUEST, "Bad Request");
    }

    let method = req.method().clone();
    let token = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            debug!(error = %e, "playbox sim: could not read request body");
            return plain(StatusCode::BAD_REQUEST, "Bad Request");
        }
    };
    let reply = inner.lock().route(&method, &path, token.as_deref(), &body);
    match reply {
        Reply::Json(v) => respond(
            StatusCode::OK,
            "application/json;charset=utf-8",
            v.to_string(),
        ),
        Reply::Status(status, text) => plain(status, text),
        Reply::Huge(size) => huge(size),
    }
}

async fn udp_loop(inner: Arc<SimServer>, sock: UdpSocket) {
    let mut buf = vec![0u8; 2048];
    loop {
        let received = tokio::select! {
            _ = inner.cancel.cancelled() => return,
            r = sock.recv_from(&mut buf) => r,
        };
        let (n, peer) = match received {
            Ok(x) => x,
            Err(e) => {
                // ICMP errors from earlier sends surface here on Linux; keep going.
                debug!(error = %e, "playbox sim: UDP receive failed");
                continue;
            }
        };
        if !avon::is_search(&buf[..n]) {
            continue;
        }
        let body = {
            let st = inner.lock();
            if st.down() {
                continue;
            }
            st.discovery_body(inner.addr.port())
        };
        if let Err(e) = sock.send_to(&avon::build_reply(&body), peer).await {
            debug!(error = %e, %peer, "playbox sim: UDP reply failed");
        }
    }
}

impl PlayboxSim {
    /// Serve HTTPS on `127.0.0.1:0`, and answer discovery on another `127.0.0.1:0` UDP
    /// socket when `opts.udp_discovery` is set.
    pub async fn start(opts: PlayboxOptions) -> io::Result<PlayboxSim> {
        let tls = make_tls()?;
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let udp = if opts.udp_discovery {
            Some(UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).await?)
        } else {
            None
        };
        let udp_addr = udp.as_ref().map(UdpSocket::local_addr).transpose()?;
        let cancel = CancellationToken::new();
        let epoch = Epoch::new(&cancel);
        let (hang, _) = watch::channel(false);
        let inner = Arc::new(SimServer {
            state: Mutex::new(State::new(opts, epoch)),
            cancel,
            addr,
            udp_addr,
            tls: Mutex::new(tls),
            hang,
        });
        tokio::spawn(accept_loop(inner.clone(), listener));
        if let Some(sock) = udp {
            tokio::spawn(udp_loop(inner.clone(), sock));
        }
        Ok(PlayboxSim {
            _owner: Arc::new(Owner(inner.clone())),
            inner,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.inner.addr
    }

    /// `https://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("https://{}", self.inner.addr)
    }

    /// Where discovery searches go; `None` when `udp_discovery` is off.
    pub fn udp_addr(&self) -> Option<SocketAddr> {
        self.inner.udp_addr
    }

    /// Lowercase hex SHA-256 of the DER of the certificate served right now.
    pub fn cert_fingerprint_sha256(&self) -> String {
        self.inner.tls().fingerprint
    }

    /// Brightness `ratio` the screen shows now.
    pub fn brightness(&self) -> f64 {
        self.inner.lock().brightness
    }

    pub fn screen(&self) -> String {
        self.inner.lock().screen.clone()
    }

    pub fn volume(&self) -> Option<f64> {
        self.inner.lock().volume
    }

    /// An operator or a schedule changed the brightness. It counts as saved.
    pub fn set_brightness(&self, v: f64) {
        let mut st = self.inner.lock();
        st.brightness = v;
        st.saved_brightness = v;
    }

    /// Any string, `"UNKNOW"` included; stored as given.
    pub fn set_screen(&self, s: &str) {
        self.inner.lock().screen = s.to_owned();
    }

    /// Has no effect on the endpoints' existence: a box started with `volume: None` keeps
    /// answering 404 on the volume paths, but `volume()` reports the value.
    pub fn set_volume(&self, v: f64) {
        self.inner.lock().volume = Some(v);
    }

    /// Existing tokens stay valid.
    pub fn set_password(&self, p: &str) {
        self.inner.lock().password = p.to_owned();
    }

    /// Lock logins now, for `lock_for`, as three wrong passwords would (answered with
    /// `lockout_code`). Counted in [`PlayboxSim::lockouts`].
    pub fn lock_out(&self, lock_for: Duration) {
        let mut st = self.inner.lock();
        st.locked_until = Some(Instant::now() + lock_for);
        st.lockouts += 1;
    }

    /// `Some(code)`: every request to an existing value path (with a valid token)
    /// answers `code` with HTTP 200, e.g. 38 "screen not connected". `None`: normal.
    pub fn set_value_code(&self, code: Option<i64>) {
        self.inner.lock().value_code = code;
    }

    /// `Some(bytes)`: every GET of an existing value path (with a valid token) answers a
    /// valid reply padded to about `bytes`, streamed without a length. `None`: normal.
    pub fn set_huge_replies(&self, bytes: Option<usize>) {
        self.inner.lock().huge_replies = bytes;
    }

    /// Every current token answers `expired_code` from now on.
    pub fn expire_tokens(&self) {
        self.inner.lock().clear_tokens();
    }

    /// While set, HTTP requests (on new or kept-alive connections) are read and never
    /// answered. Clearing it lets the waiting requests through and answers new ones.
    pub fn set_hang(&self, yes: bool) {
        self.inner.hang.send_replace(yes);
    }

    /// Drop every connection, invalidate every token, revert unsaved brightness, lift a
    /// lockout and a hang. For `down_for`, new TCP connections are accepted and then
    /// alternately reset at once or held silent (TLS never starts) until the window ends,
    /// and discovery goes unanswered. Returns once the old connections are gone.
    pub async fn reboot(&self, down_for: Duration) {
        let old = {
            let mut st = self.inner.lock();
            st.down_until = Some(Instant::now() + down_for);
            st.down_conns = 0;
            st.clear_tokens();
            st.brightness = st.saved_brightness;
            st.locked_until = None;
            st.consecutive_failures = 0;
            let fresh = Epoch::new(&self.inner.cancel);
            std::mem::replace(&mut st.epoch, fresh)
        };
        self.inner.hang.send_replace(false);
        old.kill.cancel();
        old.tracker.close();
        let _ = tokio::time::timeout(ABORT_WAIT, old.tracker.wait()).await;
    }

    /// Serve a new self-signed certificate to every TLS handshake from now on.
    pub fn regenerate_certificate(&self) {
        match make_tls() {
            Ok(tls) => *self.inner.tls.lock().unwrap_or_else(|e| e.into_inner()) = tls,
            Err(e) => warn!(error = %e, "playbox sim: could not make a new certificate"),
        }
    }

    /// ViPlex Express logs in with `clientId` 1. In-process: no lockout, no counters.
    pub async fn viplex_login(&self) -> String {
        self.inner.lock().issue_token("1".to_owned())
    }

    pub fn token_valid(&self, token: &str) -> bool {
        self.inner.lock().token_valid(token)
    }

    /// Every request to an existing login path, whatever the reply.
    pub fn login_attempts(&self) -> u64 {
        self.inner.lock().login_attempts
    }

    /// Code-24 replies (wrong username or password).
    pub fn login_failures(&self) -> u64 {
        self.inner.lock().login_failures
    }

    /// How many times the lockout was triggered.
    pub fn lockouts(&self) -> u64 {
        self.inner.lock().lockouts
    }

    pub fn locked(&self) -> bool {
        self.inner.lock().locked()
    }

    /// Requests seen on `path` (any method, any reply, counted on arrival).
    pub fn requests(&self, path: &str) -> u64 {
        self.inner.lock().requests.get(path).copied().unwrap_or(0)
    }

    /// Every POST to a candidate value path (existing or not) and every request to a
    /// never-call path, in order: `(path, body)`.
    pub fn sets(&self) -> Vec<(String, Value)> {
        self.inner.lock().sets.clone()
    }

    /// Distinct non-empty `User-Agent` values, in order of first appearance.
    pub fn user_agents(&self) -> Vec<String> {
        self.inner.lock().user_agents.clone()
    }

    /// Completed TLS handshakes.
    pub fn tls_handshakes(&self) -> u64 {
        self.inner.lock().tls_handshakes
    }

    /// TLS handshakes that failed (the client gave up or refused the server).
    pub fn tls_failures(&self) -> u64 {
        self.inner.lock().tls_failures
    }

    /// While set, new connections get the box's own certificate but a handshake signed
    /// with another key, as from a machine in the middle that copied the certificate:
    /// a client that checks the signature refuses every handshake.
    pub fn set_impostor(&self, yes: bool) {
        self.inner.lock().impostor = yes;
    }

    /// Poll `f` every 10 ms until it holds; panic naming `what` after `deadline` (measured
    /// on the wall clock, so it also works under a paused tokio clock).
    pub async fn wait_until<F: Fn(&PlayboxSim) -> bool>(
        &self,
        what: &str,
        deadline: Duration,
        f: F,
    ) {
        super::eventually(what, deadline, || f(self)).await
    }

    /// Stop listening and drop every connection. Also happens when the last clone drops.
    pub fn shutdown(&self) {
        self.inner.cancel.cancel();
    }
}

impl std::fmt::Debug for PlayboxSim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PlayboxSim")
            .field("url", &self.url())
            .field("udp", &self.udp_addr())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    const WAIT: Duration = Duration::from_secs(5);

    fn client_with(timeout: Duration) -> reqwest::Client {
        reqwest::Client::builder()
            .tls_danger_accept_invalid_certs(true)
            .user_agent("playbox-sim-test/1")
            .http1_only()
            .timeout(timeout)
            .build()
            .expect("client")
    }

    fn client() -> reqwest::Client {
        client_with(WAIT)
    }

    async fn post(
        c: &reqwest::Client,
        sim: &PlayboxSim,
        path: &str,
        token: Option<&str>,
        body: Value,
    ) -> Value {
        let mut req = c.post(format!("{}{path}", sim.url())).json(&body);
        if let Some(t) = token {
            req = req.header("Authorization", t);
        }
        let resp = req.send().await.expect("request");
        assert_eq!(resp.status(), 200, "POST {path}");
        resp.json().await.expect("json reply")
    }

    async fn get(c: &reqwest::Client, sim: &PlayboxSim, path: &str, token: &str) -> Value {
        let resp = c
            .get(format!("{}{path}", sim.url()))
            .header("Authorization", token)
            .send()
            .await
            .expect("request");
        assert_eq!(resp.status(), 200, "GET {path}");
        resp.json().await.expect("json reply")
    }

    async fn status(
        c: &reqwest::Client,
        sim: &PlayboxSim,
        method: Method,
        path: &str,
        token: &str,
    ) -> u16 {
        c.request(method, format!("{}{path}", sim.url()))
            .header("Authorization", token)
            .json(&json!({"ratio": 10}))
            .send()
            .await
            .expect("request")
            .status()
            .as_u16()
    }

    fn doc_login(password: &str, client_id: Value) -> Value {
        json!({
            "sn": "2ZTA00000X0A00000000", "username": "admin", "password": password,
            "loginType": 2, "clientId": client_id, "clientName": "test",
        })
    }

    fn fallback_login(password: &str, client_id: Value) -> Value {
        json!({
            "sn": "2ZTA00000X0A00000000", "username": "admin", "password": password,
            "loginType": 9, "clientId": client_id, "clientName": "test",
            "source": {"type": 0, "platform": 2, "platformVersion": "4.0.1"},
        })
    }

    async fn login(c: &reqwest::Client, sim: &PlayboxSim, client_id: i64) -> String {
        let v = post(
            c,
            sim,
            LOGIN_PATH,
            None,
            doc_login("SN2008@+", json!(client_id)),
        )
        .await;
        assert_eq!(v["code"], 0, "{v}");
        v["data"]["token"].as_str().expect("token").to_owned()
    }

    async fn start(opts: PlayboxOptions) -> PlayboxSim {
        PlayboxSim::start(opts).await.expect("start")
    }

    #[tokio::test]
    async fn login_in_both_forms() {
        let sim = start(PlayboxOptions::default()).await;
        let c = client();
        assert!(sim.url().starts_with("https://127.0.0.1:"));
        assert_eq!(sim.cert_fingerprint_sha256().len(), 64);

        let v = post(
            &c,
            &sim,
            LOGIN_PATH,
            None,
            doc_login("SN2008@+", json!(731942)),
        )
        .await;
        assert_eq!(v["code"], 0, "{v}");
        assert_eq!(v["data"]["logined"], true);
        assert_eq!(v["data"]["validation"], true);
        assert_eq!(v["data"]["sn"], "2ZTA00000X0A00000000");
        assert_eq!(v["data"]["username"], "admin");
        let t = v["data"]["token"].as_str().expect("token");
        assert!(
            t.len() > 13 && t[..13].bytes().all(|b| b.is_ascii_digit()),
            "{t}"
        );
        assert_eq!(
            get(&c, &sim, BRIGHTNESS_PATHS[0], t).await["data"]["ratio"],
            50.0
        );

        let v = post(
            &c,
            &sim,
            FALLBACK_LOGIN_PATH,
            None,
            fallback_login("SN2008@+", json!("bridge-5f3a9c")),
        )
        .await;
        assert_eq!(v["code"], 0, "{v}");
        let t2 = v["data"]["token"].as_str().expect("token");
        assert!(sim.token_valid(t) && sim.token_valid(t2));

        // The clientId type belongs to the form.
        let v = post(
            &c,
            &sim,
            LOGIN_PATH,
            None,
            doc_login("SN2008@+", json!("731942")),
        )
        .await;
        assert_eq!(v["code"], 3);
        let v = post(
            &c,
            &sim,
            FALLBACK_LOGIN_PATH,
            None,
            fallback_login("SN2008@+", json!(5)),
        )
        .await;
        assert_eq!(v["code"], 3);

        // SN rules.
        let mut body = doc_login("SN2008@+", json!(7));
        body["sn"] = json!("OTHER");
        let v = post(&c, &sim, LOGIN_PATH, None, body.clone()).await;
        assert_eq!(
            (v["code"].as_i64(), v["message"].as_str()),
            (Some(1), Some("sn not match"))
        );
        body["sn"] = json!("");
        let v = post(&c, &sim, LOGIN_PATH, None, body.clone()).await;
        assert_eq!(
            (v["code"].as_i64(), v["message"].as_str()),
            (Some(3), Some("invalid sn"))
        );
        body.as_object_mut().expect("object").remove("sn");
        assert_eq!(post(&c, &sim, LOGIN_PATH, None, body).await["code"], 0);

        assert_eq!(sim.login_attempts(), 7);
        assert_eq!(sim.login_failures(), 0);
        assert_eq!(sim.user_agents(), vec!["playbox-sim-test/1".to_owned()]);
        assert_eq!(sim.requests(LOGIN_PATH), 5);
        // One kept-alive connection carried everything.
        assert_eq!(sim.tls_handshakes(), 1);
    }

    #[tokio::test]
    async fn disabled_login_forms_answer_404() {
        let sim = start(PlayboxOptions {
            documented_login: false,
            ..PlayboxOptions::default()
        })
        .await;
        let c = client();
        let resp = c
            .post(format!("{}{LOGIN_PATH}", sim.url()))
            .json(&doc_login("SN2008@+", json!(7)))
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), 404);
        let v = post(
            &c,
            &sim,
            FALLBACK_LOGIN_PATH,
            None,
            fallback_login("SN2008@+", json!("x")),
        )
        .await;
        assert_eq!(v["code"], 0);
        assert_eq!(sim.login_attempts(), 1);
    }

    #[tokio::test]
    async fn lockout_after_three_wrong_passwords() {
        let sim = start(PlayboxOptions {
            lockout_for: Duration::from_millis(300),
            ..PlayboxOptions::default()
        })
        .await;
        let c = client();
        for _ in 0..3 {
            let v = post(&c, &sim, LOGIN_PATH, None, doc_login("wrong", json!(7))).await;
            assert_eq!(v["code"], 24, "{v}");
            assert_eq!(v["data"], json!({"logined": false, "validation": false}));
        }
        assert!(sim.locked());
        assert_eq!(sim.lockouts(), 1);
        // Even the right password is refused now, and every attempt counts.
        let v = post(&c, &sim, LOGIN_PATH, None, doc_login("SN2008@+", json!(7))).await;
        assert_eq!(v["code"], 17);
        let v = post(
            &c,
            &sim,
            FALLBACK_LOGIN_PATH,
            None,
            fallback_login("wrong", json!("x")),
        )
        .await;
        assert_eq!(v["code"], 17);
        assert_eq!(sim.login_attempts(), 5);
        assert_eq!(sim.login_failures(), 3);
        assert_eq!(sim.lockouts(), 1);

        // Attempts during the lock do not extend it.
        sim.wait_until("lock over", WAIT, |s| !s.locked()).await;
        login(&c, &sim, 7).await;

        // A success resets the count: 2 wrong, 1 right, 2 wrong is no lockout.
        for pw in ["wrong", "wrong", "SN2008@+", "wrong", "wrong"] {
            post(&c, &sim, LOGIN_PATH, None, doc_login(pw, json!(7))).await;
        }
        assert!(!sim.locked());
        assert_eq!(sim.lockouts(), 1);
        assert_eq!(sim.login_failures(), 7);
    }

    #[tokio::test]
    async fn tokens_are_per_client_id() {
        let sim = start(PlayboxOptions::default()).await;
        let c = client();
        let viplex = sim.viplex_login().await;
        assert!(sim.token_valid(&viplex));
        assert_eq!(sim.login_attempts(), 0);

        let a = login(&c, &sim, 731942).await;
        assert!(sim.token_valid(&viplex) && sim.token_valid(&a));

        // Same clientId again: the first holder is kicked.
        let b = login(&c, &sim, 731942).await;
        assert!(!sim.token_valid(&a) && sim.token_valid(&b));
        assert_eq!(get(&c, &sim, SCREEN_PATHS[0], &a).await["code"], 39);
        assert_eq!(get(&c, &sim, SCREEN_PATHS[0], &b).await["code"], 0);

        // Someone logging in as clientId 1 kicks ViPlex; a string "1" is the same client.
        let v = post(
            &c,
            &sim,
            FALLBACK_LOGIN_PATH,
            None,
            fallback_login("SN2008@+", json!("1")),
        )
        .await;
        assert_eq!(v["code"], 0);
        assert!(!sim.token_valid(&viplex));
        assert!(sim.token_valid(&b));
    }

    #[tokio::test]
    async fn expired_tokens_answer_the_expired_code() {
        let sim = start(PlayboxOptions::default()).await;
        let c = client();
        let t = login(&c, &sim, 7).await;
        assert_eq!(get(&c, &sim, BRIGHTNESS_PATHS[0], &t).await["code"], 0);
        sim.expire_tokens();
        assert!(!sim.token_valid(&t));
        assert_eq!(get(&c, &sim, BRIGHTNESS_PATHS[0], &t).await["code"], 39);
        assert_eq!(
            get(&c, &sim, BRIGHTNESS_PATHS[0], "garbage").await["code"],
            39
        );
        let resp = c
            .get(format!("{}{}", sim.url(), BRIGHTNESS_PATHS[0]))
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.json::<Value>().await.expect("json")["code"], 39);

        let sim = start(PlayboxOptions {
            token_lifetime: Some(Duration::from_millis(200)),
            expired_code: 40,
            ..PlayboxOptions::default()
        })
        .await;
        let t = login(&c, &sim, 7).await;
        assert_eq!(get(&c, &sim, SCREEN_PATHS[0], &t).await["code"], 0);
        sim.wait_until("token expired", WAIT, |s| !s.token_valid(&t))
            .await;
        assert_eq!(get(&c, &sim, SCREEN_PATHS[0], &t).await["code"], 40);
    }

    #[tokio::test]
    async fn values_on_the_default_paths() {
        let sim = start(PlayboxOptions::default()).await;
        let c = client();
        let t = login(&c, &sim, 7).await;
        let t = t.as_str();
        let (b, s, vol, info) = (
            BRIGHTNESS_PATHS[0],
            SCREEN_PATHS[0],
            VOLUME_PATHS[0],
            INFO_PATHS[0],
        );

        assert_eq!(get(&c, &sim, b, t).await["data"], json!({"ratio": 50.0}));
        assert_eq!(
            post(&c, &sim, b, Some(t), json!({"ratio": 42.5})).await,
            json!({"code": 0, "message": ""})
        );
        assert_eq!(sim.brightness(), 42.5);
        assert_eq!(get(&c, &sim, b, t).await["data"]["ratio"], 42.5);
        for bad in [
            json!({"ratio": 101}),
            json!({"ratio": -1}),
            json!({"ratio": "50"}),
            json!({}),
            json!({"ratio": 5, "solidity": "yes"}),
        ] {
            assert_eq!(post(&c, &sim, b, Some(t), bad).await["code"], 3);
        }
        assert_eq!(sim.brightness(), 42.5);

        assert_eq!(get(&c, &sim, s, t).await["data"], json!({"state": "OPEN"}));
        assert_eq!(
            post(&c, &sim, s, Some(t), json!({"state": "close"})).await["code"],
            0
        );
        assert_eq!(sim.screen(), "CLOSE");
        assert_eq!(
            post(&c, &sim, s, Some(t), json!({"state": "off"})).await["code"],
            3
        );
        sim.set_screen("UNKNOW");
        assert_eq!(get(&c, &sim, s, t).await["data"]["state"], "UNKNOW");

        assert_eq!(get(&c, &sim, vol, t).await["data"], json!({"ratio": 30.0}));
        assert_eq!(
            post(&c, &sim, vol, Some(t), json!({"ratio": 75})).await["code"],
            0
        );
        assert_eq!(sim.volume(), Some(75.0));
        assert_eq!(
            post(&c, &sim, vol, Some(t), json!({"ratio": 175})).await["code"],
            3
        );

        let v = get(&c, &sim, info, t).await;
        assert_eq!(v["data"]["sn"], "2ZTA00000X0A00000000");
        assert_eq!(v["data"]["productName"], "T2-4G");
        assert_eq!(v["data"]["mainVersion"], "V4.6.2");

        // Out-of-band changes show on the next read.
        sim.set_brightness(80.0);
        sim.set_volume(10.0);
        assert_eq!(get(&c, &sim, b, t).await["data"]["ratio"], 80.0);
        assert_eq!(get(&c, &sim, vol, t).await["data"]["ratio"], 10.0);

        // The other candidates do not exist; unknown paths neither.
        for p in [
            BRIGHTNESS_PATHS[1],
            SCREEN_PATHS[1],
            SCREEN_PATHS[2],
            VOLUME_PATHS[1],
            INFO_PATHS[1],
            "/terminal/core/v1/nope",
        ] {
            assert_eq!(status(&c, &sim, Method::GET, p, t).await, 404, "{p}");
        }
        assert_eq!(
            status(&c, &sim, Method::POST, BRIGHTNESS_PATHS[1], t).await,
            404
        );
        assert_eq!(status(&c, &sim, Method::POST, info, t).await, 405);

        let sets = sim.sets();
        assert_eq!(sets.len(), 11, "{sets:?}");
        assert_eq!(sets[0], (b.to_owned(), json!({"ratio": 42.5})));
        assert_eq!(sets.last().map(|s| s.0.as_str()), Some(BRIGHTNESS_PATHS[1]));
        assert_eq!(sim.requests(b), 9);
    }

    #[tokio::test]
    async fn alternative_paths_rich_brightness_and_no_volume() {
        let sim = start(PlayboxOptions {
            brightness_path: 1,
            screen_path: 2,
            volume: None,
            info_path: 1,
            rich_brightness: true,
            ..PlayboxOptions::default()
        })
        .await;
        let c = client();
        let t = login(&c, &sim, 7).await;
        let t = t.as_str();
        assert_eq!(
            status(&c, &sim, Method::GET, BRIGHTNESS_PATHS[0], t).await,
            404
        );
        assert_eq!(
            get(&c, &sim, BRIGHTNESS_PATHS[1], t).await["data"],
            json!({"ratio": 50.0, "brightness": 128, "solidity": false, "orderId": -1})
        );
        assert_eq!(status(&c, &sim, Method::GET, SCREEN_PATHS[0], t).await, 404);
        assert_eq!(
            get(&c, &sim, SCREEN_PATHS[2], t).await["data"]["state"],
            "OPEN"
        );
        for p in VOLUME_PATHS {
            assert_eq!(status(&c, &sim, Method::GET, p, t).await, 404, "{p}");
        }
        assert_eq!(sim.volume(), None);
        let v = get(&c, &sim, INFO_PATHS[1], t).await;
        assert_eq!(v["data"]["main"], "V4.6.2");
        assert!(v["data"].get("mainVersion").is_none());
    }

    #[tokio::test]
    async fn integer_only_firmware() {
        let sim = start(PlayboxOptions {
            integer_only_brightness: true,
            ..PlayboxOptions::default()
        })
        .await;
        let c = client();
        let t = login(&c, &sim, 7).await;
        let b = BRIGHTNESS_PATHS[0];
        assert_eq!(
            post(&c, &sim, b, Some(&t), json!({"ratio": 45.5})).await["code"],
            3
        );
        assert_eq!(sim.brightness(), 50.0);
        assert_eq!(
            post(&c, &sim, b, Some(&t), json!({"ratio": 46})).await["code"],
            0
        );
        assert_eq!(sim.brightness(), 46.0);
        assert_eq!(
            post(&c, &sim, b, Some(&t), json!({"ratio": 47.0})).await["code"],
            0
        );
        assert_eq!(sim.brightness(), 47.0);
    }

    #[tokio::test]
    async fn empty_user_agent_and_never_call_paths() {
        let sim = start(PlayboxOptions::default()).await;
        let bare = reqwest::Client::builder()
            .tls_danger_accept_invalid_certs(true)
            .build()
            .expect("client");
        let resp = bare
            .post(format!("{}{LOGIN_PATH}", sim.url()))
            .json(&doc_login("SN2008@+", json!(7)))
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status(), 400);
        assert!(
            resp.json::<Value>().await.is_err(),
            "a 400 must not be JSON"
        );
        assert_eq!(sim.requests(LOGIN_PATH), 1);
        assert_eq!(sim.login_attempts(), 0);
        assert!(sim.user_agents().is_empty());

        let c = client();
        let t = login(&c, &sim, 7).await;
        let v = post(
            &c,
            &sim,
            "/terminal/core/v1/device/reboot",
            Some(&t),
            json!({"reason": "x"}),
        )
        .await;
        assert_eq!(v["code"], 0);
        let v = post(
            &c,
            &sim,
            "/terminal/core/v1/play/transfer/start",
            None,
            json!({}),
        )
        .await;
        assert_eq!(v["code"], 39);
        let sets = sim.sets();
        assert_eq!(sets.len(), 2);
        assert_eq!(
            sets[0],
            (
                "/terminal/core/v1/device/reboot".to_owned(),
                json!({"reason": "x"})
            )
        );

        let sim = start(PlayboxOptions {
            reject_empty_user_agent: false,
            ..PlayboxOptions::default()
        })
        .await;
        let v: Value = bare
            .post(format!("{}{LOGIN_PATH}", sim.url()))
            .json(&doc_login("SN2008@+", json!(7)))
            .send()
            .await
            .expect("send")
            .json()
            .await
            .expect("json");
        assert_eq!(v["code"], 0);
    }

    async fn discover(to: SocketAddr, timeout: Duration) -> Option<Value> {
        let sock = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind");
        sock.send_to(b"not a search", to).await.expect("send");
        sock.send_to(&avon::search_request(), to)
            .await
            .expect("send");
        let mut buf = [0u8; 2048];
        let (n, from) = tokio::time::timeout(timeout, sock.recv_from(&mut buf))
            .await
            .ok()?
            .expect("recv");
        assert_eq!(from, to);
        Some(avon::reply_body(&buf[..n]).expect("a discovery reply"))
    }

    #[tokio::test]
    async fn udp_discovery_round_trip() {
        let sim = start(PlayboxOptions::default()).await;
        let to = sim.udp_addr().expect("udp");
        let found = discover(to, WAIT).await.expect("reply");
        assert_eq!(found["sn"], "2ZTA00000X0A00000000");
        assert_eq!(found["productName"], "T2-4G");
        assert_eq!(found["aliasName"], "T2-4G_00000000");
        assert_eq!(found["terminalEntrancePortHttps"], sim.addr().port());
        assert_eq!(found["modelId"], 38411);
        assert_eq!(found["key"], "novaStar");

        let off = start(PlayboxOptions {
            udp_discovery: false,
            ..PlayboxOptions::default()
        })
        .await;
        assert!(off.udp_addr().is_none());
    }

    #[tokio::test]
    async fn reboot_window_then_recovery() {
        let sim = start(PlayboxOptions::default()).await;
        let c = client_with(Duration::from_millis(300));
        let t = login(&c, &sim, 7).await;
        let b = BRIGHTNESS_PATHS[0];
        assert_eq!(
            post(
                &c,
                &sim,
                b,
                Some(&t),
                json!({"ratio": 60, "solidity": true})
            )
            .await["code"],
            0
        );
        assert_eq!(
            post(&c, &sim, b, Some(&t), json!({"ratio": 70})).await["code"],
            0
        );
        assert_eq!(sim.brightness(), 70.0);

        sim.reboot(Duration::from_millis(800)).await;
        assert_eq!(sim.brightness(), 60.0, "unsaved brightness reverts");
        assert!(!sim.token_valid(&t));
        // Both kinds of failure: a reset, then a silent accept.
        let mut buf = [0u8; 16];
        let mut reset = TcpStream::connect(sim.addr()).await.expect("connect");
        let r = tokio::time::timeout(WAIT, reset.read(&mut buf)).await;
        assert!(matches!(r, Ok(Ok(0) | Err(_))), "expected a reset: {r:?}");
        let mut silent = TcpStream::connect(sim.addr()).await.expect("connect");
        // A negative check needs a window; 200 ms is far beyond a loopback round trip.
        let r = tokio::time::timeout(Duration::from_millis(200), silent.read(&mut buf)).await;
        assert!(r.is_err(), "expected silence: {r:?}");
        for _ in 0..2 {
            let r = c
                .post(format!("{}{LOGIN_PATH}", sim.url()))
                .json(&doc_login("SN2008@+", json!(7)))
                .send()
                .await;
            assert!(r.is_err(), "answered during the boot window: {r:?}");
        }
        assert!(
            discover(sim.udp_addr().expect("udp"), Duration::from_millis(200))
                .await
                .is_none()
        );

        let end = std::time::Instant::now() + WAIT;
        let v = loop {
            let r = c
                .get(format!("{}{b}", sim.url()))
                .header("Authorization", &t)
                .send()
                .await;
            if let Ok(r) = r {
                break r.json::<Value>().await.expect("json");
            }
            assert!(std::time::Instant::now() < end, "the box did not come back");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(v["code"], 39, "tokens do not survive a reboot");
        let t = login(&c, &sim, 7).await;
        assert_eq!(get(&c, &sim, b, &t).await["data"]["ratio"], 60.0);
        assert!(discover(sim.udp_addr().expect("udp"), WAIT).await.is_some());
    }

    #[tokio::test]
    async fn huge_replies_are_valid_and_unannounced() {
        let sim = start(PlayboxOptions::default()).await;
        let c = client();
        let t = login(&c, &sim, 7).await;
        sim.set_huge_replies(Some(2 << 20));
        let resp = c
            .get(format!("{}{}", sim.url(), BRIGHTNESS_PATHS[0]))
            .header("Authorization", &t)
            .send()
            .await
            .expect("request");
        assert_eq!(resp.content_length(), None);
        let body = resp.bytes().await.expect("body");
        assert!(body.len() >= 2 << 20, "{}", body.len());
        let v: Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(v["data"]["ratio"], 50);
        sim.set_huge_replies(None);
        assert_eq!(
            get(&c, &sim, BRIGHTNESS_PATHS[0], &t).await["data"]["ratio"],
            50.0
        );
    }

    #[tokio::test]
    async fn hang_times_out_and_recovers() {
        let sim = start(PlayboxOptions::default()).await;
        let c = client_with(Duration::from_millis(300));
        let t = login(&c, &sim, 7).await;
        sim.set_hang(true);
        let r = c
            .get(format!("{}{}", sim.url(), SCREEN_PATHS[0]))
            .header("Authorization", &t)
            .send()
            .await;
        assert!(r.as_ref().is_err_and(reqwest::Error::is_timeout), "{r:?}");
        assert_eq!(sim.requests(SCREEN_PATHS[0]), 1, "the request arrived");
        sim.set_hang(false);
        assert_eq!(
            get(&c, &sim, SCREEN_PATHS[0], &t).await["data"]["state"],
            "OPEN"
        );
    }

    #[tokio::test]
    async fn keep_alive_and_new_certificates() {
        let sim = start(PlayboxOptions::default()).await;
        let c = client();
        let t = login(&c, &sim, 7).await;
        for _ in 0..5 {
            get(&c, &sim, BRIGHTNESS_PATHS[0], &t).await;
        }
        assert_eq!(sim.tls_handshakes(), 1);

        let before = sim.cert_fingerprint_sha256();
        sim.regenerate_certificate();
        assert_ne!(sim.cert_fingerprint_sha256(), before);
        // The kept-alive connection keeps its session; a new client gets the new cert.
        get(&client(), &sim, BRIGHTNESS_PATHS[0], &t).await;
        assert_eq!(sim.tls_handshakes(), 2);

        let clone = sim.clone();
        drop(sim);
        get(&c, &clone, BRIGHTNESS_PATHS[0], &t).await;
        clone.shutdown();
        sim_is_gone(&clone).await;
    }

    async fn sim_is_gone(sim: &PlayboxSim) {
        let c = client_with(Duration::from_millis(500));
        let end = std::time::Instant::now() + WAIT;
        while c
            .get(format!("{}{}", sim.url(), INFO_PATHS[0]))
            .send()
            .await
            .is_ok()
        {
            assert!(
                std::time::Instant::now() < end,
                "still answering after shutdown"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}
