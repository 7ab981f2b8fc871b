//! Fsync and replicated durability against private `redis-server`s.

use std::time::{Duration, Instant};

use bytes::Bytes;
use spool_core::{NewMessage, Offset, StreamName};
use spool_engine::{Engine, EngineError};
use spool_redis::{RedisConfig, RedisDurability, RedisEngine};

use spool_testkit::engines::{Backend, OwnServer};

fn msg(s: &'static str) -> NewMessage {
    NewMessage {
        payload: Bytes::from_static(s.as_bytes()),
        ..Default::default()
    }
}

const TIMEOUT: Duration = Duration::from_secs(1);

fn config(server: &OwnServer, durability: RedisDurability) -> RedisConfig {
    RedisConfig {
        durability,
        timeout: TIMEOUT,
        ..RedisConfig::new(server.url())
    }
}

#[tokio::test]
async fn fsync_needs_appendfsync_always() {
    let Some(always) = OwnServer::start_with(
        Backend::Redis,
        &["--appendonly", "yes", "--appendfsync", "always"],
    ) else {
        return;
    };
    let e = RedisEngine::connect(config(&always, RedisDurability::Fsync))
        .await
        .expect("appendfsync always is enough");
    let s = StreamName::new("fsync").unwrap();
    let out = e.append(&s, vec![msg("1")]).await.unwrap();
    assert_eq!(out[0].position.offset, Offset(1));

    let Some(everysec) = OwnServer::start_with(
        Backend::Redis,
        &["--appendonly", "yes", "--appendfsync", "everysec"],
    ) else {
        return;
    };
    let Err(err) = RedisEngine::connect(config(&everysec, RedisDurability::Fsync)).await else {
        panic!("fsync durability accepted with appendfsync everysec");
    };
    assert!(
        err.to_string().contains("appendfsync always") && err.to_string().contains("everysec"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicated_waits_for_the_replica_and_fails_without_it() {
    // No 5 s wait before the replica's first sync.
    let Some(primary) = OwnServer::start_with(Backend::Redis, &["--repl-diskless-sync-delay", "0"])
    else {
        return;
    };
    let port = primary.port.to_string();
    let Some(mut replica) =
        OwnServer::start_with(Backend::Redis, &["--replicaof", "127.0.0.1", &port])
    else {
        return;
    };
    // Wait until the replica is in sync.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let info: String = redis::cmd("INFO")
            .arg("replication")
            .query(&mut replica.redis())
            .unwrap();
        if info.contains("master_link_status:up") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the replica never synced: {info}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let e = RedisEngine::connect(config(
        &primary,
        RedisDurability::Replicated { replicas: 1 },
    ))
    .await
    .unwrap();
    let s = StreamName::new("replicated").unwrap();
    for i in 1..=3 {
        let out = e.append(&s, vec![msg("m")]).await.unwrap();
        assert_eq!(out[0].position.offset, Offset(i));
    }
    // Reads are not held up by the appends' WAIT.
    assert_eq!(e.read(&s, Offset(0), 10).await.unwrap().messages.len(), 3);

    replica.kill();
    let started = Instant::now();
    let keyed = NewMessage {
        idempotency_key: Some("k".into()),
        ..msg("m")
    };
    let err = e.append(&s, vec![keyed.clone()]).await.unwrap_err();
    let took = started.elapsed();
    assert!(matches!(err, EngineError::Unavailable { .. }), "{err}");
    assert!(err.to_string().contains("0 of 1"), "{err}");
    assert!(took < TIMEOUT + Duration::from_secs(1), "took {took:?}");
    // It was stored, but a retry with the same key is not acknowledged either while the
    // replica is missing, and appends nothing.
    let err = e.append(&s, vec![keyed]).await.unwrap_err();
    assert!(matches!(err, EngineError::Unavailable { .. }), "{err}");
    let state = e.state(&s).await.unwrap().unwrap();
    assert_eq!(state.head, Offset(4));
}
