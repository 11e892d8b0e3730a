//! Invalidation: dropping one entry (`quote(symbol)`) or every entry of a function (`quote(..)`),
//! and retrying the ones the backend failed until they succeed or can no longer matter.
//!
//! Nothing accepted is lost: an invalidation whose caller goes away before it is applied (a
//! dropped future) is queued like a failed one, and the queue's worker runs on the cache's own
//! background runtime, so it outlives the runtime that queued it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::backend::stamp_life;
use crate::error::BackendError;
use crate::key;
use crate::runtime::{Inner, Runtime};
use crate::spec::{CachedFn, FunctionId};
use crate::stats::Counters;

/// What one entry of `#[invalidates(...)]` drops.
#[derive(Debug, Clone)]
pub enum Target {
    /// One entry: the key of a call (`None` if an argument failed to serialize: nothing to drop,
    /// since such a call was never cached).
    Key(CachedFn, Option<String>),
    /// Every entry of a function.
    All(CachedFn),
}

impl Target {
    fn function(&self) -> &CachedFn {
        match self {
            Target::Key(f, _) | Target::All(f) => f,
        }
    }
}

/// Past this many queued single-key invalidations of one function, they become one function-wide
/// invalidation: the queue's memory stays bounded through a long outage.
pub(crate) const MAX_QUEUED_KEYS_PER_FUNCTION: usize = 1_000;

/// Applies `targets` on the current runtime. Failures are queued and retried in the background;
/// nothing is returned because nothing may fail the caller. If this future is dropped before it
/// finishes, what it had not applied yet is queued all the same.
pub async fn invalidate(targets: &[Target]) {
    let runtime = Runtime::current();
    let mut unapplied = Unapplied { runtime: &runtime, targets: targets.to_vec() };
    while let Some(target) = unapplied.targets.first().cloned() {
        let spec = target.function().spec();
        let counters = runtime.inner().stats.counters(spec.db, spec.prefix);
        match apply(runtime.inner(), &target).await {
            Ok(()) => counters.invalidation(),
            Err(error) => {
                count_failure(&counters, &error);
                tracing::debug!(db = spec.db, prefix = spec.prefix, function = spec.function, %error, "invalidation failed; retrying in the background");
                runtime.inner().pending.push(&runtime, target);
            }
        }
        unapplied.targets.remove(0);
    }
}

/// The targets of an `invalidate` call not applied yet; queued for retry if it is dropped.
struct Unapplied<'a> {
    runtime: &'a Runtime,
    targets: Vec<Target>,
}

impl Drop for Unapplied<'_> {
    fn drop(&mut self) {
        for target in self.targets.drain(..) {
            let spec = target.function().spec();
            tracing::debug!(
                db = spec.db,
                prefix = spec.prefix,
                function = spec.function,
                "invalidation interrupted (its future was dropped); queued"
            );
            self.runtime.inner().pending.push(self.runtime, target);
        }
    }
}

/// A failed attempt: queued for another try (`invalidation_retries`), and counted as a backend
/// error, or as bypassed when the open breaker skipped it.
fn count_failure(counters: &Counters, error: &BackendError) {
    counters.invalidation_retry();
    if error.is_bypassed() {
        counters.bypass();
    } else {
        counters.backend_error();
    }
}

/// One invalidation, against this process's flights and the backend.
async fn apply(rt: &Inner, target: &Target) -> Result<(), BackendError> {
    match target {
        Target::Key(_, None) => Ok(()),
        Target::Key(function, Some(key)) => {
            let db = function.spec().db;
            rt.flights.revoke(db, key);
            rt.backend.invalidate(rt.op_timeout, db, key, stamp_life(rt.lease_ttl)).await
        }
        Target::All(function) => {
            let spec = function.spec();
            // Also revokes the flights of a same-named function of another module (same base):
            // they start over, which costs a computation, never a wrong value.
            rt.flights.revoke_prefix(spec.db, &format!("{}:", key::function_base(spec)));
            let state = rt.functions.get(function, &rt.stats);
            let life = key::generation_life(spec.ttl);
            match rt.backend.bump_generation(rt.op_timeout, spec.db, &state.generation_key, life).await? {
                Some(generation) => rt.functions.observe(&state, generation),
                None => rt.functions.bump_local(&state),
            };
            Ok(())
        }
    }
}

struct Queued {
    target: Target,
    /// After this, every entry the target covers has expired: the invalidation cannot matter.
    give_up_at: Instant,
    /// Raised each time the same target is queued again: an attempt that started before the
    /// newest queueing does not settle it (the newer write may have come after that attempt).
    seq: u64,
}

#[derive(Default)]
struct Queue {
    next_seq: u64,
    /// Single-key invalidations by key (a key names one function, so one DB).
    keys: HashMap<String, Queued>,
    /// Function-wide invalidations.
    functions: HashMap<FunctionId, Queued>,
    /// How many queued keys each function has (for the bound).
    keys_per_function: HashMap<FunctionId, usize>,
}

/// Invalidations the backend failed, retried with backoff by one background task per runtime.
#[derive(Default)]
pub(crate) struct Pending {
    count: AtomicUsize,
    queue: Mutex<Queue>,
    worker: AtomicBool,
}

const FIRST_RETRY: Duration = Duration::from_millis(50);
const MAX_RETRY: Duration = Duration::from_secs(1);

impl Queue {
    fn seq(&mut self) -> u64 {
        self.next_seq += 1;
        self.next_seq
    }

    fn len(&self) -> usize {
        self.keys.len() + self.functions.len()
    }

    fn insert(&mut self, target: Target) -> Option<(CachedFn, usize)> {
        let function = *target.function();
        let id = function.id();
        let give_up_at = Instant::now().checked_add(function.spec().ttl).unwrap_or_else(Instant::now);
        let seq = self.seq();
        match &target {
            Target::Key(_, None) => None,
            Target::All(_) => {
                self.functions.insert(id, Queued { target, give_up_at, seq });
                None
            }
            Target::Key(_, Some(key)) => {
                if self.functions.contains_key(&id) {
                    // A queued function-wide invalidation covers this key; it must be applied
                    // after this newer write too.
                    self.functions.get_mut(&id).expect("checked").seq = seq;
                    return None;
                }
                if self.keys.insert(key.clone(), Queued { target, give_up_at, seq }).is_none() {
                    let n = self.keys_per_function.entry(id).or_default();
                    *n += 1;
                    if *n > MAX_QUEUED_KEYS_PER_FUNCTION {
                        return Some((function, self.coalesce(function)));
                    }
                }
                None
            }
        }
    }

    /// Replaces every queued key of `function` by one function-wide invalidation; how many.
    fn coalesce(&mut self, function: CachedFn) -> usize {
        let id = function.id();
        let before = self.keys.len();
        self.keys.retain(|_, q| q.target.function().id() != id);
        self.keys_per_function.remove(&id);
        let give_up_at = Instant::now().checked_add(function.spec().ttl).unwrap_or_else(Instant::now);
        let seq = self.seq();
        self.functions.insert(id, Queued { target: Target::All(function), give_up_at, seq });
        before - self.keys.len()
    }

    /// Removes `target` if it was not queued again since attempt `seq` started.
    fn settle(&mut self, target: &Target, seq: u64) {
        match target {
            Target::Key(function, Some(key)) => {
                if self.keys.get(key).is_some_and(|q| q.seq == seq) {
                    self.keys.remove(key);
                    let id = function.id();
                    if let Some(n) = self.keys_per_function.get_mut(&id) {
                        *n -= 1;
                        if *n == 0 {
                            self.keys_per_function.remove(&id);
                        }
                    }
                }
            }
            Target::All(function) => {
                let id = function.id();
                if self.functions.get(&id).is_some_and(|q| q.seq == seq) {
                    self.functions.remove(&id);
                }
            }
            Target::Key(_, None) => {}
        }
    }
}

impl Pending {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn push(&self, runtime: &Runtime, target: Target) {
        {
            let mut queue = self.queue();
            if let Some((function, n)) = queue.insert(target) {
                let spec = function.spec();
                runtime.inner().stats.counters(spec.db, spec.prefix).invalidations_coalesced(n as u64);
                tracing::warn!(
                    db = spec.db,
                    prefix = spec.prefix,
                    function = spec.function,
                    keys = n,
                    "too many invalidations queued for one function: dropping all of its entries instead"
                );
            }
            self.count.store(queue.len(), SeqCst);
        }
        self.start_worker(runtime);
    }

    fn start_worker(&self, runtime: &Runtime) {
        if self.worker.swap(true, SeqCst) {
            return;
        }
        let runtime = runtime.clone();
        crate::background::spawn(async move { retry_until_done(runtime).await });
    }

    /// Invalidations queued and not applied yet.
    pub(crate) fn len(&self) -> usize {
        self.count.load(SeqCst)
    }

    /// Whether a lookup of `key` must not trust the cache: an invalidation covering it has not
    /// reached the backend yet. One atomic load when nothing is pending, two hash lookups when
    /// something is.
    pub(crate) fn covers(&self, function: &CachedFn, key: &str) -> bool {
        if self.count.load(SeqCst) == 0 {
            return false;
        }
        let queue = self.queue();
        queue.keys.contains_key(key) || queue.functions.contains_key(&function.id())
    }
}

async fn retry_until_done(runtime: Runtime) {
    let rt = runtime.inner();
    let mut pause = FIRST_RETRY;
    loop {
        tokio::time::sleep(pause).await;
        let batch: Vec<(Target, Instant, u64)> = {
            let queue = rt.pending.queue();
            let all = queue.functions.values().chain(queue.keys.values());
            all.map(|q| (q.target.clone(), q.give_up_at, q.seq)).collect()
        };
        let mut progress = false;
        for (target, give_up_at, seq) in batch {
            let spec = target.function().spec();
            let counters = rt.stats.counters(spec.db, spec.prefix);
            match apply(rt, &target).await {
                Ok(()) => {
                    counters.invalidation();
                    tracing::debug!(
                        db = spec.db,
                        prefix = spec.prefix,
                        function = spec.function,
                        "queued invalidation applied"
                    );
                    rt.pending.queue().settle(&target, seq);
                    progress = true;
                }
                Err(_) if Instant::now() >= give_up_at => {
                    counters.invalidation_expired();
                    tracing::info!(
                        db = spec.db,
                        prefix = spec.prefix,
                        function = spec.function,
                        "queued invalidation dropped: every entry it covered has expired"
                    );
                    rt.pending.queue().settle(&target, seq);
                }
                Err(error) => {
                    count_failure(&counters, &error);
                    tracing::debug!(db = spec.db, prefix = spec.prefix, %error, "invalidation retry failed");
                }
            }
        }
        {
            let queue = rt.pending.queue();
            rt.pending.count.store(queue.len(), SeqCst);
            if queue.len() == 0 {
                rt.pending.worker.store(false, SeqCst);
                return;
            }
        }
        pause = if progress { FIRST_RETRY } else { (pause * 2).min(MAX_RETRY) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Spec;

    const SPEC: Spec = Spec {
        db: 5,
        prefix: "p",
        function: "f",
        module: "m",
        ttl: Duration::from_secs(60),
        version: None,
        format: crate::value::Format::Json,
    };
    const F: CachedFn = CachedFn::free(&SPEC);

    #[test]
    fn requeued_target_survives_the_older_attempt() {
        let mut q = Queue::default();
        q.insert(Target::Key(F, Some("k".into())));
        let first = q.keys["k"].seq;
        q.insert(Target::Key(F, Some("k".into()))); // a newer write failed while retrying
        q.settle(&Target::Key(F, Some("k".into())), first);
        assert!(q.keys.contains_key("k"), "the newer invalidation was discarded");
        let second = q.keys["k"].seq;
        q.settle(&Target::Key(F, Some("k".into())), second);
        assert_eq!(q.len(), 0);
    }

    #[test]
    fn too_many_keys_become_one_function_wide_invalidation() {
        let mut q = Queue::default();
        let mut coalesced = 0;
        for i in 0..=MAX_QUEUED_KEYS_PER_FUNCTION {
            if let Some((_, n)) = q.insert(Target::Key(F, Some(format!("k{i}")))) {
                coalesced = n;
            }
        }
        assert_eq!(coalesced, MAX_QUEUED_KEYS_PER_FUNCTION + 1);
        assert_eq!((q.keys.len(), q.functions.len()), (0, 1));
        // Later keys of that function are covered by it, not queued again.
        q.insert(Target::Key(F, Some("later".into())));
        assert_eq!(q.len(), 1);
    }
}
