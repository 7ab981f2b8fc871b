//! TLS on the listener: rustls (the `ring` provider), the certificate chain and private key
//! read from PEM files (`--tls-cert`, `--tls-key`), and read again on SIGHUP.
//!
//! A reload swaps the certificate new handshakes are answered with; connections already open
//! keep theirs and are never dropped. When the new files cannot be read, do not parse or do
//! not belong together, the served certificate stays as it was and the reload is logged as an
//! error — a typo while rotating certificates never takes the server down.
//!
//! The server speaks HTTP/1.1 only, so ALPN offers `http/1.1`.

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
};

use parking_lot::RwLock;
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        self,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
        server::{ClientHello, ResolvesServerCert},
        sign::CertifiedKey,
    },
};
use tokio_util::sync::CancellationToken;

/// Why the TLS certificate or key could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The certificate file is missing, unreadable, or holds no PEM certificate.
    #[error("certificate {path}: {why}")]
    Cert { path: PathBuf, why: String },
    /// The key file is missing, unreadable, or holds no PEM private key rustls can sign with.
    #[error("private key {path}: {why}")]
    Key { path: PathBuf, why: String },
    /// Both files read, but the key is not the certificate's.
    #[error("the private key {key} does not belong to the certificate {cert}")]
    Mismatch { cert: PathBuf, key: PathBuf },
}

impl TlsError {
    /// Whether the certificate file (rather than the key file) is at fault.
    pub fn is_cert(&self) -> bool {
        matches!(self, TlsError::Cert { .. })
    }
}

/// The server's TLS: where its certificate and key are, and the pair served now.
pub struct Tls {
    cert_path: PathBuf,
    key_path: PathBuf,
    current: Arc<Current>,
    acceptor: TlsAcceptor,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("cert", &self.cert_path)
            .field("key", &self.key_path)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// Reads the PEM certificate chain at `cert` (the server's certificate first) and the PEM
    /// private key at `key` (PKCS#8, PKCS#1 RSA or SEC1 EC) and checks that they belong
    /// together.
    pub fn load(cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let pair = read_pair(cert, key)?;
        let current = Arc::new(Current(RwLock::new(pair)));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Cert {
                path: cert.to_owned(),
                why: e.to_string(),
            })?
            .with_no_client_auth()
            .with_cert_resolver(current.clone());
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Self {
            cert_path: cert.to_owned(),
            key_path: key.to_owned(),
            current,
            acceptor: TlsAcceptor::from(Arc::new(config)),
        })
    }

    /// Reads both files again and serves the new pair to new handshakes; on an error the
    /// pair served so far stays.
    pub fn reload(&self) -> Result<(), TlsError> {
        let pair = read_pair(&self.cert_path, &self.key_path)?;
        *self.current.0.write() = pair;
        Ok(())
    }

    pub(crate) fn acceptor(&self) -> TlsAcceptor {
        self.acceptor.clone()
    }

    /// Reloads on every SIGHUP until `shutdown` fires.
    #[cfg(unix)]
    pub(crate) fn reload_on_sighup(self: Arc<Self>, shutdown: CancellationToken) {
        use tokio::signal::unix::{SignalKind, signal};
        let mut hangups = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGHUP: the TLS certificate will not be reloaded");
                return;
            }
        };
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    got = hangups.recv() => if got.is_none() { return },
                }
                let tls = self.clone();
                match tokio::task::spawn_blocking(move || tls.reload()).await {
                    Ok(Ok(())) => tracing::info!(
                        cert = %self.cert_path.display(),
                        key = %self.key_path.display(),
                        "SIGHUP: reloaded the TLS certificate and key"
                    ),
                    Ok(Err(e)) => tracing::error!(
                        error = %e,
                        "SIGHUP: cannot reload the TLS certificate; still serving the previous one"
                    ),
                    Err(e) => tracing::error!(error = %e, "SIGHUP: the TLS reload panicked"),
                }
            }
        });
    }

    #[cfg(not(unix))]
    pub(crate) fn reload_on_sighup(self: Arc<Self>, _shutdown: CancellationToken) {}
}

/// The pair new handshakes get.
#[derive(Debug)]
struct Current(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().clone())
    }
}

fn read_pair(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let cert_err = |why: String| TlsError::Cert {
        path: cert.to_owned(),
        why,
    };
    let key_err = |why: String| TlsError::Key {
        path: key.to_owned(),
        why,
    };
    let cert_pem = std::fs::read(cert).map_err(|e| cert_err(io_why(&e)))?;
    let chain = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| cert_err(format!("not a PEM certificate chain ({e})")))?;
    if chain.is_empty() {
        return Err(cert_err(
            "holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into(),
        ));
    }
    let key_pem = std::fs::read(key).map_err(|e| key_err(io_why(&e)))?;
    let private = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => {
            key_err("holds no PEM private key (PKCS#8, RSA or EC)".into())
        }
        other => key_err(format!("not a PEM private key ({other})")),
    })?;
    let provider = rustls::crypto::ring::default_provider();
    let signing = provider
        .key_provider
        .load_private_key(private)
        .map_err(|e| key_err(format!("unusable private key ({e})")))?;
    let pair = CertifiedKey::new(chain, signing);
    match pair.keys_match() {
        Ok(()) => Ok(Arc::new(pair)),
        // The certificate's public key could not be compared (an unusual encoding): rustls
        // would find out at the first handshake; let it.
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(Arc::new(pair))
        }
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            Err(TlsError::Mismatch {
                cert: cert.to_owned(),
                key: key.to_owned(),
            })
        }
        Err(e) => Err(cert_err(format!("not a usable certificate ({e})"))),
    }
}

/// An I/O error without the "(os error N)" suffix, which says nothing more to a reader.
fn io_why(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such file".into(),
        std::io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => e.to_string(),
    }
}
