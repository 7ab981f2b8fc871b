//! A plain HTTP client for one Spool server: publish (`POST /v1/streams/STREAM/messages`,
//! `POST /v1/publish`), and the base the [`sse`](crate::sse) and [`poll`](crate::poll)
//! readers build on. Credentials go out as `Authorization: Bearer …`; error answers become a
//! [`RequestError`] that says whether retrying can help.
//!
//! ```no_run
//! use spool_client::http::HttpClient;
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let client = HttpClient::new("http://127.0.0.1:7070", Some("my-api-key"))?;
//! let stored = client.publish("chat:1", b"hello".to_vec(), Some("k1"), None).await?;
//! println!("stored at {}:{} (duplicate: {})", stored.epoch, stored.offset, stored.duplicate);
//! # Ok(())
//! # }
//! ```
//!
//! `http://` and `https://` (see [`HttpClient::with_tls`] and [`Tls`](crate::Tls)).

use std::time::Duration;

use reqwest::{RequestBuilder, Response, StatusCode, Url};
use spool_protocol::{
    ErrorBody,
    http::{BatchMessage, BatchRequest, BatchResponse, PublishResponse},
};

/// Why an [`HttpClient`] could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// The server URL does not parse, or cannot hold a path.
    #[error("invalid server URL {url:?}")]
    InvalidUrl {
        url: String,
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// The HTTP client itself could not be built.
    #[error("cannot build the HTTP client")]
    Build(#[source] reqwest::Error),
    /// The trust settings of an `https://` server could not be made.
    #[error("TLS: {0}")]
    Tls(#[source] crate::TlsError),
}

/// A failed request: either the server answered with an error, or it could not be reached.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RequestError {
    /// The server said no; retrying the same request will not help (4xx).
    Rejected(StatusCode, String),
    /// The server or network failed; retrying later may work (5xx, connection errors).
    Transient(String),
    /// The server sent something this client cannot read (not worth retrying).
    Unreadable(String),
}

impl std::fmt::Display for RequestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RequestError::Rejected(status, msg) => write!(f, "{status}: {msg}"),
            RequestError::Transient(msg) | RequestError::Unreadable(msg) => f.write_str(msg),
        }
    }
}

impl std::error::Error for RequestError {}

/// A reader's notice that a request failed in a way retrying may fix: it waits (at most
/// `delay`, [`Backoff`](crate::Backoff) with jitter) when called next, then tries again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retry {
    /// What went wrong.
    pub why: String,
    /// The longest the wait before the next attempt may be.
    pub delay: Duration,
    /// The position (or `Last-Event-ID`) the next attempt continues from; `None` before the
    /// reader has one.
    pub from: Option<String>,
}

/// An HTTP client for one Spool server. Cheap to clone (the connection pool is shared).
#[derive(Clone, Debug)]
pub struct HttpClient {
    http: reqwest::Client,
    base: Url,
    token: Option<String>,
}

impl HttpClient {
    /// A client for the server at `server` (e.g. `http://127.0.0.1:7070`), sending `token`
    /// (an API key or client token; an empty one counts as none) with every request.
    pub fn new(server: &str, token: Option<&str>) -> Result<Self, BuildError> {
        Self::with_tls(server, token, None)
    }

    /// [`HttpClient::new`], and for an `https://` server, trusting `tls` (`None`: the system's
    /// certificate store).
    pub fn with_tls(
        server: &str,
        token: Option<&str>,
        tls: Option<&crate::Tls>,
    ) -> Result<Self, BuildError> {
        let base = Url::parse(server).map_err(|e| BuildError::InvalidUrl {
            url: server.to_owned(),
            source: Some(Box::new(e)),
        })?;
        if base.cannot_be_a_base() {
            return Err(BuildError::InvalidUrl {
                url: server.to_owned(),
                source: None,
            });
        }
        let mut builder = reqwest::Client::builder().connect_timeout(Duration::from_secs(5));
        if base.scheme() == "https" {
            let tls = match tls {
                Some(tls) => tls.clone(),
                None => crate::Tls::system().map_err(BuildError::Tls)?,
            };
            // reqwest takes a rustls config by value, as `Any`.
            builder = builder.tls_backend_preconfigured((*tls.client_config()).clone());
        }
        let http = builder.build().map_err(BuildError::Build)?;
        Ok(Self {
            http,
            base,
            token: token.filter(|t| !t.is_empty()).map(ToOwned::to_owned),
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

    /// A `GET` with the credentials.
    pub fn get(&self, url: Url) -> RequestBuilder {
        self.auth(self.http.get(url))
    }

    /// A `POST` with the credentials.
    pub fn post(&self, url: Url) -> RequestBuilder {
        self.auth(self.http.post(url))
    }

    /// A `PUT` with the credentials.
    pub fn put(&self, url: Url) -> RequestBuilder {
        self.auth(self.http.put(url))
    }

    /// A `DELETE` with the credentials.
    pub fn delete(&self, url: Url) -> RequestBuilder {
        self.auth(self.http.delete(url))
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
            .map_err(|e| RequestError::Transient(format!("request failed: {}", causes(&e))))?;
        let response = check(response).await?;
        response
            .json::<T>()
            .await
            .map_err(|e| RequestError::Transient(format!("unreadable answer: {e}")))
    }

    /// Publishes one message (`POST /v1/streams/STREAM/messages`). With an idempotency key,
    /// a retry is stored once (the answer then says `duplicate`).
    pub async fn publish(
        &self,
        stream: &str,
        payload: Vec<u8>,
        idempotency_key: Option<&str>,
        content_type: Option<&str>,
    ) -> Result<PublishResponse, RequestError> {
        let mut request = self
            .post(self.url(&["v1", "streams", stream, "messages"]))
            .body(payload);
        if let Some(key) = idempotency_key {
            request = request.header("idempotency-key", key);
        }
        if let Some(ct) = content_type {
            request = request.header("content-type", ct);
        }
        self.send_json(request).await
    }

    /// Publishes a batch (`POST /v1/publish`): one result per message, in order.
    pub async fn publish_batch(
        &self,
        messages: Vec<BatchMessage>,
    ) -> Result<BatchResponse, RequestError> {
        let request = BatchRequest { messages };
        self.send_json(self.post(self.url(&["v1", "publish"])).json(&request))
            .await
    }
}

/// The answer when it is a success; otherwise an error: rejected for 4xx other than 408 and
/// 429, worth retrying for the rest. The message comes from the JSON error body when there is one.
pub async fn check(response: Response) -> Result<Response, RequestError> {
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

/// An error and its causes, as "a: b: c" (reqwest's own text hides why a request failed,
/// e.g. "connection refused"), each cause once.
fn causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_keep_each_segment_whole() {
        let c = HttpClient::new("http://127.0.0.1:7070/base/", Some("")).unwrap();
        assert_eq!(
            c.url(&["v1", "streams", "a/b c", "messages"]).as_str(),
            "http://127.0.0.1:7070/base/v1/streams/a%2Fb%20c/messages"
        );
        assert!(c.token.is_none());
        assert!(HttpClient::new("not a url", None).is_err());
        assert!(HttpClient::new("mailto:x@y", None).is_err());
    }
}
