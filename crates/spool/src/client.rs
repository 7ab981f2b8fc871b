//! What the client commands share: the server address and credentials. The HTTP client
//! itself is spool-client's.

use clap::Args;
use spool_client::http::HttpClient;

#[derive(Args, Debug, Clone)]
pub struct ClientArgs {
    /// Base URL of the Spool server.
    #[arg(long, env = "SPOOL_SERVER", default_value = "http://127.0.0.1:7070")]
    pub server: String,
    /// API key or client token, sent as `Authorization: Bearer …`.
    #[arg(long, env = "SPOOL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

impl ClientArgs {
    /// An HTTP client for the server these arguments name.
    pub fn http(&self) -> anyhow::Result<HttpClient> {
        Ok(HttpClient::new(&self.server, self.token.as_deref())?)
    }
}
