//! Which stream a channel identifier names: only the reserved `$pubsub` channel of AnyCable's
//! standalone mode, by a signed stream name (Rails `MessageVerifier`, verified with the
//! streams secret) or, with `--anycable-public-streams`, a plain one. Channels backed by
//! Rails RPC are not served.

use base64::Engine as _;
use subtle::ConstantTimeEq;

use super::config::{AnycableConfig, hex_hmac_sha256};

/// The channel of public and signed streams.
pub const PUBSUB: &str = "$pubsub";

/// Why a subscription is refused (the client gets `reject_subscription`).
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    NotJson,
    NotPubsub,
    BadSignature,
    PublicStreamsOff,
    NoStream,
}

/// The stream the channel `identifier` (a JSON object as text) subscribes to.
pub fn stream_of(identifier: &str, config: &AnycableConfig) -> Result<String, Refused> {
    let params: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(identifier).map_err(|_| Refused::NotJson)?;
    if params.get("channel").and_then(|c| c.as_str()) != Some(PUBSUB) {
        return Err(Refused::NotPubsub);
    }
    if let Some(signed) = params.get("signed_stream_name") {
        let signed = signed.as_str().ok_or(Refused::BadSignature)?;
        let secret = config.streams_secret().ok_or(Refused::BadSignature)?;
        return verify(signed, secret).ok_or(Refused::BadSignature);
    }
    if let Some(name) = params.get("stream_name") {
        if !config.public_streams {
            return Err(Refused::PublicStreamsOff);
        }
        return name.as_str().map(str::to_owned).ok_or(Refused::NoStream);
    }
    Err(Refused::NoStream)
}

/// Whether `identifier` (already subscribed) lets its subscriber whisper: a public stream
/// always, a signed one only with `--anycable-whisper` (AnyCable's `--streams_whisper`).
pub fn whisper_allowed(identifier: &str, config: &AnycableConfig) -> bool {
    let Ok(params) = serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(identifier)
    else {
        return false;
    };
    if params.contains_key("signed_stream_name") {
        config.whisper
    } else {
        params.contains_key("stream_name") && config.public_streams
    }
}

/// The stream name in `signed` (`base64(JSON(name)) + "--" + hex(HMAC-SHA256(secret,
/// base64 part))`), if the signature is right.
pub fn verify(signed: &str, secret: &str) -> Option<String> {
    let (encoded, digest) = signed.rsplit_once("--")?;
    let expected = hex_hmac_sha256(secret.as_bytes(), encoded.as_bytes());
    if !bool::from(expected.as_bytes().ct_eq(digest.as_bytes())) {
        return None;
    }
    let json = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()?;
    serde_json::from_slice::<String>(&json).ok()
}

/// Signs `stream` as Rails' `MessageVerifier` (and AnyCable's helpers) do.
pub fn sign(stream: &str, secret: &str) -> String {
    let json = serde_json::to_string(stream).unwrap_or_default();
    let encoded = base64::engine::general_purpose::STANDARD.encode(json);
    let digest = hex_hmac_sha256(secret.as_bytes(), encoded.as_bytes());
    format!("{encoded}--{digest}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(public: bool) -> AnycableConfig {
        AnycableConfig {
            streams_secret: Some("s".into()),
            public_streams: public,
            ..Default::default()
        }
    }

    #[test]
    fn signed_names_round_trip_and_forgeries_fail() {
        let signed = sign("chat/42", "s");
        // As Ruby's MessageVerifier (and Python's hmac) compute it.
        assert_eq!(
            signed,
            "ImNoYXQvNDIi--6f28578d730aaf705233d26ebba229c2038208ed73769827ec576fb378845989"
        );
        assert_eq!(verify(&signed, "s").as_deref(), Some("chat/42"));
        assert_eq!(verify(&signed, "other"), None);
        let forged = format!(
            "{}--{}",
            "ImNoYXQvNDMi",
            signed.rsplit_once("--").unwrap().1
        );
        assert_eq!(verify(&forged, "s"), None);
        assert_eq!(verify("no-separator", "s"), None);
    }

    #[test]
    fn whispers_are_allowed_on_public_streams_and_on_signed_ones_with_the_flag() {
        let signed =
            serde_json::json!({"channel": "$pubsub", "signed_stream_name": sign("a", "s")})
                .to_string();
        let public = r#"{"channel":"$pubsub","stream_name":"b"}"#;
        assert!(!whisper_allowed(&signed, &config(true)));
        assert!(whisper_allowed(public, &config(true)));
        assert!(
            !whisper_allowed(public, &config(false)),
            "public streams off"
        );
        let whisper = AnycableConfig {
            whisper: true,
            ..config(false)
        };
        assert!(whisper_allowed(&signed, &whisper));
        assert!(!whisper_allowed("not json", &whisper));
        assert!(!whisper_allowed(r#"{"channel":"$pubsub"}"#, &whisper));
    }

    #[test]
    fn identifiers() {
        let signed = sign("a", "s");
        let id =
            serde_json::json!({"channel": "$pubsub", "signed_stream_name": signed}).to_string();
        assert_eq!(stream_of(&id, &config(false)).as_deref(), Ok("a"));
        let public = r#"{"channel":"$pubsub","stream_name":"b"}"#;
        assert_eq!(
            stream_of(public, &config(false)),
            Err(Refused::PublicStreamsOff)
        );
        assert_eq!(stream_of(public, &config(true)).as_deref(), Ok("b"));
        assert_eq!(stream_of("not json", &config(true)), Err(Refused::NotJson));
        assert_eq!(
            stream_of(r#"{"channel":"ChatChannel","id":1}"#, &config(true)),
            Err(Refused::NotPubsub)
        );
        assert_eq!(
            stream_of(r#"{"channel":"$pubsub"}"#, &config(true)),
            Err(Refused::NoStream)
        );
    }
}
