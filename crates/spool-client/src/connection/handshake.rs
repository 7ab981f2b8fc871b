//! Opening a connection: dial with the subprotocol, send `connect` with the session and the
//! positions the application processed, and read until `connected` — or until the server
//! refuses, when the close code says whether trying again can help.

use std::collections::BTreeMap;

use futures::{SinkExt, StreamExt};
use spool_protocol::{
    ErrorCode,
    ws::{self, ClientFrame, ServerFrame, close},
};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::{
    self, Message as WsMessage, client::IntoClientRequest, http::HeaderValue, protocol::CloseFrame,
};

use super::{CLOSE_GRACE, Connection, Ws, encode};
use crate::Error;

/// A failed attempt to connect, and whether another attempt may succeed.
pub(super) struct Failure {
    pub(super) error: Error,
    pub(super) retry: bool,
}

impl Failure {
    fn retry(error: Error) -> Self {
        Self { error, retry: true }
    }
}

impl Connection {
    /// Opens a socket and gets a `connected`; falls back to a fresh session once when the
    /// server cannot restore the one given.
    pub(super) async fn open(&mut self) -> Result<(Ws, ws::Connected), Failure> {
        loop {
            let mut ws = self.dial().await?;
            let connect = ClientFrame::Connect(ws::Connect {
                token: self.token.clone(),
                session: self.session.clone(),
                positions: self.positions(),
            });
            ws.send(encode(&connect))
                .await
                .map_err(|e| Failure::retry(Error::ConnectionLost(e.to_string())))?;
            match timeout(self.config.connect_timeout, await_connected(&mut ws)).await {
                Err(_) => return Err(Failure::retry(Error::Timeout)),
                Ok(Ok(connected)) => return Ok((ws, connected)),
                Ok(Err(failure))
                    if failure.error.code() == Some(ErrorCode::SessionNotRestored)
                        && self.session.is_some() =>
                {
                    // The session is gone: start a fresh one (with the token), then
                    // re-subscribe each stream after its cursor in `on_connected`.
                    tracing::debug!("session not restored; connecting afresh");
                    self.session = None;
                    let _ = timeout(CLOSE_GRACE, ws.close(None)).await;
                }
                Ok(Err(failure)) => return Err(failure),
            }
        }
    }

    async fn dial(&self) -> Result<Ws, Failure> {
        let mut request = self
            .config
            .url
            .as_str()
            .into_client_request()
            .map_err(|e| Failure {
                error: Error::InvalidUrl(e.to_string()),
                retry: false,
            })?;
        request.headers_mut().insert(
            "sec-websocket-protocol",
            HeaderValue::from_static(ws::SUBPROTOCOL),
        );
        let connector = if request.uri().scheme_str() == Some("wss") {
            let tls = match &self.config.tls {
                Some(tls) => tls.clone(),
                None => crate::Tls::system().map_err(|e| Failure {
                    error: Error::Connect(e.to_string()),
                    retry: false,
                })?,
            };
            Some(tokio_tungstenite::Connector::Rustls(tls.client_config()))
        } else {
            None
        };
        match timeout(
            self.config.connect_timeout,
            tokio_tungstenite::connect_async_tls_with_config(request, None, false, connector),
        )
        .await
        {
            Err(_) => Err(Failure::retry(Error::Timeout)),
            Ok(Ok((ws, _response))) => Ok(ws),
            Ok(Err(tungstenite::Error::Url(e))) => Err(Failure {
                error: Error::InvalidUrl(e.to_string()),
                retry: false,
            }),
            Ok(Err(e)) => Err(Failure::retry(Error::Connect(e.to_string()))),
        }
    }

    /// What `connect` tells the server the application processed, per stream.
    fn positions(&self) -> BTreeMap<String, String> {
        if self.session.is_none() {
            return BTreeMap::new();
        }
        self.subs
            .iter()
            .filter_map(|(stream, sub)| Some((stream.clone(), sub.cursor.position()?.to_string())))
            .collect()
    }
}

/// Reads frames until `connected`, or until the server refuses (an `error`, then a close).
async fn await_connected(ws: &mut Ws) -> Result<ws::Connected, Failure> {
    let mut refused: Option<ws::ErrorFrame> = None;
    let failure = |refused: Option<ws::ErrorFrame>, otherwise: Error| match refused {
        Some(e) => Failure {
            retry: !matches!(
                e.code,
                ErrorCode::Unauthorized | ErrorCode::InvalidToken | ErrorCode::Forbidden
            ),
            error: Error::server(e.code, e.message),
        },
        None => Failure::retry(otherwise),
    };
    while let Some(message) = ws.next().await {
        match message {
            Err(e) => return Err(failure(refused, Error::ConnectionLost(e.to_string()))),
            Ok(WsMessage::Text(text)) => match serde_json::from_str::<ServerFrame>(&text) {
                Ok(ServerFrame::Connected(connected)) => return Ok(connected),
                Ok(ServerFrame::Error(e)) if e.code == ErrorCode::SessionNotRestored => {
                    return Err(failure(Some(e), Error::Timeout));
                }
                Ok(ServerFrame::Error(e)) => refused = Some(e),
                Ok(ServerFrame::Ping(_)) => {
                    let _ = ws.send(encode(&ClientFrame::Pong(ws::Ping {}))).await;
                }
                Ok(_) => {}
                Err(e) => {
                    let error = Error::Protocol(format!("unreadable answer to connect: {e}"));
                    return Err(Failure::retry(error));
                }
            },
            Ok(WsMessage::Close(frame)) => {
                let error = closed(frame);
                let retry = match &error {
                    Error::Closed { code, .. } => close::should_reconnect(*code),
                    _ => true,
                };
                let mut failure = failure(refused, error);
                failure.retry = retry;
                return Err(failure);
            }
            Ok(_) => {}
        }
    }
    Err(failure(
        refused,
        Error::ConnectionLost("closed before `connected`".into()),
    ))
}

/// The error a close frame stands for (1005, "no status", when it has none).
pub(super) fn closed(frame: Option<CloseFrame>) -> Error {
    match frame {
        Some(f) => Error::Closed {
            code: f.code.into(),
            reason: f.reason.to_string(),
        },
        None => Error::Closed {
            code: 1005,
            reason: String::new(),
        },
    }
}
