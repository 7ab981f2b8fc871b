//! JWT identification as AnyCable does it: a token in the `jid` query parameter, the `X-JID`
//! header or an `anycable-token.<token>` subprotocol, HS256 with the JWT secret, the
//! identifiers in the `ext` claim. The connection's identity is the `ext` string; it may
//! subscribe to what `$pubsub` lets it (the channel decides, not stream patterns).

use axum::http::{HeaderMap, HeaderValue, header::SEC_WEBSOCKET_PROTOCOL};
use spool_core::Pattern;

use super::config::AnycableConfig;
use crate::auth::{Principal, Proof};

/// The subprotocol prefix carrying a token.
const TOKEN_PROTOCOL: &str = "anycable-token.";

/// Who a connection is, as its upgrade request says.
#[derive(Debug)]
pub enum Identity {
    /// A valid token.
    Token(Principal, Proof),
    /// No token (allowed unless `--anycable-enforce-jwt`).
    None,
    /// A token that does not verify, or no token where one is required.
    Unauthorized,
    /// A token whose `exp` has passed.
    Expired,
}

#[derive(serde::Deserialize)]
struct Claims {
    #[serde(default)]
    ext: Option<serde_json::Value>,
    #[serde(default)]
    exp: Option<u64>,
}

/// The identity of an upgrade request with `query` parameter `param` and `headers`.
pub fn identify(token: Option<&str>, config: &AnycableConfig) -> Identity {
    let Some(token) = token.filter(|t| !t.is_empty()) else {
        return if config.enforce_jwt {
            Identity::Unauthorized
        } else {
            Identity::None
        };
    };
    let Some(secret) = config.jwt_secret() else {
        // Without a secret there is no JWT identification: the token means nothing.
        return if config.enforce_jwt {
            Identity::Unauthorized
        } else {
            Identity::None
        };
    };
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.required_spec_claims.clear();
    validation.leeway = 0;
    let key = jsonwebtoken::DecodingKey::from_secret(secret.as_bytes());
    let claims = match jsonwebtoken::decode::<Claims>(token, &key, &validation) {
        Ok(data) => data.claims,
        Err(e) if matches!(e.kind(), jsonwebtoken::errors::ErrorKind::ExpiredSignature) => {
            return Identity::Expired;
        }
        Err(_) => return Identity::Unauthorized,
    };
    let Some(ext) = claims.ext else {
        return Identity::Unauthorized;
    };
    let subject = match ext {
        serde_json::Value::String(s) => s,
        other => other.to_string(),
    };
    Identity::Token(
        Principal::Token {
            subject: Some(format!("anycable:{subject}")),
            subscribe: vec![Pattern::new("*")],
            publish: Vec::new(),
            consume: Vec::new(),
            admin: Vec::new(),
            expires_at: claims.exp.map(|s| s.saturating_mul(1000)),
        },
        Proof::Token {
            token: token.to_owned(),
        },
    )
}

/// The token of an upgrade request: the `X-<param>` header wins over the `<param>` query
/// parameter, which wins over an `anycable-token.` subprotocol.
pub fn token<'a>(
    headers: &'a HeaderMap,
    query: Option<&'a str>,
    config: &AnycableConfig,
) -> Option<&'a str> {
    let header = format!("x-{}", config.jwt_param.to_ascii_lowercase());
    if let Some(value) = headers.get(header.as_str()).and_then(|v| v.to_str().ok()) {
        return Some(value);
    }
    if let Some(value) = query {
        return Some(value);
    }
    headers
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .flat_map(|v: &HeaderValue| v.to_str().unwrap_or_default().split(','))
        .map(str::trim)
        .find_map(|p| p.strip_prefix(TOKEN_PROTOCOL))
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};

    fn config() -> AnycableConfig {
        AnycableConfig {
            jwt_secret: Some("k".into()),
            ..Default::default()
        }
    }

    fn jwt(claims: serde_json::Value, key: &str) -> String {
        encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(key.as_bytes()),
        )
        .unwrap()
    }

    #[test]
    fn tokens() {
        let far = spool_core::now_ms() / 1000 + 3600;
        let good = jwt(
            serde_json::json!({"ext": "{\"user_id\":42}", "exp": far}),
            "k",
        );
        match identify(Some(&good), &config()) {
            Identity::Token(p, _) => {
                assert_eq!(p.subject(), Some("anycable:{\"user_id\":42}"));
                assert_eq!(p.expires_at(), Some(far * 1000));
            }
            other => panic!("{other:?}"),
        }
        let expired = jwt(serde_json::json!({"ext": "{}", "exp": 1000}), "k");
        assert!(matches!(
            identify(Some(&expired), &config()),
            Identity::Expired
        ));
        let forged = jwt(serde_json::json!({"ext": "{}"}), "other");
        assert!(matches!(
            identify(Some(&forged), &config()),
            Identity::Unauthorized
        ));
        let no_ext = jwt(serde_json::json!({"exp": far}), "k");
        assert!(matches!(
            identify(Some(&no_ext), &config()),
            Identity::Unauthorized
        ));
        assert!(matches!(identify(None, &config()), Identity::None));
        let enforced = AnycableConfig {
            enforce_jwt: true,
            ..config()
        };
        assert!(matches!(identify(None, &enforced), Identity::Unauthorized));
    }

    #[test]
    fn where_the_token_is_found() {
        let mut headers = HeaderMap::new();
        headers.insert(
            SEC_WEBSOCKET_PROTOCOL,
            "actioncable-v1-ext-json, anycable-token.abc"
                .parse()
                .unwrap(),
        );
        assert_eq!(token(&headers, None, &config()), Some("abc"));
        assert_eq!(token(&headers, Some("q"), &config()), Some("q"));
        headers.insert("x-jid", "h".parse().unwrap());
        assert_eq!(token(&headers, Some("q"), &config()), Some("h"));
    }
}
