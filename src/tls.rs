//! Every rustls `ClientConfig` is built here, one per trust policy, with an explicit
//! crypto provider. BVCSP REST and WebSocket share one config; the broker and each play
//! box get their own, so pinning or `insecure` for one never weakens another.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: no PEM certificates found", path.display())]
    NoCerts { path: PathBuf },
    #[error("{}: no PEM private key found", path.display())]
    NoKey { path: PathBuf },
    #[error("no usable system root certificates")]
    NoRoots,
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
    /// A trust-on-first-use pin that cannot be used or stored: nothing is sent.
    #[error(transparent)]
    Pin(Arc<PinError>),
    #[error("first contact (TLS handshake before pinning) failed: {0}")]
    FirstContact(#[source] FirstContactError),
}

/// A pin file that cannot be used: every connection is refused until it is fixed.
#[derive(Debug, thiserror::Error)]
pub enum PinError {
    #[error(
        "pin file {path} is not a SHA-256 fingerprint ({source}); refusing to connect \
         until it is fixed or deleted"
    )]
    NotAFingerprint {
        path: String,
        #[source]
        source: FingerprintError,
    },
    #[error(
        "cannot read pin file {path}: {source}; refusing to connect until it is fixed or deleted"
    )]
    Unreadable {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot store the pin in {path}: {source}; refusing to connect")]
    Unstorable {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Why the first TLS handshake with a trust-on-first-use peer failed.
#[derive(Debug, thiserror::Error)]
pub enum FirstContactError {
    #[error("timed out")]
    TimedOut,
    #[error(transparent)]
    Name(#[from] rustls::pki_types::InvalidDnsNameError),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error("the server sent no certificate")]
    NoCertificate,
}

/// A certificate fingerprint that is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FingerprintError {
    #[error("must be hex (colons allowed)")]
    NotHex,
    #[error("must be a SHA-256: 32 bytes, 64 hex digits")]
    WrongLength,
}

/// How a server certificate is trusted.
#[derive(Debug, Clone)]
pub enum Trust {
    /// The operating system's roots, with the hostname checked.
    System,
    /// A PEM CA bundle, with the hostname checked.
    CaFile(PathBuf),
    /// Only a certificate whose SHA-256 (of the DER) is this; chain, name and expiry ignored.
    Fingerprint([u8; 32]),
    /// Anything (logged loudly by the caller).
    Insecure,
    /// Trust on first use: the certificate seen at first contact is pinned (and stored);
    /// a different one later is refused.
    Tofu(Arc<TofuPin>),
}

/// The pin of a trust-on-first-use peer, kept in a file so restarts keep it.
///
/// - A pin is stored only after a TLS handshake with the certificate completed
///   ([`TofuPin::first_contact`]), never from inside the certificate verifier, where
///   the peer has not yet proved it holds the certificate's key.
/// - It is written atomically: a temporary file in the same directory (mode 0600),
///   synced, then linked into place; an existing file is never overwritten.
/// - A pin file that exists but cannot be read or parsed fails closed: every connection
///   is refused, with the reason, until it is fixed or deleted. It is never replaced.
#[derive(Debug)]
pub struct TofuPin {
    path: std::path::PathBuf,
    state: std::sync::Mutex<PinState>,
}

#[derive(Debug, Clone)]
enum PinState {
    /// No pin file: the first completed handshake pins.
    Empty,
    Pinned([u8; 32]),
    /// The pin file is there but unusable: refuse everything.
    Broken(Arc<PinError>),
}

impl TofuPin {
    /// Load the pin stored at `path`, if any.
    pub fn load(path: std::path::PathBuf) -> Arc<TofuPin> {
        let state = match std::fs::read_to_string(&path) {
            Ok(s) => match parse_fingerprint(s.trim()) {
                Ok(fp) => PinState::Pinned(fp),
                Err(source) => PinState::Broken(Arc::new(PinError::NotAFingerprint {
                    path: path.display().to_string(),
                    source,
                })),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => PinState::Empty,
            Err(source) => PinState::Broken(Arc::new(PinError::Unreadable {
                path: path.display().to_string(),
                source,
            })),
        };
        if let PinState::Broken(why) = &state {
            tracing::error!("{why}");
        }
        Arc::new(TofuPin {
            path,
            state: std::sync::Mutex::new(state),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, PinState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn pinned(&self) -> Option<String> {
        match &*self.state() {
            PinState::Pinned(p) => Some(hex::encode(p)),
            _ => None,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accept `seen` only if it is the pinned certificate. Pins nothing.
    fn check(&self, seen: [u8; 32]) -> Result<(), rustls::Error> {
        match &*self.state() {
            PinState::Pinned(p) if *p == seen => Ok(()),
            PinState::Pinned(p) => Err(rustls::Error::General(format!(
                "certificate changed since first contact: pinned sha256 {}, got {}; \
                 if the box was really replaced, delete {}",
                hex::encode(p),
                hex::encode(seen),
                self.path.display()
            ))),
            PinState::Empty => Err(rustls::Error::General(
                "no certificate pinned yet (first contact not completed)".into(),
            )),
            PinState::Broken(why) => Err(rustls::Error::General(why.to_string())),
        }
    }

    /// Make sure a pin exists before anything is sent: with none yet, complete a TLS
    /// handshake with `host:port` (the handshake signature checked against the
    /// certificate presented) and only then store that certificate's fingerprint.
    /// With a pin already, nothing happens; with a broken pin file, an error.
    pub async fn first_contact(
        &self,
        host: &str,
        port: u16,
        timeout: std::time::Duration,
    ) -> Result<(), TlsError> {
        match &*self.state() {
            PinState::Pinned(_) => return Ok(()),
            PinState::Broken(why) => return Err(TlsError::Pin(why.clone())),
            PinState::Empty => {}
        }
        let seen = tokio::time::timeout(timeout, handshake_fingerprint(host, port))
            .await
            .map_err(|_| TlsError::FirstContact(FirstContactError::TimedOut))??;
        let mut state = self.state();
        match &*state {
            PinState::Empty => {
                store_pin(&self.path, seen).map_err(|source| {
                    TlsError::Pin(Arc::new(PinError::Unstorable {
                        path: self.path.display().to_string(),
                        source,
                    }))
                })?;
                tracing::info!(
                    "pinned certificate sha256 {} at first contact ({})",
                    hex::encode(seen),
                    self.path.display()
                );
                *state = PinState::Pinned(seen);
                Ok(())
            }
            // Someone else got there first: the usual check decides.
            _ => Ok(()),
        }
    }
}

/// The SHA-256 of the end-entity certificate of a completed handshake with `host:port`.
async fn handshake_fingerprint(host: &str, port: u16) -> Result<[u8; 32], TlsError> {
    let fail = |e: FirstContactError| TlsError::FirstContact(e);
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let name = match bare.parse::<std::net::IpAddr>() {
        Ok(ip) => ServerName::IpAddress(ip.into()),
        Err(_) => ServerName::try_from(bare.to_owned()).map_err(|e| fail(e.into()))?,
    };
    let provider = provider();
    let config = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedVerifier {
            pin: Pin::FirstContact,
            algorithms: provider.signature_verification_algorithms,
        }))
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect((bare, port))
        .await
        .map_err(|e| fail(e.into()))?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| fail(e.into()))?;
    let cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or_else(|| fail(FirstContactError::NoCertificate))?;
    Ok(Sha256::digest(cert.as_ref()).into())
}

/// Write `fp` to `path` atomically, mode 0600, never over an existing file.
fn store_pin(path: &Path, fp: [u8; 32]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::Builder::new().prefix(".pin-").tempfile_in(dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    writeln!(tmp, "{}", hex::encode(fp))?;
    tmp.as_file().sync_all()?;
    tmp.persist_noclobber(path).map_err(|e| e.error)?;
    // The new name is durable once its directory is.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

impl Trust {
    pub fn from_options(
        insecure: bool,
        fingerprint: Option<[u8; 32]>,
        ca_file: Option<&Path>,
    ) -> Trust {
        if insecure {
            Trust::Insecure
        } else if let Some(sha256) = fingerprint {
            Trust::Fingerprint(sha256)
        } else if let Some(ca_file) = ca_file {
            Trust::CaFile(ca_file.to_path_buf())
        } else {
            Trust::System
        }
    }
}

/// Hex SHA-256, colons and case allowed.
pub fn parse_fingerprint(s: &str) -> Result<[u8; 32], FingerprintError> {
    let clean: String = s
        .chars()
        .filter(|c| *c != ':' && !c.is_whitespace())
        .collect();
    let bytes = hex::decode(&clean).map_err(|_| FingerprintError::NotHex)?;
    bytes.try_into().map_err(|_| FingerprintError::WrongLength)
}

pub fn fingerprint_hex(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// reqwest (built without a provider of its own, to keep one crypto library in the
/// binary) asks rustls for the process-wide default when a client is built, even one
/// given a complete TLS config: install ours, once, before any client is built.
pub fn install_process_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Err only if another provider was installed first, which then serves as well.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// Client certificate and key for mutual TLS, PEM files.
pub struct ClientAuth<'a> {
    pub cert_file: &'a Path,
    pub key_file: &'a Path,
}

/// A client config for one trust policy. ALPN stays empty (HTTP/1.1) because the same
/// config carries WebSocket upgrades, which an h2 choice would break.
pub fn client_config(
    trust: &Trust,
    client_auth: Option<ClientAuth<'_>>,
) -> Result<ClientConfig, TlsError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match trust {
        Trust::System => {
            let mut roots = RootCertStore::empty();
            let loaded = rustls_native_certs::load_native_certs();
            for cert in loaded.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(TlsError::NoRoots);
            }
            builder.with_root_certificates(roots)
        }
        Trust::CaFile(path) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certs(path)? {
                roots.add(cert)?;
            }
            builder.with_root_certificates(roots)
        }
        Trust::Fingerprint(fp) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedVerifier {
                pin: Pin::Fixed(*fp),
                algorithms: provider.signature_verification_algorithms,
            })),
        Trust::Tofu(pin) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedVerifier {
                pin: Pin::Tofu(pin.clone()),
                algorithms: provider.signature_verification_algorithms,
            })),
        Trust::Insecure => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedVerifier {
                pin: Pin::Any,
                algorithms: provider.signature_verification_algorithms,
            })),
    };
    let config = match client_auth {
        None => builder.with_no_client_auth(),
        Some(auth) => {
            let certs = read_certs(auth.cert_file)?;
            let key = read_key(auth.key_file)?;
            builder.with_client_auth_cert(certs, key)?
        }
    };
    Ok(config)
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.into(),
        source,
    })
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    let data = read_file(path)?;
    let certs: Vec<_> = CertificateDer::pem_slice_iter(&data)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::NoCerts { path: path.into() });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<rustls::pki_types::PrivateKeyDer<'static>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    let data = read_file(path)?;
    rustls::pki_types::PrivateKeyDer::from_pem_slice(&data)
        .map_err(|_| TlsError::NoKey { path: path.into() })
}

#[derive(Debug)]
enum Pin {
    Fixed([u8; 32]),
    Tofu(Arc<TofuPin>),
    /// A first contact: any certificate, but the handshake signature must be made with
    /// its key; the caller pins it once the handshake completed.
    FirstContact,
    /// The insecure mode: anything goes, signatures unchecked.
    Any,
}

/// Accepts exactly one end-entity certificate (by SHA-256), or any in the insecure
/// mode. With a pin the handshake signature is still verified, so the peer must hold
/// the pinned certificate's key.
#[derive(Debug)]
struct PinnedVerifier {
    pin: Pin,
    algorithms: WebPkiSupportedAlgorithms,
}

impl PinnedVerifier {
    fn check_signatures(&self) -> bool {
        !matches!(self.pin, Pin::Any)
    }
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let seen: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        match &self.pin {
            Pin::Any | Pin::FirstContact => Ok(ServerCertVerified::assertion()),
            Pin::Fixed(fp) if *fp == seen => Ok(ServerCertVerified::assertion()),
            Pin::Fixed(_) => Err(rustls::Error::General(format!(
                "server certificate fingerprint mismatch: got sha256 {}",
                hex::encode(seen)
            ))),
            Pin::Tofu(pin) => pin.check(seen).map(|()| ServerCertVerified::assertion()),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        if !self.check_signatures() {
            return Ok(HandshakeSignatureValid::assertion());
        }
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        if !self.check_signatures() {
            return Ok(HandshakeSignatureValid::assertion());
        }
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_accept_colons_and_case() {
        let hex64 = "AB".repeat(32);
        let with_colons: String = hex64
            .as_bytes()
            .chunks(2)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect::<Vec<_>>()
            .join(":");
        assert_eq!(parse_fingerprint(&hex64).unwrap(), [0xab; 32]);
        assert_eq!(parse_fingerprint(&with_colons).unwrap(), [0xab; 32]);
        assert!(parse_fingerprint("abcd").is_err());
        assert!(parse_fingerprint(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn pin_files_load_or_fail_closed() {
        let dir = tempfile::tempdir().unwrap();
        let missing = TofuPin::load(dir.path().join("none.pin"));
        assert!(matches!(*missing.state(), PinState::Empty));
        assert!(missing.check([1; 32]).is_err(), "nothing accepted unpinned");

        let good = dir.path().join("good.pin");
        std::fs::write(&good, format!("{}\n", "ab".repeat(32))).unwrap();
        let pin = TofuPin::load(good);
        assert_eq!(pin.pinned(), Some("ab".repeat(32)));
        assert!(pin.check([0xab; 32]).is_ok());
        assert!(pin.check([1; 32]).is_err());

        let a_dir = dir.path().join("dir.pin");
        std::fs::create_dir(&a_dir).unwrap();
        let garbage = dir.path().join("garbage.pin");
        std::fs::write(&garbage, "not a pin").unwrap();
        for path in [a_dir, garbage] {
            let pin = TofuPin::load(path.clone());
            assert!(matches!(*pin.state(), PinState::Broken(_)), "{path:?}");
            let e = pin.check([1; 32]).unwrap_err().to_string();
            assert!(e.contains("refusing to connect"), "{e}");
        }

        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let locked = dir.path().join("locked.pin");
            std::fs::write(&locked, "ab".repeat(32)).unwrap();
            std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o000)).unwrap();
            if std::fs::read(&locked).is_err() {
                let pin = TofuPin::load(locked);
                let e = pin.check([0xab; 32]).unwrap_err().to_string();
                assert!(e.contains("cannot read pin file"), "{e}");
            } else {
                eprintln!("running as root: the permission-denied case cannot be made");
            }
        }
    }

    #[test]
    fn pins_are_stored_atomically_and_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("box.pin");
        store_pin(&path, [7; 32]).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            format!("{}\n", "07".repeat(32))
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        }
        assert!(
            store_pin(&path, [8; 32]).is_err(),
            "an existing pin replaced"
        );
        assert_eq!(TofuPin::load(path.clone()).pinned(), Some("07".repeat(32)));
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("box.pin")]);
    }

    #[tokio::test]
    async fn first_contact_pins_only_a_completed_handshake() {
        let sim = bvcsp2mqtt_testkit::playbox::PlayboxSim::start(Default::default())
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("box.pin");
        let pin = TofuPin::load(path.clone());
        let port = sim.addr().port();
        let wait = std::time::Duration::from_secs(5);
        sim.set_impostor(true);
        let e = pin
            .first_contact("127.0.0.1", port, wait)
            .await
            .unwrap_err();
        assert!(matches!(e, TlsError::FirstContact(_)), "{e}");
        assert!(!path.exists());
        assert_eq!(pin.pinned(), None);
        sim.set_impostor(false);
        pin.first_contact("127.0.0.1", port, wait).await.unwrap();
        assert_eq!(pin.pinned(), Some(sim.cert_fingerprint_sha256()));
        assert_eq!(
            std::fs::read_to_string(&path).unwrap().trim(),
            sim.cert_fingerprint_sha256()
        );
        // Pinned: no more handshakes of its own.
        let before = sim.tls_handshakes();
        pin.first_contact("127.0.0.1", port, wait).await.unwrap();
        assert_eq!(sim.tls_handshakes(), before);
    }

    #[test]
    fn trust_modes_build() {
        assert!(client_config(&Trust::Insecure, None).is_ok());
        assert!(client_config(&Trust::Fingerprint([1; 32]), None).is_ok());
        assert!(matches!(
            client_config(&Trust::CaFile("/nonexistent.pem".into()), None),
            Err(TlsError::Read { .. })
        ));
    }
}
