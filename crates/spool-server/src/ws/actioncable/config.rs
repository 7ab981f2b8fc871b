//! AnyCable's settings (`--anycable-*`), and the secrets derived from `--anycable-secret` the
//! way AnyCable-Go's `--secret` derives them.

use std::time::Duration;

use crate::delivery::transient::TransientLimits;

/// Settings of the AnyCable-compatible endpoint.
#[derive(Clone, Debug)]
pub struct AnycableConfig {
    /// The WebSocket path (`--anycable-path`, default `/cable`).
    pub path: String,
    /// The application secret (`--anycable-secret`): the default of every secret below.
    pub secret: Option<String>,
    /// Verifies `signed_stream_name` (`--anycable-streams-secret`; default: `secret`).
    pub streams_secret: Option<String>,
    /// Verifies HS256 identification tokens (`--anycable-jwt-secret`; default: `secret`).
    pub jwt_secret: Option<String>,
    /// The query parameter carrying the token; the header is `X-<param>` (`jid`, `X-JID`).
    pub jwt_param: String,
    /// Refuse connections without a token (`--anycable-enforce-jwt`).
    pub enforce_jwt: bool,
    /// Allow `$pubsub` subscriptions by plain `stream_name` (`--anycable-public-streams`).
    pub public_streams: bool,
    /// The `/_broadcast` bearer key (`--anycable-broadcast-key`; default derived from
    /// `secret`).
    pub broadcast_key: Option<String>,
    /// How often `ping` is sent (AnyCable: 3 s; a client's `?pi=` overrides it).
    pub ping_interval: Duration,
    /// Allow `whisper` on signed streams (`--anycable-whisper`; public streams always allow
    /// it, as AnyCable's `--streams_whisper` does).
    pub whisper: bool,
    /// Bounds of whispers (transient messages): per-connection inbox and largest payload
    /// (`--anycable-whisper-buffer`, `--anycable-whisper-max-bytes`).
    pub whisper_limits: TransientLimits,
    /// Close extended-protocol connections that sent no `{"command":"pong"}` for this long
    /// (`--anycable-pong-timeout`; AnyCable's `--pong_timeout`); `None`: off.
    pub pong_timeout: Option<Duration>,
}

impl Default for AnycableConfig {
    fn default() -> Self {
        Self {
            path: "/cable".to_owned(),
            secret: None,
            streams_secret: None,
            jwt_secret: None,
            jwt_param: "jid".to_owned(),
            enforce_jwt: false,
            public_streams: false,
            broadcast_key: None,
            ping_interval: Duration::from_secs(3),
            whisper: false,
            whisper_limits: TransientLimits::default(),
            pong_timeout: None,
        }
    }
}

impl AnycableConfig {
    /// The secret signed stream names are verified with.
    pub fn streams_secret(&self) -> Option<&str> {
        self.streams_secret
            .as_deref()
            .or(self.secret.as_deref())
            .filter(|s| !s.is_empty())
    }

    /// The secret identification tokens are verified with.
    pub fn jwt_secret(&self) -> Option<&str> {
        self.jwt_secret
            .as_deref()
            .or(self.secret.as_deref())
            .filter(|s| !s.is_empty())
    }

    /// The `/_broadcast` key: the explicit one, else hex HMAC-SHA256(secret, "broadcast-cable").
    pub fn broadcast_key(&self) -> Option<String> {
        if let Some(key) = self.broadcast_key.as_deref().filter(|k| !k.is_empty()) {
            return Some(key.to_owned());
        }
        let secret = self.secret.as_deref().filter(|s| !s.is_empty())?;
        Some(hex_hmac_sha256(secret.as_bytes(), b"broadcast-cable"))
    }
}

/// HMAC-SHA256 of `data` under `key`, as lowercase hex.
pub fn hex_hmac_sha256(key: &[u8], data: &[u8]) -> String {
    use base64::Engine as _;
    let key = jsonwebtoken::EncodingKey::from_secret(key);
    // jsonwebtoken's HS256 signature is the HMAC-SHA256, base64url without padding.
    let mac = jsonwebtoken::crypto::sign(data, &key, jsonwebtoken::Algorithm::HS256)
        .ok()
        .and_then(|b64| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(b64)
                .ok()
        })
        .unwrap_or_default();
    mac.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_a_known_vector() {
        // RFC 4231 test case 2.
        assert_eq!(
            hex_hmac_sha256(b"Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn secrets_derive_from_the_application_secret() {
        let config = AnycableConfig {
            secret: Some("s3cr3t".into()),
            ..Default::default()
        };
        assert_eq!(config.streams_secret(), Some("s3cr3t"));
        assert_eq!(config.jwt_secret(), Some("s3cr3t"));
        assert_eq!(
            config.broadcast_key().as_deref(),
            Some("83149057b2f956b5f862c0ef5ad6a24d3677dc076d77e8999c24f77ca17d7a20")
        );
        let explicit = AnycableConfig {
            streams_secret: Some("streams".into()),
            broadcast_key: Some("key".into()),
            ..config
        };
        assert_eq!(explicit.streams_secret(), Some("streams"));
        assert_eq!(explicit.broadcast_key().as_deref(), Some("key"));
        assert_eq!(AnycableConfig::default().broadcast_key(), None);
    }
}
