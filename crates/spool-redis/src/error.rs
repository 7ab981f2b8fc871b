//! Which Redis failures mean "try again later" and which mean a bug or bad data.

use std::{future::Future, time::Duration};

use redis::{ErrorKind, RedisError, RedisResult, ServerErrorKind};
use spool_engine::EngineError;

/// Maps a Redis error: the server down, loading, read-only, out of memory or refusing writes
/// is `Unavailable` (HTTP 503, retry); anything else (a script error, a wrong type) is
/// `Internal`. The message keeps Redis's own text.
pub fn map(what: &str, e: RedisError) -> EngineError {
    let down = match e.kind() {
        ErrorKind::Io | ErrorKind::AuthenticationFailed | ErrorKind::ClusterConnectionNotFound => {
            true
        }
        ErrorKind::Server(kind) => matches!(
            kind,
            ServerErrorKind::BusyLoading
                | ServerErrorKind::ReadOnly
                | ServerErrorKind::MasterDown
                | ServerErrorKind::TryAgain
                | ServerErrorKind::ClusterDown
                | ServerErrorKind::NoPerm
        ),
        _ => false,
    } || matches!(
        e.code(),
        Some("MISCONF" | "OOM" | "NOREPLICAS" | "BUSY" | "NOAUTH" | "WRONGPASS" | "LOADING")
    );
    if down {
        EngineError::unavailable_from(format!("redis {what}"), e)
    } else {
        EngineError::internal_from(format!("redis {what}"), e)
    }
}

/// Runs one Redis call with a deadline, so every call fails fast while Redis is unreachable
/// (the connection manager alone would wait through its reconnect attempts).
pub async fn within<T>(
    what: &str,
    timeout: Duration,
    call: impl Future<Output = RedisResult<T>>,
) -> Result<T, EngineError> {
    match tokio::time::timeout(timeout, call).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(map(what, e)),
        Err(_) => Err(EngineError::unavailable(format!(
            "redis {what}: no answer within {timeout:?}"
        ))),
    }
}
