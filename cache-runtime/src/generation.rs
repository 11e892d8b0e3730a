//! Per-function generations: what makes `function(..)` invalidation O(1).
//!
//! Every stored value carries the generation its writer saw (`value.rs`); a lookup treats a value
//! from an older generation as a miss. Invalidating every entry of a function is one write: raise
//! its generation. On Redis the generation lives in `{prefix}:{function}[:vN]:gen` and this
//! process keeps a copy, read again (in the same round trip as a lookup) once it is older than
//! `generation_refresh`; the process that invalidates sees the new generation at once. On the
//! embedded backend this copy is the generation itself.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::__private::Spec;

type FunctionId = (u8, &'static str, &'static str, Option<u32>);

fn id(spec: &Spec) -> FunctionId {
    (spec.db, spec.prefix, spec.function, spec.version)
}

#[derive(Default)]
struct State {
    generation: AtomicU64,
    /// Nanoseconds since `Generations::epoch` when last read from the backend; 0 = never.
    read_at: AtomicU64,
}

pub(crate) struct Generations {
    /// The copy is the truth (embedded backend): never read again.
    authoritative: bool,
    refresh: Duration,
    epoch: Instant,
    by_function: RwLock<HashMap<FunctionId, Arc<State>>>,
}

impl Generations {
    pub(crate) fn new(authoritative: bool, refresh: Duration) -> Self {
        Generations {
            authoritative,
            refresh,
            epoch: Instant::now(),
            by_function: RwLock::default(),
        }
    }

    fn state(&self, spec: &Spec) -> Arc<State> {
        let id = id(spec);
        if let Some(s) = self
            .by_function
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
        {
            return Arc::clone(s);
        }
        Arc::clone(
            self.by_function
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .entry(id)
                .or_default(),
        )
    }

    fn now(&self) -> u64 {
        // +1 so that 0 keeps meaning "never read".
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX) + 1
    }

    /// The generation this process knows, and whether it must be read again with this lookup.
    pub(crate) fn current(&self, spec: &Spec) -> (u64, bool) {
        let state = self.state(spec);
        let generation = state.generation.load(Relaxed);
        if self.authoritative {
            return (generation, false);
        }
        let read_at = state.read_at.load(Relaxed);
        let stale =
            read_at == 0 || self.now().saturating_sub(read_at) >= self.refresh.as_nanos() as u64;
        (generation, stale)
    }

    /// Records a generation read from (or returned by) the backend; returns the one to use.
    pub(crate) fn observe(&self, spec: &Spec, generation: u64) -> u64 {
        let state = self.state(spec);
        state.read_at.store(self.now(), Relaxed);
        state
            .generation
            .fetch_max(generation, Relaxed)
            .max(generation)
    }

    /// Raises the generation kept here (embedded backend: this is the invalidation itself).
    pub(crate) fn bump_local(&self, spec: &Spec) -> u64 {
        self.state(spec).generation.fetch_add(1, Relaxed) + 1
    }
}
