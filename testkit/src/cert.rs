//! Self-signed server certificates for the simulators, as on-prem devices present them.

use std::io;
use std::sync::Arc;

use sha2::{Digest, Sha256};

/// A TLS acceptor with a fresh self-signed certificate.
#[derive(Clone)]
pub struct SelfSigned {
    pub acceptor: tokio_rustls::TlsAcceptor,
    /// Lowercase hex SHA-256 of the certificate DER.
    pub fingerprint: String,
    pub pem: String,
    /// Presents this same certificate but signs the handshake with another key, as a
    /// machine in the middle that copied the certificate would: no handshake completes.
    pub impostor: tokio_rustls::TlsAcceptor,
}

/// Always the one certificate and key it was made with, matching or not.
#[derive(Debug)]
struct Fixed(Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for Fixed {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// A certificate for `localhost` and `127.0.0.1`. `ca` makes it CA:TRUE, what
/// `openssl req -x509` produces and many real servers use as their leaf. ALPN is
/// HTTP/1.1 only: WebSocket upgrades need it, and play boxes speak nothing else.
pub fn self_signed(common_name: &str, ca: bool) -> io::Result<SelfSigned> {
    let key = rcgen::KeyPair::generate().map_err(io::Error::other)?;
    let mut params =
        rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .map_err(io::Error::other)?;
    if ca {
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    }
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, common_name);
    let cert = params.self_signed(&key).map_err(io::Error::other)?;
    let der = cert.der().clone();
    let fingerprint = hex::encode(Sha256::digest(der.as_ref()));
    let pem = cert.pem();
    let key_der = rustls::pki_types::PrivateKeyDer::Pkcs8(
        rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()),
    );
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(io::Error::other)?
    .with_no_client_auth()
    .with_single_cert(vec![der], key_der)
    .map_err(io::Error::other)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];

    let other = rcgen::KeyPair::generate().map_err(io::Error::other)?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let wrong_key = provider
        .key_provider
        .load_private_key(rustls::pki_types::PrivateKeyDer::Pkcs8(
            rustls::pki_types::PrivatePkcs8KeyDer::from(other.serialize_der()),
        ))
        .map_err(io::Error::other)?;
    let stolen = rustls::sign::CertifiedKey::new(vec![cert.der().clone()], wrong_key);
    let mut fake = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(io::Error::other)?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Fixed(Arc::new(stolen))));
    fake.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(SelfSigned {
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(cfg)),
        fingerprint,
        pem,
        impostor: tokio_rustls::TlsAcceptor::from(Arc::new(fake)),
    })
}
