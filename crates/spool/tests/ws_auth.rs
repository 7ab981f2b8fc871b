//! Authentication and authorization on the WebSocket protocol against the real binary
//! (SPEC §3, §9): every way a `connect` is refused, forbidden streams, sessions bound to their
//! identity, credentials on the upgrade request, origins, token expiry and refresh.

mod common;

use std::time::Duration;

use common::{API_KEY, Server, WsPeer, connect_with, jwt, now_secs};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

const ISSUER: &str = "https://id.example";
const AUDIENCE: &str = "spool";

fn fixture(name: &str) -> String {
    format!(
        "{}/../spool-server/tests/fixtures/jwt/{name}",
        env!("CARGO_MANIFEST_DIR")
    )
}

fn sign(alg: Algorithm, key: &EncodingKey, claims: &Value) -> String {
    jsonwebtoken::encode(&Header::new(alg), claims, key).expect("encode jwt")
}

fn rs256(claims: &Value) -> String {
    let pem = std::fs::read(fixture("rsa_private.pem")).unwrap();
    sign(
        Algorithm::RS256,
        &EncodingKey::from_rsa_pem(&pem).unwrap(),
        claims,
    )
}

fn es256(claims: &Value) -> String {
    let pem = std::fs::read(fixture("ec_private.pem")).unwrap();
    sign(
        Algorithm::ES256,
        &EncodingKey::from_ec_pem(&pem).unwrap(),
        claims,
    )
}

fn hs256_with(secret: &[u8], claims: &Value) -> String {
    sign(Algorithm::HS256, &EncodingKey::from_secret(secret), claims)
}

/// Claims that pass the checks of [`strict_server`], with `extra` merged in (`null` removes).
fn claims(extra: Value) -> Value {
    let mut c = json!({
        "sub": "alice", "exp": now_secs() + 600, "iss": ISSUER, "aud": AUDIENCE,
        "subscribe": ["chat:*"], "publish": ["chat:1"],
    });
    for (k, v) in extra.as_object().unwrap() {
        if v.is_null() {
            c.as_object_mut().unwrap().remove(k);
        } else {
            c[k] = v.clone();
        }
    }
    c
}

/// A server that checks issuer and audience and also takes RS256 and ES256 tokens.
fn strict_server() -> Server {
    let (rsa, ec) = (fixture("rsa_public.pem"), fixture("ec_public.pem"));
    Server::start(&[
        "--jwt-issuer",
        ISSUER,
        "--jwt-audience",
        AUDIENCE,
        "--jwt-public-key",
        &rsa,
        "--jwt-public-key",
        &ec,
    ])
}

/// Sends `connect` (with `token` when given) and expects a refusal: an `error` frame, then a
/// close with 4001. Returns the error's code and message.
async fn refused(addr: &str, token: Option<&str>) -> (String, String) {
    let mut peer = WsPeer::open(addr, &[]).await.expect("upgrade");
    let mut connect = json!({"type":"connect"});
    if let Some(token) = token {
        connect["token"] = json!(token);
    }
    peer.send(connect).await;
    let error = peer.expect("error").await;
    assert_eq!(peer.closed().await.0, 4001, "{error}");
    (
        error["code"].as_str().unwrap().to_owned(),
        error["message"].as_str().unwrap().to_owned(),
    )
}

async fn accepted(addr: &str, token: &str) -> (WsPeer, Value) {
    WsPeer::connect(addr, token).await
}

#[tokio::test]
async fn every_bad_credential_in_connect_is_refused_with_4001() {
    let server = strict_server();
    let addr = &server.addr;

    assert_eq!(refused(addr, None).await.0, "unauthorized");
    assert_eq!(refused(addr, Some("")).await.0, "unauthorized");

    let cases: Vec<(&str, String, &str)> = vec![
        (
            "expired",
            jwt(claims(json!({"exp": now_secs() - 60}))),
            "expired",
        ),
        (
            "bad signature",
            hs256_with(b"not-the-secret", &claims(json!({}))),
            "signature",
        ),
        (
            "wrong audience",
            jwt(claims(json!({"aud": "another-service"}))),
            "audience",
        ),
        ("no audience", jwt(claims(json!({"aud": null}))), "aud"),
        (
            "wrong issuer",
            jwt(claims(json!({"iss": "https://evil.example"}))),
            "issuer",
        ),
        ("no issuer", jwt(claims(json!({"iss": null}))), "iss"),
        ("no expiry", jwt(claims(json!({"exp": null}))), "exp"),
        (
            "not yet valid",
            jwt(claims(json!({"nbf": now_secs() + 600}))),
            "nbf",
        ),
        ("garbage", "not-a-token-or-key".to_owned(), "not a valid"),
        (
            "unknown API key",
            "test-api-key-2".to_owned(),
            "not a valid",
        ),
        (
            // alg "none": an unsigned token.
            "unsigned",
            format!(
                "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.",
                base64url(&claims(json!({})).to_string())
            ),
            "none",
        ),
        (
            // The classic key confusion: HS256 "signed" with the RSA public key as secret.
            "HS256 with the RSA public key as secret",
            hs256_with(
                &std::fs::read(fixture("rsa_public.pem")).unwrap(),
                &claims(json!({})),
            ),
            "signature",
        ),
        (
            "RS256 with expired claims",
            rs256(&claims(json!({"exp": now_secs() - 60}))),
            "expired",
        ),
        (
            "ES256 for another audience",
            es256(&claims(json!({"aud": "another-service"}))),
            "audience",
        ),
    ];
    for (case, token, hint) in cases {
        let (code, message) = refused(addr, Some(&token)).await;
        assert_eq!(code, "invalid_token", "{case}: {message}");
        assert!(message.contains(hint), "{case}: {message:?} lacks {hint:?}");
    }

    // The good ones, with each kind of key.
    for (alg, token) in [
        ("HS256", jwt(claims(json!({})))),
        ("RS256", rs256(&claims(json!({})))),
        ("ES256", es256(&claims(json!({})))),
    ] {
        let (_, connected) = accepted(addr, &token).await;
        assert_eq!(connected["subject"], "alice", "{alg}");
        assert_eq!(
            connected["expires_at"].as_u64(),
            Some(claims(json!({}))["exp"].as_u64().unwrap() * 1000),
            "{alg}"
        );
    }
    let (_, connected) = accepted(addr, API_KEY).await;
    assert!(connected["subject"].is_null());

    // Without a public key configured, RS256 and ES256 tokens are refused.
    let plain = Server::start(&[]);
    for token in [rs256(&claims(json!({}))), es256(&claims(json!({})))] {
        let (code, message) = refused(&plain.addr, Some(&token)).await;
        assert_eq!(code, "invalid_token");
        assert!(message.contains("not accepted"), "{message}");
    }
}

fn base64url(s: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in s.as_bytes().chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

#[tokio::test]
async fn forbidden_streams_are_refused_and_the_connection_stays_open() {
    let server = Server::start(&[]);
    let token = jwt(
        json!({"sub":"carol","exp":now_secs()+600,"subscribe":["chat:*"],"publish":["chat:mine"]}),
    );
    let (mut peer, _) = accepted(&server.addr, &token).await;
    peer.send(json!({"type":"subscribe","id":1,"stream":"secret","after":"oldest"}))
        .await;
    let e = peer.expect("error").await;
    assert_eq!(
        (e["id"].as_u64(), e["code"].as_str()),
        (Some(1), Some("forbidden"))
    );
    peer.send(json!({"type":"publish","id":2,"stream":"chat:other","data":"x"}))
        .await;
    let e = peer.expect("error").await;
    assert_eq!(
        (e["id"].as_u64(), e["code"].as_str()),
        (Some(2), Some("forbidden"))
    );

    // Still connected, with its allowed rights.
    peer.send(json!({"type":"subscribe","id":3,"stream":"chat:other","after":"oldest"}))
        .await;
    assert_eq!(peer.expect("subscribed").await["id"], 3);
    peer.send(json!({"type":"publish","id":4,"stream":"chat:mine","data":"ok"}))
        .await;
    let ack = peer.expect("ack").await;
    assert_eq!(
        (ack["id"].as_u64(), ack["offset"].as_u64()),
        (Some(4), Some(1))
    );
    // The refused publish appended nothing: the first message of chat:other is this one.
    server.publish("chat:other", "from the API").await;
    let m = peer.expect("message").await;
    assert_eq!(
        (m["offset"].as_u64(), m["data"].as_str()),
        (Some(1), Some("from the API"))
    );

    // A token without a publish claim publishes nowhere.
    let reader = jwt(json!({"sub":"dave","exp":now_secs()+600,"subscribe":["chat:*"]}));
    let (mut peer, _) = accepted(&server.addr, &reader).await;
    peer.send(json!({"type":"publish","id":5,"stream":"chat:1","data":"x"}))
        .await;
    let e = peer.expect("error").await;
    assert_eq!(
        (e["id"].as_u64(), e["code"].as_str()),
        (Some(5), Some("forbidden"))
    );
    peer.send(json!({"type":"ping"})).await;
    peer.expect("pong").await;
}

#[tokio::test]
async fn a_session_is_bound_to_its_identity_and_forged_ids_restore_nothing() {
    let server = Server::start(&[]);
    let token = |sub: &str| jwt(json!({"sub":sub,"exp":now_secs()+600,"subscribe":["chat:*"]}));
    let (mut alice, connected) = accepted(&server.addr, &token("alice")).await;
    let session = connected["session"].as_str().unwrap().to_owned();
    alice
        .send(json!({"type":"subscribe","stream":"chat:1","after":"oldest"}))
        .await;
    alice.expect("subscribed").await;

    // Bob with alice's session, while she is connected and after she left; an API key too.
    let (mut bob, answer) = connect_with(
        &server.addr,
        json!({"token": token("bob"), "session": session}),
    )
    .await;
    assert_eq!(answer["type"], "error", "{answer}");
    assert_eq!(answer["code"], "session_not_restored");
    // Bob is not connected by that, and can still connect without the session.
    bob.send(json!({"type":"subscribe","stream":"chat:1"}))
        .await;
    assert_eq!(bob.expect("error").await["code"], "not_connected");
    bob.send(json!({"type":"connect","token": token("bob")}))
        .await;
    let connected = bob.expect("connected").await;
    assert_eq!(connected["subject"], "bob");
    assert_ne!(connected["session"], session.as_str());
    // Alice was not disturbed.
    server.publish("chat:1", "for alice").await;
    assert_eq!(alice.expect("message").await["data"], "for alice");

    // After she left: the server has seen her connection end (bob's is the one left).
    drop(alice);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while server.metric(r#"spool_connections{transport="ws"}"#).await != Some(1.0) {
        assert!(
            std::time::Instant::now() < deadline,
            "alice's connection still counted 20 s after it was dropped"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for credential in [token("bob"), API_KEY.to_owned()] {
        let (_, answer) = connect_with(
            &server.addr,
            json!({"token": credential, "session": session}),
        )
        .await;
        assert_eq!(answer["code"], "session_not_restored", "{answer}");
    }
    // Alice herself gets it back, with her subscription.
    let (mut alice, connected) = connect_with(
        &server.addr,
        json!({"token": token("alice"), "session": session}),
    )
    .await;
    assert_eq!(connected["resumed"], true, "{connected}");
    assert_eq!(connected["subscriptions"][0]["stream"], "chat:1");
    server.publish("chat:1", "again").await;
    assert_eq!(alice.expect("message").await["data"], "again");

    // Forged or malformed ids: with a token, a new session and why; without, a plain refusal.
    for forged in [
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "../../etc/passwd",
        &"x".repeat(200),
        "",
    ] {
        let (_, connected) = connect_with(
            &server.addr,
            json!({"token": token("eve"), "session": forged}),
        )
        .await;
        assert_eq!(connected["type"], "connected", "{forged}: {connected}");
        assert_eq!(connected["resumed"], false);
        assert_eq!(connected["not_restored"], "unknown_session", "{connected}");
        assert_ne!(connected["session"], forged);
        let (_, answer) = connect_with(&server.addr, json!({"session": forged})).await;
        assert_eq!(answer["type"], "error", "{forged}: {answer}");
        assert_eq!(answer["code"], "session_not_restored", "{forged}");
    }
}

#[tokio::test]
async fn credentials_on_the_upgrade_request_and_origins() {
    let server = Server::start(&["--cors-origin", "https://app.example"]);
    let addr = &server.addr;
    let token = jwt(json!({"sub":"alice","exp":now_secs()+600,"subscribe":["chat:*"]}));
    let url = format!("ws://{addr}/v1/ws");

    // ?token= and Authorization, then a `connect` without a token.
    let bearer = format!("Bearer {token}");
    for (url, headers) in [
        (format!("{url}?token={token}"), vec![]),
        (url.clone(), vec![("authorization", bearer.as_str())]),
    ] {
        let mut peer = WsPeer::open_url(&url, &headers).await.expect("upgrade");
        peer.send(json!({"type":"connect"})).await;
        let connected = peer.expect("connected").await;
        assert_eq!(connected["subject"], "alice", "{url} {headers:?}");
        peer.send(json!({"type":"subscribe","stream":"chat:1"}))
            .await;
        peer.expect("subscribed").await;
    }
    let api_key = format!("Bearer {API_KEY}");
    let mut peer = WsPeer::open(addr, &[("authorization", &api_key)])
        .await
        .unwrap();
    peer.send(json!({"type":"connect"})).await;
    peer.expect("connected").await;

    // A bad credential on the upgrade is a plain HTTP 401 with a JSON body.
    let expired = jwt(json!({"sub":"alice","exp":now_secs()-60}));
    let bad_header = format!("Bearer {expired}");
    for (url, headers) in [
        (format!("{url}?token=garbage"), vec![]),
        (format!("{url}?token={expired}"), vec![]),
        (url.clone(), vec![("authorization", bad_header.as_str())]),
        (url.clone(), vec![("authorization", "Basic YTpi")]),
    ] {
        let (status, body) = match WsPeer::open_url(&url, &headers).await {
            Err(refusal) => refusal,
            Ok(_) => panic!("{url} {headers:?}: upgraded"),
        };
        assert_eq!(status, 401, "{url} {headers:?}");
        let body: Value = serde_json::from_str(&body).expect("a JSON body");
        assert_eq!(body["error"]["code"], "invalid_token", "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }

    // Origins: not allowed → 403 (the server's own too: it is not listed, see
    // hardening_ws.rs); the allowed one and none → upgraded.
    let own = format!("http://{addr}");
    for origin in ["https://evil.example", own.as_str()] {
        let (status, body) = WsPeer::open(addr, &[("origin", origin)])
            .await
            .err()
            .expect("an unlisted origin upgraded");
        assert_eq!(status, 403);
        let body: Value = serde_json::from_str(&body).expect("a JSON body");
        assert_eq!(body["error"]["code"], "origin_not_allowed", "{body}");
    }
    let mut peer = WsPeer::open(addr, &[("origin", "https://app.example")])
        .await
        .unwrap_or_else(|e| panic!("https://app.example: {e:?}"));
    peer.send(json!({"type":"connect","token":token})).await;
    peer.expect("connected").await;
    // Without --cors-origin, a foreign origin is refused too.
    let plain = Server::start(&[]);
    let refusal = WsPeer::open(&plain.addr, &[("origin", "https://app.example")])
        .await
        .err()
        .expect("a foreign origin upgraded");
    assert_eq!(refusal.0, 403);
}

/// Sleeps until `ms` (ms since the Unix epoch) has passed by `margin`.
async fn sleep_past(ms: u64, margin: Duration) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    tokio::time::sleep(Duration::from_millis(ms.saturating_sub(now)) + margin).await;
}

#[tokio::test]
async fn a_refresh_before_expiry_keeps_the_connection_open() {
    let server = Server::start(&[]);
    let claims = |exp: i64| json!({"sub":"alice","exp":exp,"subscribe":["chat:*"]});
    // Far enough ahead that the refresh below comes before it even on a loaded machine.
    let first_exp = now_secs() + 6;
    let (mut peer, connected) = accepted(&server.addr, &jwt(claims(first_exp))).await;
    assert_eq!(
        connected["expires_at"].as_u64(),
        Some(first_exp as u64 * 1000)
    );
    peer.send(json!({"type":"subscribe","stream":"chat:1"}))
        .await;
    peer.expect("subscribed").await;

    tokio::time::sleep(Duration::from_secs(1)).await;
    let second_exp = now_secs() + 600;
    peer.send(json!({"type":"refresh","id":7,"token":jwt(claims(second_exp))}))
        .await;
    let refreshed = peer.expect("refreshed").await;
    assert_eq!(refreshed["id"], 7);
    assert_eq!(
        refreshed["expires_at"].as_u64(),
        Some(second_exp as u64 * 1000)
    );

    // Well past the first expiry: still open, still delivering.
    sleep_past(first_exp as u64 * 1000, Duration::from_millis(1000)).await;
    server.publish("chat:1", "still here").await;
    assert_eq!(peer.expect("message").await["data"], "still here");
    peer.send(json!({"type":"ping"})).await;
    peer.expect("pong").await;
}

#[tokio::test]
async fn a_token_that_expires_closes_the_connection_with_4002() {
    let server = Server::start(&[]);
    // Far enough ahead that the subscribe below is answered before it on a loaded machine.
    let exp = now_secs() + 4;
    let (mut peer, connected) = accepted(
        &server.addr,
        &jwt(json!({"sub":"alice","exp":exp,"subscribe":["chat:*"]})),
    )
    .await;
    let session = connected["session"].as_str().unwrap().to_owned();
    peer.send(json!({"type":"subscribe","stream":"chat:1","after":"oldest"}))
        .await;
    peer.expect("subscribed").await;

    let error = peer.expect("error").await;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert_eq!(error["code"], "token_expired", "{error}");
    assert!(
        now_ms + 100 >= exp as u64 * 1000,
        "closed {} ms before the expiry",
        exp as u64 * 1000 - now_ms
    );
    assert_eq!(peer.closed().await.0, 4002);

    // The session outlives the token, but resuming it needs a fresh one.
    server.publish("chat:1", "while away").await;
    let (_, answer) = connect_with(&server.addr, json!({"session": session})).await;
    assert_eq!(answer["code"], "session_not_restored", "{answer}");
    let fresh = jwt(json!({"sub":"alice","exp":now_secs()+600,"subscribe":["chat:*"]}));
    let (mut peer, connected) =
        connect_with(&server.addr, json!({"session": session, "token": fresh})).await;
    assert_eq!(connected["resumed"], true, "{connected}");
    assert_eq!(peer.expect("message").await["data"], "while away");
}

#[tokio::test]
async fn a_refresh_keeps_the_identity_and_narrower_rights_end_subscriptions() {
    let server = Server::start(&[]);
    let token = |sub: &str, subscribe: Value| {
        jwt(json!({"sub":sub,"exp":now_secs()+600,"subscribe":subscribe}))
    };
    let (mut peer, _) = accepted(&server.addr, &token("alice", json!(["chat:*", "news"]))).await;
    for stream in ["chat:1", "news"] {
        peer.send(json!({"type":"subscribe","stream":stream})).await;
        peer.expect("subscribed").await;
    }

    // Another identity, or an invalid token: refused, nothing changes.
    peer.send(json!({"type":"refresh","id":1,"token":token("mallory", json!(["*"]))}))
        .await;
    let e = peer.expect("error").await;
    assert_eq!(
        (e["id"].as_u64(), e["code"].as_str()),
        (Some(1), Some("forbidden"))
    );
    let forged = hs256_with(
        b"not-the-secret",
        &json!({"sub":"alice","exp":now_secs()+600,"subscribe":["*"]}),
    );
    peer.send(json!({"type":"refresh","id":2,"token":forged}))
        .await;
    let e = peer.expect("error").await;
    assert_eq!(
        (e["id"].as_u64(), e["code"].as_str()),
        (Some(2), Some("invalid_token"))
    );
    server.publish("chat:1", "c1").await;
    assert_eq!(peer.expect("message").await["data"], "c1");

    // Narrower rights: chat:* is gone, so is the subscription to chat:1.
    peer.send(json!({"type":"refresh","id":3,"token":token("alice", json!(["news"]))}))
        .await;
    assert_eq!(peer.expect("refreshed").await["id"], 3);
    let u = peer.expect("unsubscribed").await;
    assert_eq!(u["stream"], "chat:1");
    assert_eq!(u["reason"], "forbidden");
    server.publish("chat:1", "c2").await;
    server.publish("news", "n1").await;
    let m = peer.expect("message").await;
    assert_eq!(
        (m["stream"].as_str(), m["data"].as_str()),
        (Some("news"), Some("n1"))
    );
    peer.send(json!({"type":"subscribe","id":4,"stream":"chat:2"}))
        .await;
    assert_eq!(peer.expect("error").await["code"], "forbidden");

    // An API-key connection cannot become a token holder either.
    let (mut service, _) = accepted(&server.addr, API_KEY).await;
    service
        .send(json!({"type":"refresh","id":5,"token":token("alice", json!(["*"]))}))
        .await;
    assert_eq!(service.expect("error").await["code"], "forbidden");
}
