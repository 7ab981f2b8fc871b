//! Stream administration on JetStream ([`StreamAdmin`]): list, describe, delete, truncate.
//!
//! - **List**: `STREAM.LIST` filtered by the engine's subjects (`<prefix>.s.>`), every stream's
//!   Spool name read from its description (JetStream names are encoded, see `names`, and
//!   their order is not the names' order), the page picked with a bounded heap page by page
//!   ([`page_of_names`]). So a listing walks every stream of the prefix (256 infos a request)
//!   and holds at most a page and one answer; the figures come with the infos.
//! - **Describe**: the stream's info from its leader.
//! - **Delete**: `STREAM.DELETE`, then the head note `<epoch> 0 <stream>` of a fresh placeholder
//!   epoch on `<prefix>.heads`: every node (this one at once) forgets the epoch it knew, keeps
//!   the placeholder for its watchers, whose watch moves there; they read, find no stream and
//!   get a reset, and the next append makes the stream again in a new epoch at offset 1. A node
//!   that missed the note learns it from its next read or its periodic re-read (the stream is
//!   gone), and its next append from JetStream's "no responders" (it makes the stream again).
//! - **Truncate**: `STREAM.PURGE` with `seq` (JetStream 2.9: messages from `seq` on stay), with
//!   `seq` at most one past the head so the head stays; then `!truncated <stream>` on
//!   `<prefix>.heads`, on which every node drops its cached tail of the stream.

use std::time::Instant;

use async_nats::jetstream::stream::Info;
use async_trait::async_trait;
use spool_core::{Epoch, Offset, Position, StreamName, StreamState};
use spool_engine::{
    EngineError, StreamAdmin, StreamSummary, cluster::truncate_note, store::page_of_names,
};

use super::{Inner, NatsEngine};
use crate::codec;

impl Inner {
    /// The summary an info describes, if it is of a Spool stream (its description names it).
    fn summary_of(&self, info: &Info) -> Option<StreamSummary> {
        let description = info.config.description.as_deref()?;
        let name = description.split(' ').next()?;
        let name = StreamName::new(name).ok()?;
        // The description's name must encode to the stream's own (else it is none of ours).
        if self.names(&name).stream != info.config.name {
            return None;
        }
        let epoch = codec::epoch(&name, info).ok()?;
        Some(self.summary(name, epoch, info))
    }

    fn summary(&self, name: StreamName, epoch: Epoch, info: &Info) -> StreamSummary {
        let state = &info.state;
        let head = Offset(state.last_sequence);
        let oldest = if state.messages == 0 {
            head.next()
        } else {
            Offset(state.first_sequence)
        };
        let last_publish_ms = (state.messages > 0).then(|| {
            u64::try_from(state.last_timestamp.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
        });
        StreamSummary {
            watchers: self.node.heads().watchers(&name),
            name,
            state: StreamState {
                epoch,
                head,
                oldest,
            },
            retained_messages: state.messages,
            retained_bytes: state.bytes,
            last_publish_ms,
        }
    }

    /// A stream was deleted (here, or a note from another node says so): the epoch this node
    /// knew goes, its watchers (if any) are kept in `placeholder`, and its watch and cached
    /// tail move there ([`spool_engine::cluster::ClusterNode::deleted`]).
    pub(crate) fn deleted(&self, stream: &StreamName, placeholder: Epoch) {
        self.forget(stream);
        self.behind.lock().remove(stream);
        {
            let mut placeholders = self.placeholders.lock();
            if self.node.heads().current(stream).is_some() {
                placeholders
                    .epochs
                    .insert(stream.clone(), (placeholder.clone(), Instant::now()));
            } else {
                placeholders.epochs.remove(stream);
            }
        }
        self.node.deleted(stream, placeholder);
    }
}

#[async_trait]
impl StreamAdmin for NatsEngine {
    async fn list_streams(
        &self,
        prefix: &str,
        after: Option<&StreamName>,
        limit: usize,
    ) -> Result<Vec<StreamSummary>, EngineError> {
        let inner = &*self.inner;
        let subject = format!("{}.s.>", inner.config.prefix);
        let mut page: Vec<StreamSummary> = Vec::new();
        let mut offset = 0;
        loop {
            let (infos, total) = inner.api.list_page(&subject, offset).await?;
            if infos.is_empty() {
                break;
            }
            offset += infos.len();
            let mut candidates: Vec<StreamSummary> = infos
                .iter()
                .filter_map(|info| inner.summary_of(info))
                .filter(|s| page.iter().all(|kept| kept.name != s.name))
                .collect();
            let names: Vec<StreamName> = page
                .iter()
                .chain(&candidates)
                .map(|s| s.name.clone())
                .collect();
            let picked = page_of_names(names.iter(), prefix, after, limit);
            candidates.append(&mut page);
            page = picked
                .into_iter()
                .filter_map(|name| {
                    let i = candidates.iter().position(|s| s.name == name)?;
                    Some(candidates.swap_remove(i))
                })
                .collect();
            if offset >= total {
                break;
            }
        }
        Ok(page)
    }

    async fn describe_stream(
        &self,
        stream: &StreamName,
    ) -> Result<Option<StreamSummary>, EngineError> {
        let inner = &*self.inner;
        let names = inner.names(stream);
        // What this node already knows of the head, as `Engine::state` checks it: a replica
        // or a new leader still behind must not be answered as the stream's state.
        let known = inner.node.heads().current(stream);
        let Some(info) = inner.api.info(&names.stream).await? else {
            return Ok(None);
        };
        let state = inner.state_from(stream, &info).await?;
        inner.fresh(stream, &state, known)?;
        Ok(Some(inner.summary(stream.clone(), state.epoch, &info)))
    }

    async fn delete_stream(&self, stream: &StreamName) -> Result<bool, EngineError> {
        let inner = &*self.inner;
        let names = inner.names(stream);
        if !inner.api.delete(&names.stream).await? {
            return Ok(false);
        }
        let placeholder = Epoch::generate();
        inner.deleted(stream, placeholder.clone());
        inner
            .tell(stream, &Position::new(placeholder, Offset::ZERO))
            .await;
        Ok(true)
    }

    async fn truncate_stream(
        &self,
        stream: &StreamName,
        before: Offset,
    ) -> Result<Option<StreamState>, EngineError> {
        let inner = &*self.inner;
        let names = inner.names(stream);
        let Some(state) = inner.fetch_state(stream).await? else {
            return Ok(None);
        };
        // Past the head JetStream would move the head on; one past it drops everything.
        let keep = before.min(state.head.next());
        if keep > state.oldest {
            if !inner.api.purge_before(&names.stream, keep.get()).await? {
                return Ok(None);
            }
            inner.node.truncated(stream);
            inner.publish_note(truncate_note(stream)).await;
        }
        inner.fetch_state(stream).await
    }
}
