//! What the conformance suite does not cover: retention by bytes and age in Redis, metadata
//! outliving data, loss of the metadata, idempotency expiry, and corrupt data.

mod common;

use std::time::Duration;

use bytes::Bytes;
use redis::Commands;
use spool_core::{NewMessage, Offset, StreamName};
use spool_engine::{Engine, EngineError};
use spool_redis::{RedisConfig, RedisEngine};

use common::Prefix;

fn stream(name: &str) -> StreamName {
    StreamName::new(name).unwrap()
}

fn msg(s: &'static str) -> NewMessage {
    NewMessage {
        payload: Bytes::from_static(s.as_bytes()),
        ..Default::default()
    }
}

fn keyed(s: &'static str, key: &str) -> NewMessage {
    NewMessage {
        idempotency_key: Some(key.into()),
        ..msg(s)
    }
}

/// Keys as the crate lays them out (checked against `spool_redis::keys`).
fn meta_key(prefix: &Prefix, s: &str) -> String {
    spool_redis::keys::Keys::new(&prefix.name)
        .unwrap()
        .stream(&stream(s))
        .meta
}

fn data_key(prefix: &Prefix, s: &str) -> String {
    spool_redis::keys::Keys::new(&prefix.name)
        .unwrap()
        .stream(&stream(s))
        .data
}

async fn engine(config: RedisConfig) -> RedisEngine {
    RedisEngine::connect(config).await.expect("connect")
}

#[tokio::test]
async fn retention_by_bytes_counts_what_is_kept() {
    let Some(url) = common::shared_redis() else {
        return;
    };
    let prefix = Prefix::new(&url);
    let mut config = prefix.config();
    config.retention.default.max_bytes = 5;
    let e = engine(config).await;
    let s = stream("bytes");
    e.append(&s, vec![msg("abc"), msg("def")]).await.unwrap();
    let state = e.state(&s).await.unwrap().unwrap();
    assert_eq!((state.oldest, state.head), (Offset(2), Offset(2)));
    e.append(&s, vec![msg("gh")]).await.unwrap();
    let state = e.state(&s).await.unwrap().unwrap();
    assert_eq!((state.oldest, state.head), (Offset(2), Offset(3)));
    let bytes: u64 = prefix.raw().hget(meta_key(&prefix, "bytes"), "b").unwrap();
    assert_eq!(bytes, 5, "the byte count follows trimming");
    // A message larger than the limit on its own is not kept, and nothing loops.
    e.append(&s, vec![msg("0123456789")]).await.unwrap();
    let state = e.state(&s).await.unwrap().unwrap();
    assert_eq!((state.oldest, state.head), (Offset(5), Offset(4)));
    assert!(e.read(&s, Offset(3), 10).await.unwrap().messages.is_empty());
}

#[tokio::test]
async fn retention_by_age_empties_an_idle_stream_but_keeps_its_position() {
    let Some(url) = common::shared_redis() else {
        return;
    };
    let prefix = Prefix::new(&url);
    let mut config = prefix.config();
    config.retention.default.max_age = Duration::from_secs(1);
    let e = engine(config).await;
    let s = stream("age");
    let out = e.append(&s, vec![msg("1"), msg("2")]).await.unwrap();
    let epoch = out[0].position.epoch.clone();
    assert_eq!(e.read(&s, Offset(0), 10).await.unwrap().messages.len(), 2);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let batch = e.read(&s, Offset(0), 10).await.unwrap();
    assert!(batch.messages.is_empty(), "expired messages are not read");
    assert_eq!(batch.state.epoch, epoch);
    assert_eq!(
        (batch.state.oldest, batch.state.head),
        (Offset(3), Offset(2))
    );
    let bytes: u64 = prefix.raw().hget(meta_key(&prefix, "age"), "b").unwrap();
    assert_eq!(bytes, 0);
}

#[tokio::test]
async fn the_epoch_outlives_the_data() {
    let Some(url) = common::shared_redis() else {
        return;
    };
    let prefix = Prefix::new(&url);
    let mut config = prefix.config();
    config.retention.default.max_age = Duration::from_millis(200);
    let e = engine(config).await;
    let s = stream("idle");
    let out = e.append(&s, vec![msg("1")]).await.unwrap();
    let epoch = out[0].position.epoch.clone();
    let mut raw = prefix.raw();
    let ttl: i64 = raw.pttl(data_key(&prefix, "idle")).unwrap();
    assert!(
        ttl > 0 && ttl <= 1200,
        "the data key expires with the retention ({ttl} ms)"
    );
    let meta_ttl: i64 = raw.pttl(meta_key(&prefix, "idle")).unwrap();
    assert!(meta_ttl > 29 * 24 * 3600 * 1000, "metadata lasts 30 days");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let exists: bool = raw.exists(data_key(&prefix, "idle")).unwrap();
    assert!(!exists, "the idle stream's data expired on its own");
    let state = e.state(&s).await.unwrap().unwrap();
    assert_eq!(state.epoch, epoch, "the epoch survives");
    assert_eq!((state.oldest, state.head), (Offset(2), Offset(1)));
    let next = e.append(&s, vec![msg("2")]).await.unwrap();
    assert_eq!(next[0].position.epoch, epoch);
    assert_eq!(next[0].position.offset, Offset(2));
}

#[tokio::test]
async fn losing_the_metadata_gives_a_new_epoch() {
    let Some(url) = common::shared_redis() else {
        return;
    };
    let prefix = Prefix::new(&url);
    let e = engine(prefix.config()).await;
    let s = stream("lost");
    let out = e.append(&s, vec![msg("1"), msg("2")]).await.unwrap();
    let old = out[0].position.epoch.clone();
    let mut watch = e.watch(&s).await.unwrap();
    watch.borrow_and_update();
    let _: () = prefix.raw().del(meta_key(&prefix, "lost")).unwrap();
    let batch = e.read(&s, Offset(0), 10).await.unwrap();
    assert_ne!(batch.state.epoch, old, "a new epoch");
    assert_eq!(batch.state.head, Offset(0));
    assert!(batch.messages.is_empty(), "the old data is not served");
    assert!(
        watch.has_changed().unwrap(),
        "watchers learn of the new epoch"
    );
    assert_eq!(watch.borrow_and_update().epoch, batch.state.epoch);
    let next = e.append(&s, vec![msg("x")]).await.unwrap();
    assert_eq!(next[0].position.epoch, batch.state.epoch);
    assert_eq!(next[0].position.offset, Offset(1));
}

#[tokio::test]
async fn idempotency_keys_expire_after_the_window() {
    let Some(url) = common::shared_redis() else {
        return;
    };
    let prefix = Prefix::new(&url);
    let config = RedisConfig {
        dedup_window: Duration::from_millis(300),
        ..prefix.config()
    };
    let e = engine(config).await;
    let s = stream("dedup");
    let first = e.append(&s, vec![keyed("a", "k")]).await.unwrap();
    let again = e.append(&s, vec![keyed("a", "k")]).await.unwrap();
    assert!(again[0].duplicate);
    assert_eq!(again[0].position, first[0].position);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let later = e.append(&s, vec![keyed("a", "k")]).await.unwrap();
    assert!(!later[0].duplicate, "the window is over");
    assert_eq!(later[0].position.offset, Offset(2));
}

#[tokio::test]
async fn corrupt_data_is_an_internal_error_not_a_panic() {
    let Some(url) = common::shared_redis() else {
        return;
    };
    let prefix = Prefix::new(&url);
    let e = engine(prefix.config()).await;
    let s = stream("corrupt");
    e.append(&s, vec![msg("1")]).await.unwrap();
    let mut raw = prefix.raw();
    let data = data_key(&prefix, "corrupt");
    let meta = meta_key(&prefix, "corrupt");
    let now = spool_core::now_ms();
    let _: String = redis::cmd("XADD")
        .arg(&data)
        .arg("2-0")
        .arg(&["t", &now.to_string(), "n", "1", "d", "garbage"])
        .query(&mut raw)
        .unwrap();
    let _: String = redis::cmd("XADD")
        .arg(&data)
        .arg("3-0")
        .arg(&["junk", "1"])
        .query(&mut raw)
        .unwrap();
    let _: () = raw.hset(&meta, "h", 3).unwrap();
    let fine = e.read(&s, Offset(0), 1).await.unwrap();
    assert_eq!(fine.messages[0].payload, "1");
    for after in [1, 2] {
        let err = e.read(&s, Offset(after), 10).await.unwrap_err();
        assert!(matches!(err, EngineError::Internal { .. }), "{err}");
    }
    // Appends still work past the bad entries.
    let out = e.append(&s, vec![msg("4")]).await.unwrap();
    assert_eq!(out[0].position.offset, Offset(4));
    // A garbled epoch, and a head that is not a number.
    let _: () = raw.hset(&meta, "e", "not an epoch").unwrap();
    let err = e.state(&s).await.unwrap_err();
    assert!(matches!(err, EngineError::Internal { .. }), "{err}");
    let _: () = raw.hset(&meta, "e", "abc").unwrap();
    let _: () = raw.hset(&meta, "h", "many").unwrap();
    let err = e.read(&s, Offset(0), 10).await.unwrap_err();
    assert!(matches!(err, EngineError::Internal { .. }), "{err}");
    let err = e.append(&s, vec![msg("5")]).await.unwrap_err();
    assert!(matches!(err, EngineError::Internal { .. }), "{err}");
    let len: u64 = raw.xlen(&data).unwrap();
    assert_eq!(len, 4, "a failed append writes nothing");
}

#[tokio::test]
async fn malformed_notifications_are_ignored() {
    let Some(url) = common::shared_redis() else {
        return;
    };
    let prefix = Prefix::new(&url);
    let a = engine(prefix.config()).await;
    let b = engine(prefix.config()).await;
    let s = stream("notify");
    let mut watch = a.watch(&s).await.unwrap();
    watch.borrow_and_update();
    let channel = format!("{}:heads", prefix.name);
    let mut raw = prefix.raw();
    for junk in [
        "",
        "x",
        "e 1",
        "e x notify",
        "bad:epoch 5 notify",
        "e 5 two words",
    ] {
        let _: i64 = raw.publish(&channel, junk).unwrap();
    }
    b.append(&s, vec![msg("1")]).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), watch.changed())
        .await
        .expect("woken by the real notification")
        .unwrap();
    assert_eq!(watch.borrow_and_update().offset, Offset(1));
    assert!(a.ready().await.is_ok());
}

#[tokio::test]
async fn fsync_is_refused_on_a_redis_that_does_not_fsync_each_write() {
    let Some(url) = common::shared_redis() else {
        return;
    };
    let prefix = Prefix::new(&url);
    let mut raw = prefix.raw();
    let fsync: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("appendfsync")
        .query(&mut raw)
        .unwrap();
    let config = RedisConfig {
        durability: spool_redis::RedisDurability::Fsync,
        ..prefix.config()
    };
    let result = RedisEngine::connect(config).await;
    if fsync.get(1).map(String::as_str) == Some("always") {
        assert!(result.is_ok());
    } else {
        let Err(err) = result else {
            panic!("fsync accepted on a Redis without appendfsync always")
        };
        assert!(err.to_string().contains("appendfsync"), "{err}");
    }
}

#[tokio::test]
async fn a_read_with_an_unbounded_limit_reads_to_the_head() {
    let Some(url) = common::shared_redis() else {
        return;
    };
    let prefix = Prefix::new(&url);
    let e = engine(prefix.config()).await;
    let s = stream("unbounded");
    e.append(&s, vec![msg("a"), msg("b")]).await.unwrap();
    for limit in [usize::MAX, 1 << 60, 100_000_000_000_000_000] {
        let batch = e.read(&s, Offset(0), limit).await.unwrap();
        assert_eq!(batch.messages.len(), 2, "limit {limit}");
    }
}
