//! The near tier: typed copies of cached values kept in this process, so that a hit clones a value
//! instead of asking the backend and decoding bytes. A copy is only as good as what tells this
//! process that the entry changed, so copies are kept only where something does:
//!
//! - on the embedded backend, the store itself, synchronously, on every write, delete and clear;
//! - on Redis (one server, the primary behind Sentinel, or every node of a Cluster), Redis's
//!   server-assisted client-side caching: connections of its own in RESP3 with `CLIENT TRACKING
//!   ON BCAST` over the prefixes of the functions that keep copies (`backend/redis/tracking.rs`).
//!   Every write to those keys, from any process, is pushed to them. Behind Sentinel the
//!   connection follows the store's to each new primary, the tier distrusted from the moment
//!   they move (`backend/sentinel`); on Cluster a change in the set of nodes ends the session
//!   (`backend/cluster/tracking.rs`).
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
//! invalidation made here came in between; the check runs after the copy is stored, so that a
//! notification racing with it either sees the copy (and drops it) or is seen by the check. A
//! function-wide change made elsewhere arrives as a change of the function's generation key: each
//! copy carries the generation its entry was written under and answers only while no pushed
//! change is unread and the generation read since is not later.
//!
//! The copies live in `near/copies.rs`: a lock-free map whose lookups write nothing shared (but
//! a copy's "read since" flag, once per eviction pass), bounded by weight, the oldest kept and
//! not read since evicted first.

mod copies;

use std::any::Any;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::clock;
use copies::Copies;

pub(crate) use crate::key::{Args, ArgsRef};

/// A typed value as the tier keeps it.
pub(crate) type Shared = Box<dyn Any + Send + Sync>;

/// How many stripes notifications are counted in: two keys share one with odds 1/1024, which
/// costs a kept copy (a later hit reads the backend), never a wrong one.
const STRIPES: usize = 1024;

/// What the tier charges for one copy beyond the encoded value's bytes (its key included).
const OVERHEAD: u64 = 128;

/// What a copy is kept under: its function's base (`{prefix}:{function}[:vN]`, numbered as
/// functions register) and its call's key bytes as `key.rs` encodes them before hashing (module,
/// owner, arguments), or, for the rare call whose bytes outgrow the hasher's buffer, the hash its
/// key's braces hold. A hit looks a copy up by these bytes (`NearRef`): no blake3 and no key
/// formatting. A change is notified by key text, whose hash `Index` maps back to the bytes.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct NearKey {
    base: u32,
    args: Args,
}

/// A [`NearKey`] as a lookup has it, borrowed from the call's key.
pub(crate) struct NearRef<'a> {
    base: u32,
    args: ArgsRef<'a>,
}

impl NearKey {
    /// The key of a copy of the call `args` of the function numbered `base`.
    pub(crate) fn new(base: u32, args: Args) -> Self {
        NearKey { base, args }
    }

    fn borrowed(&self) -> NearRef<'_> {
        NearRef { base: self.base, args: self.args.borrowed() }
    }
}

impl<'a> NearRef<'a> {
    pub(crate) fn new(base: u32, args: ArgsRef<'a>) -> Self {
        NearRef { base, args }
    }
}

/// The key and its borrowed form hash alike (the map looks one up by the other).
impl std::hash::Hash for NearRef<'_> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u32(self.base);
        match self.args {
            ArgsRef::Encoded(bytes) => {
                state.write_u8(0);
                state.write(bytes);
            }
            ArgsRef::Hashed(hash) => {
                state.write_u8(1);
                state.write(&hash);
            }
        }
    }
}

impl std::hash::Hash for NearKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.borrowed().hash(state)
    }
}

impl papaya::Equivalent<NearKey> for NearRef<'_> {
    fn equivalent(&self, key: &NearKey) -> bool {
        self.base == key.base
            && match (self.args, &key.args) {
                (ArgsRef::Encoded(a), Args::Encoded(b)) => a == &**b,
                (ArgsRef::Hashed(a), Args::Hashed(b)) => a == *b,
                _ => false,
            }
    }
}

/// Where a notified key's bytes are found: per function number and hash, the bytes of the copies
/// kept under them, and how many copies in the map have them (a copy being replaced by one of the
/// same key is two for a moment). Every copy of encoded bytes is counted here from before it is
/// stored until it leaves the map, so a notification always finds a copy that could answer.
#[derive(Default)]
struct Index(std::sync::Mutex<Places>);

/// Per (function number, hash): the bytes (shared with the copies' keys), and how many copies
/// have them.
type Places = HashMap<(u32, [u8; 16]), (Arc<[u8]>, usize)>;

impl Index {
    fn lock(&self) -> std::sync::MutexGuard<'_, Places> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One copy of the bytes at `place` left the map.
    fn release(&self, place: (u32, [u8; 16])) {
        let mut index = self.lock();
        if let Some((_, holders)) = index.get_mut(&place) {
            *holders -= 1;
            if *holders == 0 {
                index.remove(&place);
            }
        }
    }
}

/// One kept copy.
struct Held {
    db: u8,
    value: Shared,
    /// The tier's flush count when the lookup that kept it started: a flush since kills it.
    flushes: u64,
    /// The function's invalidation count then: a function-wide invalidation made here since
    /// kills it.
    function: u64,
    /// The generation its entry was written under: it answers only while the generation known
    /// (and confirmed, see `Functions::confirmed_generation`) is not later.
    written: u64,
    /// When it dies, on `clock`'s time.
    expires: u64,
    /// Set once the check after storing it passed: until then it answers nothing (a change may
    /// have been notified between the lookup's read and the store).
    confirmed: AtomicBool,
    /// Set by a lookup that found it, cleared when eviction passes over it (`copies.rs`).
    used: AtomicBool,
    /// For a copy kept under encoded bytes: its place in the `Index`, given back when it leaves
    /// the map.
    indexed: Option<(u32, [u8; 16])>,
    /// Its place in the order copies were kept in, for eviction (`copies.rs`).
    stamp: u64,
    /// What it weighs against the byte bound: its encoded value and an overhead (its key's
    /// included), and at least the tier's floor (`max_bytes / capacity`, so that the entry bound
    /// holds too).
    weight: u64,
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

/// The near tier of a runtime, as [`crate::Runtime::near_status`] reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct NearStatus {
    /// Whether copies answer now: the store tells this process of every change (always on the
    /// embedded backend; on Redis while the tracking connection tracks).
    pub trusted: bool,
    /// Copies held now: those past their life, or of a function invalidated as a whole, until
    /// they are evicted or replaced (they answer no hit).
    pub copies: u64,
    /// Copies dropped so far because their key changed (a write, a delete, an invalidation of
    /// that key, here or, on Redis, in any process); a function-wide invalidation is not counted.
    pub dropped: u64,
}

/// The near tier of one runtime.
pub(crate) struct NearTier {
    copies: Copies,
    /// The least a copy weighs: `max_bytes / capacity`.
    floor: u64,
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
    /// The bytes of the copies kept by hash, for notifications.
    index: Arc<Index>,
}

/// What the tier knows of the functions that keep copies, both filled by `NearTier::register`.
#[derive(Default)]
struct Registry {
    /// Per function (by its generation key): the changes of that key pushed by Redis, as the
    /// function state holds them (`Function::pushed`); two functions that differ only by DB
    /// share a generation key, and both count its changes.
    epochs: HashMap<String, Vec<Arc<AtomicU64>>>,
    /// The number of each function base (`NearKey::base`), given as functions register.
    bases: HashMap<String, u32>,
}

impl NearTier {
    /// A tier of at most `capacity` copies and `max_bytes` (values counted by their encoded size):
    /// each copy weighs at least `max_bytes / capacity` (the floor), and the copies at most
    /// `capacity` floors, so neither bound can be passed.
    pub(crate) fn new(capacity: u64, max_bytes: u64) -> Self {
        let floor = (max_bytes / capacity.max(1)).max(1);
        NearTier {
            copies: Copies::new(max_bytes.min(floor.saturating_mul(capacity.max(1)))),
            floor,
            hasher: foldhash::fast::RandomState::default(),
            notified: (0..STRIPES).map(|_| AtomicU64::new(0)).collect(),
            flushes: AtomicU64::new(0),
            trusted: AtomicBool::new(false),
            registry: RwLock::default(),
            dropped: AtomicU64::new(0),
            index: Arc::default(),
        }
    }

    /// The stripe notifications of the entry with `hash` of the function numbered `base` count in.
    fn stripe(&self, base: u32, hash: [u8; 16]) -> usize {
        (self.hasher.hash_one((base, hash)) as usize) % STRIPES
    }

    /// Registers a function: its count of pushed changes under its generation key, so that a
    /// change of that key (a function-wide invalidation in another process, or its life extended)
    /// holds its copies back until the generation is read again, and its base
    /// (`key::function_base`), numbered. Returns the base's number, for its [`NearKey`]s.
    pub(crate) fn register(&self, generation_key: &str, base: &str, epoch: &Arc<AtomicU64>) -> u32 {
        let mut registry = self.registry.write().unwrap_or_else(|e| e.into_inner());
        let counts = registry.epochs.entry(generation_key.to_owned()).or_default();
        if !counts.iter().any(|c| Arc::ptr_eq(c, epoch)) {
            counts.push(Arc::clone(epoch));
        }
        let next = u32::try_from(registry.bases.len()).unwrap_or(u32::MAX);
        *registry.bases.entry(base.to_owned()).or_insert(next)
    }

    /// The function number and hash of an entry's key, if it is one, of a registered function.
    fn entry(&self, key: &str) -> Option<(u32, [u8; 16])> {
        let (base, hash) = crate::key::split_entry(key)?;
        let registry = self.registry.read().unwrap_or_else(|e| e.into_inner());
        Some((*registry.bases.get(base)?, hash))
    }

    /// The copy of `key` in `db`, if one is live.
    #[cfg(test)]
    fn get<T>(&self, db: u8, key: NearRef<'_>, function: &AtomicU64, keeper: Keeper<T>) -> Option<T> {
        let mut slot = None;
        self.get_into(db, key, function, Some(0), keeper, &mut slot);
        slot
    }

    /// Writes the copy of `key` in `db` into `slot` if one is live (`None` if it does not have
    /// the type asked for); leaves `slot` as it is otherwise. `function` is the function's count
    /// of invalidations made here, `generation` its confirmed generation (`None`: no copy of it
    /// answers).
    pub(crate) fn get_into<T>(
        &self,
        db: u8,
        key: NearRef<'_>,
        function: &AtomicU64,
        generation: Option<u64>,
        keeper: Keeper<T>,
        slot: &mut Option<T>,
    ) {
        let Some(generation) = generation else { return };
        self.copies.read(&key, |kept| {
            if kept.db == db
                && kept.flushes == self.flushes.load(SeqCst)
                && kept.function == function.load(SeqCst)
                && kept.written >= generation
                && kept.confirmed.load(SeqCst)
                && clock::before(kept.expires)
            {
                (keeper.take)(&*kept.value, slot)
            }
        });
    }

    /// Gives back what a copy that left the map held in the index.
    fn gone(&self) -> impl Fn(&Held) + '_ {
        |held| {
            if let Some(place) = held.indexed {
                self.index.release(place);
            }
        }
    }

    /// Taken before a lookup of the entry with `hash` of the function numbered `base` reads the
    /// backend; `None` while the tier is untrusted.
    pub(crate) fn ticket(&self, db: u8, base: u32, hash: [u8; 16], function: &AtomicU64) -> Option<Ticket> {
        if !self.trusted.load(SeqCst) {
            return None;
        }
        let stripe = self.stripe(base, hash);
        Some(Ticket {
            db,
            stripe,
            notified: self.notified[stripe].load(SeqCst),
            flushes: self.flushes.load(SeqCst),
            function: function.load(SeqCst),
        })
    }

    /// Keeps a copy of what a lookup that took `ticket` read, under `key` (whose entry's hash is
    /// `hash` and was written under generation `written`), for at most `life`, unless a change
    /// came in between (then nothing is kept).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn keep(
        &self,
        ticket: Ticket,
        key: NearKey,
        hash: [u8; 16],
        function: &AtomicU64,
        written: u64,
        value: Shared,
        size: usize,
        life: Duration,
    ) {
        let Some(expires) = clock::after(life) else { return };
        let key_bytes = match &key.args {
            Args::Encoded(bytes) => bytes.len() as u64,
            Args::Hashed(_) => 0,
        };
        let weight = (size as u64).saturating_add(OVERHEAD + key_bytes).max(self.floor);
        if !self.copies.admits(weight) {
            return;
        }
        // Indexed before it is stored: a notification from then on finds it.
        let indexed = match &key.args {
            Args::Encoded(bytes) => {
                let place = (key.base, hash);
                self.index.lock().entry(place).or_insert_with(|| (Arc::clone(bytes), 0)).1 += 1;
                Some(place)
            }
            Args::Hashed(_) => None,
        };
        let make = |stamp| Held {
            db: ticket.db,
            value,
            flushes: ticket.flushes,
            function: ticket.function,
            written,
            expires,
            confirmed: AtomicBool::new(false),
            used: AtomicBool::new(false),
            indexed,
            stamp,
            weight,
        };
        let kept = self.copies.insert(key.clone(), make, self.gone());
        // Between the copy stored and the counts read, and in `forget` between the count raised
        // and the copy looked for: without both, each side could miss the other's write (the
        // map publishes a slot with a release store, not a sequentially consistent one).
        fence(SeqCst);
        let unchanged = self.trusted.load(SeqCst)
            && self.notified[ticket.stripe].load(SeqCst) == ticket.notified
            && self.flushes.load(SeqCst) == ticket.flushes
            && function.load(SeqCst) == ticket.function;
        if unchanged {
            kept.confirmed.store(true, SeqCst);
        } else {
            // This copy only: another lookup's, kept since on a clean ticket, stays.
            self.copies.remove_stamped(&key.borrowed(), kept.stamp, self.gone());
        }
    }

    /// `key` changed (in any DB: Redis's notifications do not say which). A key that is not a
    /// registered function's entry has no copy here, and no lookup takes a ticket on it.
    pub(crate) fn forget(&self, key: &str) {
        let Some((base, hash)) = self.entry(key) else { return };
        self.notified[self.stripe(base, hash)].fetch_add(1, SeqCst);
        fence(SeqCst); // see `keep`
                       // The bytes are taken out of the index's lock first: a copy dropped takes that lock.
        let encoded = self.index.lock().get(&(base, hash)).map(|(bytes, _)| Arc::clone(bytes));
        let removed = match &encoded {
            Some(bytes) => self.copies.remove(&NearRef::new(base, ArgsRef::Encoded(bytes)), self.gone()),
            None => self.copies.remove(&NearRef::new(base, ArgsRef::Hashed(hash)), self.gone()),
        };
        if removed {
            self.dropped.fetch_add(1, SeqCst);
        }
    }

    /// A key of the tracked prefixes changed: an entry (`...:{hash}`), or a function's generation.
    /// Redis does not say whether a generation was raised or only had its life extended (about
    /// once per TTL), so its copies are held back until a lookup reads the generation again, and
    /// those written under it answer again (`Functions::confirmed_generation`). Leases and
    /// invalidation stamps are neither, and are ignored.
    pub(crate) fn changed(&self, key: &str) {
        if key.ends_with('}') {
            self.forget(key);
        } else if key.contains(":gen:") {
            let registry = self.registry.read().unwrap_or_else(|e| e.into_inner());
            // A function this process has not called keeps no copy here.
            for count in registry.epochs.get(key).into_iter().flatten() {
                count.fetch_add(1, SeqCst);
            }
        }
    }

    /// Every copy is dropped.
    pub(crate) fn flush(&self) {
        self.flushes.fetch_add(1, SeqCst);
        self.copies.clear(self.gone());
    }

    /// What tells this process of changes works (again): copies from before are dropped, and
    /// each function reads its generation again before a copy of it answers (a function-wide
    /// change while nothing told this process may be unknown here).
    pub(crate) fn trust(&self) {
        self.flush();
        {
            let registry = self.registry.read().unwrap_or_else(|e| e.into_inner());
            for count in registry.epochs.values().flatten() {
                count.fetch_add(1, SeqCst);
            }
        }
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

    /// One entry of a function, as the tier sees it: its number, its key's hash, its bytes (or
    /// none: kept by hash), and its key's text.
    #[derive(Clone)]
    struct Entry {
        base: u32,
        hash: [u8; 16],
        bytes: Option<Vec<u8>>,
        text: String,
    }

    impl Entry {
        fn args(&self) -> ArgsRef<'_> {
            match &self.bytes {
                Some(bytes) => ArgsRef::Encoded(bytes),
                None => ArgsRef::Hashed(self.hash),
            }
        }
        fn at(&self) -> NearRef<'_> {
            NearRef::new(self.base, self.args())
        }
        fn keep<T: Clone + Send + Sync + 'static>(
            &self,
            near: &NearTier,
            f: &AtomicU64,
            value: T,
            life: Duration,
        ) {
            let ticket = near.ticket(0, self.base, self.hash, f).unwrap();
            self.keep_on(near, ticket, f, 0, value, life);
        }
        /// Keeps `value` on a `ticket` taken before, for an entry written under `written`.
        fn keep_on<T: Clone + Send + Sync + 'static>(
            &self,
            near: &NearTier,
            ticket: Ticket,
            f: &AtomicU64,
            written: u64,
            value: T,
            life: Duration,
        ) {
            let key = NearKey::new(self.base, self.args().to_owned());
            near.keep(ticket, key, self.hash, f, written, Box::new(value), 8, life);
        }
    }

    /// A tier, a function's count of invalidations made here, and one entry of it kept by its
    /// bytes. The function's count of pushed generation changes is [`pushed`]'s.
    fn tier() -> (NearTier, Arc<AtomicU64>, Entry) {
        let near = NearTier::new(100, 1 << 20);
        near.trust();
        let f = Arc::default();
        let base = near.register("p:f:gen:00", "p:f", &Arc::default());
        let entry = Entry {
            base,
            hash: [7; 16],
            bytes: Some(b"module\0AAPL".to_vec()),
            text: format!("p:f:{{{}}}", "07".repeat(16)),
        };
        (near, f, entry)
    }

    const LIFE: Duration = Duration::from_secs(60);

    /// A trusted tier of at most `capacity` copies (and 1 MiB), a function's count of
    /// invalidations made here, and the number of its base, registered (with a count of pushed
    /// generation changes of its own, as `tier` does).
    fn trusted(capacity: u64) -> (NearTier, Arc<AtomicU64>, u32) {
        let near = NearTier::new(capacity, 1 << 20);
        near.trust();
        let f = Arc::new(AtomicU64::new(0));
        let base = near.register("p:f:gen:00", "p:f", &Arc::default());
        (near, f, base)
    }

    #[test]
    fn a_kept_copy_answers_until_its_key_changes() {
        let (near, f, e) = tier();
        let by_hash =
            Entry { bytes: None, hash: [9; 16], text: format!("p:f:{{{}}}", "09".repeat(16)), ..e.clone() };
        for e in [e, by_hash] {
            let keeper = Keeper::<String>::of();
            let ticket = near.ticket(1, e.base, e.hash, &f).unwrap();
            near.keep(
                ticket,
                NearKey::new(e.base, e.args().to_owned()),
                e.hash,
                &f,
                0,
                (keeper.keep)(&"v1".to_owned()),
                8,
                LIFE,
            );
            assert_eq!(near.get(1, e.at(), &f, keeper).as_deref(), Some("v1"));
            assert_eq!(near.get(2, e.at(), &f, keeper), None, "another DB's key");
            near.changed(&format!("p:g:{{{}}}", "07".repeat(16))); // another function's entry
            near.changed(&format!("p:f:{{{}}}", "08".repeat(16))); // another entry of this one
            assert_eq!(near.get(1, e.at(), &f, keeper).as_deref(), Some("v1"));
            near.changed(&e.text);
            assert_eq!(near.get(1, e.at(), &f, keeper), None);
        }
        assert_eq!(near.status().dropped, 2);
    }

    #[test]
    fn the_index_holds_what_copies_live_and_nothing_more() {
        let (near, f, e) = tier();
        let indexed = || near.index.lock().len();
        e.keep(&near, &f, 1u32, LIFE);
        e.keep(&near, &f, 2u32, LIFE); // replaces the first
        assert_eq!(indexed(), 1);
        // A copy that left the map leaves the index then, even while a lookup still reads it
        // (papaya frees it later): no later lookup can find it.
        near.copies.read(&e.at(), |held| {
            near.changed(&e.text);
            assert!(held.indexed.is_some());
            assert_eq!(near.index.lock().len(), 0, "the read copy left");
        });
        assert_eq!(near.get(0, e.at(), &f, Keeper::<u32>::of()), None);
        e.keep(&near, &f, 4u32, LIFE);
        assert_eq!(indexed(), 1);
        near.flush();
        assert_eq!(indexed(), 0, "a flush empties it");
        assert_eq!(near.copies.weight(), 0, "and the weight");
        for i in 0..1000u16 {
            let mut other = e.clone();
            other.hash[..2].copy_from_slice(&i.to_le_bytes());
            other.bytes = Some(i.to_le_bytes().to_vec());
            other.keep(&near, &f, i, LIFE);
        }
        let copies = near.status().copies as usize;
        assert!(copies <= 100, "{copies} copies");
        assert_eq!(indexed(), copies, "evicted copies leave it");
        near.copies.clear(near.gone());
        assert_eq!(indexed(), 0, "removed copies leave it");
    }

    /// The entry bound holds exactly, whatever the byte bound: at the defaults (64 MiB / 100,000
    /// copies is not whole) and with the bytes unbounded (`u64::MAX`, which once wrapped the
    /// weight and stopped eviction).
    #[test]
    fn the_entry_bound_holds_whatever_the_byte_bound() {
        for (entries, bytes) in [(100_000, crate::config::DEFAULT_NEAR_MAX_BYTES), (10, u64::MAX)] {
            let config = crate::CacheConfig::memory().with_near_bounds(entries, bytes);
            let near = NearTier::new(config.near_capacity, config.near_max_bytes);
            near.trust();
            let f = Arc::new(AtomicU64::new(0));
            let base = near.register("p:f:gen:00", "p:f", &Arc::default());
            for i in 0..entries as u32 + 50 {
                let mut hash = [0; 16];
                hash[..4].copy_from_slice(&i.to_le_bytes());
                let e = Entry { base, hash, bytes: Some(i.to_le_bytes().to_vec()), text: String::new() };
                e.keep(&near, &f, i, LIFE);
            }
            assert_eq!(near.status().copies, entries, "at most {entries} copies ({bytes} bytes)");
        }
    }

    #[test]
    fn the_weight_counts_the_copies_kept_and_the_oldest_go_first() {
        // 10 copies at most (the floor, 1 MiB / 10, is above any copy's own weight).
        let (near, f, base) = trusted(10);
        let entry = |i: u8| Entry { base, hash: [i; 16], bytes: Some(vec![i; 20]), text: String::new() };
        let floor = (1u64 << 20) / 10;
        for i in 0..10u8 {
            entry(i).keep(&near, &f, u32::from(i), LIFE);
        }
        assert_eq!(near.copies.weight(), 10 * floor);
        entry(3).keep(&near, &f, 33u32, LIFE); // replaced: weighs the same
        assert_eq!(near.copies.weight(), 10 * floor);
        let answers = |i: u8| near.get(0, entry(i).at(), &f, Keeper::<u32>::of());
        assert_eq!(answers(1), Some(1)); // read: passed over once
        entry(10).keep(&near, &f, 10u32, LIFE); // the oldest, 0, goes
        entry(11).keep(&near, &f, 11u32, LIFE); // then 2, not 1
        entry(12).keep(&near, &f, 12u32, LIFE); // then 4 (3 was kept again, after 9)
        assert_eq!((answers(0), answers(1), answers(2)), (None, Some(1), None));
        assert_eq!((answers(3), answers(4), answers(5)), (Some(33), None, Some(5)));
        assert_eq!((answers(10), answers(11), answers(12)), (Some(10), Some(11), Some(12)));
        // Every other copy read: each is passed over once, and the new copy, not read yet, goes
        // (a scan of new keys does not push out copies in use); the next keep finds the flags
        // cleared, and the oldest goes.
        for i in [1, 3, 5, 6, 7, 8, 9, 10, 11, 12] {
            assert!(answers(i).is_some());
        }
        entry(13).keep(&near, &f, 13u32, LIFE);
        assert_eq!(answers(13), None);
        entry(14).keep(&near, &f, 14u32, LIFE);
        assert_eq!((answers(5), answers(6), answers(14)), (None, Some(6), Some(14)));
        assert_eq!(near.copies.weight(), 10 * floor);
        assert_eq!(near.status().copies, 10);
        // A copy heavier than the whole bound is not kept, and evicts nothing.
        let e = entry(20);
        let ticket = near.ticket(0, e.base, e.hash, &f).unwrap();
        let key = NearKey::new(e.base, e.args().to_owned());
        near.keep(ticket, key, e.hash, &f, 0, Box::new(20u32), 1 << 21, LIFE);
        assert_eq!((answers(20), answers(6), near.status().copies), (None, Some(6), 10));
        assert_eq!(near.index.lock().len(), 10);
        // Replacing the same copies over and over leaves the queue of their order bounded.
        for round in 0..1000u32 {
            entry(5).keep(&near, &f, round, LIFE);
        }
        assert_eq!(near.status().copies, 10);
        assert!(near.copies.queued() <= 2 * 10 + 64, "{} queued", near.copies.queued());
    }

    #[test]
    fn keeps_replacements_drops_and_evictions_from_many_threads_leave_the_counts_exact() {
        let (near, f, base) = trusted(50);
        let entry = |i: u8| Entry {
            base,
            hash: [i; 16],
            bytes: Some(vec![i; 1 + usize::from(i)]),
            text: format!("p:f:{{{}}}", format!("{i:02x}").repeat(16)),
        };
        std::thread::scope(|s| {
            for t in 0..4u32 {
                let (near, f) = (&near, &f);
                s.spawn(move || {
                    for n in 0..5_000u32 {
                        let i = ((n * 7 + t * 13) % 120) as u8;
                        match n % 4 {
                            0 | 1 => entry(i).keep(near, f, n, LIFE),
                            2 => near.changed(&entry(i).text),
                            _ => drop(near.get(0, entry(i).at(), f, Keeper::<u32>::of())),
                        }
                    }
                });
            }
        });
        let copies = near.status().copies;
        assert!(copies <= 50, "{copies} copies");
        assert_eq!(near.copies.weight(), near.copies.summed(), "the weight counted is the copies'");
        assert_eq!(near.index.lock().len() as u64, copies, "one place per copy");
    }

    #[test]
    fn a_change_between_the_ticket_and_the_copy_keeps_nothing() {
        let (near, f, e) = tier();
        let keeper = Keeper::<u32>::of();
        let ticket = near.ticket(0, e.base, e.hash, &f).unwrap();
        near.changed(&e.text); // the notification of a write the lookup may have missed
        e.keep_on(&near, ticket, &f, 0, 1u32, LIFE);
        assert_eq!(near.get(0, e.at(), &f, keeper), None);
        // Without the change, the same sequence keeps the copy.
        e.keep(&near, &f, 1u32, LIFE);
        assert_eq!(near.get(0, e.at(), &f, keeper), Some(1));
    }

    #[test]
    fn untrusted_flushed_and_function_wide_changes_answer_nothing() {
        let (near, f, e) = tier();
        let keeper = Keeper::<u32>::of();
        let keep = |near: &NearTier| {
            e.keep(near, &f, 7u32, LIFE);
            assert_eq!(near.get(0, e.at(), &f, keeper), Some(7));
        };
        keep(&near);
        near.distrust();
        assert_eq!(near.get(0, e.at(), &f, keeper), None);
        assert!(near.ticket(0, e.base, e.hash, &f).is_none(), "nothing is kept while untrusted");
        near.trust();
        keep(&near);
        near.changed(&format!("{}:lease", e.text)); // not an entry: nothing dropped
        assert_eq!(near.get(0, e.at(), &f, keeper), Some(7));
        // A pushed generation change only counts (the caller then holds copies back until the
        // generation is read again: `a_copy_answers_while_its_generation_is_confirmed_and_not_passed`);
        // a function-wide invalidation made here ends them.
        let before = pushed(&near, "p:f:gen:00");
        near.changed("p:f:gen:00");
        assert_eq!(pushed(&near, "p:f:gen:00"), before + 1);
        assert_eq!(near.get(0, e.at(), &f, keeper), Some(7));
        f.fetch_add(1, SeqCst);
        assert_eq!(near.get(0, e.at(), &f, keeper), None);
    }

    /// What `changed` counted for the function with `generation_key`.
    fn pushed(near: &NearTier, generation_key: &str) -> u64 {
        let registry = near.registry.read().unwrap();
        registry.epochs[generation_key].iter().map(|c| c.load(SeqCst)).sum()
    }

    #[test]
    fn two_functions_under_one_generation_key_both_count_its_changes_and_trust_counts_one() {
        let near = NearTier::new(100, 1 << 20);
        let (a, b) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        near.register("p:f:gen:00", "p:f", &a);
        near.register("p:f:gen:00", "p:f", &b); // the same function in another DB
        near.register("p:f:gen:00", "p:f", &a); // registered again: counted once
        near.changed("p:f:gen:00");
        assert_eq!((a.load(SeqCst), b.load(SeqCst)), (1, 1));
        // Tracking (re)started: a change pushed while it was down may be unknown here, so every
        // function reads its generation again.
        near.trust();
        assert_eq!((a.load(SeqCst), b.load(SeqCst)), (2, 2));
    }

    #[test]
    fn a_copy_answers_while_its_generation_is_confirmed_and_not_passed() {
        let (near, f, e) = tier();
        let keeper = Keeper::<u32>::of();
        let ticket = near.ticket(0, e.base, e.hash, &f).unwrap();
        e.keep_on(&near, ticket, &f, 3, 9u32, LIFE);
        let get = |generation| {
            let mut slot = None;
            near.get_into(0, e.at(), &f, generation, keeper, &mut slot);
            slot
        };
        assert_eq!(get(Some(2)), Some(9), "written under a later generation than the one known");
        assert_eq!(get(Some(3)), Some(9));
        assert_eq!(get(Some(4)), None, "a later generation was read: written under an older one");
        assert_eq!(get(None), None, "a pushed change of the generation is unread");
        assert_eq!(get(Some(3)), Some(9), "held back, not dropped");
    }

    #[test]
    fn a_copy_expires_after_its_life_and_a_huge_life_is_no_panic() {
        let (near, f, e) = tier();
        let keeper = Keeper::<u32>::of();
        e.keep(&near, &f, 7u32, Duration::from_millis(30));
        assert_eq!(near.get(0, e.at(), &f, keeper), Some(7));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(near.get(0, e.at(), &f, keeper), None);
        e.keep(&near, &f, 8u32, Duration::MAX);
        assert_eq!(near.get(0, e.at(), &f, keeper), None, "a life past the clock's range keeps nothing");
    }

    #[test]
    fn the_bounds_hold() {
        let (near, f, base) = trusted(10);
        for i in 0..100u8 {
            let e = Entry { base, hash: [i; 16], bytes: Some(vec![i; 20]), text: String::new() };
            e.keep(&near, &f, u32::from(i), LIFE);
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
