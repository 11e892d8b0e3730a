//! The queue of invalidations that failed or were interrupted: what it holds, what it covers,
//! and its bounds. `super` applies them and runs the retry worker.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use crate::spec::{CachedFn, FunctionId, Target};

/// Past this many queued single-key invalidations of one function, they become one function-wide
/// invalidation: the queue's memory stays bounded through a long outage.
pub(crate) const MAX_QUEUED_KEYS_PER_FUNCTION: usize = 1_000;

struct Queued {
    target: Target,
    /// After this, every entry the target covers has expired: the invalidation cannot matter.
    give_up_at: Instant,
    /// Raised each time the same target is queued again: an attempt that started before the
    /// newest queueing does not settle it (the newer write may have come after that attempt).
    seq: u64,
}

#[derive(Default)]
pub(crate) struct Queue {
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
        let give_up_at =
            Instant::now().checked_add(function.spec().entry_life()).unwrap_or_else(Instant::now);
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
                    // after this newer write too, and tried for as long as this key's would be.
                    let queued = self.functions.get_mut(&id).expect("checked");
                    queued.seq = seq;
                    queued.give_up_at = queued.give_up_at.max(give_up_at);
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
        let give_up_at =
            Instant::now().checked_add(function.spec().entry_life()).unwrap_or_else(Instant::now);
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

/// A target the queue took: whether the caller must start the retry worker, and the function
/// whose queued keys were folded into one function-wide invalidation (with how many).
pub(crate) struct Pushed {
    pub(crate) start_worker: bool,
    pub(crate) coalesced: Option<(CachedFn, usize)>,
}

impl Pending {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `target` (or raises its sequence number if it is queued already).
    pub(crate) fn push(&self, target: Target) -> Pushed {
        let mut queue = self.queue();
        let coalesced = queue.insert(target);
        self.count.store(queue.len(), SeqCst);
        Pushed { start_worker: !self.worker.swap(true, SeqCst), coalesced }
    }

    /// Every queued target, function-wide ones first, with when to give up on it and the
    /// sequence number an attempt must still see to settle it.
    pub(crate) fn snapshot(&self) -> Vec<(Target, Instant, u64)> {
        let queue = self.queue();
        let all = queue.functions.values().chain(queue.keys.values());
        all.map(|q| (q.target.clone(), q.give_up_at, q.seq)).collect()
    }

    /// Removes `target` if it was not queued again since the attempt numbered `seq` started.
    pub(crate) fn settle(&self, target: &Target, seq: u64) {
        let mut queue = self.queue();
        queue.settle(target, seq);
        self.count.store(queue.len(), SeqCst);
    }

    /// After a round of attempts: `true` (and the worker stops) when nothing is left.
    pub(crate) fn round_done(&self) -> bool {
        let queue = self.queue();
        self.count.store(queue.len(), SeqCst);
        if queue.len() == 0 {
            self.worker.store(false, SeqCst);
            return true;
        }
        false
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Spec;
    use std::time::Duration;

    const SPEC: Spec = Spec {
        db: 5,
        prefix: "p",
        function: "f",
        module: "m",
        ttl: Duration::from_secs(60),
        version: None,
        format: crate::value::Format::Json,
        jitter_percent: 0,
        eager_refresh_percent: 0,
        stale_if_error: Duration::ZERO,
        near: Duration::ZERO,
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
        // Later keys of that function are covered by it, not queued again, and keep it queued
        // for as long as they would have been.
        let before = q.functions.values().next().unwrap().give_up_at;
        std::thread::sleep(std::time::Duration::from_millis(5));
        let inserted = Instant::now();
        q.insert(Target::Key(F, Some("later".into())));
        assert_eq!(q.len(), 1);
        let after = q.functions.values().next().unwrap().give_up_at;
        assert!(after > before && after >= inserted + F.spec().entry_life(), "{before:?} {after:?}");
    }
}
