//! Local faults (contract §4): a second bridge on the same `storage.dir`, owner-only
//! files whatever the umask, a corrupt outbox file, and a disk that refuses writes. The
//! daemon runs as a child process wherever a process is the point.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use bvcsp2mqtt_testkit::Stream;
use bvcsp2mqtt_testkit::bvcsp::BvcspSim;
use common::*;
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_bvcsp2mqtt");
const T: Duration = Duration::from_secs(30);

/// A simulator with one device, a broker, an observer, and a daemon configuration whose
/// `storage.dir` is `state`.
struct Rig {
    sim: BvcspSim,
    obs: Observer,
    _dir: tempfile::TempDir,
    config: PathBuf,
    state: PathBuf,
}

async fn rig(extra: &str) -> Rig {
    let sim = one_device_sim().await;
    let broker = broker();
    let obs = Observer::start(broker).await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[bvcsp]
url = "{url}"
username = "admin"
password = "123456"
streams = ["alarm"]
keepalive_interval = "200ms"
pong_timeout = "1s"
reconnect_min = "100ms"
reconnect_max = "800ms"
reopen_stagger = "50ms"

[mqtt]
url = "mqtt://{broker}"
client_id = "faults-{id}"
keepalive = "2s"
reconnect_min = "100ms"
reconnect_max = "1s"

[storage]
dir = "{state}"
{extra}
"#,
            url = sim.url(),
            id = rand_suffix(),
            state = state.display(),
        ),
    )
    .unwrap();
    Rig {
        sim,
        obs,
        _dir: dir,
        config,
        state,
    }
}

fn alarm(key: &str) -> serde_json::Value {
    json!({"key": key, "type": 5, "time": 1717400123, "devID": "PU_1", "devName": "Helmet",
        "status": 0, "desc": "SOS", "lat": 31.8, "lng": 117.2, "payload": ""})
}

fn sos_topic() -> String {
    format!("{BASE}/device/PU_1/alarm/sos")
}

/// Inject an alarm once the stream is open, and wait until it is published.
async fn alarm_flows(r: &Rig, key: &str) {
    wait_sockets(&r.sim, &[Stream::Alarm], T).await;
    assert_eq!(r.sim.inject(Stream::Alarm, alarm(key)), 1);
    r.obs.wait_keys(&sos_topic(), &[key.to_string()], T).await;
}

fn offlines(obs: &Observer) -> usize {
    obs.on(&format!("{BASE}/bridge/state"))
        .iter()
        .filter(|m| m.text() == "offline")
        .count()
}

async fn stop(mut d: Daemon) {
    d.signal("-TERM");
    let status = d.wait_exit(Duration::from_secs(15)).await;
    assert_eq!(status.code(), Some(0), "log:\n{}", d.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_bridge_on_the_same_storage_dir_exits_73_and_the_first_runs_on() {
    let r = rig("").await;
    let first = Daemon::spawn(&r.config);
    r.obs.wait_all_up(&[Stream::Alarm], T).await;
    alarm_flows(&r, "before").await;
    let offline_before = offlines(&r.obs);

    let started = Instant::now();
    let mut second = Daemon::spawn(&r.config);
    let status = second.wait_exit(T).await;
    let log = second.log();
    assert_eq!(status.code(), Some(73), "log:\n{log}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "exits at once, took {:?}",
        started.elapsed()
    );
    assert!(
        log.contains("storage.dir") && log.contains(&r.state.display().to_string()),
        "the message names the directory:\n{log}"
    );

    // The first one is not disturbed: it never went offline and still delivers.
    alarm_flows(&r, "after").await;
    assert_eq!(
        offlines(&r.obs),
        offline_before,
        "the first bridge was disturbed"
    );
    stop(first).await;
}

#[cfg(unix)]
fn mode(p: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_files_are_0600_and_the_dir_0700_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let r = rig("").await;
    // Left by an older version, under a lax umask.
    std::fs::create_dir_all(&r.state).unwrap();
    std::fs::set_permissions(&r.state, std::fs::Permissions::from_mode(0o777)).unwrap();
    let stale = r.state.join("playbox-old.pin");
    std::fs::write(&stale, "00\n").unwrap();
    std::fs::set_permissions(&stale, std::fs::Permissions::from_mode(0o666)).unwrap();

    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(r#"umask 000; exec "$0" run --config "$1""#)
        .arg(BIN)
        .arg(&r.config);
    let d = Daemon::spawn_command(cmd);
    r.obs.wait_all_up(&[Stream::Alarm], T).await;
    alarm_flows(&r, "perm").await;
    let expected = ["outbox.sqlite3", "outbox.sqlite3-wal", "alarm-ledger.json"];
    bvcsp2mqtt_testkit::eventually("every file exists", T, || {
        expected.iter().all(|f| r.state.join(f).exists())
    })
    .await;
    assert_eq!(mode(&r.state), 0o700, "storage.dir");
    for entry in std::fs::read_dir(&r.state).unwrap() {
        let p = entry.unwrap().path();
        assert_eq!(mode(&p), 0o600, "{}", p.display());
    }
    stop(d).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_outbox_file_is_kept_aside_and_the_daemon_runs() {
    let r = rig("").await;
    std::fs::create_dir_all(&r.state).unwrap();
    let garbage: Vec<u8> = (0..16384u32).map(|i| (i * 7919 % 251) as u8).collect();
    std::fs::write(r.state.join("outbox.sqlite3"), &garbage).unwrap();

    let d = Daemon::spawn(&r.config);
    r.obs.wait_all_up(&[Stream::Alarm], T).await;
    alarm_flows(&r, "fresh").await;
    let kept: Vec<PathBuf> = std::fs::read_dir(&r.state)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("outbox.sqlite3.corrupt-")
        })
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(std::fs::read(&kept[0]).unwrap(), garbage, "kept as it was");
    let log = d.log();
    assert!(
        log.contains("corrupt") && log.contains(&kept[0].display().to_string()),
        "the log says what happened:\n{log}"
    );
    let health = r
        .obs
        .wait_topic(&format!("{BASE}/bridge/health"), T, |_| true)
        .await
        .json();
    assert_eq!(
        health["outbox"]["corrupt_file_kept_as"],
        kept[0].display().to_string()
    );
    stop(d).await;
}

/// Set the daemon's soft file-size limit (RLIMIT_FSIZE) with `prlimit`; false when the
/// tool is missing.
fn set_fsize(pid: u32, soft: &str) -> bool {
    match Command::new("prlimit")
        .arg("--pid")
        .arg(pid.to_string())
        .arg(format!("--fsize={soft}:unlimited"))
        .status()
    {
        Ok(s) => {
            assert!(s.success(), "prlimit --fsize={soft} failed");
            true
        }
        Err(_) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "prlimit (util-linux) is required under CI"
            );
            false
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_refusing_writes_pauses_reading_says_why_and_resumes_by_itself_losing_nothing() {
    let r = rig("[service]\nhealth_interval = \"1s\"\n").await;
    let d = Daemon::spawn(&r.config);
    r.obs.wait_all_up(&[Stream::Alarm], T).await;
    alarm_flows(&r, "before").await;
    let health_topic = format!("{BASE}/bridge/health");

    // Every write past the first byte of a file now fails with EFBIG (SIGXFSZ is
    // ignored), as on a full disk.
    if !set_fsize(d.child.id(), "1") {
        eprintln!("skipping: prlimit is not installed");
        return;
    }
    let keys: Vec<String> = (0..20).map(|i| format!("full-{i}")).collect();
    for k in &keys {
        assert_eq!(r.sim.inject(Stream::Alarm, alarm(k)), 1);
    }
    let paused = r
        .obs
        .wait_topic(&health_topic, T, |m| {
            let o = &m.json()["outbox"];
            o["paused"] == true
                && o["write_error"].is_string()
                && o["write_error_for_s"].as_u64() >= Some(2)
        })
        .await
        .json();
    let published = |obs: &Observer| {
        obs.on(&sos_topic())
            .iter()
            .filter(|m| {
                m.json()["raw"]["key"]
                    .as_str()
                    .is_some_and(|k| k.starts_with("full-"))
            })
            .count()
    };
    assert_eq!(
        published(&r.obs),
        0,
        "nothing is published before it is on disk: {paused}"
    );
    let log = d.log();
    assert!(
        log.contains("reading upstream is paused until writes work again"),
        "the log says why:\n{log}"
    );
    assert_eq!(
        log.matches("outbox: cannot write to").count(),
        1,
        "rate-limited (seconds of retries, one line):\n{log}"
    );
    assert!(d.log().matches("checkpoint failed").count() <= 1);

    // Writes work again: it resumes by itself and every alarm arrives, once.
    assert!(set_fsize(d.child.id(), "unlimited"));
    r.obs.wait_keys(&sos_topic(), &keys, T).await;
    r.obs
        .wait_topic(&health_topic, T, |m| {
            let o = &m.json()["outbox"];
            o["paused"] == false && o["write_error"].is_null()
        })
        .await;
    assert_eq!(published(&r.obs), keys.len(), "no duplicates either");
    bvcsp2mqtt_testkit::eventually("the log says it resumed", T, || {
        d.log().contains("writes work again")
    })
    .await;
    stop(d).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_while_the_disk_refuses_writes_still_ends() {
    let r = rig("[service]\nhealth_interval = \"1s\"\ngrace_period = \"1s\"\n").await;
    let mut d = Daemon::spawn(&r.config);
    r.obs.wait_all_up(&[Stream::Alarm], T).await;
    alarm_flows(&r, "before").await;
    if !set_fsize(d.child.id(), "1") {
        eprintln!("skipping: prlimit is not installed");
        return;
    }
    for i in 0..5 {
        assert_eq!(r.sim.inject(Stream::Alarm, alarm(&format!("stop-{i}"))), 1);
    }
    r.obs
        .wait_topic(&format!("{BASE}/bridge/health"), T, |m| {
            m.json()["outbox"]["paused"] == true
        })
        .await;
    d.signal("-TERM");
    let status = d.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(0), "log:\n{}", d.log());
}
