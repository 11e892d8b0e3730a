//! Where the near tier's copies live: a lock-free map (`papaya`) whose lookups write nothing
//! shared but a copy's read flag (once per eviction pass), bounded by weight with first-in,
//! first-out eviction that passes over, once, a copy read since it was kept (second chance, the
//! CLOCK policy).
//!
//! Why not a cache crate: a near hit costs a few hundred nanoseconds, and at 64 callers on two
//! cores a lookup that writes anything shared (a shard's read lock, a reference count, a
//! policy's record of the read) moves that cache line between the cores on about every other
//! hit. `quick_cache`, which kept the copies before, took a shard's read lock and cloned an `Arc`
//! per hit: 189 ns per lookup on each of this machine's two cores against papaya's 79 (two
//! threads, 1,000 keys, a `String` cloned per lookup). A lookup here pins papaya's epoch (a
//! thread-local write) and reads. What a cache crate gave besides, the bound and eviction, is
//! done on the write side, which only lookups that read the backend reach: copies are counted by
//! weight as they are kept, and the oldest kept go first when the bound is passed, but for those
//! read since. A lookup marks the copy it reads with a flag, written only when not set yet.
//!
//! Every copy leaves through this file (replaced, removed, evicted, cleared) and is handed to
//! `gone`, exactly once, so that what is counted per copy elsewhere (the index of its key's
//! bytes) is given back when it leaves the map, not when papaya frees it later.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Mutex, MutexGuard};

use papaya::{Guard, HashMap};

use super::{Held, NearKey, NearRef};

/// The copies of one tier.
pub(super) struct Copies {
    map: HashMap<NearKey, Arc<Held>, foldhash::fast::RandomState>,
    /// The weight of the copies in the map: raised before a copy is stored, lowered by whoever
    /// takes it out.
    weight: AtomicU64,
    /// The bound on `weight`.
    max_weight: u64,
    /// Every copy in the map, by its key and stamp, in the order kept (and stale entries of
    /// copies since replaced or removed, skipped and compacted away). Locked by every keep.
    order: Mutex<Order>,
}

struct Order {
    queue: VecDeque<(NearKey, u64)>,
    /// The next copy's stamp.
    next: u64,
}

impl Copies {
    pub(super) fn new(max_weight: u64) -> Self {
        Copies {
            // Blocking resizes: a resize is paid by the keep that causes it, never by lookups,
            // which with incremental resizing may search two tables while one is under way.
            map: HashMap::builder()
                .hasher(foldhash::fast::RandomState::default())
                .resize_mode(papaya::ResizeMode::Blocking)
                .build(),
            weight: AtomicU64::new(0),
            max_weight,
            order: Mutex::new(Order { queue: VecDeque::new(), next: 0 }),
        }
    }

    fn order(&self) -> MutexGuard<'_, Order> {
        self.order.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What `read` makes of the copy under `key`, if there is one.
    #[inline]
    pub(super) fn read<R>(&self, key: &NearRef<'_>, read: impl FnOnce(&Held) -> R) -> Option<R> {
        let guard = self.map.guard();
        self.map.get(key, &guard).map(|held| {
            // Written only when not set: a copy read again and again is written once per pass
            // of the eviction, not once per read.
            if !held.used.load(Relaxed) {
                held.used.store(true, Relaxed);
            }
            read(held)
        })
    }

    /// Stores the copy `make` builds from its stamp under `key` (replacing the copy there), then
    /// evicts the oldest copies not read since they were kept while the weight is past the bound
    /// (second chance); `gone` is called with each copy that left. Returns the copy stored.
    pub(super) fn insert(
        &self,
        key: NearKey,
        make: impl FnOnce(u64) -> Held,
        gone: impl Fn(&Held),
    ) -> Arc<Held> {
        let guard = self.map.guard();
        let mut order = self.order();
        let stamp = order.next;
        order.next += 1;
        let held = Arc::new(make(stamp));
        order.queue.push_back((key.clone(), stamp));
        // Counted before it is stored: whoever takes it out lowers the weight by as much.
        self.weight.fetch_add(held.weight, SeqCst);
        if let Some(old) = self.map.insert(key, Arc::clone(&held), &guard) {
            self.left(old, &gone);
        }
        // The oldest go first, but one read since it was kept (or last passed over) is passed
        // over once, to the back of the queue; at most one pass over the queue per keep, so that
        // lookups marking copies all the while cannot keep this loop going.
        let mut chances = order.queue.len();
        while self.weight.load(SeqCst) > self.max_weight {
            let Some((key, stamp)) = order.queue.pop_front() else { break };
            if chances > 0 {
                let kept = self.map.get(&key.borrowed(), &guard).filter(|held| held.stamp == stamp);
                if kept.is_some_and(|held| held.used.swap(false, Relaxed)) {
                    chances -= 1;
                    order.queue.push_back((key, stamp));
                    continue;
                }
            }
            self.take_stamped(&key.borrowed(), stamp, &guard, &gone);
        }
        // Entries of copies replaced or removed since are skipped as they come up; compacted
        // when they are most of the queue, so that it stays within twice the copies. A compaction
        // looks every entry up, under the lock that keeps wait on (lookups do not take it): at
        // the default bound of 100,000 copies, once per at least 100,000 keeps.
        if order.queue.len() > 2 * self.map.len() + 64 {
            order.queue.retain(|(key, stamp)| {
                self.map.get(&key.borrowed(), &guard).is_some_and(|held| held.stamp == *stamp)
            });
        }
        held
    }

    /// Takes out the copy under `key`, if there is one; `gone` is called with it.
    pub(super) fn remove(&self, key: &NearRef<'_>, gone: impl Fn(&Held)) -> bool {
        let guard = self.map.guard();
        match self.map.remove(key, &guard) {
            Some(held) => {
                self.left(held, &gone);
                true
            }
            None => false,
        }
    }

    /// Whether a copy of `weight` may be kept: one heavier than the bound alone would evict every
    /// other copy, then itself.
    pub(super) fn admits(&self, weight: u64) -> bool {
        weight <= self.max_weight
    }

    /// Takes out the copy under `key` if it is the one stamped `stamp`; `gone` is called with it.
    pub(super) fn remove_stamped(&self, key: &NearRef<'_>, stamp: u64, gone: impl Fn(&Held)) {
        self.take_stamped(key, stamp, &self.map.guard(), &gone);
    }

    fn take_stamped(&self, key: &NearRef<'_>, stamp: u64, guard: &impl Guard, gone: &impl Fn(&Held)) {
        if let Ok(Some((_, held))) = self.map.remove_if(key, |_, held| held.stamp == stamp, guard) {
            self.left(held, gone);
        }
    }

    /// Takes out every copy; `gone` is called with each.
    pub(super) fn clear(&self, gone: impl Fn(&Held)) {
        let guard = self.map.guard();
        let mut order = self.order();
        // Every copy in the map has its entry in the queue (stored under this lock).
        for (key, stamp) in std::mem::take(&mut order.queue) {
            self.take_stamped(&key.borrowed(), stamp, &guard, &gone);
        }
    }

    /// `held` left the map (its taker is the only one to see it leave).
    fn left(&self, held: &Held, gone: &impl Fn(&Held)) {
        self.weight.fetch_sub(held.weight, SeqCst);
        gone(held);
    }

    /// How many copies are kept.
    pub(super) fn len(&self) -> usize {
        self.map.len()
    }

    /// The weight of the copies kept.
    #[cfg(test)]
    pub(super) fn weight(&self) -> u64 {
        self.weight.load(SeqCst)
    }

    /// How many entries the order of copies has (stale ones included).
    #[cfg(test)]
    pub(super) fn queued(&self) -> usize {
        self.order().queue.len()
    }

    /// The weight of the copies in the map, summed over them.
    #[cfg(test)]
    pub(super) fn summed(&self) -> u64 {
        self.map.pin().values().map(|held| held.weight).sum()
    }
}
