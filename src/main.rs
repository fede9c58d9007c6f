//! The binary: parse the command line, load and validate the configuration, set up
//! logging, run. Everything else lives in the library. With the `demo` feature (on in a
//! source build, off in the package) it also runs the demo and the benchmark, which bring
//! the simulators and the embedded broker of `bvcsp2mqtt-testkit`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use bvcsp2mqtt::config::{self, LogConfig, LogFormat};
use bvcsp2mqtt::homeassistant::api::{LogFilterError, check_log_filter};

#[cfg(feature = "demo")]
mod demo;

/// Exit codes (sysexits): bad configuration or usage, internal error, and another
/// bridge already running on `storage.dir` (EX_CANTCREAT).
const EX_USAGE: u8 = 64;
const EX_SOFTWARE: u8 = 70;
const EX_CANTCREAT: u8 = 73;

#[derive(Parser)]
#[command(
    name = "bvcsp2mqtt",
    version,
    about = "Bridge BVCSP events and NovaStar play boxes to MQTT"
)]
struct Cli {
    /// Configuration file
    #[arg(long, short, global = true, default_value = config::DEFAULT_PATH)]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the bridge (the default)
    Run,
    /// Run simulators, an embedded broker and the bridge on this machine, and show what is published
    Demo {
        /// Port for the embedded MQTT broker (default 1883, or a free one if taken)
        #[arg(long)]
        mqtt_port: Option<u16>,
        /// Stop by itself after this long (e.g. "30s"); default: until Ctrl-C
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Option<std::time::Duration>,
    },
    /// Validate the configuration and print it with secrets redacted
    CheckConfig,
    /// End-to-end benchmark: simulator flood, real broker, the bridge as its own process
    Bench {
        /// A small run: checks loss and duplicates only (what CI runs)
        #[arg(long)]
        quick: bool,
        /// Repetitions of every scenario (medians are printed)
        #[arg(long, default_value_t = 3)]
        repeat: usize,
        /// Run only these scenarios (a: burst, b: steady, c: GPS fleet, d: idle fleet,
        /// e: recovery after a broker outage)
        #[arg(long, value_delimiter = ',', value_parser = ["a", "b", "c", "d", "e"])]
        scenario: Vec<String>,
        /// Messages waiting in the outbox when the broker returns, in scenario e
        /// (default 1 000 000; 2 000 with --quick)
        #[arg(long)]
        backlog: Option<u64>,
        /// The bridge to measure (default: this executable); say, the packaged daemon
        /// (`cargo build --release --no-default-features`), whose code is smaller
        #[arg(long, value_name = "PATH")]
        bridge_binary: Option<PathBuf>,
    },
    /// Find NovaStar play boxes on the network (UDP search) and print ready-to-paste [[playbox]] entries
    Discover {
        /// Also ask this address directly (repeatable); replies to a broadcast are often firewalled
        #[arg(long = "target", value_name = "IP")]
        targets: Vec<std::net::IpAddr>,
        /// Do not send to the broadcast address
        #[arg(long)]
        no_broadcast: bool,
        /// UDP port the boxes listen on
        #[arg(long, default_value_t = bvcsp2mqtt::playbox::avon::DISCOVERY_PORT)]
        port: u16,
        /// How long to listen for answers
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        wait: std::time::Duration,
    },
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() { EX_USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    match cli.command.unwrap_or(Command::Run) {
        Command::CheckConfig => match config::load(Some(&cli.config), config::env_overrides()) {
            Ok(cfg) => {
                print!("{}", cfg.redacted_toml());
                eprintln!("configuration OK: {}", cli.config.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("configuration error: {e}");
                ExitCode::from(EX_USAGE)
            }
        },
        Command::Run => {
            let cfg = match config::load(Some(&cli.config), config::env_overrides()) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("configuration error: {e}");
                    return ExitCode::from(EX_USAGE);
                }
            };
            init_tracing(&cfg.log);
            ignore_file_size_signal();
            let rt = match daemon_runtime() {
                Ok(rt) => rt,
                Err(e) => return exit_with(Err(e)),
            };
            match rt.block_on(bvcsp2mqtt::run(cfg, shutdown_signal())) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) if e.is_storage_locked() => {
                    tracing::error!("cannot start: {e}");
                    eprintln!("error: cannot start: {e}");
                    ExitCode::from(EX_CANTCREAT)
                }
                Err(e) => exit_with(Err(anyhow::Error::new(e).context("cannot start"))),
            }
        }
        #[cfg(not(feature = "demo"))]
        Command::Bench { .. } | Command::Demo { .. } => {
            eprintln!(
                "this build has no demo or benchmark (the packaged daemon leaves the simulators \
                 and the embedded broker out); from a source checkout run `cargo run --release -- demo`"
            );
            ExitCode::from(EX_USAGE)
        }
        #[cfg(feature = "demo")]
        Command::Bench {
            quick,
            repeat,
            scenario,
            backlog,
            bridge_binary,
        } => {
            init_tracing(&LogConfig {
                level: "warn,rumqttd=off".into(),
                format: LogFormat::Text,
            });
            exit_with(runtime().and_then(|rt| {
                rt.block_on(async {
                    let cfg = bvcsp2mqtt_testkit::bench::BenchConfig {
                        quick,
                        repeat,
                        bridge_exe: match bridge_binary {
                            Some(path) => path,
                            None => {
                                std::env::current_exe().context("cannot find this executable")?
                            }
                        },
                        scenarios: scenario.iter().filter_map(|s| s.chars().next()).collect(),
                        backlog,
                    };
                    let (broker, figures) = bvcsp2mqtt_testkit::bench::run(&cfg)
                        .await
                        .context("benchmark failed")?;
                    println!(
                        "{}",
                        bvcsp2mqtt_testkit::bench::render(&broker, repeat, &figures)
                    );
                    let lost: u64 = figures.iter().map(|f| f.lost + f.duplicates).sum();
                    anyhow::ensure!(lost == 0, "messages were lost or duplicated");
                    let reordered: u64 = figures
                        .iter()
                        .filter_map(|f| f.recovery.as_ref())
                        .map(|r| r.out_of_order)
                        .sum();
                    anyhow::ensure!(reordered == 0, "messages were delivered out of order");
                    Ok(())
                })
            }))
        }
        Command::Discover {
            targets,
            no_broadcast,
            port,
            wait,
        } => {
            init_tracing(&LogConfig {
                level: "warn".into(),
                format: LogFormat::Text,
            });
            let opts = bvcsp2mqtt::playbox::discovery::DiscoverOptions {
                targets,
                broadcast: !no_broadcast,
                port,
                wait,
            };
            exit_with(runtime().and_then(|rt| {
                rt.block_on(async {
                    use bvcsp2mqtt::playbox::discovery;
                    eprintln!("searching for play boxes for {wait:?}...");
                    let found = discovery::discover(&opts).await.context("UDP search failed")?;
                    if found.is_empty() {
                        println!("no play box answered (try --target <IP>; UDP port {port} must be reachable)");
                    } else {
                        print!("{}\n{}", discovery::render_table(&found), discovery::render_toml(&found));
                    }
                    Ok(())
                })
            }))
        }
        #[cfg(feature = "demo")]
        Command::Demo {
            mqtt_port,
            duration,
        } => {
            init_tracing(&LogConfig {
                level: "warn,bvcsp2mqtt=info,rumqttd=off".into(),
                format: LogFormat::Text,
            });
            exit_with(runtime().and_then(|rt| {
                rt.block_on(async {
                    let stop = async move {
                        match duration {
                            Some(d) => tokio::select! {
                                _ = shutdown_signal() => {}
                                _ = tokio::time::sleep(d) => {}
                            },
                            None => shutdown_signal().await,
                        }
                    };
                    demo::run(mqtt_port, stop).await.context("demo failed")
                })
            }))
        }
    }
}

fn exit_with(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::from(EX_SOFTWARE)
        }
    }
}

/// The daemon's runtime: one thread. Its work is I/O bound and the box is shared with the
/// broker; in the benchmark one thread costs less CPU per event, keeps p99 lower and
/// uses less memory (no per-thread malloc arenas) than a work-stealing pool. The
/// outbox's disk writes have threads of their own.
fn daemon_runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

/// A write past the file size limit (RLIMIT_FSIZE) must fail with EFBIG, which the
/// outbox survives (it pauses and retries), not kill the process with SIGXFSZ.
fn ignore_file_size_signal() {
    #[cfg(unix)]
    // SAFETY: setting a signal's disposition to SIG_IGN installs no handler and touches no
    // memory; it happens before any thread is started.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}

/// Crates that log requests and handshakes, headers included, at debug and trace: the
/// BVCSP token rides in `Sec-WebSocket-Protocol`, the login body holds the password hash.
const HEADER_LOGGERS: &[&str] = &[
    "tungstenite",
    "tokio_tungstenite",
    "hyper",
    "hyper_util",
    "reqwest",
    "h2",
    "rustls",
    "rumqttc",
];

fn logs_headers(target: &str) -> bool {
    let krate = target.split("::").next().unwrap_or(target);
    HEADER_LOGGERS.contains(&krate)
}

fn init_tracing(log: &LogConfig) {
    use tracing_subscriber::EnvFilter;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&log.level));
    // Reloadable, for the bridge API's `log_level` request (until the next restart).
    let (filter, reload) = tracing_subscriber::reload::Layer::new(filter);
    bvcsp2mqtt::homeassistant::api::install_log_level_setter(Box::new(move |level: &str| {
        // A word with no level would turn every level on for it, and the rest off.
        check_log_filter(level)?;
        let new = EnvFilter::try_new(level).map_err(LogFilterError::Invalid)?;
        reload.reload(new).map_err(LogFilterError::Reload)
    }));
    // A global cap after the user's filter: no `RUST_LOG` (not even a module of one of
    // these crates) lifts it above info.
    let cap = tracing_subscriber::filter::filter_fn(|meta| {
        *meta.level() <= tracing::Level::INFO || !logs_headers(meta.target())
    });
    let registry = tracing_subscriber::registry().with(filter);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    // journald stamps every line itself.
    let under_journal = std::env::var_os("JOURNAL_STREAM").is_some();
    match (log.format, under_journal) {
        (LogFormat::Json, _) => registry.with(fmt.json()).with(cap).init(),
        (LogFormat::Text, true) => registry
            .with(fmt.without_time().with_ansi(false))
            .with(cap)
            .init(),
        (LogFormat::Text, false) => registry.with(fmt).with(cap).init(),
    }
}

/// Resolves on the first SIGTERM or SIGINT; a second one exits at once.
async fn shutdown_signal() {
    wait_signal().await;
    tracing::info!("signal received: stopping gracefully (send it again to exit at once)");
    tokio::spawn(async {
        wait_signal().await;
        eprintln!("second signal: exiting now");
        std::process::exit(130);
    });
}

async fn wait_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            },
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
