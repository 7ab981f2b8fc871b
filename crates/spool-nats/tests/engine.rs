//! What is particular to the JetStream engine, against the shared NATS: retention by count and
//! age in JetStream, an epoch that survives idleness but not the loss of the stream, odd stream
//! names, and data Spool did not write.

mod common;

use std::time::Duration;

use bytes::Bytes;
use spool_core::{NewMessage, Offset, StreamName};
use spool_engine::{Engine, EngineError, SessionRecord, SessionStore};
use spool_nats::{NatsConfig, NatsEngine};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn name(s: &str) -> StreamName {
    StreamName::new(s).expect("valid name")
}

fn msg(payload: &str) -> NewMessage {
    NewMessage {
        payload: Bytes::from(payload.to_owned()),
        ..Default::default()
    }
}

/// A fresh prefix on the shared NATS, cleaned up on drop.
fn setup(url: &str) -> (NatsConfig, common::Cleanup) {
    let prefix = common::unique_prefix();
    let config = NatsConfig {
        prefix: prefix.clone(),
        ..NatsConfig::new(url)
    };
    (
        config,
        common::Cleanup {
            url: url.to_owned(),
            prefix,
        },
    )
}

async fn connect(config: &NatsConfig) -> NatsEngine {
    NatsEngine::connect(config.clone())
        .await
        .expect("connect to NATS")
}

async fn payloads(engine: &NatsEngine, s: &StreamName) -> Vec<String> {
    engine
        .read(s, Offset(0), 100)
        .await
        .expect("read")
        .messages
        .iter()
        .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
        .collect()
}

#[tokio::test]
async fn retention_by_count_and_by_age_keeps_the_epoch() {
    let Some(url) = common::shared_nats() else {
        return;
    };
    let (mut config, _cleanup) = setup(&url);
    config.retention.default.max_messages = 2;
    config.retention.default.max_age = Duration::from_secs(1);
    let engine = connect(&config).await;
    let s = name("aging");
    let out = engine
        .append(&s, vec![msg("1"), msg("2"), msg("3")])
        .await
        .unwrap();
    let epoch = out[0].position.epoch.clone();
    let state = engine.state(&s).await.unwrap().unwrap();
    assert_eq!(
        (state.oldest, state.head),
        (Offset(2), Offset(3)),
        "by count"
    );

    // By age: JetStream expires them within a moment of max_age.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let state = loop {
        let state = engine.state(&s).await.unwrap().unwrap();
        if state.oldest > state.head {
            break state;
        }
        assert!(tokio::time::Instant::now() < deadline, "nothing expired");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(state.head, Offset(3), "the head outlives the messages");
    assert_eq!(state.oldest, Offset(4), "no message: oldest = head + 1");
    assert_eq!(state.epoch, epoch, "an idle stream keeps its epoch");
    let batch = engine.read(&s, Offset(1), 10).await.unwrap();
    assert!(batch.messages.is_empty());
    assert_eq!(
        (batch.state.oldest, batch.state.head),
        (Offset(4), Offset(3))
    );
    let next = engine.append(&s, vec![msg("4")]).await.unwrap();
    assert_eq!(next[0].position.offset, Offset(4));
    assert_eq!(next[0].position.epoch, epoch);
}

#[tokio::test]
async fn a_deleted_jetstream_stream_comes_back_with_a_new_epoch() {
    let Some(url) = common::shared_nats() else {
        return;
    };
    let (config, _cleanup) = setup(&url);
    let reader = connect(&config).await;
    let writer = connect(&config).await;
    let s = name("lost");
    let out = writer.append(&s, vec![msg("1"), msg("2")]).await.unwrap();
    let old = out[0].position.epoch.clone();
    let mut watch = reader.watch(&s).await.unwrap();
    assert_eq!(watch.borrow_and_update().epoch, old);

    // Simulated data loss: the stream is deleted behind Spool's back.
    let js = async_nats::jetstream::new(async_nats::connect(&url).await.unwrap());
    js.delete_stream(format!("{}_lost", config.prefix))
        .await
        .expect("delete the JetStream stream");
    assert!(reader.state(&s).await.unwrap().is_none(), "gone is gone");

    // The reader is told (a placeholder epoch at head 0, its watch moved there); reading
    // makes nothing.
    let batch = reader.read(&s, Offset(2), 10).await.unwrap();
    assert_ne!(batch.state.epoch, old, "a new history, a new epoch");
    assert_eq!(batch.state.head, Offset(0));
    let placeholder = batch.state.epoch.clone();
    assert_eq!(watch.borrow_and_update().epoch, placeholder);
    assert!(reader.state(&s).await.unwrap().is_none(), "reading made it");

    // The writer still remembers the old epoch: its publish finds the stream gone and makes
    // it again, in a new epoch, which the reader's watch follows.
    let out = writer.append(&s, vec![msg("again")]).await.unwrap();
    let new = out[0].position.epoch.clone();
    assert_ne!(new, old);
    assert_eq!(out[0].position.offset, Offset(1));
    tokio::time::timeout(Duration::from_secs(10), async {
        while watch.borrow_and_update().epoch != new {
            watch.changed().await.unwrap();
        }
    })
    .await
    .expect("the watcher learns of the new epoch");
    assert_eq!(payloads(&reader, &s).await, ["again"]);
}

/// Names of the JetStream streams of a prefix (its session bucket's `KV_…` is not among them).
async fn jetstream_streams(url: &str, prefix: &str) -> Vec<String> {
    use futures::StreamExt;
    let js = async_nats::jetstream::new(async_nats::connect(url).await.unwrap());
    let mut names = js.stream_names();
    let mut out = Vec::new();
    while let Some(name) = names.next().await {
        let name = name.expect("stream names");
        if name.starts_with(&format!("{prefix}_")) {
            out.push(name);
        }
    }
    out
}

#[tokio::test]
async fn reads_and_watches_make_no_jetstream_stream_and_the_first_append_takes_their_epoch() {
    let Some(url) = common::shared_nats() else {
        return;
    };
    let (mut config, _cleanup) = setup(&url);
    config.max_unpublished_streams = 3;
    let engine = connect(&config).await;
    let other = connect(&config).await;
    let s = name("waited-on");
    let watch = engine.watch(&s).await.unwrap();
    let placeholder = watch.borrow().epoch.clone();
    assert_eq!(watch.borrow().offset, Offset(0));
    let batch = engine.read(&s, Offset(0), 10).await.unwrap();
    assert_eq!(
        batch.state.epoch, placeholder,
        "one epoch per stream per node"
    );
    assert!(engine.state(&s).await.unwrap().is_none());
    assert!(!engine.exists(&s).await.unwrap());
    for i in 0..20 {
        let ghost = name(&format!("ghost-{i}"));
        engine.read(&ghost, Offset(0), 10).await.unwrap();
        assert!(other.state(&ghost).await.unwrap().is_none());
    }
    assert!(
        jetstream_streams(&url, &config.prefix).await.is_empty(),
        "reads made JetStream streams"
    );

    // The cap: watched placeholders count; past it a watch of another unknown stream is
    // refused, while reads without a watch and known streams go on.
    let w2 = engine.watch(&name("w2")).await.unwrap();
    let w3 = engine.watch(&name("w3")).await.unwrap();
    let refused = engine.watch(&name("w4")).await.unwrap_err();
    assert!(
        matches!(
            refused,
            EngineError::StreamLimit(spool_engine::StreamLimit::Unpublished { engine: None, .. })
        ),
        "{refused:?}"
    );
    engine.read(&name("w4"), Offset(0), 1).await.unwrap();
    drop((w2, w3));
    engine.sweep().await.unwrap();
    // A scan at the cap that freed nothing is not repeated for a second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let w4 = engine.watch(&name("w4")).await.expect("room again");

    // The first append makes the stream, in the epoch the watcher waits in.
    let out = engine.append(&s, vec![msg("first")]).await.unwrap();
    assert_eq!(out[0].position.epoch, placeholder);
    assert_eq!(out[0].position.offset, Offset(1));
    assert_eq!(watch.borrow().offset, Offset(1));
    assert_eq!(
        other.state(&s).await.unwrap().unwrap().epoch,
        placeholder,
        "one epoch on every node"
    );
    assert_eq!(jetstream_streams(&url, &config.prefix).await.len(), 1);
    drop(w4);
}

#[tokio::test]
async fn odd_stream_names_map_to_distinct_working_streams() {
    let Some(url) = common::shared_nats() else {
        return;
    };
    let (config, cleanup) = setup(&url);
    let engine = connect(&config).await;
    let long = format!("{}x", "é".repeat(127));
    assert_eq!(long.len(), 255);
    let names = [
        "a.b",
        "a_2Eb",
        "a_b",
        "x/y",
        "ü*>",
        "chat:room",
        long.as_str(),
    ];
    for n in names {
        let out = engine.append(&name(n), vec![msg(n)]).await.unwrap();
        assert_eq!(out[0].position.offset, Offset(1), "{n}");
    }
    for n in names {
        assert_eq!(
            payloads(&engine, &name(n)).await,
            [n],
            "{n} holds only its own"
        );
    }
    // Sessions under ids Spool would never issue still work.
    let id = "not base64.url id/ü";
    engine
        .save_sessions(vec![SessionRecord {
            id: id.into(),
            data: Bytes::from_static(b"odd"),
            expires_at: spool_core::now_ms() + 60_000,
            holder: 0,
            take_over: false,
        }])
        .await
        .unwrap();
    assert_eq!(engine.load_session(id).await.unwrap().unwrap(), "odd");
    engine.delete_session(id).await.unwrap();
    assert!(engine.load_session(id).await.unwrap().is_none());

    // And the test leaves nothing behind on the shared server.
    assert_eq!(
        common::streams_of(&url, &config.prefix).await.len(),
        names.len() + 1
    );
    drop(engine);
    drop(cleanup);
    assert!(common::streams_of(&url, &config.prefix).await.is_empty());
}

#[tokio::test]
async fn one_oversized_session_does_not_keep_the_others_of_its_batch_from_being_saved() {
    let Some(url) = common::shared_nats() else {
        return;
    };
    let (config, _cleanup) = setup(&url);
    let engine = connect(&config).await;
    let record = |id: &str, data: Bytes| SessionRecord {
        id: id.into(),
        data,
        expires_at: spool_core::now_ms() + 60_000,
        holder: 0,
        take_over: false,
    };
    // More than NATS's max_payload (1 MiB by default).
    let huge = Bytes::from(vec![b'x'; 2 << 20]);
    let err = engine
        .save_sessions(vec![
            record("before", Bytes::from_static(b"b")),
            record("huge", huge),
            record("after", Bytes::from_static(b"a")),
        ])
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            EngineError::Limit(spool_engine::Limit::SessionTooLarge { id, .. }) if id == "huge"
        ),
        "{err:?}"
    );
    assert_eq!(engine.load_session("before").await.unwrap().unwrap(), "b");
    assert_eq!(
        engine.load_session("after").await.unwrap().unwrap(),
        "a",
        "a session batched after an oversized one is saved too (the server retries the \
         whole batch every second, so otherwise it never would be)"
    );
    assert!(engine.load_session("huge").await.unwrap().is_none());
}

/// A message over NATS's `max_payload` is a `Limit` that names its size and the bound, and
/// stores nothing.
#[tokio::test]
async fn an_oversized_message_is_a_limit_naming_its_size() {
    let Some(url) = common::shared_nats() else {
        return;
    };
    let (config, _cleanup) = setup(&url);
    let engine = connect(&config).await;
    let s = StreamName::new("oversized").unwrap();
    engine.append(&s, vec![msg("small")]).await.unwrap();
    let huge = NewMessage {
        payload: Bytes::from(vec![b'x'; 2 << 20]),
        ..Default::default()
    };
    let err = engine.append(&s, vec![huge]).await.unwrap_err();
    match &err {
        EngineError::Limit(spool_engine::Limit::MessageTooLarge {
            size,
            max: Some(max),
            ..
        }) => {
            assert_eq!(*size, 2 << 20);
            assert!(*max < *size, "{err}");
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains("max_payload"), "{err}");
    let state = engine.state(&s).await.unwrap().unwrap();
    assert_eq!(state.head, Offset(1), "nothing stored");
}

#[tokio::test]
async fn data_spool_did_not_write_reads_as_internal_not_a_panic() {
    let Some(url) = common::shared_nats() else {
        return;
    };
    let (config, _cleanup) = setup(&url);
    let engine = connect(&config).await;
    let subject = |s: &str| format!("{}.s.{s}", config.prefix);
    let client = async_nats::connect(&url).await.unwrap();
    let js = async_nats::jetstream::new(client);

    // A plain NATS publish (no Spool metadata) is a bare payload. (Spool makes the JetStream
    // stream on its first append: reads make none.)
    let plain = name("plain");
    engine.append(&plain, vec![msg("first")]).await.unwrap();
    js.publish(subject("plain"), "from nats".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let batch = engine.read(&plain, Offset(1), 10).await.unwrap();
    assert_eq!(batch.messages[0].payload, "from nats");
    assert!(batch.messages[0].time_ms > 0);

    // Metadata that is not Spool's JSON.
    let garbage = name("garbage");
    engine.append(&garbage, vec![msg("first")]).await.unwrap();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Spool-Meta", "{not json");
    js.publish_with_headers(subject("garbage"), headers, "x".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let err = engine.read(&garbage, Offset(0), 10).await.unwrap_err();
    assert!(matches!(err, EngineError::Internal { .. }), "{err:?}");

    // A header block that is not even UTF-8, written with the raw protocol: it must not break
    // the engine's connection either.
    let raw = name("raw");
    engine.append(&raw, vec![msg("first")]).await.unwrap();
    raw_hpub(
        &url,
        &subject("raw"),
        b"NATS/1.0\r\nSpool-Meta: \xff\xfe\r\n\r\n",
        b"body",
    )
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let err = loop {
        match engine.read(&raw, Offset(0), 10).await {
            Err(e) => break e,
            Ok(b) if b.state.head == Offset(1) && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(b) => panic!("read a garbage message: {:?}", b.messages),
        }
    };
    assert!(matches!(err, EngineError::Internal { .. }), "{err:?}");
    // The engine still works.
    engine.append(&plain, vec![msg("after")]).await.unwrap();
    assert_eq!(
        payloads(&engine, &plain).await,
        ["first", "from nats", "after"]
    );
}

/// Publishes with the raw NATS protocol, headers as given.
async fn raw_hpub(url: &str, subject: &str, headers: &[u8], body: &[u8]) {
    let mut socket = tokio::net::TcpStream::connect(spool_testkit::engines::host_port(url))
        .await
        .unwrap();
    let mut info = [0u8; 4096];
    let _ = socket.read(&mut info).await.unwrap();
    let mut frame = b"CONNECT {\"verbose\":false,\"headers\":true}\r\n".to_vec();
    frame.extend_from_slice(
        format!(
            "HPUB {subject} {} {}\r\n",
            headers.len(),
            headers.len() + body.len()
        )
        .as_bytes(),
    );
    frame.extend_from_slice(headers);
    frame.extend_from_slice(body);
    frame.extend_from_slice(b"\r\nPING\r\n");
    socket.write_all(&frame).await.unwrap();
    let mut reply = [0u8; 256];
    let n = socket.read(&mut reply).await.unwrap();
    let reply = String::from_utf8_lossy(&reply[..n]);
    assert!(reply.contains("PONG"), "server said: {reply}");
}
