//! A real Mosquitto on a free loopback port, persistence off (its default, unless `extra`
//! turns it on), that can be killed or stopped and started again on the same port. Used by the durability tests and the
//! benchmark.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Mosquitto {
    pub addr: SocketAddr,
    conf: PathBuf,
    child: Option<Child>,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    /// Whether a `mosquitto` binary is on the PATH.
    pub fn installed() -> bool {
        Command::new("mosquitto").arg("-h").output().is_ok()
    }

    /// Start one; `extra` lines go into its configuration (e.g. `set_tcp_nodelay true`).
    pub fn start(extra: &str) -> std::io::Result<Mosquitto> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let dir = tempfile::tempdir()?;
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n{extra}\n"
            ),
        )?;
        let mut m = Mosquitto {
            addr: ([127, 0, 0, 1], port).into(),
            conf,
            child: None,
            _dir: dir,
        };
        m.up()?;
        Ok(m)
    }

    /// (Re)start it and wait until it accepts connections.
    pub fn up(&mut self) -> std::io::Result<()> {
        if self.child.is_some() {
            return Ok(());
        }
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        self.child = Some(child);
        let end = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(self.addr).is_err() {
            if Instant::now() > end {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "mosquitto did not start",
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Stop it gracefully (SIGTERM) and wait until it has exited: with persistence on,
    /// it saves its sessions and retained messages first. Killed after 30 s.
    pub fn stop(&mut self) {
        let Some(mut c) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let end = Instant::now() + Duration::from_secs(30);
        while Instant::now() < end {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = c.kill();
        let _ = c.wait();
    }

    /// Kill it hard (SIGKILL): sessions and retained messages are gone with it.
    pub fn down(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.down();
    }
}
