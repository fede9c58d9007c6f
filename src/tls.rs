//! Every rustls `ClientConfig` is built here, one per trust policy, with an explicit
//! crypto provider. BVCSP REST and WebSocket share one config; the broker and each play
//! box get their own, so pinning or `insecure` for one never weakens another.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: no PEM certificates found")]
    NoCerts { path: String },
    #[error("{path}: no PEM private key found")]
    NoKey { path: String },
    #[error("no usable system root certificates")]
    NoRoots,
    #[error("TLS setup: {0}")]
    Rustls(#[from] rustls::Error),
}

/// How a server certificate is trusted.
#[derive(Debug, Clone)]
pub enum Trust {
    /// The operating system's roots, with the hostname checked.
    System,
    /// A PEM CA bundle, with the hostname checked.
    CaFile(String),
    /// Only a certificate whose SHA-256 (of the DER) is this; chain, name and expiry ignored.
    Fingerprint([u8; 32]),
    /// Anything (logged loudly by the caller).
    Insecure,
    /// Trust on first use: the certificate seen at first contact is pinned (and stored);
    /// a different one later is refused.
    Tofu(Arc<TofuPin>),
}

/// The pin of a trust-on-first-use peer, kept in a file so restarts keep it.
#[derive(Debug)]
pub struct TofuPin {
    path: std::path::PathBuf,
    pin: std::sync::Mutex<Option<[u8; 32]>>,
}

impl TofuPin {
    /// Load the pin stored at `path`, if any.
    pub fn load(path: std::path::PathBuf) -> Arc<TofuPin> {
        let pin = std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| parse_fingerprint(s.trim()).ok());
        Arc::new(TofuPin {
            path,
            pin: std::sync::Mutex::new(pin),
        })
    }

    pub fn pinned(&self) -> Option<String> {
        self.pin
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map(hex::encode)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Accept `seen` if it is the pinned certificate, or pin it if nothing is pinned yet.
    fn check(&self, seen: [u8; 32]) -> Result<(), rustls::Error> {
        let mut pin = self.pin.lock().unwrap_or_else(|p| p.into_inner());
        match *pin {
            Some(p) if p == seen => Ok(()),
            Some(p) => Err(rustls::Error::General(format!(
                "certificate changed since first contact: pinned sha256 {}, got {};                  if the box was really replaced, delete {}",
                hex::encode(p),
                hex::encode(seen),
                self.path.display()
            ))),
            None => {
                *pin = Some(seen);
                if let Some(dir) = self.path.parent() {
                    let _ = crate::storage::create_private_dir(dir);
                }
                let text = format!("{}\n", hex::encode(seen));
                match crate::storage::write_atomic(&self.path, text.as_bytes()) {
                    Ok(()) => tracing::info!(
                        "pinned certificate sha256 {} at first contact ({})",
                        hex::encode(seen),
                        self.path.display()
                    ),
                    Err(e) => tracing::warn!(
                        "pinned certificate sha256 {} for this run only: cannot store it in {}: {e}",
                        hex::encode(seen),
                        self.path.display()
                    ),
                }
                Ok(())
            }
        }
    }
}

impl Trust {
    pub fn from_options(insecure: bool, fingerprint: &str, ca_file: &str) -> Result<Trust, String> {
        if insecure {
            Ok(Trust::Insecure)
        } else if !fingerprint.is_empty() {
            parse_fingerprint(fingerprint).map(Trust::Fingerprint)
        } else if !ca_file.is_empty() {
            Ok(Trust::CaFile(ca_file.to_string()))
        } else {
            Ok(Trust::System)
        }
    }
}

/// Hex SHA-256, colons and case allowed.
pub fn parse_fingerprint(s: &str) -> Result<[u8; 32], String> {
    let clean: String = s
        .chars()
        .filter(|c| *c != ':' && !c.is_whitespace())
        .collect();
    let bytes = hex::decode(&clean).map_err(|_| "must be hex (colons allowed)".to_string())?;
    bytes
        .try_into()
        .map_err(|_| "must be a SHA-256: 32 bytes, 64 hex digits".to_string())
}

pub fn fingerprint_hex(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Client certificate and key for mutual TLS, PEM files.
pub struct ClientAuth<'a> {
    pub cert_file: &'a str,
    pub key_file: &'a str,
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

fn read_file(path: &str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(Path::new(path)).map_err(|source| TlsError::Read {
        path: path.into(),
        source,
    })
}

fn read_certs(path: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
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

fn read_key(path: &str) -> Result<rustls::pki_types::PrivateKeyDer<'static>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    let data = read_file(path)?;
    rustls::pki_types::PrivateKeyDer::from_pem_slice(&data)
        .map_err(|_| TlsError::NoKey { path: path.into() })
}

#[derive(Debug)]
enum Pin {
    Fixed([u8; 32]),
    Tofu(Arc<TofuPin>),
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
            Pin::Any => Ok(ServerCertVerified::assertion()),
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
    fn trust_modes_build() {
        assert!(client_config(&Trust::Insecure, None).is_ok());
        assert!(client_config(&Trust::Fingerprint([1; 32]), None).is_ok());
        assert!(matches!(
            client_config(&Trust::CaFile("/nonexistent.pem".into()), None),
            Err(TlsError::Read { .. })
        ));
    }
}
