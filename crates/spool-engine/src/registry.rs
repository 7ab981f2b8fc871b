//! The streams an engine holds, by name, with a cap on how many: lookups take a read lock,
//! only the first touch of a stream takes the write lock.

use std::{collections::HashMap, sync::Arc};

use parking_lot::RwLock;
use spool_core::StreamName;

use crate::EngineError;

pub struct Registry<T> {
    streams: RwLock<HashMap<StreamName, Arc<T>>>,
    max: usize,
    engine: &'static str,
}

impl<T> Registry<T> {
    pub fn new(engine: &'static str, max: usize) -> Self {
        Self {
            streams: RwLock::new(HashMap::new()),
            max,
            engine,
        }
    }

    pub fn get(&self, name: &StreamName) -> Option<Arc<T>> {
        self.streams.read().get(name).cloned()
    }

    /// The stream, created with `make` on first touch; an error past the cap.
    pub fn get_or_create(
        &self,
        name: &StreamName,
        make: impl FnOnce() -> T,
    ) -> Result<Arc<T>, EngineError> {
        if let Some(s) = self.get(name) {
            return Ok(s);
        }
        let mut streams = self.streams.write();
        if let Some(s) = streams.get(name) {
            return Ok(s.clone());
        }
        if streams.len() >= self.max {
            return Err(EngineError::Limit(format!(
                "the {} engine holds its maximum of {} streams",
                self.engine, self.max
            )));
        }
        let s = Arc::new(make());
        streams.insert(name.clone(), s.clone());
        Ok(s)
    }

    /// Every stream, for sweeps and snapshots (a copy, so no lock is held while using it).
    pub fn all(&self) -> Vec<Arc<T>> {
        self.streams.read().values().cloned().collect()
    }

    pub fn replace_all(&self, streams: HashMap<StreamName, Arc<T>>) {
        *self.streams.write() = streams;
    }
}
