//! Redis going away and coming back empty, with a private `redis-server` per test.

use std::time::{Duration, Instant};

use bytes::Bytes;
use spool_core::{NewMessage, Offset, StreamName};
use spool_engine::{Engine, EngineError};
use spool_redis::{RedisConfig, RedisEngine};

use spool_testkit::engines::{Backend, OwnServer};

fn msg(s: &'static str) -> NewMessage {
    NewMessage {
        payload: Bytes::from_static(s.as_bytes()),
        ..Default::default()
    }
}

const TIMEOUT: Duration = Duration::from_secs(1);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_fails_fast_and_a_restart_without_data_is_a_new_epoch() {
    let Some(mut server) = OwnServer::start(Backend::Redis) else {
        return;
    };
    let config = RedisConfig {
        timeout: TIMEOUT,
        ..RedisConfig::new(server.url())
    };
    let writer = RedisEngine::connect(config.clone()).await.unwrap();
    let watcher = RedisEngine::connect(config).await.unwrap();
    let s = StreamName::new("outage").unwrap();
    let before = writer.append(&s, vec![msg("1"), msg("2")]).await.unwrap();
    let old = before[0].position.epoch.clone();
    let mut watch = watcher.watch(&s).await.unwrap();
    assert_eq!(watch.borrow_and_update().offset, Offset(2));

    server.kill();
    let started = Instant::now();
    let err = writer.append(&s, vec![msg("3")]).await.unwrap_err();
    assert!(matches!(err, EngineError::Unavailable { .. }), "{err}");
    assert!(
        started.elapsed() < TIMEOUT + Duration::from_secs(1),
        "failed in {:?}",
        started.elapsed()
    );
    let err = watcher.read(&s, Offset(0), 10).await;
    // A watched stream's tail may still answer from the cache; it must not be an Internal.
    if let Err(err) = err {
        assert!(matches!(err, EngineError::Unavailable { .. }), "{err}");
    }
    assert!(writer.ready().await.is_err());
    assert!(watcher.ready().await.is_err());

    server.restart();
    let deadline = Instant::now() + Duration::from_secs(10);
    while writer.ready().await.is_err() {
        assert!(Instant::now() < deadline, "ready again after the restart");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The watcher's node resubscribes and re-reads the stream: its watchers see the new
    // epoch without any publish.
    tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if watch.borrow_and_update().epoch != old {
                break;
            }
            watch.changed().await.unwrap();
        }
    })
    .await
    .expect("the watcher is woken by the epoch change");
    // The watcher's node only shows its readers a placeholder (reads write nothing); the
    // stream's new epoch is the one the first publish makes, and the watchers move to it.
    let placeholder = watch.borrow_and_update().epoch.clone();
    let after = writer.append(&s, vec![msg("x")]).await.unwrap();
    let new = after[0].position.epoch.clone();
    assert_ne!(new, old, "Redis came back empty: a new epoch");
    assert_eq!(after[0].position.offset, Offset(1));
    tokio::time::timeout(Duration::from_secs(10), async {
        while watch.borrow_and_update().epoch == placeholder {
            watch.changed().await.unwrap();
        }
    })
    .await
    .expect("the watcher is woken by the first publish");
    assert_eq!(watch.borrow().epoch, new, "one epoch on every node");
    let batch = watcher.read(&s, Offset(0), 10).await.unwrap();
    assert_eq!(batch.state.epoch, new);
    assert_eq!(batch.messages.len(), 1);
    assert_eq!(batch.messages[0].payload, "x");
}

#[tokio::test]
async fn connect_fails_clearly_when_redis_is_unreachable() {
    let port = spool_testkit::free_port();
    let config = RedisConfig {
        timeout: TIMEOUT,
        ..RedisConfig::new(format!("redis://127.0.0.1:{port}"))
    };
    let started = Instant::now();
    let Err(err) = RedisEngine::connect(config).await else {
        panic!("connected to nothing");
    };
    assert!(matches!(err, EngineError::Unavailable { .. }), "{err}");
    assert!(err.to_string().contains("cannot connect to Redis"), "{err}");
    assert!(started.elapsed() < TIMEOUT * 2 + Duration::from_secs(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_an_engine_closes_its_connections() {
    let Some(server) = OwnServer::start(Backend::Redis) else {
        return;
    };
    let mut raw = server.redis();
    let clients = |raw: &mut redis::Connection| -> usize {
        let list: String = redis::cmd("CLIENT").arg("LIST").query(raw).unwrap();
        list.lines().count()
    };
    let baseline = clients(&mut raw);
    let e = RedisEngine::connect(RedisConfig {
        timeout: TIMEOUT,
        ..RedisConfig::new(server.url())
    })
    .await
    .unwrap();
    let s = StreamName::new("drop").unwrap();
    let _watch = e.watch(&s).await.unwrap();
    assert!(clients(&mut raw) > baseline);
    drop(e);
    let deadline = Instant::now() + Duration::from_secs(5);
    while clients(&mut raw) != baseline {
        assert!(
            Instant::now() < deadline,
            "the engine's connections (and its notification task) outlived it"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One watched stream with corrupt metadata must not keep the notification channel from
/// coming back: its re-read fails, the others' notifications still wake their watchers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_watched_stream_does_not_stop_notifications_after_a_reconnect() {
    let Some(server) = OwnServer::start(Backend::Redis) else {
        return;
    };
    let config = RedisConfig {
        timeout: TIMEOUT,
        ..RedisConfig::new(server.url())
    };
    let writer = RedisEngine::connect(config.clone()).await.unwrap();
    let watcher = RedisEngine::connect(config).await.unwrap();
    let good = StreamName::new("good").unwrap();
    let bad = StreamName::new("bad").unwrap();
    let mut watch = watcher.watch(&good).await.unwrap();
    let _bad_watch = watcher.watch(&bad).await.unwrap();
    let meta = spool_redis::keys::Keys::new("spool")
        .unwrap()
        .stream(&bad)
        .meta;
    let mut raw = server.redis();
    let _: () = redis::cmd("HSET")
        .arg(&meta)
        .arg("e")
        .arg("e1")
        .arg("h")
        .arg("many")
        .query(&mut raw)
        .unwrap();
    // Drop every pub/sub connection: the watcher resubscribes and re-reads what it watches.
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query(&mut raw)
        .unwrap();
    assert!(killed > 0);
    assert!(watcher.read(&bad, Offset(0), 0).await.is_err());
    // Past the first reconnect attempts (a retry loop would be in long backoffs by now).
    tokio::time::sleep(Duration::from_secs(3)).await;
    for n in 1..=5 {
        watch.borrow_and_update();
        writer.append(&good, vec![msg("n")]).await.unwrap();
        tokio::time::timeout(Duration::from_millis(500), watch.changed())
            .await
            .unwrap_or_else(|_| panic!("append {n}: no prompt wake-up after the reconnect"))
            .unwrap();
        assert_eq!(watch.borrow_and_update().offset, Offset(n));
    }
}
