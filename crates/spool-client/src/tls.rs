//! Which servers a `https://` or `wss://` connection trusts.
//!
//! By default the system's certificate store (rustls-native-certs: `/etc/ssl/certs` and the
//! like, or `SSL_CERT_FILE` / `SSL_CERT_DIR`). [`Tls::from_ca_pem`] / [`Tls::from_ca_file`]
//! trust only the given certificate authorities instead, as `curl --cacert` does: a server
//! with a private CA, or a test's. rustls with the `ring` provider, TLS 1.2 and 1.3.
//!
//! ```no_run
//! # fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let tls = spool_client::Tls::from_ca_file("ca.pem")?;
//! let ws = spool_client::Config::new("wss://spool.internal:7070/v1/ws").tls(tls.clone());
//! let http = spool_client::http::HttpClient::with_tls("https://spool.internal:7070", None, Some(&tls))?;
//! # Ok(())
//! # }
//! ```

use std::{fmt, path::Path, sync::Arc};

use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, pem::PemObject},
};

/// Why a [`Tls`] could not be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// The CA file cannot be read.
    #[error("cannot read the CA certificate file {path}: {why}")]
    Read { path: String, why: String },
    /// The PEM holds no usable CA certificate.
    #[error("no usable CA certificate in {what}: {why}")]
    NoCa { what: String, why: String },
    /// The system's certificate store has no certificate.
    #[error("no trusted certificate in the system's store ({0}); give a CA certificate")]
    NoSystemRoots(String),
}

/// The trust settings of TLS connections; cheap to clone.
#[derive(Clone)]
pub struct Tls {
    config: Arc<ClientConfig>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls").finish_non_exhaustive()
    }
}

impl Tls {
    /// Trusts the system's certificate store.
    pub fn system() -> Result<Self, TlsError> {
        let found = rustls_native_certs::load_native_certs();
        let mut roots = RootCertStore::empty();
        let (added, _ignored) = roots.add_parsable_certificates(found.certs);
        if added == 0 {
            let why = found
                .errors
                .first()
                .map_or_else(|| "none found".to_owned(), |e| e.to_string());
            return Err(TlsError::NoSystemRoots(why));
        }
        Ok(Self::with_roots(roots))
    }

    /// Trusts only the CA certificates in `pem` (one or more `-----BEGIN CERTIFICATE-----`).
    pub fn from_ca_pem(pem: &[u8]) -> Result<Self, TlsError> {
        Self::from_pem(pem, "the CA certificate PEM")
    }

    /// Trusts only the CA certificates in the PEM file at `path`.
    pub fn from_ca_file(path: impl AsRef<Path>) -> Result<Self, TlsError> {
        let path = path.as_ref();
        let pem = std::fs::read(path).map_err(|e| TlsError::Read {
            path: path.display().to_string(),
            why: match e.kind() {
                std::io::ErrorKind::NotFound => "no such file".into(),
                std::io::ErrorKind::PermissionDenied => "permission denied".into(),
                _ => e.to_string(),
            },
        })?;
        Self::from_pem(&pem, &path.display().to_string())
    }

    fn from_pem(pem: &[u8], what: &str) -> Result<Self, TlsError> {
        let no_ca = |why: String| TlsError::NoCa {
            what: what.to_owned(),
            why,
        };
        let certs = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| no_ca(format!("not PEM ({e})")))?;
        if certs.is_empty() {
            return Err(no_ca("no -----BEGIN CERTIFICATE----- block".into()));
        }
        let mut roots = RootCertStore::empty();
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| no_ca(format!("not a usable certificate ({e})")))?;
        }
        Ok(Self::with_roots(roots))
    }

    fn with_roots(roots: RootCertStore) -> Self {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        Self {
            config: Arc::new(config),
        }
    }

    /// The rustls configuration, e.g. for another HTTP or WebSocket client.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        self.config.clone()
    }
}
