//! What the client commands share: the server address, credentials, and error answers.

use anyhow::{Context, bail};
use clap::Args;
use reqwest::{RequestBuilder, Response, StatusCode, Url};
use spool_protocol::ErrorBody;

#[derive(Args, Debug, Clone)]
pub struct ClientArgs {
    /// Base URL of the Spool server.
    #[arg(long, env = "SPOOL_SERVER", default_value = "http://127.0.0.1:7070")]
    pub server: String,
    /// API key or client token, sent as `Authorization: Bearer …`.
    #[arg(long, env = "SPOOL_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// An HTTP client for one Spool server.
pub struct Client {
    http: reqwest::Client,
    base: Url,
    token: Option<String>,
}

/// A failed request: either the server answered with an error, or it could not be reached.
#[derive(Debug)]
pub enum RequestError {
    /// The server said no; retrying the same request will not help (4xx).
    Rejected(StatusCode, String),
    /// The server or network failed; retrying later may work (5xx, connection errors).
    Transient(String),
}

impl std::fmt::Display for RequestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RequestError::Rejected(status, msg) => write!(f, "{status}: {msg}"),
            RequestError::Transient(msg) => f.write_str(msg),
        }
    }
}

impl Client {
    pub fn new(args: &ClientArgs) -> anyhow::Result<Self> {
        let base = Url::parse(&args.server)
            .with_context(|| format!("invalid server URL {:?}", args.server))?;
        if base.cannot_be_a_base() {
            bail!("invalid server URL {:?}", args.server);
        }
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(5))
            .build()
            .context("cannot build the HTTP client")?;
        Ok(Self {
            http,
            base,
            token: args.token.clone().filter(|t| !t.is_empty()),
        })
    }

    /// The URL of `segments` under the server, each percent-encoded as one path segment
    /// (so stream names with `/` work).
    pub fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(segments);
        }
        url
    }

    pub fn get(&self, url: Url) -> RequestBuilder {
        self.auth(self.http.get(url))
    }

    pub fn post(&self, url: Url) -> RequestBuilder {
        self.auth(self.http.post(url))
    }

    fn auth(&self, request: RequestBuilder) -> RequestBuilder {
        match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// Sends a request and decodes a JSON answer, mapping error answers to [`RequestError`].
    pub async fn send_json<T: serde::de::DeserializeOwned>(
        &self,
        request: RequestBuilder,
    ) -> Result<T, RequestError> {
        let response = request
            .send()
            .await
            .map_err(|e| RequestError::Transient(format!("request failed: {e}")))?;
        let response = check(response).await?;
        response
            .json::<T>()
            .await
            .map_err(|e| RequestError::Transient(format!("unreadable answer: {e}")))
    }
}

/// The answer when it is a success; otherwise an error: rejected for 4xx other than 408 and
/// 429, worth retrying for the rest. The message comes from the JSON error body when there is one.
pub(crate) async fn check(response: Response) -> Result<Response, RequestError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let text = response.text().await.unwrap_or_default();
    let message = serde_json::from_str::<ErrorBody>(&text)
        .map(|b| format!("{}: {}", b.error.code.as_str(), b.error.message))
        .unwrap_or(text);
    if status.is_client_error()
        && status != StatusCode::REQUEST_TIMEOUT
        && status != StatusCode::TOO_MANY_REQUESTS
    {
        Err(RequestError::Rejected(status, message))
    } else {
        Err(RequestError::Transient(format!("{status}: {message}")))
    }
}

impl std::error::Error for RequestError {}
