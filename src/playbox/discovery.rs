//! `bvcsp2mqtt discover`: the AVON UDP search (shared/spec/playbox.md §9), so users get
//! each box's IP, serial number and HTTPS port without digging in ViPlex.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use tokio::time::Instant;

use tokio::net::UdpSocket;

use super::avon::{self, Found};

#[derive(Debug, Clone)]
pub struct DiscoverOptions {
    /// Unicast targets (host firewalls often drop replies to a broadcast).
    pub targets: Vec<IpAddr>,
    /// Also send to the broadcast address.
    pub broadcast: bool,
    pub port: u16,
    /// How long to listen for replies in all.
    pub wait: Duration,
}

impl Default for DiscoverOptions {
    fn default() -> Self {
        DiscoverOptions {
            targets: Vec::new(),
            broadcast: true,
            port: avon::DISCOVERY_PORT,
            wait: Duration::from_secs(3),
        }
    }
}

/// A box that answered, and from where.
#[derive(Debug, Clone, PartialEq)]
pub struct Discovered {
    pub ip: IpAddr,
    pub found: Found,
}

/// Search, in three rounds spread over the wait, and collect one entry per serial number.
pub async fn discover(opts: &DiscoverOptions) -> std::io::Result<Vec<Discovered>> {
    let bind: SocketAddr = if !opts.broadcast && opts.targets.iter().all(IpAddr::is_loopback) {
        (Ipv4Addr::LOCALHOST, 0).into()
    } else {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(bind).await?;
    if opts.broadcast {
        socket.set_broadcast(true)?;
    }
    let request = avon::search_request();
    let mut destinations: Vec<SocketAddr> = opts
        .targets
        .iter()
        .map(|ip| SocketAddr::new(*ip, opts.port))
        .collect();
    if opts.broadcast {
        destinations.push((Ipv4Addr::BROADCAST, opts.port).into());
    }
    let start = Instant::now();
    let deadline = start + opts.wait;
    let rounds = 3u32;
    let mut next_round = start;
    let mut sent = 0u32;
    let mut found: BTreeMap<String, Discovered> = BTreeMap::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let now = Instant::now();
        if sent < rounds && now >= next_round {
            for d in &destinations {
                // One unreachable target must not stop the search.
                let _ = socket.send_to(&request, d).await;
            }
            sent += 1;
            next_round = now + opts.wait / (rounds + 1);
        }
        let until = if sent < rounds {
            next_round.min(deadline)
        } else {
            deadline
        };
        if now >= deadline {
            break;
        }
        match tokio::time::timeout(
            until.saturating_duration_since(now),
            socket.recv_from(&mut buf),
        )
        .await
        {
            Ok(Ok((n, from))) => {
                if let Some(f) = avon::parse_reply(&buf[..n]) {
                    found.entry(f.sn.clone()).or_insert(Discovered {
                        ip: from.ip(),
                        found: f,
                    });
                }
            }
            Ok(Err(e)) => tracing::debug!("discovery receive: {e}"),
            Err(_) => {}
        }
    }
    Ok(found.into_values().collect())
}

/// A config-friendly name: `[a-z0-9_-]+`.
pub fn suggested_name(d: &Discovered) -> String {
    let base = if d.found.alias_name.is_empty() {
        &d.found.sn
    } else {
        &d.found.alias_name
    };
    let name: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    if name.is_empty() {
        "playbox".into()
    } else {
        name
    }
}

pub fn render_table(found: &[Discovered]) -> String {
    let mut out = format!(
        "{:<16} {:<24} {:<16} {:<24} {}\n",
        "IP", "SN", "PRODUCT", "ALIAS", "HTTPS PORT"
    );
    for d in found {
        let f = &d.found;
        out.push_str(&format!(
            "{:<16} {:<24} {:<16} {:<24} {}\n",
            d.ip.to_string(),
            f.sn,
            f.product_name,
            f.alias_name,
            f.https_port
        ));
    }
    out
}

pub fn render_toml(found: &[Discovered]) -> String {
    let mut out = String::new();
    for d in found {
        let name = suggested_name(d);
        let host = match d.ip {
            IpAddr::V6(v6) => format!("[{v6}]"),
            v4 => v4.to_string(),
        };
        out.push_str(&format!(
            "[[playbox]]\nname = \"{name}\"\nurl = \"https://{host}:{port}\"\nsn = {sn}\nusername = \"admin\"\n\
             password_file = \"/etc/bvcsp2mqtt/playbox-{name}.password\"\npoll_interval = \"15s\"\ncommands = false\n\n",
            port = d.found.https_port,
            // The serial number is whatever the box said: quoted and escaped as TOML, so
            // a quote, a backslash or a control character cannot break the file.
            sn = toml::Value::String(d.found.sn.clone()),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::playbox::avon::Found;

    #[test]
    fn rendered_config_quotes_any_serial_number() {
        // Found by fuzzing: a DEL (or a quote, backslash, newline) in the reply's `sn`
        // made the printed configuration invalid TOML.
        for sn in ["2ZTA\u{7f}X", "a\"b", "a\\b", "a\nb\u{0}", "'''"] {
            let d = Discovered {
                ip: std::net::Ipv4Addr::LOCALHOST.into(),
                found: Found {
                    sn: sn.into(),
                    product_name: String::new(),
                    alias_name: String::new(),
                    https_port: 16674,
                    raw: serde_json::json!({}),
                },
            };
            let t: toml::Table = toml::from_str(&render_toml(&[d])).unwrap();
            assert_eq!(t["playbox"][0]["sn"].as_str(), Some(sn));
        }
    }
}
