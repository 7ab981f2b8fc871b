//! The HTTP API against the real binary: publishing, batches, stream info, every bad input
//! with its status and JSON body, deny-by-default auth, CORS, and the operations endpoints.

mod common;

use common::{API_KEY, Server, enc, jwt, now_secs};
use serde_json::{Value, json};

async fn expect_error(r: reqwest::Response, status: u16, code: &str) -> Value {
    assert_eq!(r.status().as_u16(), status, "status");
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/json"),
        "error bodies are JSON"
    );
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], code, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    body
}

#[tokio::test]
async fn publish_answers_the_position_and_keeps_content_type() {
    let s = Server::start(&[]);
    let a = s.publish("chat:lobby", "one").await;
    let b = s.publish("chat:lobby", "two").await;
    assert_eq!(a["stream"], "chat:lobby");
    assert_eq!(
        (a["offset"].as_u64(), b["offset"].as_u64()),
        (Some(1), Some(2))
    );
    assert_eq!(a["epoch"], b["epoch"]);
    assert_eq!(a["duplicate"], false);

    let r = s
        .http
        .post(s.url("/v1/streams/user%2F42/messages"))
        .bearer_auth(API_KEY)
        .header("content-type", "application/json")
        .body(r#"{"x":1}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        body["stream"], "user/42",
        "names with / travel percent-encoded"
    );

    let (status, read) = s.poll("user/42", "after=oldest").await;
    assert_eq!(status, 200);
    assert_eq!(read["messages"][0]["data"], r#"{"x":1}"#);
    assert_eq!(read["messages"][0]["content_type"], "application/json");

    // Binary payloads come back base64-encoded.
    let r = s
        .http
        .post(s.url("/v1/streams/bin/messages"))
        .bearer_auth(API_KEY)
        .body(vec![0xffu8, 0x00, 0x80])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let (_, read) = s.poll("bin", "").await;
    assert_eq!(read["messages"][0]["data_base64"], "/wCA");
    assert!(read["messages"][0].get("data").is_none());
}

#[tokio::test]
async fn idempotency_key_appends_once() {
    let s = Server::start(&[]);
    let send = || {
        s.http
            .post(s.url("/v1/streams/orders/messages"))
            .bearer_auth(API_KEY)
            .header("idempotency-key", "order-17")
            .body("paid")
            .send()
    };
    let first: Value = send().await.unwrap().json().await.unwrap();
    let retry = send().await.unwrap();
    assert_eq!(retry.status(), 201);
    let retry: Value = retry.json().await.unwrap();
    assert_eq!(first["duplicate"], false);
    assert_eq!(retry["duplicate"], true);
    assert_eq!(first["offset"], retry["offset"]);
    assert_eq!(first["epoch"], retry["epoch"]);
    let (_, read) = s.poll("orders", "after=oldest").await;
    assert_eq!(read["messages"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn batch_publishes_in_order_across_streams() {
    let s = Server::start(&[]);
    let r = s
        .http
        .post(s.url("/v1/publish"))
        .bearer_auth(API_KEY)
        .json(&json!({"messages": [
            {"stream": "a", "data": "a1"},
            {"stream": "b", "data_base64": "AAE="},
            {"stream": "a", "data": "a2", "idempotency_key": "k"},
            {"stream": "a", "data": "a2 again", "idempotency_key": "k"},
            {"stream": "a", "data": "a3", "key": "price", "headers": {"h": "v"}}
        ]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let body: Value = r.json().await.unwrap();
    let results = body["results"].as_array().unwrap();
    let got: Vec<(String, u64, bool)> = results
        .iter()
        .map(|r| {
            (
                r["stream"].as_str().unwrap().to_owned(),
                r["offset"].as_u64().unwrap(),
                r["duplicate"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("a".into(), 1, false),
            ("b".into(), 1, false),
            ("a".into(), 2, false),
            ("a".into(), 2, true),
            ("a".into(), 3, false)
        ]
    );
    let (_, read) = s.poll("a", "after=oldest").await;
    assert_eq!(read["messages"][2]["key"], "price");
    assert_eq!(read["messages"][2]["headers"]["h"], "v");
}

#[tokio::test]
async fn bad_publishes_get_status_and_json_and_append_nothing() {
    let s = Server::start(&["--max-payload", "1KiB"]);
    let post = |path: &str| s.http.post(s.url(path)).bearer_auth(API_KEY);

    expect_error(
        post("/v1/streams/a%20b/messages")
            .body("x")
            .send()
            .await
            .unwrap(),
        400,
        "invalid_stream_name",
    )
    .await;
    let long = "x".repeat(256);
    expect_error(
        post(&format!("/v1/streams/{long}/messages"))
            .body("x")
            .send()
            .await
            .unwrap(),
        400,
        "invalid_stream_name",
    )
    .await;
    expect_error(
        post("/v1/streams/%FF/messages")
            .body("x")
            .send()
            .await
            .unwrap(),
        400,
        "invalid_parameter",
    )
    .await;
    expect_error(
        post("/v1/streams/big/messages")
            .body(vec![b'x'; 1025])
            .send()
            .await
            .unwrap(),
        413,
        "payload_too_large",
    )
    .await;
    expect_error(
        post("/v1/streams/big/messages")
            .header("idempotency-key", "k".repeat(300))
            .body("x")
            .send()
            .await
            .unwrap(),
        400,
        "invalid_parameter",
    )
    .await;
    // Exactly at the limit is fine.
    assert_eq!(
        post("/v1/streams/big/messages")
            .body(vec![b'x'; 1024])
            .send()
            .await
            .unwrap()
            .status(),
        201
    );

    for (body, status, code) in [
        ("not json", 400, "invalid_body"),
        (r#"{"messages":[]}"#, 400, "invalid_body"),
        (
            r#"{"messages":[{"stream":"ok","data":"x"},{"stream":"bad name","data":"y"}]}"#,
            400,
            "invalid_stream_name",
        ),
        (r#"{"messages":[{"stream":"ok"}]}"#, 400, "invalid_body"),
        (
            r#"{"messages":[{"stream":"ok","data":"x","data_base64":"eA=="}]}"#,
            400,
            "invalid_body",
        ),
        (
            r#"{"messages":[{"stream":"ok","data_base64":"***"}]}"#,
            400,
            "invalid_body",
        ),
        (
            r#"{"messages":[{"stream":"ok","data":"x","bogus":1}]}"#,
            400,
            "invalid_body",
        ),
    ] {
        let r = post("/v1/publish")
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let err = expect_error(r, status, code).await;
        eprintln!("{body} -> {err}");
    }
    let big = json!({"messages":[{"stream":"ok","data":"x".repeat(2000)}]});
    expect_error(
        post("/v1/publish").json(&big).send().await.unwrap(),
        413,
        "payload_too_large",
    )
    .await;
    // Nothing of the failed batches was appended.
    let r = s
        .http
        .get(s.url("/v1/streams/ok"))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    expect_error(r, 404, "not_found").await;

    expect_error(
        s.http.get(s.url("/v1/nope")).send().await.unwrap(),
        404,
        "not_found",
    )
    .await;
    expect_error(
        s.http.delete(s.url("/v1/publish")).send().await.unwrap(),
        405,
        "method_not_allowed",
    )
    .await;
}

#[tokio::test]
async fn bad_reads_get_status_and_json() {
    let s = Server::start(&[]);
    s.publish("r", "x").await;
    let get = |path: &str| s.http.get(s.url(path)).bearer_auth(API_KEY);
    for (query, code) in [
        ("after=garbage", "invalid_position"),
        ("after=abc", "invalid_position"),
        ("after=e:-1", "invalid_position"),
        ("after=e:99999999999999999999999", "invalid_position"),
        ("limit=0", "invalid_parameter"),
        ("limit=ten", "invalid_parameter"),
        ("wait=-3", "invalid_parameter"),
        ("wait=NaN", "invalid_parameter"),
    ] {
        expect_error(
            get(&format!("/v1/streams/r/messages?{query}"))
                .send()
                .await
                .unwrap(),
            400,
            code,
        )
        .await;
    }
    expect_error(
        get("/v1/streams/r/events")
            .header("last-event-id", "nonsense")
            .send()
            .await
            .unwrap(),
        400,
        "invalid_position",
    )
    .await;
    for (path, status, code) in [
        ("/v1/streams/r/events?format=xml", 400, "invalid_parameter"),
        ("/v1/events", 400, "invalid_parameter"),
        ("/v1/events?stream=a&stream=a", 400, "invalid_parameter"),
        (
            "/v1/events?stream=a&stream=b&after=x:1",
            400,
            "invalid_parameter",
        ),
        ("/v1/streams/never-seen", 404, "not_found"),
    ] {
        expect_error(get(path).send().await.unwrap(), status, code).await;
    }
}

#[tokio::test]
async fn stream_info_reports_bounds_and_retention() {
    let s = Server::start(&["--history-limit", "3"]);
    for i in 0..5 {
        s.publish("info", &i.to_string()).await;
    }
    let r = s
        .http
        .get(s.url("/v1/streams/info"))
        .bearer_auth(API_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let info: Value = r.json().await.unwrap();
    assert_eq!(info["head"], 5);
    assert_eq!(info["oldest"], 3);
    assert_eq!(info["retention"]["max_messages"], 3);
    assert_eq!(
        info["position"],
        format!("{}:5", info["epoch"].as_str().unwrap())
    );
}

#[tokio::test]
async fn deny_by_default() {
    let s = Server::start(&[]);
    s.publish("secure", "x").await;
    let r = s
        .http
        .post(s.url("/v1/streams/secure/messages"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert!(r.headers().contains_key("www-authenticate"));
    expect_error(r, 401, "unauthorized").await;
    expect_error(
        s.http
            .get(s.url("/v1/streams/secure/messages"))
            .send()
            .await
            .unwrap(),
        401,
        "unauthorized",
    )
    .await;
    expect_error(
        s.http
            .get(s.url("/v1/streams/secure/events"))
            .send()
            .await
            .unwrap(),
        401,
        "unauthorized",
    )
    .await;
    expect_error(
        s.http
            .get(s.url("/v1/streams/secure"))
            .send()
            .await
            .unwrap(),
        401,
        "unauthorized",
    )
    .await;
    expect_error(
        s.http
            .post(s.url("/v1/publish"))
            .json(&json!({"messages":[{"stream":"a","data":"x"}]}))
            .send()
            .await
            .unwrap(),
        401,
        "unauthorized",
    )
    .await;
    let wrong = s
        .http
        .get(s.url("/v1/streams/secure/messages"))
        .bearer_auth("wrong-key")
        .send()
        .await
        .unwrap();
    expect_error(wrong, 401, "invalid_token").await;
    let malformed = s
        .http
        .get(s.url("/v1/streams/secure/messages"))
        .header("authorization", "Basic Zm9vOmJhcg==")
        .send()
        .await
        .unwrap();
    expect_error(malformed, 401, "invalid_token").await;
}

#[tokio::test]
async fn jwt_claims_limit_streams_and_actions() {
    let s = Server::start(&[]);
    s.publish("chat:1", "hello").await;
    s.publish("admin", "secret").await;
    let reader = jwt(json!({"sub": "u1", "exp": now_secs() + 60, "subscribe": ["chat:*"]}));
    let publisher = jwt(json!({"sub": "u2", "exp": now_secs() + 60, "publish": ["chat:*"]}));
    let expired = jwt(json!({"sub": "u1", "exp": now_secs() - 120, "subscribe": ["*"]}));

    let read = |stream: &str, token: &str| {
        s.http
            .get(s.url(&format!(
                "/v1/streams/{}/messages?after=oldest",
                enc(stream)
            )))
            .bearer_auth(token)
            .send()
    };
    assert_eq!(read("chat:1", &reader).await.unwrap().status(), 200);
    expect_error(read("admin", &reader).await.unwrap(), 403, "forbidden").await;
    expect_error(read("chat:1", &publisher).await.unwrap(), 403, "forbidden").await;
    expect_error(
        read("chat:1", &expired).await.unwrap(),
        401,
        "invalid_token",
    )
    .await;

    // The token may come as a query parameter, for EventSource.
    let r = s
        .http
        .get(s.url(&format!("/v1/streams/chat:1/messages?token={reader}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let publish = |stream: &str, token: &str| {
        s.http
            .post(s.url(&format!("/v1/streams/{}/messages", enc(stream))))
            .bearer_auth(token)
            .body("x")
            .send()
    };
    assert_eq!(publish("chat:2", &publisher).await.unwrap().status(), 201);
    expect_error(publish("chat:2", &reader).await.unwrap(), 403, "forbidden").await;
    expect_error(
        publish("admin", &publisher).await.unwrap(),
        403,
        "forbidden",
    )
    .await;
    let batch = s
        .http
        .post(s.url("/v1/publish"))
        .bearer_auth(&publisher)
        .json(&json!({"messages":[{"stream":"chat:3","data":"x"},{"stream":"admin","data":"y"}]}))
        .send()
        .await
        .unwrap();
    expect_error(batch, 403, "forbidden").await;
}

#[tokio::test]
async fn anonymous_mode_is_explicit() {
    let s = Server::start(&["--allow-anonymous"]);
    let r = s
        .http
        .post(s.url("/v1/streams/open/messages"))
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    // A wrong credential is still refused, even when anonymous access is on.
    let r = s
        .http
        .post(s.url("/v1/streams/open/messages"))
        .bearer_auth("nope")
        .body("x")
        .send()
        .await
        .unwrap();
    expect_error(r, 401, "invalid_token").await;
}

#[tokio::test]
async fn cors_preflight_and_headers() {
    let s = Server::start(&["--cors-origin", "https://app.example"]);
    let r = s
        .http
        .request(reqwest::Method::OPTIONS, s.url("/v1/streams/a/messages"))
        .header("origin", "https://app.example")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization,idempotency-key",
        )
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    let allowed = r.headers()["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_lowercase();
    assert!(
        allowed.contains("idempotency-key") && allowed.contains("authorization"),
        "{allowed}"
    );

    let r = s
        .http
        .get(s.url("/v1/streams/a/messages"))
        .bearer_auth(API_KEY)
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert!(!r.headers().contains_key("access-control-allow-origin"));
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let s = Server::start(&[]);
    assert_eq!(
        s.http.get(s.url("/healthz")).send().await.unwrap().status(),
        200
    );
    let ready: Value = s
        .http
        .get(s.url("/readyz"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["status"], "ready");
    s.publish("m", "x").await;
    s.publish("m", "y").await;
    let (_, _) = s.poll("m", "after=oldest").await;
    let text = s
        .http
        .get(s.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(text.contains("spool_messages_published_total 2"), "{text}");
    assert!(
        text.contains("spool_messages_delivered_total{transport=\"poll\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("spool_resets_total{reason=\"history_expired\"} 0"),
        "{text}"
    );
    assert!(
        text.contains("spool_http_request_duration_seconds"),
        "{text}"
    );
    assert!(text.contains("spool_connections"), "{text}");
}
