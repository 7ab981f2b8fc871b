//! `spool token`: sign a client token (JWT) with the server's secret or a private key, or
//! check one (`--check`) the way the server does and print its claims.
//!
//! The secret, public keys, issuer and audience come from the same flags, `SPOOL_*` variables
//! and TOML keys as `spool serve` (`--config` too), so a token signed here is one the server
//! configured the same way accepts, and `--check` says what the server would say.

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, bail};
use base64::Engine as _;
use clap::Args;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Map, Value, json};
use spool_core::retention::parse_duration;
use spool_server::config::AuthConfig;

use crate::config::{self, JwtFlags, Layer as _, Settings};

/// Longest lifetime `--ttl` / `--exp` may give a token: a year.
const MAX_TTL: Duration = Duration::from_secs(366 * 24 * 3600);

#[derive(Args, Debug)]
pub struct TokenArgs {
    /// Stream pattern the token may read: subscribe, SSE, long-poll (repeatable).
    #[arg(long, value_name = "PATTERN")]
    pub subscribe: Vec<String>,
    /// Stream pattern the token may publish to (repeatable).
    #[arg(long, value_name = "PATTERN")]
    pub publish: Vec<String>,
    /// Stream pattern whose consumer groups the token may use and manage (repeatable).
    #[arg(long, value_name = "PATTERN")]
    pub consume: Vec<String>,
    /// Stream pattern the token may administer through the stream admin API (repeatable).
    #[arg(long, value_name = "PATTERN")]
    pub admin: Vec<String>,
    /// The token's subject (`sub`): its identity for sessions and budgets.
    #[arg(long, value_name = "SUB")]
    pub sub: Option<String>,
    /// How long the token is valid, e.g. 15m, 24h (default 1h; at most a year).
    #[arg(long, value_name = "DUR", value_parser = parse_duration, conflicts_with = "exp")]
    pub ttl: Option<Duration>,
    /// When the token expires: Unix seconds or an RFC 3339 time (2030-01-02T03:04:05Z).
    #[arg(long, value_name = "TIME")]
    pub exp: Option<String>,
    /// The token's `iss` (default: the configured --jwt-issuer, if any).
    #[arg(long, value_name = "ISS")]
    pub iss: Option<String>,
    /// The token's `aud` (default: the configured --jwt-audience, if any).
    #[arg(long, value_name = "AUD")]
    pub aud: Option<String>,
    /// Sign with this PEM private key instead of the HS256 secret: RS256 for an RSA key,
    /// ES256 for an EC P-256 key (the server verifies with its --jwt-public-key).
    #[arg(long, env = "SPOOL_JWT_PRIVATE_KEY", value_name = "FILE")]
    pub private_key: Option<PathBuf>,
    /// Check TOKEN (`-`: read it from stdin) as the server would — signature, expiry, issuer,
    /// audience — and print its claims; exits 1 when it is not valid.
    #[arg(long, value_name = "TOKEN", conflicts_with_all = ["subscribe", "publish", "consume", "admin", "sub", "ttl", "exp", "iss", "aud"])]
    pub check: Option<String>,
    /// `--jwt-secret`, `--jwt-public-key`, `--jwt-issuer` and `--jwt-audience`, as
    /// `spool serve` takes them: the HS256 secret signs and checks, the public keys check.
    #[command(flatten)]
    pub jwt: JwtFlags,
    /// The server's TOML configuration file: its jwt_secret, jwt_public_keys, jwt_issuer and
    /// jwt_audience fill what flags and environment leave unset.
    #[arg(long, env = "SPOOL_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// The JWT settings (`jwt_*` of [`Settings`]), flags and environment over the file.
fn resolve(args: &TokenArgs) -> anyhow::Result<Settings> {
    let file = match &args.config {
        Some(path) => Settings::load(path)?,
        None => Settings::default(),
    };
    Ok(args.jwt.0.clone().or(file))
}

pub fn run(args: TokenArgs) -> anyhow::Result<()> {
    let jwt = resolve(&args)?;
    match &args.check {
        Some(token) => check(token, &jwt),
        None => {
            println!("{}", sign(&args, &jwt, now())?);
            Ok(())
        }
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn patterns(flag: &str, given: &[String]) -> anyhow::Result<Vec<String>> {
    for p in given {
        if p.trim().is_empty() {
            bail!("--{flag}: a stream pattern must not be empty");
        }
    }
    Ok(given.to_vec())
}

fn sign(args: &TokenArgs, jwt: &Settings, now: u64) -> anyhow::Result<String> {
    let subscribe = patterns("subscribe", &args.subscribe)?;
    let publish = patterns("publish", &args.publish)?;
    let consume = patterns("consume", &args.consume)?;
    let admin = patterns("admin", &args.admin)?;
    if subscribe.is_empty() && publish.is_empty() && consume.is_empty() && admin.is_empty() {
        bail!(
            "the token would allow nothing: give at least one --subscribe, --publish, --consume \
             or --admin pattern"
        );
    }
    let exp = match (&args.exp, args.ttl) {
        (Some(exp), _) => {
            let exp = parse_time(exp)?;
            if exp <= now {
                bail!("--exp {exp} is not in the future");
            }
            exp
        }
        (None, Some(ttl)) if ttl.is_zero() => bail!("--ttl must be longer than zero"),
        (None, ttl) => {
            now.saturating_add(ttl.unwrap_or(Duration::from_secs(3600)).as_secs().max(1))
        }
    };
    if exp - now > MAX_TTL.as_secs() {
        bail!("the token would be valid for more than a year; give a shorter --ttl or --exp");
    }
    let mut claims = Map::new();
    if let Some(sub) = &args.sub {
        if sub.is_empty() {
            bail!("--sub must not be empty");
        }
        claims.insert("sub".into(), json!(sub));
    }
    claims.insert("iat".into(), json!(now));
    claims.insert("exp".into(), json!(exp));
    if let Some(iss) = args.iss.as_ref().or(jwt.jwt_issuer.as_ref()) {
        claims.insert("iss".into(), json!(iss));
    }
    if let Some(aud) = args.aud.as_ref().or(jwt.jwt_audience.as_ref()) {
        claims.insert("aud".into(), json!(aud));
    }
    for (name, list) in [
        ("subscribe", subscribe),
        ("publish", publish),
        ("consume", consume),
        ("admin", admin),
    ] {
        if !list.is_empty() {
            claims.insert(name.into(), json!(list));
        }
    }
    let (alg, key) = match &args.private_key {
        Some(path) => private_key(path)?,
        None => match &jwt.jwt_secret {
            Some(secret) if secret.is_empty() => {
                bail!("the JWT secret is empty; set a long random secret")
            }
            Some(secret) => (
                Algorithm::HS256,
                EncodingKey::from_secret(secret.as_bytes()),
            ),
            None => bail!(
                "nothing to sign with: give --jwt-secret (SPOOL_JWT_SECRET, or jwt_secret in \
                 --config) or --private-key"
            ),
        },
    };
    jsonwebtoken::encode(&Header::new(alg), &Value::Object(claims), &key).map_err(|e| {
        match &args.private_key {
            Some(path) => {
                anyhow::anyhow!("--private-key: cannot sign with {}: {e}", path.display())
            }
            None => anyhow::anyhow!("cannot sign the token: {e}"),
        }
    })
}

/// Reads a PEM private key: RSA signs RS256, EC P-256 signs ES256.
fn private_key(path: &Path) -> anyhow::Result<(Algorithm, EncodingKey)> {
    let pem = std::fs::read(path)
        .with_context(|| format!("--private-key: cannot read {}", path.display()))?;
    // jsonwebtoken parses some keys only when signing: refuse what is not a private key now.
    let text = String::from_utf8_lossy(&pem);
    let private = text.split("-----BEGIN ").skip(1).any(|rest| {
        rest.split_once("-----")
            .is_some_and(|(label, _)| label.ends_with("PRIVATE KEY"))
    });
    if !private {
        bail!(
            "--private-key: {} is not a PEM RSA or EC P-256 private key (-----BEGIN PRIVATE KEY-----)",
            path.display()
        );
    }
    if let Ok(key) = EncodingKey::from_rsa_pem(&pem) {
        return Ok((Algorithm::RS256, key));
    }
    if let Ok(key) = EncodingKey::from_ec_pem(&pem) {
        return Ok((Algorithm::ES256, key));
    }
    bail!(
        "--private-key: {} is not a PEM RSA or EC P-256 private key",
        path.display()
    )
}

/// Unix seconds, or an RFC 3339 time.
fn parse_time(text: &str) -> anyhow::Result<u64> {
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(secs);
    }
    let time = humantime::parse_rfc3339_weak(text)
        .with_context(|| format!("--exp: {text:?} is neither Unix seconds nor an RFC 3339 time"))?;
    Ok(time.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()))
}

fn check(token: &str, jwt: &Settings) -> anyhow::Result<()> {
    let token = if token == "-" {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
            .context("cannot read the token from stdin")?;
        text.trim().to_owned()
    } else {
        token.trim().to_owned()
    };
    if jwt.jwt_secret.is_none() && jwt.jwt_public_key.is_empty() {
        bail!(
            "nothing to verify with: give --jwt-secret or --jwt-public-key (or --config with \
             jwt_secret / jwt_public_keys)"
        );
    }
    let (_, authenticator) = config::authenticator(
        AuthConfig {
            jwt_secret: jwt.jwt_secret.clone(),
            jwt_issuer: jwt.jwt_issuer.clone(),
            jwt_audience: jwt.jwt_audience.clone(),
            ..AuthConfig::default()
        },
        &jwt.jwt_public_key,
    )?;
    if let Err(e) = authenticator.verify(&token) {
        bail!("invalid token: {}", e.message);
    }
    let (header, claims) = decode_parts(&token)?;
    let alg = header.get("alg").and_then(Value::as_str).unwrap_or("?");
    println!("valid token, signed with {alg}");
    println!("{}", serde_json::to_string_pretty(&claims)?);
    let now = now();
    match claims.get("exp").and_then(Value::as_u64) {
        Some(exp) => {
            let at = humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(exp));
            let left = humantime::format_duration(Duration::from_secs(exp.saturating_sub(now)));
            println!("expires {at} (in {left})");
        }
        None => println!("never expires"),
    }
    Ok(())
}

/// The header and claims of a token already verified, as JSON.
fn decode_parts(token: &str) -> anyhow::Result<(Value, Value)> {
    let mut parts = token.split('.');
    let mut part = || -> anyhow::Result<Value> {
        let text = parts.next().context("not a JWT")?;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(text.trim_end_matches('='))
            .context("not a JWT (bad base64)")?;
        serde_json::from_slice(&bytes).context("not a JWT (bad JSON)")
    };
    Ok((part()?, part()?))
}
