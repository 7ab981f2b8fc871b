//! NATS going away and coming back, on a `nats-server` of the test's own (free loopback port,
//! store in a temp dir, killed on drop): appends fail fast with `Unavailable` while it is
//! down, resume with the same epoch when it returns with its data, and start a new epoch
//! when it returns without.

use std::time::{Duration, Instant};

use bytes::Bytes;
use spool_core::{NewMessage, Offset, StreamName};
use spool_engine::{Engine, EngineError, SessionRecord, SessionStore};
use spool_nats::{NatsConfig, NatsEngine};
use spool_testkit::engines::{Backend, OwnServer};

fn msg(payload: &'static str) -> NewMessage {
    NewMessage {
        payload: Bytes::from_static(payload.as_bytes()),
        ..Default::default()
    }
}

async fn until_ready(engine: &NatsEngine) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while let Err(e) = engine.ready().await {
        assert!(
            Instant::now() < deadline,
            "not ready 20 s after NATS came back: {e}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_fail_fast_while_nats_is_down_and_resume_after() {
    let Some(mut server) = OwnServer::start(Backend::Nats) else {
        return;
    };
    let port = server.port;
    let timeout = Duration::from_secs(1);
    let config = NatsConfig {
        timeout,
        ..NatsConfig::new(server.url())
    };
    let engine = NatsEngine::connect(config.clone()).await.expect("connect");
    engine.ready().await.expect("ready");
    let s = StreamName::new("outage").unwrap();
    let out = engine.append(&s, vec![msg("1"), msg("2")]).await.unwrap();
    let epoch = out[0].position.epoch.clone();
    let mut watch = engine.watch(&s).await.unwrap();

    // Down: an append says so within about the timeout, and so does ready().
    server.kill();
    let started = Instant::now();
    let err = engine.append(&s, vec![msg("lost?")]).await.unwrap_err();
    assert!(matches!(err, EngineError::Unavailable { .. }), "{err:?}");
    assert!(
        started.elapsed() < timeout + Duration::from_secs(1),
        "took {:?}",
        started.elapsed()
    );
    eprintln!(
        "append while NATS is down failed after {:?}",
        started.elapsed()
    );
    assert!(engine.ready().await.is_err());
    assert!(matches!(
        engine.read(&s, Offset(0), 10).await,
        Err(EngineError::Unavailable { .. })
    ));
    // A new engine cannot start without NATS, and says why.
    let err = match NatsEngine::connect(config.clone()).await {
        Err(e) => e,
        Ok(_) => panic!("connected to a stopped NATS"),
    };
    assert!(err.to_string().contains(&server_url(port)), "{err}");

    // Back with its data: same epoch, offsets go on. (The append that timed out may have been
    // stored on the way, as the crate docs say; count from what JetStream holds.)
    server.restart();
    until_ready(&engine).await;
    let head = engine.state(&s).await.unwrap().unwrap();
    assert_eq!(head.epoch, epoch, "NATS kept the data: same epoch");
    let out = engine.append(&s, vec![msg("3")]).await.unwrap();
    assert_eq!(out[0].position.epoch, epoch);
    assert_eq!(out[0].position.offset, head.head.next());
    let batch = engine.read(&s, Offset(0), 10).await.unwrap();
    assert_eq!(batch.messages[0].payload, "1");
    assert_eq!(batch.messages.last().unwrap().payload, "3");

    // Back without its data (a wiped store): a new epoch, so readers reset; sessions work.
    server.kill();
    server.wipe();
    server.restart();
    until_ready(&engine).await;
    tokio::time::timeout(Duration::from_secs(15), async {
        while watch.borrow_and_update().epoch == epoch {
            watch.changed().await.unwrap();
        }
    })
    .await
    .expect("the watcher learns of the new epoch after the reconnect");
    let out = engine.append(&s, vec![msg("fresh")]).await.unwrap();
    assert_ne!(out[0].position.epoch, epoch, "data lost: a new epoch");
    assert_eq!(out[0].position.offset, Offset(1));
    assert_eq!(out[0].position.epoch, watch.borrow().epoch);
    engine
        .save_sessions(vec![SessionRecord {
            id: "after-wipe".into(),
            data: Bytes::from_static(b"s"),
            expires_at: spool_core::now_ms() + 60_000,
            holder: 0,
            take_over: false,
        }])
        .await
        .expect("the sessions bucket is made again");
    assert_eq!(
        engine.load_session("after-wipe").await.unwrap().unwrap(),
        "s"
    );
}

fn server_url(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

/// Under load while NATS is down, the client's command queue fills (its connection task does
/// not drain it while reconnecting); calls must still answer within the timeout rather than
/// wait in that queue until NATS is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_calls_while_nats_is_down_all_fail_within_the_timeout() {
    let Some(mut server) = OwnServer::start(Backend::Nats) else {
        return;
    };
    let timeout = Duration::from_secs(1);
    let config = NatsConfig {
        timeout,
        ..NatsConfig::new(server.url())
    };
    let engine = std::sync::Arc::new(NatsEngine::connect(config).await.expect("connect"));
    let s = StreamName::new("queue").unwrap();
    engine.append(&s, vec![msg("1")]).await.unwrap();
    server.kill();
    while engine.ready().await.is_ok() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let started = Instant::now();
    let calls: Vec<_> = (0..3000)
        .map(|i| {
            let engine = engine.clone();
            let s = s.clone();
            tokio::spawn(async move {
                if i % 2 == 0 {
                    engine.read(&s, Offset(0), 10).await.map(|_| ())
                } else {
                    engine.load_session("some-session").await.map(|_| ())
                }
            })
        })
        .collect();
    let all = tokio::time::timeout(timeout * 3, futures::future::join_all(calls))
        .await
        .expect("every call answers within about the timeout while NATS is down");
    for call in all {
        let err = call.unwrap().unwrap_err();
        assert!(matches!(err, EngineError::Unavailable { .. }), "{err:?}");
    }
    eprintln!("3000 calls failed after {:?}", started.elapsed());
}
