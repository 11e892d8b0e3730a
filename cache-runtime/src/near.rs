//! The near tier: typed copies of cached values kept in this process, so that a hit clones a value
//! instead of asking the backend and decoding bytes. A copy is only as good as what tells this
//! process that the entry changed, so copies are kept only where something does:
//!
//! - on the embedded backend, the store itself, synchronously, on every write, delete and clear;
//! - on one Redis server, Redis's server-assisted client-side caching: a connection of its own in
//!   RESP3 with `CLIENT TRACKING ON BCAST` over the prefixes of the functions that keep copies
//!   (`backend/redis/tracking.rs`). Every write to those keys, from any process, is pushed to it.
//!
//! Until that connection is tracking, and again from the moment it drops until it tracks again,
//! the tier is *untrusted*: no copy answers and none is kept. Each copy also expires on its own,
//! after the function's `near` duration (or the entry's time left, if shorter), which bounds how
//! long a copy could outlive a change whose notification were lost.
//!
//! The race every client-side cache must close: a lookup reads value `v1` from the backend, a
//! write replaces it and its notification arrives (and drops nothing, as no copy is kept yet),
//! then the lookup keeps `v1`. Here a lookup takes a [`Ticket`] before it reads, and keeps its copy
//! only if no notification for its key (a stripe of keys), no flush and no function-wide
//! invalidation came in between; the check runs after the copy is stored, so that a notification
//! racing with it either sees the copy (and drops it) or is seen by the check.
//!
//! The copies live in a `quick_cache` (sharded, S3-FIFO eviction, bounded by weight): its `get`
//! takes a shard's read lock and records nothing, where moka's records every read for its
//! policy; a hit here is a few hundred nanoseconds, so that difference is most of it.

use std::any::Any;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use quick_cache::sync::{Cache, DefaultLifecycle};
use quick_cache::Weighter;

/// A typed value as the tier keeps it.
pub(crate) type Shared = Box<dyn Any + Send + Sync>;

/// How many stripes notifications are counted in: two keys share one with odds 1/1024, which
/// costs a kept copy (a later hit reads the backend), never a wrong one.
const STRIPES: usize = 1024;

/// What the tier charges for one copy beyond the encoded value's bytes (its key included).
const OVERHEAD: u64 = 128;

/// What a copy is kept under: its entry's key as the function's base (`{prefix}:{function}[:vN]`,
/// numbered as functions register) and the hash the key's braces hold. A hit looks it up without
/// formatting the key; a change notified by key text is split back into it (`key::split_entry`).
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct NearKey {
    base: u32,
    hash: [u8; 16],
}

impl NearKey {
    pub(crate) fn new(base: u32, hash: [u8; 16]) -> Self {
        NearKey { base, hash }
    }
}

/// One kept copy, shared: the cache hands out clones, one reference count each.
#[derive(Clone)]
struct Kept(Arc<Held>);

struct Held {
    db: u8,
    value: Shared,
    /// The tier's flush count when the lookup that kept it started: a flush since kills it.
    flushes: u64,
    /// The function's invalidation count then: a function-wide invalidation since kills it.
    function: u64,
    expires: Instant,
    /// The encoded value's size, what the byte bound counts.
    size: u32,
    /// Set once the check after storing it passed: until then it answers nothing (a change may
    /// have been notified between the lookup's read and the store).
    confirmed: AtomicBool,
}

/// Taken by a lookup before it reads the backend; see the module's documentation.
pub(crate) struct Ticket {
    db: u8,
    stripe: usize,
    notified: u64,
    flushes: u64,
    function: u64,
}

/// How a function's copies are turned back into its type, and made from it: built where the type
/// is known to be `Clone + Send + Sync + 'static` (`__private::Keeper::of`).
pub struct Keeper<T> {
    pub(crate) keep: fn(&T) -> Shared,
    /// Writes a clone of the copy into the slot (the caller's, so the value is not moved again).
    pub(crate) take: fn(&(dyn Any + Send + Sync), &mut Option<T>),
}

impl Ticket {
    /// The function's near epoch when it was taken.
    pub(crate) fn function_epoch(&self) -> u64 {
        self.function
    }
}

impl<T> Clone for Keeper<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Keeper<T> {}

impl<T: Clone + Send + Sync + 'static> Keeper<T> {
    /// The keeper of `T`.
    pub fn of() -> Self {
        Keeper {
            keep: |value| Box::new(value.clone()),
            take: |any, slot| *slot = any.downcast_ref::<T>().cloned(),
        }
    }
}

/// What a copy weighs against the byte bound: its encoded value and an overhead (its key's
/// included), and at least `floor` (`max_bytes / capacity`, so that the entry bound holds too).
#[derive(Clone)]
struct ByBytes {
    floor: u64,
}

impl Weighter<NearKey, Kept> for ByBytes {
    fn weight(&self, _: &NearKey, kept: &Kept) -> u64 {
        (u64::from(kept.0.size) + OVERHEAD).max(self.floor)
    }
}

/// The near tier of a runtime, as [`crate::Runtime::near_status`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct NearStatus {
    /// Whether copies answer now: the store tells this process of every change (always on the
    /// embedded backend; on Redis while the tracking connection tracks).
    pub trusted: bool,
    /// Copies kept now.
    pub copies: u64,
    /// Copies dropped so far because their entry changed (a write, a delete, an invalidation,
    /// here or, on Redis, in any process).
    pub dropped: u64,
}

/// The near tier of one runtime.
pub(crate) struct NearTier {
    copies: Cache<NearKey, Kept, ByBytes, foldhash::fast::RandomState>,
    hasher: foldhash::fast::RandomState,
    /// Notifications seen per stripe of keys.
    notified: Box<[AtomicU64]>,
    /// Flushes so far (a dropped tracking connection, `FLUSHALL`, a store cleared).
    flushes: AtomicU64,
    /// Whether what tells this process of changes is working now.
    trusted: AtomicBool,
    /// The functions that registered, filled by `register`.
    registry: RwLock<Registry>,
    /// Copies dropped by a notification or an invalidation, for `Runtime::stats`.
    dropped: AtomicU64,
}

/// What the tier knows of the functions that keep copies, both filled by `NearTier::register`.
#[derive(Default)]
struct Registry {
    /// Per function (by its generation key): its function-wide invalidations, as the function
    /// state holds them (`Function::near_epoch`).
    epochs: HashMap<String, Arc<AtomicU64>>,
    /// The number of each function base (`NearKey::base`), given as functions register.
    bases: HashMap<String, u32>,
}

impl NearTier {
    /// A tier of at most `capacity` copies and `max_bytes` (values counted by their encoded size):
    /// each copy weighs at least `max_bytes / capacity`, so neither bound can be passed.
    pub(crate) fn new(capacity: u64, max_bytes: u64) -> Self {
        let floor = (max_bytes / capacity.max(1)).max(1);
        let copies = Cache::with(
            // Grows as copies are kept; this is only its first allocation.
            usize::try_from(capacity.min(1024)).unwrap_or(1024),
            max_bytes,
            ByBytes { floor },
            foldhash::fast::RandomState::default(),
            DefaultLifecycle::default(),
        );
        NearTier {
            copies,
            hasher: foldhash::fast::RandomState::default(),
            notified: (0..STRIPES).map(|_| AtomicU64::new(0)).collect(),
            flushes: AtomicU64::new(0),
            trusted: AtomicBool::new(false),
            registry: RwLock::default(),
            dropped: AtomicU64::new(0),
        }
    }

    fn stripe(&self, key: NearKey) -> usize {
        (self.hasher.hash_one(key) as usize) % STRIPES
    }

    /// Registers a function: its invalidation count under its generation key, so that a change of
    /// that key (a function-wide invalidation in another process) drops its copies, and its base
    /// (`key::function_base`), numbered. Returns the base's number, for its [`NearKey`]s.
    pub(crate) fn register(&self, generation_key: &str, base: &str, epoch: &Arc<AtomicU64>) -> u32 {
        let mut registry = self.registry.write().unwrap_or_else(|e| e.into_inner());
        registry.epochs.entry(generation_key.to_owned()).or_insert_with(|| Arc::clone(epoch));
        let next = u32::try_from(registry.bases.len()).unwrap_or(u32::MAX);
        *registry.bases.entry(base.to_owned()).or_insert(next)
    }

    /// The [`NearKey`] of an entry's key, if it is one, of a registered function.
    fn near_key(&self, key: &str) -> Option<NearKey> {
        let (base, hash) = crate::key::split_entry(key)?;
        let registry = self.registry.read().unwrap_or_else(|e| e.into_inner());
        Some(NearKey { base: *registry.bases.get(base)?, hash })
    }

    /// The copy of `key` in `db`, if one is live.
    #[cfg(test)]
    fn get<T>(&self, db: u8, key: NearKey, function: &AtomicU64, keeper: Keeper<T>) -> Option<T> {
        let mut slot = None;
        self.get_into(db, key, function, keeper, &mut slot);
        slot
    }

    /// Writes the copy of `key` in `db` into `slot` if one is live (`None` if it does not have
    /// the type asked for); leaves `slot` as it is otherwise.
    pub(crate) fn get_into<T>(
        &self,
        db: u8,
        key: NearKey,
        function: &AtomicU64,
        keeper: Keeper<T>,
        slot: &mut Option<T>,
    ) {
        let Some(Kept(kept)) = self.copies.get(&key) else { return };
        if kept.db != db
            || kept.flushes != self.flushes.load(SeqCst)
            || kept.function != function.load(SeqCst)
            || !kept.confirmed.load(SeqCst)
            || kept.expires <= Instant::now()
        {
            return;
        }
        (keeper.take)(&*kept.value, slot)
    }

    /// Taken before a lookup reads the backend; `None` while the tier is untrusted.
    pub(crate) fn ticket(&self, db: u8, key: NearKey, function: &AtomicU64) -> Option<Ticket> {
        if !self.trusted.load(SeqCst) {
            return None;
        }
        let stripe = self.stripe(key);
        Some(Ticket {
            db,
            stripe,
            notified: self.notified[stripe].load(SeqCst),
            flushes: self.flushes.load(SeqCst),
            function: function.load(SeqCst),
        })
    }

    /// Keeps a copy of what a lookup that took `ticket` read, for at most `life`, unless a change
    /// came in between (then nothing is kept).
    pub(crate) fn keep(
        &self,
        ticket: Ticket,
        key: NearKey,
        function: &AtomicU64,
        value: Shared,
        size: usize,
        life: Duration,
    ) {
        let Some(expires) = Instant::now().checked_add(life) else { return };
        let size = u32::try_from(size).unwrap_or(u32::MAX);
        let kept = Arc::new(Held {
            db: ticket.db,
            value,
            flushes: ticket.flushes,
            function: ticket.function,
            expires,
            size,
            confirmed: AtomicBool::new(false),
        });
        self.copies.insert(key, Kept(Arc::clone(&kept)));
        let unchanged = self.trusted.load(SeqCst)
            && self.notified[ticket.stripe].load(SeqCst) == ticket.notified
            && self.flushes.load(SeqCst) == ticket.flushes
            && function.load(SeqCst) == ticket.function;
        if unchanged {
            kept.confirmed.store(true, SeqCst);
        } else {
            self.copies.remove(&key);
        }
    }

    /// `key` changed (in any DB: Redis's notifications do not say which). A key that is not a
    /// registered function's entry has no copy here, and no lookup takes a ticket on it.
    pub(crate) fn forget(&self, key: &str) {
        let Some(key) = self.near_key(key) else { return };
        self.notified[self.stripe(key)].fetch_add(1, SeqCst);
        if self.copies.remove(&key).is_some() {
            self.dropped.fetch_add(1, SeqCst);
        }
    }

    /// A key of the tracked prefixes changed: an entry (`...:{hash}`), or a function's generation
    /// (which drops every copy of the function: Redis does not say whether it was raised or only
    /// had its life extended, which happens about once per TTL). Leases and invalidation stamps
    /// are neither, and are ignored.
    pub(crate) fn changed(&self, key: &str) {
        if key.ends_with('}') {
            self.forget(key);
        } else if key.contains(":gen:") {
            let registry = self.registry.read().unwrap_or_else(|e| e.into_inner());
            // A function this process has not called keeps no copy here.
            if let Some(epoch) = registry.epochs.get(key) {
                epoch.fetch_add(1, SeqCst);
            }
        }
    }

    /// Every copy is dropped.
    pub(crate) fn flush(&self) {
        self.flushes.fetch_add(1, SeqCst);
        self.copies.clear();
    }

    /// What tells this process of changes works (again): copies from before are dropped.
    pub(crate) fn trust(&self) {
        self.flush();
        self.trusted.store(true, SeqCst);
    }

    /// What tells this process of changes stopped: nothing is kept or answered until [`trust`].
    ///
    /// [`trust`]: NearTier::trust
    pub(crate) fn distrust(&self) {
        self.trusted.store(false, SeqCst);
        self.flush();
    }

    /// What [`crate::Runtime::near_status`] reports.
    pub(crate) fn status(&self) -> NearStatus {
        NearStatus {
            trusted: self.trusted.load(SeqCst),
            copies: self.copies.len() as u64,
            dropped: self.dropped.load(SeqCst),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tier, a function's epoch, and one entry of it: its key and its text.
    fn tier() -> (NearTier, Arc<AtomicU64>, NearKey, String) {
        let near = NearTier::new(100, 1 << 20);
        near.trust();
        let f = Arc::default();
        let base = near.register("p:f:gen:00", "p:f", &f);
        (near, f, NearKey::new(base, [7; 16]), format!("p:f:{{{}}}", "07".repeat(16)))
    }

    const LIFE: Duration = Duration::from_secs(60);

    #[test]
    fn a_kept_copy_answers_until_its_key_changes() {
        let (near, f, key, text) = tier();
        let keeper = Keeper::<String>::of();
        let ticket = near.ticket(1, key, &f).unwrap();
        near.keep(ticket, key, &f, (keeper.keep)(&"v1".to_owned()), 8, LIFE);
        assert_eq!(near.get(1, key, &f, keeper).as_deref(), Some("v1"));
        assert_eq!(near.get(2, key, &f, keeper), None, "another DB's key");
        near.changed(&format!("p:g:{{{}}}", "07".repeat(16))); // another function's entry
        near.changed(&format!("p:f:{{{}}}", "08".repeat(16))); // another entry of this one
        assert_eq!(near.get(1, key, &f, keeper).as_deref(), Some("v1"));
        near.changed(&text);
        assert_eq!(near.get(1, key, &f, keeper), None);
    }

    #[test]
    fn a_change_between_the_ticket_and_the_copy_keeps_nothing() {
        let (near, f, key, text) = tier();
        let keeper = Keeper::<u32>::of();
        let ticket = near.ticket(0, key, &f).unwrap();
        near.changed(&text); // the notification of a write the lookup may have missed
        near.keep(ticket, key, &f, (keeper.keep)(&1), 8, LIFE);
        assert_eq!(near.get(0, key, &f, keeper), None);
        // Without the change, the same sequence keeps the copy.
        let ticket = near.ticket(0, key, &f).unwrap();
        near.keep(ticket, key, &f, (keeper.keep)(&1), 8, LIFE);
        assert_eq!(near.get(0, key, &f, keeper), Some(1));
    }

    #[test]
    fn untrusted_flushed_and_function_wide_changes_answer_nothing() {
        let (near, f, key, text) = tier();
        let keeper = Keeper::<u32>::of();
        let keep = |near: &NearTier| {
            let ticket = near.ticket(0, key, &f).unwrap();
            near.keep(ticket, key, &f, (keeper.keep)(&7), 8, LIFE);
            assert_eq!(near.get(0, key, &f, keeper), Some(7));
        };
        keep(&near);
        near.distrust();
        assert_eq!(near.get(0, key, &f, keeper), None);
        assert!(near.ticket(0, key, &f).is_none(), "nothing is kept while untrusted");
        near.trust();
        keep(&near);
        near.changed(&format!("{text}:lease")); // not an entry: nothing dropped
        assert_eq!(near.get(0, key, &f, keeper), Some(7));
        near.changed("p:f:gen:00");
        assert_eq!(near.get(0, key, &f, keeper), None);
    }

    #[test]
    fn a_copy_expires_after_its_life_and_a_huge_life_is_no_panic() {
        let (near, f, key, _) = tier();
        let keeper = Keeper::<u32>::of();
        let ticket = near.ticket(0, key, &f).unwrap();
        near.keep(ticket, key, &f, (keeper.keep)(&7), 8, Duration::from_millis(30));
        assert_eq!(near.get(0, key, &f, keeper), Some(7));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(near.get(0, key, &f, keeper), None);
        let ticket = near.ticket(0, key, &f).unwrap();
        near.keep(ticket, key, &f, (keeper.keep)(&8), 8, Duration::MAX);
        assert_eq!(near.get(0, key, &f, keeper), None, "a life past the clock's range keeps nothing");
    }

    #[test]
    fn the_bounds_hold() {
        let near = NearTier::new(10, 1 << 20);
        near.trust();
        let f = Arc::new(AtomicU64::new(0));
        let base = near.register("p:f:gen:00", "p:f", &f);
        let keeper = Keeper::<u32>::of();
        for i in 0..100u8 {
            let key = NearKey::new(base, [i; 16]);
            let ticket = near.ticket(0, key, &f).unwrap();
            near.keep(ticket, key, &f, (keeper.keep)(&u32::from(i)), 8, LIFE);
        }
        let kept = near.status().copies;
        assert!(kept <= 10, "{kept} copies kept, bound 10");
    }

    #[test]
    fn same_based_functions_share_a_number_and_others_do_not() {
        let near = NearTier::new(10, 1 << 20);
        let (f, g) = (Arc::default(), Arc::default());
        let a = near.register("p:f:gen:01", "p:f", &f);
        let b = near.register("p:f:gen:02", "p:f", &g); // the same name in another module
        let c = near.register("p:g:gen:03", "p:g", &g);
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}
