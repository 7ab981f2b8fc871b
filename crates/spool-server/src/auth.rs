//! Who is calling and what they may do (SPEC §9). Deny by default.
//!
//! Credentials come as `Authorization: Bearer …` or, for EventSource (which cannot set
//! headers), a `token` query parameter. A credential is either one of the server's API keys
//! (full access, for back-end publishers) or an HS256 JWT whose `subscribe` / `publish` claims
//! list the stream patterns its holder may read and publish to.

use axum::http::{HeaderMap, StatusCode, header::AUTHORIZATION};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use spool_core::{Pattern, StreamName};
use spool_protocol::ErrorCode;
use subtle::ConstantTimeEq;

use crate::{config::AuthConfig, error::ApiError};

/// Clock skew allowed on `exp` / `nbf`, in seconds.
const LEEWAY_SECS: u64 = 5;

/// The authenticated caller. Serializable because a WebSocket session stores it (SPEC §3).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Principal {
    /// No credentials, allowed only with `--allow-anonymous`.
    Anonymous,
    /// A server API key: may do everything.
    ApiKey,
    /// A client token with its stream patterns.
    Token {
        subject: Option<String>,
        subscribe: Vec<Pattern>,
        publish: Vec<Pattern>,
        /// The token's `exp`, in ms since the Unix epoch.
        expires_at: Option<u64>,
    },
}

/// What a caller wants to do to a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Subscribe,
    Publish,
}

impl Principal {
    /// When the credential stops being valid (ms since the Unix epoch), if ever.
    pub fn expires_at(&self) -> Option<u64> {
        match self {
            Principal::Token { expires_at, .. } => *expires_at,
            _ => None,
        }
    }

    /// The token's `sub`, if any.
    pub fn subject(&self) -> Option<&str> {
        match self {
            Principal::Token { subject, .. } => subject.as_deref(),
            _ => None,
        }
    }

    /// Whether `other` is the same identity, so it may take over `self`'s session or replace
    /// its token: the same kind of credential and the same `sub` (a token without `sub` only
    /// matches a token with the very same rights).
    pub fn same_identity(&self, other: &Principal) -> bool {
        match (self, other) {
            (Principal::Anonymous, Principal::Anonymous)
            | (Principal::ApiKey, Principal::ApiKey) => true,
            (
                Principal::Token {
                    subject: Some(a), ..
                },
                Principal::Token {
                    subject: Some(b), ..
                },
            ) => a == b,
            (
                Principal::Token {
                    subject: None,
                    subscribe: s1,
                    publish: p1,
                    ..
                },
                Principal::Token {
                    subject: None,
                    subscribe: s2,
                    publish: p2,
                    ..
                },
            ) => s1 == s2 && p1 == p2,
            _ => false,
        }
    }

    pub fn may(&self, action: Action, stream: &StreamName) -> bool {
        match self {
            Principal::Anonymous | Principal::ApiKey => true,
            Principal::Token {
                subscribe, publish, ..
            } => {
                let patterns = match action {
                    Action::Subscribe => subscribe,
                    Action::Publish => publish,
                };
                patterns.iter().any(|p| p.matches(stream.as_str()))
            }
        }
    }

    /// Fails with `403 forbidden` unless the caller may do `action` on `stream`.
    pub fn check(&self, action: Action, stream: &StreamName) -> Result<(), ApiError> {
        if self.may(action, stream) {
            return Ok(());
        }
        let verb = match action {
            Action::Subscribe => "read",
            Action::Publish => "publish to",
        };
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            ErrorCode::Forbidden,
            format!(
                "this credential may not {verb} stream {stream:?}; its token claims do not list a matching pattern"
            ),
        ))
    }
}

#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    exp: Option<u64>,
    #[serde(default)]
    subscribe: Vec<String>,
    #[serde(default)]
    publish: Vec<String>,
}

/// Checks credentials against the configured API keys and JWT secret.
pub struct Authenticator {
    api_keys: Vec<Vec<u8>>,
    jwt: Option<(DecodingKey, Validation)>,
    allow_anonymous: bool,
}

impl Authenticator {
    pub fn new(config: &AuthConfig) -> Self {
        let jwt = config.jwt_secret.as_ref().map(|secret| {
            let mut validation = Validation::new(Algorithm::HS256);
            validation.leeway = LEEWAY_SECS;
            validation.validate_nbf = true;
            validation.set_required_spec_claims(&["exp"]);
            (DecodingKey::from_secret(secret.as_bytes()), validation)
        });
        Self {
            api_keys: config
                .api_keys
                .iter()
                .map(|k| k.as_bytes().to_vec())
                .collect(),
            jwt,
            allow_anonymous: config.allow_anonymous,
        }
    }

    /// Authenticates a request from its headers, or from `query_token` when no header is set.
    pub fn authenticate(
        &self,
        headers: &HeaderMap,
        query_token: Option<&str>,
    ) -> Result<Principal, ApiError> {
        let credential = match headers.get(AUTHORIZATION) {
            Some(value) => {
                let value = value
                    .to_str()
                    .map_err(|_| invalid("the Authorization header is not ASCII"))?;
                let token = value
                    .strip_prefix("Bearer ")
                    .or_else(|| value.strip_prefix("bearer "))
                    .ok_or_else(|| {
                        invalid("the Authorization header must be \"Bearer <api key or token>\"")
                    })?;
                Some(token.trim())
            }
            None => query_token,
        };
        match credential {
            None | Some("") if self.allow_anonymous => Ok(Principal::Anonymous),
            None | Some("") => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                ErrorCode::Unauthorized,
                "credentials required: send \"Authorization: Bearer <api key or token>\" or ?token=",
            )),
            Some(credential) => self.verify(credential),
        }
    }

    /// Checks one credential (API key or token), as given in a WebSocket `connect` or
    /// `refresh` frame.
    pub fn verify(&self, credential: &str) -> Result<Principal, ApiError> {
        let given = credential.as_bytes();
        if self
            .api_keys
            .iter()
            .any(|k| bool::from(k.as_slice().ct_eq(given)))
        {
            return Ok(Principal::ApiKey);
        }
        let Some((key, validation)) = &self.jwt else {
            return Err(invalid("unknown API key (and no JWT secret is configured)"));
        };
        let data = jsonwebtoken::decode::<Claims>(credential, key, validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            let why = match e.kind() {
                ErrorKind::ExpiredSignature => "the token has expired".to_owned(),
                ErrorKind::ImmatureSignature => "the token is not valid yet (nbf)".to_owned(),
                ErrorKind::InvalidSignature => "the token's signature does not verify".to_owned(),
                ErrorKind::InvalidAlgorithm => "the token must be signed with HS256".to_owned(),
                ErrorKind::MissingRequiredClaim(c) => format!("the token lacks the {c:?} claim"),
                _ => format!("not a valid API key or token: {e}"),
            };
            invalid(&why)
        })?;
        let claims = data.claims;
        Ok(Principal::Token {
            subject: claims.sub,
            subscribe: claims.subscribe.iter().map(|p| Pattern::new(p)).collect(),
            publish: claims.publish.iter().map(|p| Pattern::new(p)).collect(),
            expires_at: claims.exp.map(|s| s.saturating_mul(1000)),
        })
    }
}

fn invalid(message: &str) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, ErrorCode::InvalidToken, message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};

    fn auth() -> Authenticator {
        Authenticator::new(&AuthConfig {
            api_keys: vec!["k1".into()],
            jwt_secret: Some("s3cret".into()),
            allow_anonymous: false,
            ..AuthConfig::default()
        })
    }

    fn token(claims: serde_json::Value, secret: &str) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn exp(offset: i64) -> i64 {
        spool_core::now_ms() as i64 / 1000 + offset
    }

    fn bearer(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, format!("Bearer {v}").parse().unwrap());
        h
    }

    #[test]
    fn deny_by_default() {
        let err = auth().authenticate(&HeaderMap::new(), None).unwrap_err();
        assert_eq!(err.code, ErrorCode::Unauthorized);
        let err = auth().authenticate(&bearer("wrong"), None).unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidToken);
    }

    #[test]
    fn api_key_and_patterns() {
        let chat = StreamName::new("chat:1").unwrap();
        let other = StreamName::new("other").unwrap();
        assert!(
            auth()
                .authenticate(&bearer("k1"), None)
                .unwrap()
                .may(Action::Publish, &other)
        );
        let t = token(
            serde_json::json!({"sub":"u1","exp":exp(60),"subscribe":["chat:*"]}),
            "s3cret",
        );
        let p = auth().authenticate(&HeaderMap::new(), Some(&t)).unwrap();
        assert!(p.may(Action::Subscribe, &chat));
        assert!(!p.may(Action::Subscribe, &other));
        assert!(!p.may(Action::Publish, &chat));
        assert_eq!(
            p.check(Action::Publish, &chat).unwrap_err().code,
            ErrorCode::Forbidden
        );
    }

    #[test]
    fn bad_tokens() {
        let expired = token(
            serde_json::json!({"exp":exp(-60),"subscribe":["*"]}),
            "s3cret",
        );
        let forged = token(
            serde_json::json!({"exp":exp(60),"subscribe":["*"]}),
            "other",
        );
        let no_exp = token(serde_json::json!({"subscribe":["*"]}), "s3cret");
        for t in [expired, forged, no_exp, "not.a.jwt".to_owned()] {
            let err = auth().authenticate(&bearer(&t), None).unwrap_err();
            assert_eq!(err.code, ErrorCode::InvalidToken, "{}", err.message);
        }
    }
}
