//! TLS configuration: the certificate every TLS listener presents, and client configurations.
//!
//! The certificate comes from `[tls] cert`/`key` (PEM). In dev mode, with none configured, a
//! self-signed one is made with `rcgen` for the host name, `localhost` and the loopback
//! addresses, and kept in `<data_dir>/tls/` so it stays the same across restarts.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::Shared;

/// Why no TLS configuration could be made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or holds nothing usable.
    #[error("{path}: {message}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        message: String,
    },
    /// No certificate is configured and dev mode is off.
    #[error("no TLS certificate configured ([tls] cert and key) and dev mode is off")]
    NotConfigured,
    /// The self-signed certificate could not be made or kept.
    #[error("cannot make the dev certificate: {0}")]
    Generate(String),
    /// rustls refused the certificate or key.
    #[error("invalid certificate or key: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The certificate chain and key listeners present.
pub struct Identity {
    /// The chain, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The private key.
    pub key: PrivateKeyDer<'static>,
}

impl Identity {
    /// The configured certificate, or in dev mode the kept (or a new) self-signed one.
    pub fn from_settings(shared: &Shared) -> Result<Self, TlsError> {
        match &shared.tls {
            Some((cert, key)) => Self::from_pem_files(cert, key),
            None if shared.dev_mode => Self::dev(&shared.data_dir.join("tls"), &shared.hostname),
            None => Err(TlsError::NotConfigured),
        }
    }

    /// Reads a PEM chain and key.
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let pem_err = |path: &Path, message: String| TlsError::Pem {
            path: path.to_owned(),
            message,
        };
        let chain = CertificateDer::pem_file_iter(cert)
            .map_err(|e| pem_err(cert, e.to_string()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem_err(cert, e.to_string()))?;
        if chain.is_empty() {
            return Err(pem_err(cert, "no certificate in the file".into()));
        }
        let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| pem_err(key, e.to_string()))?;
        Ok(Self {
            chain,
            key: key_der,
        })
    }

    /// The dev certificate kept in `dir`, made on first use.
    pub fn dev(dir: &Path, hostname: &str) -> Result<Self, TlsError> {
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        if cert.exists() && key.exists() {
            return Self::from_pem_files(&cert, &key);
        }
        let names = vec![
            hostname.to_owned(),
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
            "::1".to_owned(),
        ];
        let made = rcgen::generate_simple_self_signed(names)
            .map_err(|e| TlsError::Generate(e.to_string()))?;
        std::fs::create_dir_all(dir)
            .map_err(|e| TlsError::Generate(format!("{}: {e}", dir.display())))?;
        crate::config::write_private(&key, made.signing_key.serialize_pem().as_bytes())
            .map_err(|e| TlsError::Generate(format!("{}: {e}", key.display())))?;
        crate::config::write_private(&cert, made.cert.pem().as_bytes())
            .map_err(|e| TlsError::Generate(format!("{}: {e}", cert.display())))?;
        Self::from_pem_files(&cert, &key)
    }

    /// A fresh self-signed identity in memory, for tests.
    pub fn self_signed(names: &[&str]) -> Result<Self, TlsError> {
        let made = rcgen::generate_simple_self_signed(
            names.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>(),
        )
        .map_err(|e| TlsError::Generate(e.to_string()))?;
        let key = PrivateKeyDer::try_from(made.signing_key.serialize_der())
            .map_err(|e| TlsError::Generate(e.to_string()))?;
        Ok(Self {
            chain: vec![made.cert.der().clone()],
            key,
        })
    }

    /// A server configuration presenting this identity (TLS 1.2 and 1.3).
    pub fn server_config(&self) -> Result<Arc<rustls::ServerConfig>, TlsError> {
        let cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        Ok(Arc::new(cfg))
    }

    /// A client configuration that trusts exactly this identity's certificate (tests, and
    /// internal hops to a known peer).
    pub fn trusting_client_config(&self) -> Result<Arc<rustls::ClientConfig>, TlsError> {
        let mut roots = rustls::RootCertStore::empty();
        for c in &self.chain {
            roots.add(c.clone())?;
        }
        let cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Arc::new(cfg))
    }
}

/// The crypto provider every configuration uses (ring).
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_certificate_is_made_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let a = Identity::dev(&dir.path().join("tls"), "mx.example.test").unwrap();
        let b = Identity::dev(&dir.path().join("tls"), "mx.example.test").unwrap();
        assert_eq!(a.chain, b.chain);
        a.server_config().unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.path().join("tls/key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn missing_or_bad_pem_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.pem");
        std::fs::write(&bad, "not pem").unwrap();
        let e = Identity::from_pem_files(&bad, &bad)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("bad.pem"), "{e}");
        let mut shared = Shared::for_tests(dir.path());
        shared.dev_mode = false;
        assert!(matches!(
            Identity::from_settings(&shared),
            Err(TlsError::NotConfigured)
        ));
    }

    #[tokio::test]
    async fn handshake_with_trusting_client() {
        let id = Identity::self_signed(&["localhost"]).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(id.server_config().unwrap());
        let connector = tokio_rustls::TlsConnector::from(id.trusting_client_config().unwrap());
        let (a, b) = tokio::io::duplex(64 * 1024);
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let (s, c) = tokio::join!(acceptor.accept(a), connector.connect(name, b));
        s.unwrap();
        c.unwrap();
    }
}

/// A client configuration for opportunistic TLS to the internet (RFC 7435; Postfix's
/// `smtp_tls_security_level = may`): the session is encrypted, but the server's certificate
/// is not checked, since without DANE or MTA-STS nothing says which name it should carry and
/// a refusal would only push the mail back to plaintext. The handshake signatures are still
/// verified, so the peer holds the key of the certificate it showed.
pub fn opportunistic_client_config() -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider())))
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}

/// Accepts any certificate; checks the handshake signatures (see
/// [`opportunistic_client_config`]).
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
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
