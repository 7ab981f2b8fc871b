//! Who is calling and what they may do (SPEC §9). Deny by default.
//!
//! Credentials come as `Authorization: Bearer …` or, for EventSource (which cannot set
//! headers), a `token` query parameter. A credential is either one of the server's API keys
//! (full access, for back-end publishers) or a JWT whose `subscribe` / `publish` / `consume`
//! claims list the stream patterns its holder may read, publish to, and consume through
//! consumer groups (SPEC §7: receive, settle, and manage the stream's groups).
//!
//! Tokens may be signed with HS256 (the shared `jwt_secret`), RS256 (an RSA public key) or
//! ES256 (an EC P-256 public key). The token header's `alg` picks the kind of key, and only
//! keys of that kind are tried: an RSA public key is never used as an HMAC secret, which
//! closes the classic key-confusion attack.

use axum::http::{HeaderMap, StatusCode, header::AUTHORIZATION};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
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
        /// Streams whose consumer groups the holder may use and manage (absent in sessions
        /// stored before the claim existed: none).
        #[serde(default)]
        consume: Vec<Pattern>,
        /// Streams the holder may administer: list, inspect, delete, truncate (absent in
        /// sessions stored before the claim existed: none). Disconnecting sessions and
        /// identities needs the pattern `*`.
        #[serde(default)]
        admin: Vec<Pattern>,
        /// The token's `exp`, in ms since the Unix epoch.
        expires_at: Option<u64>,
    },
}

/// What a WebSocket session keeps of the credential that created it (or last refreshed it),
/// so that resuming the session without a credential can check that the running
/// configuration still accepts it (SPEC §3): an API key still configured, a token that still
/// verifies — signature, `exp`, `nbf`, `iss`, `aud` — against the current keys, anonymous
/// access still allowed. An API key is kept only as a one-way fingerprint (HMAC-SHA256 keyed
/// by the key over a fixed label); a token is kept as it is, since it must be verified again.
/// Its `Debug` shows neither.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Proof {
    Anonymous,
    ApiKey { fingerprint: String },
    Token { token: String },
}

impl std::fmt::Debug for Proof {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Proof::Anonymous => "Proof::Anonymous",
            Proof::ApiKey { .. } => "Proof::ApiKey(..)",
            Proof::Token { .. } => "Proof::Token(..)",
        })
    }
}

/// What a caller wants to do to a stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Subscribe,
    Publish,
    /// Use the stream's consumer groups: create, update, delete, receive, settle, redrive.
    Consume,
    /// Administer the stream: list and inspect it with its figures, delete it, truncate it.
    /// Anonymous callers never may (even with `--allow-anonymous`); API keys always may.
    Admin,
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
                    consume: c1,
                    admin: a1,
                    ..
                },
                Principal::Token {
                    subject: None,
                    subscribe: s2,
                    publish: p2,
                    consume: c2,
                    admin: a2,
                    ..
                },
            ) => s1 == s2 && p1 == p2 && c1 == c2 && a1 == a2,
            _ => false,
        }
    }

    pub fn may(&self, action: Action, stream: &StreamName) -> bool {
        match self {
            Principal::Anonymous => action != Action::Admin,
            Principal::ApiKey => true,
            Principal::Token {
                subscribe,
                publish,
                consume,
                admin,
                ..
            } => {
                let patterns = match action {
                    Action::Subscribe => subscribe,
                    Action::Publish => publish,
                    Action::Consume => consume,
                    Action::Admin => admin,
                };
                patterns.iter().any(|p| p.matches(stream.as_str()))
            }
        }
    }

    /// Whether the caller may administer every stream (an API key, or a token whose `admin`
    /// claim holds `*`): needed to see all streams' names at once or to disconnect sessions.
    pub fn admin_of_all(&self) -> bool {
        match self {
            Principal::ApiKey => true,
            Principal::Anonymous => false,
            Principal::Token { admin, .. } => admin.iter().any(|p| p.as_str() == "*"),
        }
    }

    /// Whether the caller has any admin right at all (an API key, or a token with an `admin`
    /// claim).
    pub fn any_admin(&self) -> bool {
        match self {
            Principal::ApiKey => true,
            Principal::Anonymous => false,
            Principal::Token { admin, .. } => !admin.is_empty(),
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
            Action::Consume => "consume (consumer groups of)",
            Action::Admin => "administer",
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
    #[serde(default)]
    consume: Vec<String>,
    #[serde(default)]
    admin: Vec<String>,
}

/// A JWT setting that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    /// An empty HMAC secret would let anyone sign tokens.
    #[error("the JWT secret is empty; set a long random secret or leave it out")]
    EmptySecret,
    /// `jwt_public_keys[index]` is not a usable RSA or EC P-256 public key.
    #[error("JWT public key #{} {reason}", index + 1)]
    PublicKey { index: usize, reason: String },
}

/// The keys that verify tokens of one algorithm, and the checks those tokens must pass.
struct KeySet {
    alg: Algorithm,
    keys: Vec<DecodingKey>,
    validation: Validation,
}

/// Checks credentials against the configured API keys, JWT secret and JWT public keys.
pub struct Authenticator {
    api_keys: Vec<Vec<u8>>,
    /// The fingerprint of each of `api_keys`, in the same order, computed once: a session
    /// record keeps it instead of the key (see [`Proof`]).
    api_key_fingerprints: Vec<String>,
    /// One entry per accepted algorithm that has at least one key.
    jwt: Vec<KeySet>,
    allow_anonymous: bool,
}

impl Authenticator {
    /// Builds the authenticator, logging and skipping a JWT secret or public key that cannot
    /// be used. The binary calls [`Authenticator::try_new`] first, so a bad key stops it at
    /// startup instead.
    pub fn new(config: &AuthConfig) -> Self {
        Self::build(config, |e| {
            tracing::error!("{e}; ignoring it: tokens it would verify are refused");
        })
    }

    /// Builds the authenticator, or says which JWT setting cannot be used.
    pub fn try_new(config: &AuthConfig) -> Result<Self, AuthConfigError> {
        let mut first = None;
        let auth = Self::build(config, |e| {
            first.get_or_insert(e);
        });
        match first {
            Some(e) => Err(e),
            None => Ok(auth),
        }
    }

    fn build(config: &AuthConfig, mut reject: impl FnMut(AuthConfigError)) -> Self {
        let mut hmac = Vec::new();
        match config.jwt_secret.as_deref() {
            Some("") => reject(AuthConfigError::EmptySecret),
            Some(secret) => hmac.push(DecodingKey::from_secret(secret.as_bytes())),
            None => {}
        }
        let (mut rsa, mut ec) = (Vec::new(), Vec::new());
        for (index, pem) in config.jwt_public_keys.iter().enumerate() {
            match public_key(pem) {
                Ok(PublicKey::Rsa(key)) => rsa.push(key),
                Ok(PublicKey::Ec(key)) => ec.push(key),
                Err(reason) => reject(AuthConfigError::PublicKey { index, reason }),
            }
        }
        let jwt = [
            (Algorithm::HS256, hmac),
            (Algorithm::RS256, rsa),
            (Algorithm::ES256, ec),
        ]
        .into_iter()
        .filter(|(_, keys)| !keys.is_empty())
        .map(|(alg, keys)| KeySet {
            alg,
            keys,
            validation: validation(alg, config),
        })
        .collect();
        let api_keys: Vec<Vec<u8>> = config
            .api_keys
            .iter()
            .map(|k| k.as_bytes().to_vec())
            .collect();
        Self {
            api_key_fingerprints: api_keys.iter().map(|k| fingerprint(k)).collect(),
            api_keys,
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
        match self.credential(headers, query_token)? {
            None => Ok(Principal::Anonymous),
            Some(credential) => self.verify(credential),
        }
    }

    /// [`Authenticator::authenticate`], with what a WebSocket session keeps to check the
    /// credential again on resume.
    pub fn authenticate_with_proof(
        &self,
        headers: &HeaderMap,
        query_token: Option<&str>,
    ) -> Result<(Principal, Proof), ApiError> {
        match self.credential(headers, query_token)? {
            None => Ok((Principal::Anonymous, Proof::Anonymous)),
            Some(credential) => self.verify_with_proof(credential),
        }
    }

    /// The credential a request carries, `None` for an anonymous request that is allowed, or
    /// why the request is refused.
    fn credential<'a>(
        &self,
        headers: &'a HeaderMap,
        query_token: Option<&'a str>,
    ) -> Result<Option<&'a str>, ApiError> {
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
            None | Some("") if self.allow_anonymous => Ok(None),
            None | Some("") => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                ErrorCode::Unauthorized,
                "credentials required: send \"Authorization: Bearer <api key or token>\" or ?token=",
            )),
            Some(credential) => Ok(Some(credential)),
        }
    }

    /// [`Authenticator::verify`], with what a WebSocket session keeps to check the credential
    /// again on resume.
    pub fn verify_with_proof(&self, credential: &str) -> Result<(Principal, Proof), ApiError> {
        let principal = self.verify(credential)?;
        let proof = match &principal {
            Principal::Anonymous => Proof::Anonymous,
            Principal::ApiKey => Proof::ApiKey {
                fingerprint: self
                    .api_keys
                    .iter()
                    .position(|k| bool::from(k.as_slice().ct_eq(credential.as_bytes())))
                    .and_then(|i| self.api_key_fingerprints.get(i).cloned())
                    .unwrap_or_else(|| fingerprint(credential.as_bytes())),
            },
            Principal::Token { .. } => Proof::Token {
                token: credential.to_owned(),
            },
        };
        Ok((principal, proof))
    }

    /// Whether the running configuration still accepts the credential `proof` was taken from:
    /// the principal it stands for now, or why not.
    pub fn recheck(&self, proof: &Proof) -> Result<Principal, ApiError> {
        match proof {
            Proof::Anonymous if self.allow_anonymous => Ok(Principal::Anonymous),
            Proof::Anonymous => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                ErrorCode::Unauthorized,
                "anonymous access is not allowed",
            )),
            Proof::ApiKey {
                fingerprint: stored,
            } => {
                let stored = stored.as_bytes();
                if !stored.is_empty()
                    && self
                        .api_key_fingerprints
                        .iter()
                        .any(|f| bool::from(f.as_bytes().ct_eq(stored)))
                {
                    Ok(Principal::ApiKey)
                } else {
                    Err(invalid("the API key is no longer configured"))
                }
            }
            Proof::Token { token } => match self.verify(token)? {
                principal @ Principal::Token { .. } => Ok(principal),
                // A token that now equals an API key is not the token it was.
                _ => Err(invalid("not a valid token")),
            },
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
        if self.jwt.is_empty() {
            return Err(invalid(
                "unknown API key (and no JWT secret or public key is configured)",
            ));
        }
        let alg = token_algorithm(credential)?;
        let Some(set) = self.jwt.iter().find(|set| set.alg == alg) else {
            return Err(invalid(&not_accepted(alg)));
        };
        // Several keys of one kind may be configured (e.g. during a key rotation): a signature
        // that does not verify with one may verify with the next. Any other failure comes after
        // the signature verified, so it is the token's own fault.
        for key in &set.keys {
            match jsonwebtoken::decode::<Claims>(credential, key, &set.validation) {
                Ok(data) => return Ok(principal(data.claims)),
                Err(e) if *e.kind() == ErrorKind::InvalidSignature => continue,
                Err(e) => return Err(invalid(&rejection(&e, &set.validation))),
            }
        }
        let against = match alg {
            Algorithm::HS256 => "the JWT secret",
            Algorithm::RS256 => "any configured RSA public key",
            _ => "any configured EC public key",
        };
        Err(invalid(&format!(
            "the token's signature does not verify with {against}"
        )))
    }
}

/// The checks every token must pass, whatever signed it.
fn validation(alg: Algorithm, config: &AuthConfig) -> Validation {
    let mut validation = Validation::new(alg);
    validation.leeway = LEEWAY_SECS;
    validation.validate_nbf = true;
    let mut required = vec!["exp"];
    if let Some(issuer) = &config.jwt_issuer {
        validation.set_issuer(&[issuer]);
        required.push("iss");
    }
    match &config.jwt_audience {
        Some(audience) => {
            validation.set_audience(&[audience]);
            required.push("aud");
        }
        // No audience configured: `aud` is not ours to check (jsonwebtoken would otherwise
        // refuse every token that names one).
        None => validation.validate_aud = false,
    }
    validation.set_required_spec_claims(&required);
    validation
}

enum PublicKey {
    Rsa(DecodingKey),
    Ec(DecodingKey),
}

/// Reads one PEM public key: RSA (`PUBLIC KEY` or `RSA PUBLIC KEY`) or EC on P-256.
fn public_key(pem: &str) -> Result<PublicKey, String> {
    let labels: Vec<&str> = pem
        .split("-----BEGIN ")
        .skip(1)
        .filter_map(|rest| rest.split_once("-----").map(|(label, _)| label))
        .collect();
    match labels.as_slice() {
        [] => {
            return Err("is not PEM text (it should start with -----BEGIN PUBLIC KEY-----)".into());
        }
        [label] if label.contains("PRIVATE") => {
            return Err(format!(
                "is a private key ({label}); configure its public key instead \
                 (openssl pkey -in KEY.pem -pubout)"
            ));
        }
        ["PUBLIC KEY" | "RSA PUBLIC KEY"] => {}
        [label] => {
            return Err(format!(
                "is a {label}, not a public key (expected -----BEGIN PUBLIC KEY-----)"
            ));
        }
        many => {
            return Err(format!(
                "holds {} PEM blocks; give one public key per file",
                many.len()
            ));
        }
    }
    if let Ok(key) = DecodingKey::from_rsa_pem(pem.as_bytes()) {
        return Ok(PublicKey::Rsa(key));
    }
    match DecodingKey::from_ec_pem(pem.as_bytes()) {
        // An uncompressed P-256 point is 0x04 followed by two 32-byte coordinates; ES384's
        // P-384 points are longer.
        Ok(key) => match key.try_get_as_bytes() {
            Ok(point) if point.len() == 65 && point[0] == 4 => Ok(PublicKey::Ec(key)),
            _ => Err(
                "is an EC key on a curve other than P-256 (prime256v1); only ES256 is supported"
                    .into(),
            ),
        },
        Err(_) => Err(
            "is neither an RSA nor an EC public key (Spool verifies RS256 and ES256 tokens)".into(),
        ),
    }
}

/// The token header's `alg`, or why the credential is not a token Spool can check.
fn token_algorithm(credential: &str) -> Result<Algorithm, ApiError> {
    match jsonwebtoken::decode_header(credential) {
        Ok(header) => Ok(header.alg),
        Err(e) if *e.kind() == ErrorKind::InvalidToken => {
            Err(invalid("not a valid API key or token"))
        }
        // The header did not parse as one of jsonwebtoken's algorithms: say which `alg` it
        // names (typically `none`) if it names one.
        Err(_) => match header_alg_text(credential) {
            Some(alg) => Err(invalid(&format!(
                "tokens signed with {alg:?} are not accepted; Spool accepts HS256, RS256 and ES256"
            ))),
            None => Err(invalid(
                "not a valid API key or token: its header is not base64url JSON with an \"alg\"",
            )),
        },
    }
}

fn header_alg_text(credential: &str) -> Option<String> {
    use base64::Engine as _;
    let header = credential.split('.').next()?;
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header.trim_end_matches('='))
        .ok()?;
    let header: serde_json::Value = serde_json::from_slice(&json).ok()?;
    header.get("alg")?.as_str().map(str::to_owned)
}

fn not_accepted(alg: Algorithm) -> String {
    let missing = match alg {
        Algorithm::HS256 => "no JWT secret is configured",
        Algorithm::RS256 => "no RSA public key is configured",
        Algorithm::ES256 => "no EC public key is configured",
        _ => {
            return format!(
                "tokens signed with {alg:?} are not accepted; Spool accepts HS256, RS256 and ES256"
            );
        }
    };
    format!("tokens signed with {alg:?} are not accepted: {missing}")
}

/// What to tell the caller about a token whose signature verified (or that is malformed).
fn rejection(e: &jsonwebtoken::errors::Error, validation: &Validation) -> String {
    let one = |set: &Option<std::collections::HashSet<String>>| {
        set.iter().flatten().next().cloned().unwrap_or_default()
    };
    match e.kind() {
        ErrorKind::ExpiredSignature => "the token has expired".to_owned(),
        ErrorKind::ImmatureSignature => "the token is not valid yet (nbf)".to_owned(),
        ErrorKind::InvalidSignature => "the token's signature does not verify".to_owned(),
        ErrorKind::MissingRequiredClaim(c) => format!("the token lacks the {c:?} claim"),
        ErrorKind::InvalidClaimFormat(c) => format!("the token's {c:?} claim is malformed"),
        ErrorKind::InvalidIssuer => format!(
            "the token's issuer (iss) is wrong; this server accepts tokens from {:?}",
            one(&validation.iss)
        ),
        ErrorKind::InvalidAudience => format!(
            "the token's audience (aud) is wrong; this server accepts tokens for {:?}",
            one(&validation.aud)
        ),
        ErrorKind::Json(e) => format!("the token's claims are malformed: {e}"),
        _ => format!("not a valid API key or token: {e}"),
    }
}

fn principal(claims: Claims) -> Principal {
    Principal::Token {
        subject: claims.sub,
        subscribe: claims.subscribe.iter().map(|p| Pattern::new(p)).collect(),
        publish: claims.publish.iter().map(|p| Pattern::new(p)).collect(),
        consume: claims.consume.iter().map(|p| Pattern::new(p)).collect(),
        admin: claims.admin.iter().map(|p| Pattern::new(p)).collect(),
        expires_at: claims.exp.map(|s| s.saturating_mul(1000)),
    }
}

/// A one-way fingerprint of an API key, for session records: HMAC-SHA256 keyed by the key
/// over a fixed label, base64url.
fn fingerprint(key: &[u8]) -> String {
    let key = jsonwebtoken::EncodingKey::from_secret(key);
    jsonwebtoken::crypto::sign(b"spool session api key v1", &key, Algorithm::HS256)
        .unwrap_or_default()
}

fn invalid(message: &str) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, ErrorCode::InvalidToken, message)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header, encode};

    const RSA_PRIVATE: &str = include_str!("../tests/fixtures/jwt/rsa_private.pem");
    const RSA_PUBLIC: &str = include_str!("../tests/fixtures/jwt/rsa_public.pem");
    const EC_PRIVATE: &str = include_str!("../tests/fixtures/jwt/ec_private.pem");
    const EC_PUBLIC: &str = include_str!("../tests/fixtures/jwt/ec_public.pem");

    fn auth() -> Authenticator {
        Authenticator::new(&AuthConfig {
            api_keys: vec!["k1".into()],
            jwt_secret: Some("s3cret".into()),
            allow_anonymous: false,
            ..AuthConfig::default()
        })
    }

    /// Every kind of key at once, with issuer and audience checks.
    fn full() -> Authenticator {
        Authenticator::try_new(&AuthConfig {
            jwt_secret: Some("s3cret".into()),
            jwt_public_keys: vec![EC_PUBLIC.into(), RSA_PUBLIC.into()],
            jwt_issuer: Some("https://id.example".into()),
            jwt_audience: Some("spool".into()),
            ..AuthConfig::default()
        })
        .unwrap()
    }

    fn token(claims: serde_json::Value, secret: &str) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn rs256(claims: serde_json::Value) -> String {
        let key = EncodingKey::from_rsa_pem(RSA_PRIVATE.as_bytes()).unwrap();
        encode(&Header::new(Algorithm::RS256), &claims, &key).unwrap()
    }

    fn es256(claims: serde_json::Value) -> String {
        let key = EncodingKey::from_ec_pem(EC_PRIVATE.as_bytes()).unwrap();
        encode(&Header::new(Algorithm::ES256), &claims, &key).unwrap()
    }

    /// Claims that pass [`full`]'s checks, with `extra` merged in.
    fn claims(extra: serde_json::Value) -> serde_json::Value {
        let mut c = serde_json::json!({
            "sub": "u1", "exp": exp(60), "iss": "https://id.example", "aud": "spool",
            "subscribe": ["chat:*"], "publish": ["chat:1"],
        });
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    }

    fn exp(offset: i64) -> i64 {
        spool_core::now_ms() as i64 / 1000 + offset
    }

    fn bearer(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, format!("Bearer {v}").parse().unwrap());
        h
    }

    /// The message of a refused credential, which must be `401 invalid_token`.
    fn refused(auth: &Authenticator, credential: &str) -> String {
        let err = auth.verify(credential).unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidToken, "{}", err.message);
        assert_eq!(err.status, StatusCode::UNAUTHORIZED);
        err.message
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
        // Consuming is its own claim, denied unless listed.
        assert!(!p.may(Action::Consume, &chat));
        let t = token(
            serde_json::json!({"exp":exp(60),"consume":["orders*"]}),
            "s3cret",
        );
        let c = auth().authenticate(&HeaderMap::new(), Some(&t)).unwrap();
        let orders = StreamName::new("orders").unwrap();
        assert!(c.may(Action::Consume, &orders));
        assert!(!c.may(Action::Subscribe, &orders) && !c.may(Action::Consume, &chat));
        assert_eq!(
            c.check(Action::Consume, &chat).unwrap_err().code,
            ErrorCode::Forbidden
        );
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

    #[test]
    fn hs256_rs256_and_es256_are_accepted_at_once() {
        let auth = full();
        let chat = StreamName::new("chat:1").unwrap();
        // One set of claims for all three, so `exp` cannot straddle a second boundary.
        let c = claims(serde_json::json!({}));
        let expected_exp = c["exp"].as_u64().unwrap() * 1000;
        for t in [
            token(c.clone(), "s3cret"),
            rs256(c.clone()),
            es256(c.clone()),
        ] {
            let p = auth.verify(&t).unwrap();
            assert_eq!(p.subject(), Some("u1"));
            assert!(p.may(Action::Subscribe, &chat) && p.may(Action::Publish, &chat));
            assert_eq!(p.expires_at(), Some(expected_exp));
        }
        // `aud` may also be an array that lists us.
        let t = rs256(claims(serde_json::json!({"aud": ["other", "spool"]})));
        assert!(auth.verify(&t).is_ok());
    }

    #[test]
    fn every_public_key_of_the_right_kind_is_tried() {
        let other_rsa = include_str!("../tests/fixtures/jwt/rsa_other_public.pem");
        let auth = Authenticator::try_new(&AuthConfig {
            jwt_public_keys: vec![other_rsa.into(), RSA_PUBLIC.into()],
            ..AuthConfig::default()
        })
        .unwrap();
        let t = rs256(serde_json::json!({"exp": exp(60)}));
        assert!(auth.verify(&t).is_ok());
    }

    #[test]
    fn expired_and_immature_tokens_are_refused() {
        let auth = full();
        let expired = es256(claims(serde_json::json!({"exp": exp(-60)})));
        assert_eq!(refused(&auth, &expired), "the token has expired");
        let immature = rs256(claims(serde_json::json!({"nbf": exp(60)})));
        assert_eq!(
            refused(&auth, &immature),
            "the token is not valid yet (nbf)"
        );
        // Within the leeway, both pass.
        let t = rs256(claims(serde_json::json!({"exp": exp(-2), "nbf": exp(2)})));
        assert!(auth.verify(&t).is_ok());
        let no_exp = {
            let mut c = claims(serde_json::json!({}));
            c.as_object_mut().unwrap().remove("exp");
            es256(c)
        };
        assert_eq!(refused(&auth, &no_exp), "the token lacks the \"exp\" claim");
    }

    #[test]
    fn bad_signatures_are_refused() {
        let auth = full();
        let forged = token(claims(serde_json::json!({})), "not-the-secret");
        assert!(refused(&auth, &forged).contains("signature does not verify with the JWT secret"));
        // An RS256 token whose payload was swapped after signing.
        let good = rs256(claims(serde_json::json!({})));
        let evil = rs256(claims(serde_json::json!({"publish": ["*"]})));
        let parts: Vec<&str> = good.split('.').collect();
        let evil_payload = evil.split('.').nth(1).unwrap();
        let tampered = format!("{}.{}.{}", parts[0], evil_payload, parts[2]);
        assert!(refused(&auth, &tampered).contains("any configured RSA public key"));
        // The same for ES256.
        let good = es256(claims(serde_json::json!({})));
        let evil = es256(claims(serde_json::json!({"sub": "admin"})));
        let parts: Vec<&str> = good.split('.').collect();
        let tampered = format!(
            "{}.{}.{}",
            parts[0],
            evil.split('.').nth(1).unwrap(),
            parts[2]
        );
        assert!(refused(&auth, &tampered).contains("any configured EC public key"));
    }

    #[test]
    fn wrong_audience_and_issuer_are_refused() {
        let strict = full();
        let t = rs256(claims(serde_json::json!({"aud": "someone-else"})));
        assert_eq!(
            refused(&strict, &t),
            "the token's audience (aud) is wrong; this server accepts tokens for \"spool\""
        );
        let t = es256(claims(serde_json::json!({"iss": "https://evil.example"})));
        assert_eq!(
            refused(&strict, &t),
            "the token's issuer (iss) is wrong; this server accepts tokens from \"https://id.example\""
        );
        let mut c = claims(serde_json::json!({}));
        c.as_object_mut().unwrap().remove("aud");
        assert_eq!(
            refused(&strict, &token(c, "s3cret")),
            "the token lacks the \"aud\" claim"
        );
        // Without configured issuer / audience, neither claim is checked.
        let t = token(
            serde_json::json!({"exp": exp(60), "iss": "anyone", "aud": "anything"}),
            "s3cret",
        );
        assert!(auth().verify(&t).is_ok());
    }

    #[test]
    fn algorithms_without_a_configured_key_are_refused() {
        let hmac_only = auth();
        assert_eq!(
            refused(&hmac_only, &rs256(claims(serde_json::json!({})))),
            "tokens signed with RS256 are not accepted: no RSA public key is configured"
        );
        assert_eq!(
            refused(&hmac_only, &es256(claims(serde_json::json!({})))),
            "tokens signed with ES256 are not accepted: no EC public key is configured"
        );
        let hs384 = encode(
            &Header::new(Algorithm::HS384),
            &claims(serde_json::json!({})),
            &EncodingKey::from_secret(b"s3cret"),
        )
        .unwrap();
        assert!(refused(&full(), &hs384).starts_with("tokens signed with HS384 are not accepted"));
        let nothing = Authenticator::new(&AuthConfig {
            api_keys: vec!["k1".into()],
            ..AuthConfig::default()
        });
        assert!(refused(&nothing, &hs384).contains("no JWT secret or public key is configured"));
    }

    #[test]
    fn key_confusion_and_alg_none_are_refused() {
        use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
        let payload = claims(serde_json::json!({"publish": ["*"]}));
        // HS256 "signed" with the RSA public key's text as the HMAC secret: a server that
        // handed the RSA key to an HMAC verifier would accept it.
        let confused = token(payload.clone(), RSA_PUBLIC);
        let rsa_only = Authenticator::try_new(&AuthConfig {
            jwt_public_keys: vec![RSA_PUBLIC.into()],
            ..AuthConfig::default()
        })
        .unwrap();
        assert_eq!(
            refused(&rsa_only, &confused),
            "tokens signed with HS256 are not accepted: no JWT secret is configured"
        );
        assert!(refused(&full(), &confused).contains("does not verify with the JWT secret"));
        // `alg: none`, unsigned.
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let body = URL_SAFE_NO_PAD.encode(payload.to_string());
        for t in [format!("{header}.{body}."), format!("{header}.{body}.c2ln")] {
            assert_eq!(
                refused(&full(), &t),
                "tokens signed with \"none\" are not accepted; Spool accepts HS256, RS256 and ES256"
            );
        }
    }

    #[test]
    fn unusable_keys_are_named_by_try_new_and_skipped_by_new() {
        let bad = |pems: &[&str]| {
            Authenticator::try_new(&AuthConfig {
                jwt_public_keys: pems.iter().map(|p| p.to_string()).collect(),
                ..AuthConfig::default()
            })
            .err()
            .map(|e| e.to_string())
        };
        assert_eq!(bad(&[RSA_PUBLIC, EC_PUBLIC]), None);
        let e = bad(&[RSA_PUBLIC, "hello"]).unwrap();
        assert!(e.starts_with("JWT public key #2 is not PEM text"), "{e}");
        let e = bad(&[RSA_PRIVATE]).unwrap();
        assert!(e.contains("is a private key"), "{e}");
        let e = bad(&[&format!("{RSA_PUBLIC}{EC_PUBLIC}")]).unwrap();
        assert!(e.contains("holds 2 PEM blocks"), "{e}");
        let garbage = "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n";
        let e = bad(&[garbage]).unwrap();
        assert!(e.contains("neither an RSA nor an EC public key"), "{e}");
        let p384 = "-----BEGIN PUBLIC KEY-----
MHYwEAYHKoZIzj0CAQYFK4EEACIDYgAELOwb+7SM0mzBL5Izw07nqKm/L5ktu+z1
KP6DBMHgtzbpbT6oXJWCfSQajzdYDt2oNDTUd1FtaYONKg2cF4ZwIOKdhAANOCMm
0dMKNY9T7gF3Nt2rF8zRPEARK6h6OyJJ
-----END PUBLIC KEY-----
";
        let e = bad(&[p384]).unwrap();
        assert!(e.contains("other than P-256"), "{e}");
        let err = Authenticator::try_new(&AuthConfig {
            jwt_secret: Some(String::new()),
            ..AuthConfig::default()
        })
        .err()
        .unwrap();
        assert!(matches!(err, AuthConfigError::EmptySecret));

        // `new` keeps the good keys.
        let auth = Authenticator::new(&AuthConfig {
            jwt_public_keys: vec!["hello".into(), EC_PUBLIC.into()],
            ..AuthConfig::default()
        });
        assert!(
            auth.verify(&es256(serde_json::json!({"exp": exp(60)})))
                .is_ok()
        );
    }
}
