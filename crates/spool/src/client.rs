//! What the client commands share: the server address, credentials and whom to trust over
//! TLS. The HTTP client itself is spool-client's.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use spool_client::{Tls, http::HttpClient};

#[derive(Args, Debug, Clone)]
pub struct ClientArgs {
    /// Base URL of the Spool server (http:// or https://).
    #[arg(long, env = "SPOOL_SERVER", default_value = "http://127.0.0.1:7070")]
    pub server: String,
    /// API key or client token, sent as `Authorization: Bearer …`.
    #[arg(long, env = "SPOOL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// PEM file of the CA certificate(s) to trust for an https:// server, instead of the
    /// system's certificate store.
    #[arg(long, env = "SPOOL_CA_CERT", value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,
}

impl ClientArgs {
    /// An HTTP client for the server these arguments name.
    pub fn http(&self) -> anyhow::Result<HttpClient> {
        let tls = self.tls()?;
        Ok(HttpClient::with_tls(
            &self.server,
            self.token.as_deref(),
            tls.as_ref(),
        )?)
    }

    /// The CA of `--ca-cert`, if given.
    pub fn tls(&self) -> anyhow::Result<Option<Tls>> {
        self.ca_cert
            .as_ref()
            .map(|path| Tls::from_ca_file(path).context("--ca-cert (SPOOL_CA_CERT)"))
            .transpose()
    }
}
