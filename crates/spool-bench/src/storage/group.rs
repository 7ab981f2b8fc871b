//! Group commit in front of a key-value store, the same design as Spool's WAL writer: one OS
//! thread takes a request from a bounded channel, drains every other request already
//! waiting (up to [`MAX_BATCH_BYTES`]), assigns each record the next offset of its stream,
//! hands the whole batch to the [`Backend`] as one durable commit, then acks every appender.
//! While it waits on one commit the next batch gathers in the channel.
//!
//! A failed commit fails every later one too (as in Spool: after a failed fsync nothing
//! written since the last good one can be vouched for).

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    thread::JoinHandle,
};

use anyhow::{Result, anyhow};
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

/// Bound of the queue, in requests (as Spool's `WRITE_QUEUE`).
const QUEUE: usize = 4096;
/// Most payload bytes per commit (as Spool's `MAX_BATCH_BYTES`).
const MAX_BATCH_BYTES: usize = 8 * 1024 * 1024;

/// One record of a batch, its offset assigned by the writer.
pub struct Record {
    pub stream: u64,
    /// 1, 2, 3… per stream.
    pub offset: u64,
    pub payload: Bytes,
}

/// A store that makes a batch of records durable in one commit.
pub trait Backend: Send + 'static {
    /// Stores every record and returns once all of them are durable.
    fn commit(&mut self, records: &[Record]) -> Result<()>;
}

struct Request {
    stream: u64,
    payload: Bytes,
    done: oneshot::Sender<Result<u64, String>>,
}

/// The appenders' side of the writer thread; dropping it stops and joins the thread.
pub struct GroupCommit {
    tx: Option<mpsc::Sender<Request>>,
    thread: Option<JoinHandle<()>>,
    commits: Arc<AtomicU64>,
}

impl GroupCommit {
    pub fn start(name: &str, mut backend: impl Backend) -> Result<Self> {
        let (tx, mut rx) = mpsc::channel::<Request>(QUEUE);
        let commits = Arc::new(AtomicU64::new(0));
        let counter = commits.clone();
        let thread = std::thread::Builder::new()
            .name(format!("{name}-writer"))
            .spawn(move || {
                let mut next: Vec<u64> = Vec::new();
                let mut batch: Vec<Request> = Vec::new();
                let mut records: Vec<Record> = Vec::new();
                let mut failure: Option<String> = None;
                while let Some(first) = rx.blocking_recv() {
                    let mut bytes = first.payload.len();
                    batch.push(first);
                    while bytes < MAX_BATCH_BYTES {
                        match rx.try_recv() {
                            Ok(request) => {
                                bytes += request.payload.len();
                                batch.push(request);
                            }
                            Err(_) => break,
                        }
                    }
                    records.clear();
                    for request in &batch {
                        let stream = request.stream as usize;
                        if next.len() <= stream {
                            next.resize(stream + 1, 0);
                        }
                        next[stream] += 1;
                        records.push(Record {
                            stream: request.stream,
                            offset: next[stream],
                            payload: request.payload.clone(),
                        });
                    }
                    if failure.is_none() {
                        match backend.commit(&records) {
                            Ok(()) => {
                                counter.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => failure = Some(format!("{e:#}")),
                        }
                    }
                    for (request, record) in batch.drain(..).zip(&records) {
                        let outcome = match &failure {
                            None => Ok(record.offset),
                            Some(e) => Err(e.clone()),
                        };
                        let _ = request.done.send(outcome);
                    }
                }
            })?;
        Ok(Self {
            tx: Some(tx),
            thread: Some(thread),
            commits,
        })
    }

    /// Appends one record and waits until it is durable; returns its offset.
    pub async fn append(&self, stream: usize, payload: Bytes) -> Result<u64> {
        let tx = self
            .tx
            .as_ref()
            .ok_or_else(|| anyhow!("the writer has stopped"))?;
        let (done, rx) = oneshot::channel();
        tx.send(Request {
            stream: stream as u64,
            payload,
            done,
        })
        .await
        .map_err(|_| anyhow!("the writer has stopped"))?;
        rx.await
            .map_err(|_| anyhow!("the writer has stopped"))?
            .map_err(|e| anyhow!("commit failed: {e}"))
    }

    /// Durable commits so far.
    pub fn commits(&self) -> u64 {
        self.commits.load(Ordering::Relaxed)
    }
}

impl Drop for GroupCommit {
    fn drop(&mut self) {
        // Closing the channel ends the thread's loop once the queue is empty.
        self.tx.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
