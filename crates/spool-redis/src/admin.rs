//! Stream administration on Redis ([`StreamAdmin`]): list, describe, delete, truncate.
//!
//! - **List**: `SCAN` of the stream metadata keys under the prefix (`<prefix>:{<name>*}:m`),
//!   every matching key decoded back to its stream name; the page is picked with a bounded
//!   heap batch by batch ([`page_of_names`]), so a listing holds at most a page and one `SCAN`
//!   batch however many streams there are. It costs a pass over the keyspace (as `SCAN` does),
//!   which is what an operator's listing may cost; appends and reads pay nothing for it.
//! - **Describe**: one script (trims as a read does, then epoch, head, oldest, `XLEN`, the
//!   byte count and the newest entry's time).
//! - **Delete**: one script deletes the metadata and data keys and publishes the head note
//!   `<epoch> 0 <stream>` of a fresh placeholder epoch on the notes channel, so every node's
//!   watchers move there, read, find no stream and get a reset; the next append (on any node)
//!   registers a new epoch at offset 1. Idempotency records stay until they expire: they name
//!   the deleted epoch, which the append script ignores.
//! - **Truncate**: one script deletes the entries before the offset (taking their bytes off the
//!   count) and publishes `!truncated <stream>`, on which every node drops its cached tail of
//!   the stream ([`spool_engine::cluster::ClusterNode::heard_admin`]): readers behind the new
//!   oldest message then get `history_expired` from Redis, never the dropped messages from a
//!   cache. The script deletes every entry in one go (it blocks Redis for that long, as a large
//!   trim does).

use std::collections::BTreeSet;

use async_trait::async_trait;
use futures::StreamExt as _;
use redis::Value;
use spool_core::{Epoch, Offset, StreamName, StreamState};
use spool_engine::{
    EngineError, StreamAdmin, StreamSummary, cluster::truncate_note, store::page_of_names,
};

use crate::{RedisEngine, Shared, error::within, scripts};

/// Keys one `SCAN` call looks at.
const SCAN_COUNT: usize = 1000;
/// Streams a listing describes at once.
const DESCRIBE_CONCURRENCY: usize = 16;
/// The largest offset a truncate names to the script (Lua numbers are doubles).
const MAX_SCRIPT_OFFSET: u64 = 1 << 53;

impl Shared {
    /// The names of the `limit` first streams in name order after `after` whose names start
    /// with `prefix`; see the module docs.
    async fn page_of_streams(
        &self,
        prefix: &str,
        after: Option<&StreamName>,
        limit: usize,
    ) -> Result<Vec<StreamName>, EngineError> {
        let pattern = self.keys.meta_pattern(prefix);
        let mut page: Vec<StreamName> = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = within(
                "SCAN",
                self.config.timeout,
                redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(SCAN_COUNT)
                    .query_async(&mut self.conn.clone()),
            )
            .await?;
            // SCAN may return a key twice: only names not on the page yet join it.
            let batch: BTreeSet<StreamName> = keys
                .iter()
                .filter_map(|key| self.keys.stream_of_meta(key))
                .filter(|name| page.binary_search(name).is_err())
                .collect();
            if !batch.is_empty() {
                page = page_of_names(page.iter().chain(&batch), prefix, after, limit);
            }
            if next == 0 {
                return Ok(page);
            }
            cursor = next;
        }
    }

    async fn describe(&self, stream: &StreamName) -> Result<Option<StreamSummary>, EngineError> {
        let keys = self.keys.stream(stream);
        let retention = self.retention(stream);
        let mut call = self.scripts.describe.prepare_invoke();
        call.key(&keys.meta)
            .key(&keys.data)
            .arg(&scripts::retention_args(&retention)[..]);
        let reply: Value = within(
            "describe",
            self.config.timeout,
            call.invoke_async(&mut self.conn.clone()),
        )
        .await?;
        Ok(scripts::parse_describe(reply)?.map(|d| StreamSummary {
            name: stream.clone(),
            state: d.state,
            retained_messages: d.retained_messages,
            retained_bytes: d.retained_bytes,
            last_publish_ms: d.last_publish_ms,
            watchers: self.node.heads().watchers(stream),
        }))
    }
}

#[async_trait]
impl StreamAdmin for RedisEngine {
    async fn list_streams(
        &self,
        prefix: &str,
        after: Option<&StreamName>,
        limit: usize,
    ) -> Result<Vec<StreamSummary>, EngineError> {
        let shared = &*self.shared;
        let names = shared.page_of_streams(prefix, after, limit).await?;
        let described: Vec<Result<Option<StreamSummary>, EngineError>> =
            futures::stream::iter(names)
                .map(|name| async move { shared.describe(&name).await })
                .buffered(DESCRIBE_CONCURRENCY)
                .collect()
                .await;
        let mut page = Vec::with_capacity(described.len());
        for summary in described {
            // A stream deleted (or expired) since the scan is left out.
            page.extend(summary?);
        }
        Ok(page)
    }

    async fn describe_stream(
        &self,
        stream: &StreamName,
    ) -> Result<Option<StreamSummary>, EngineError> {
        self.shared.describe(stream).await
    }

    async fn delete_stream(&self, stream: &StreamName) -> Result<bool, EngineError> {
        let shared = &*self.shared;
        let keys = shared.keys.stream(stream);
        let placeholder = Epoch::generate();
        let mut call = shared.scripts.delete.prepare_invoke();
        call.key(&keys.meta)
            .key(&keys.data)
            .arg(&shared.channel)
            .arg(stream.as_str())
            .arg(placeholder.as_str());
        let deleted: i64 = within(
            "delete",
            shared.config.timeout,
            call.invoke_async(&mut shared.writer.clone()),
        )
        .await?;
        if deleted == 1 {
            shared.node.deleted(stream, placeholder);
        }
        Ok(deleted == 1)
    }

    async fn truncate_stream(
        &self,
        stream: &StreamName,
        before: Offset,
    ) -> Result<Option<StreamState>, EngineError> {
        let shared = &*self.shared;
        let keys = shared.keys.stream(stream);
        let mut call = shared.scripts.truncate.prepare_invoke();
        call.key(&keys.meta)
            .key(&keys.data)
            .arg(before.get().min(MAX_SCRIPT_OFFSET))
            .arg(&shared.channel)
            .arg(truncate_note(stream).as_ref());
        let truncated: i64 = within(
            "truncate",
            shared.config.timeout,
            call.invoke_async(&mut shared.writer.clone()),
        )
        .await?;
        if truncated == 0 {
            return Ok(None);
        }
        shared.node.truncated(stream);
        spool_engine::cluster::Store::state(shared, stream).await
    }
}
