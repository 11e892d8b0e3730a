//! The embedded backend: one moka cache for every DB, each entry expiring at its own deadline,
//! bounded in bytes and in entries (see [`MemoryBackend::new`]). Leases follow the same protocol
//! as the Redis scripts (`redis/scripts.rs`), under one lock.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use moka::sync::Cache;
use moka::Expiry;

use super::protocol::{Acquired, BackendInfo, FillOutcome, LeaseAsk, Renewal};
use super::store::Store;
use crate::config::CacheConfig;
use crate::error::BackendError;
use crate::near::NearTier;

/// Memory moka charges per entry beyond its key and value bytes (its node, our `Entry`).
const ENTRY_OVERHEAD: u64 = 96;

#[derive(Clone)]
struct Entry {
    bytes: Arc<[u8]>,
    expires_at: Instant,
}

impl Entry {
    fn remaining(&self, now: Instant) -> Duration {
        self.expires_at.saturating_duration_since(now)
    }
}

/// A key of one DB. Looked up by `(db, &str)` without building one (see [`SlotRef`]).
#[derive(Clone, PartialEq, Eq)]
struct Slot {
    db: u8,
    key: Box<str>,
}

/// What a lookup borrows a [`Slot`] as: its DB and key, from a `Slot` or a `(u8, &str)`.
trait SlotRef {
    fn parts(&self) -> (u8, &str);
}

impl SlotRef for Slot {
    fn parts(&self) -> (u8, &str) {
        (self.db, &self.key)
    }
}

impl SlotRef for (u8, &str) {
    fn parts(&self) -> (u8, &str) {
        (self.0, self.1)
    }
}

impl<'a> Borrow<dyn SlotRef + 'a> for Slot {
    fn borrow(&self) -> &(dyn SlotRef + 'a) {
        self
    }
}

impl Hash for dyn SlotRef + '_ {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.parts().hash(state)
    }
}

impl PartialEq for dyn SlotRef + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.parts() == other.parts()
    }
}

impl Eq for dyn SlotRef + '_ {}

impl Hash for Slot {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.parts().hash(state)
    }
}

/// Each entry lives until its own `expires_at`, as with `SET ... PX` on Redis.
struct UntilDeadline;

impl Expiry<Slot, Entry> for UntilDeadline {
    fn expire_after_create(&self, _: &Slot, entry: &Entry, now: Instant) -> Option<Duration> {
        Some(entry.remaining(now))
    }

    fn expire_after_update(
        &self,
        _: &Slot,
        entry: &Entry,
        now: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(entry.remaining(now))
    }
}

pub(crate) struct MemoryBackend {
    entries: Cache<Slot, Entry>,
    leases: Mutex<Leases>,
    /// How long an invalidation is remembered for fills whose lease aged out before it.
    stamp_life: Duration,
    /// The runtime's near tier, told of every change right after it is made (this store is its
    /// notification: nothing else writes here).
    near: Arc<NearTier>,
}

/// A fill lease, as on Redis: the token of its holder and when it expires.
struct Lease {
    token: u64,
    expires_at: Instant,
}

/// Leases and invalidation stamps, under the one lock that makes acquire, renew, fill and
/// invalidate atomic with respect to each other (the Redis scripts' atomicity).
#[derive(Default)]
struct Leases {
    held: HashMap<(u8, String), Lease>,
    /// Each invalidated key's current stamp (a fresh number per invalidation), and when it was set.
    stamps: HashMap<(u8, String), (u64, Instant)>,
    /// Stamps older than `stamp_life` are forgotten when the map reaches this size (then twice the
    /// size left): amortized O(1) per invalidation.
    prune_at: usize,
}

impl Leases {
    fn stamp(&self, slot: &(u8, String)) -> u64 {
        self.stamps.get(slot).map_or(0, |(stamp, _)| *stamp)
    }

    /// Sets a key's stamp (an invalidation's, or a grant's), first forgetting, when the map has
    /// reached `prune_at`, the stamps older than `life` that no fill can still need (a holder
    /// granted under a forgotten stamp is refused, never wrongly written): the map holds about
    /// twice the stamps set within `life` at most.
    fn insert_stamp(&mut self, slot: (u8, String), stamp: u64, now: Instant, life: Duration) {
        if self.stamps.len() >= self.prune_at {
            self.stamps.retain(|_, (_, at)| now.duration_since(*at) < life);
            self.prune_at = (self.stamps.len() * 2).max(1024);
        }
        self.stamps.insert(slot, (stamp, now));
    }
}

impl MemoryBackend {
    /// Bounded by `config.memory_max_bytes()` bytes (key, value and a fixed overhead per entry)
    /// and `config.memory_capacity()` entries over all DBs: each entry weighs at least
    /// `max_bytes / capacity`, so neither bound can be passed. Past either, moka evicts what it
    /// expects to be used least (TinyLFU: a scan of many new keys does not push out a hot set,
    /// though keys seen once may still evict keys seen a few times).
    pub(crate) fn new(config: &CacheConfig, near: &Arc<NearTier>) -> Self {
        let max_bytes = config.memory_max_bytes().max(1);
        let floor = (max_bytes / config.memory_capacity().max(1)).max(1);
        let entries = Cache::builder()
            .max_capacity(max_bytes)
            .weigher(move |slot: &Slot, entry: &Entry| {
                let bytes = slot.key.len() as u64 + entry.bytes.len() as u64 + ENTRY_OVERHEAD;
                u32::try_from(bytes.max(floor)).unwrap_or(u32::MAX)
            })
            .expire_after(UntilDeadline)
            .build();
        MemoryBackend {
            entries,
            leases: Mutex::default(),
            stamp_life: super::protocol::stamp_life(config.lease_ttl()),
            near: {
                near.trust();
                Arc::clone(near)
            },
        }
    }

    fn leases(&self) -> MutexGuard<'_, Leases> {
        self.leases.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn slot(db: u8, key: &str) -> Slot {
        Slot { db, key: key.into() }
    }

    /// A live entry; moka may still hold an expired one until its next maintenance run.
    fn live(&self, db: u8, key: &str) -> Option<Entry> {
        let now = Instant::now();
        self.entries.get(&(db, key) as &dyn SlotRef).filter(|e| e.expires_at > now)
    }

    /// Entries moka holds now (tests check the byte bound with it).
    #[cfg(test)]
    fn weight(&self) -> u64 {
        self.entries.run_pending_tasks();
        self.entries.weighted_size()
    }

    pub(crate) fn get_with<T>(&self, db: u8, key: &str, decode: impl FnOnce(&[u8]) -> T) -> Option<T> {
        // moka does not return an entry past its per-entry expiry, so the hit path skips `live`'s
        // clock read (`tests/cached.rs` checks expiry on this backend).
        self.entries.get(&(db, key) as &dyn SlotRef).map(|e| decode(&e.bytes))
    }

    /// Writes `value`, under the leases lock: every change of an entry is made under it, so that
    /// one that reads the entry first (`expire`) or checks a lease (`fill`) is atomic with
    /// respect to the others.
    pub(crate) fn set(&self, db: u8, key: &str, value: &[u8], ttl: Duration) {
        let _changing = self.leases();
        self.write(db, key, value, ttl);
    }

    /// `set`, with the leases lock held by the caller.
    fn write(&self, db: u8, key: &str, value: &[u8], ttl: Duration) {
        // TTLs are bounded where they come in (`cache_rules::MAX_TTL_SECONDS`); `checked_add`
        // keeps a bad one from panicking here all the same.
        let now = Instant::now();
        let expires_at =
            now.checked_add(ttl).unwrap_or(now + Duration::from_secs(cache_rules::MAX_TTL_SECONDS));
        self.entries.insert(Self::slot(db, key), Entry { bytes: Arc::from(value), expires_at });
        self.near.forget(key);
    }

    pub(crate) fn delete(&self, db: u8, key: &str) -> bool {
        let changing = self.leases();
        let removed = self.entries.remove(&(db, key) as &dyn SlotRef);
        drop(changing);
        self.near.forget(key);
        removed.is_some_and(|e| e.expires_at > Instant::now())
    }

    pub(crate) fn get_many_with<T>(
        &self,
        db: u8,
        keys: &[String],
        decode: impl Fn(&[u8]) -> T,
    ) -> Vec<Option<T>> {
        keys.iter().map(|k| self.get_with(db, k, &decode)).collect()
    }

    pub(crate) fn set_many(&self, db: u8, items: &[(String, Vec<u8>)], ttl: Duration) {
        for (key, value) in items {
            self.set(db, key, value, ttl);
        }
    }

    pub(crate) fn delete_many(&self, db: u8, keys: &[String]) -> u64 {
        keys.iter().filter(|k| self.delete(db, k)).count() as u64
    }

    pub(crate) fn exists(&self, db: u8, key: &str) -> bool {
        self.live(db, key).is_some()
    }

    /// Under the leases lock: a write or invalidation of `key` made meanwhile is not undone by
    /// writing back the bytes read here.
    pub(crate) fn expire(&self, db: u8, key: &str, ttl: Duration) -> bool {
        let _changing = self.leases();
        self.rewrite_ttl(db, key, ttl)
    }

    /// `expire`, with the leases lock held by the caller.
    fn rewrite_ttl(&self, db: u8, key: &str, ttl: Duration) -> bool {
        match self.live(db, key) {
            Some(entry) => {
                self.write(db, key, &entry.bytes, ttl);
                true
            }
            None => false,
        }
    }

    pub(crate) fn ttl(&self, db: u8, key: &str) -> Option<Duration> {
        self.live(db, key).map(|e| e.remaining(Instant::now()))
    }

    /// Removes the prefix's entries, and its leases and invalidation stamps (as `SCAN` + `UNLINK`
    /// does on Redis); how many entries went.
    pub(crate) fn clear(&self, db: u8, prefix: &str) -> u64 {
        let pattern = format!("{prefix}:");
        let mut leases = self.leases();
        let ours = |(d, key): &(u8, String)| *d == db && key.starts_with(&pattern);
        leases.held.retain(|slot, _| !ours(slot));
        leases.stamps.retain(|slot, _| !ours(slot));
        let slots: Vec<Arc<Slot>> = self
            .entries
            .iter()
            .filter(|(slot, _)| slot.db == db && slot.key.starts_with(&pattern))
            .map(|(slot, _)| slot)
            .collect();
        for slot in &slots {
            self.entries.invalidate(slot.as_ref());
        }
        drop(leases);
        self.near.flush();
        slots.len() as u64
    }

    /// A fresh value (written at `min_generation` or later), else the lease for `token`, else busy.
    pub(crate) fn acquire<T>(
        &self,
        db: u8,
        key: &str,
        ask: LeaseAsk,
        decode: impl FnOnce(&[u8]) -> T,
    ) -> Acquired<T> {
        let mut leases = self.leases();
        if let Some(entry) = self.live(db, key) {
            if crate::value::generation_of(&entry.bytes).is_some_and(|g| g >= ask.min_generation) {
                return Acquired::Value(decode(&entry.bytes));
            }
        }
        let now = Instant::now();
        let slot = (db, key.to_owned());
        if leases.held.get(&slot).is_some_and(|l| l.expires_at > now) {
            return Acquired::Busy;
        }
        // A key without a stamp is given one of the grant's own (see `protocol::grant_stamp`).
        let stamp = match leases.stamp(&slot) {
            0 => {
                let stamp = super::protocol::grant_stamp();
                leases.insert_stamp(slot.clone(), stamp, now, self.stamp_life);
                stamp
            }
            stamp => stamp,
        };
        leases.held.insert(slot, Lease { token: ask.token, expires_at: deadline(now, ask.ttl) });
        Acquired::Granted(stamp)
    }

    /// Extends the lease of `token` (see `RENEW` in `redis/scripts.rs`).
    pub(crate) fn renew(&self, db: u8, key: &str, token: u64, grant: u64, ttl: Duration) -> Renewal {
        let mut leases = self.leases();
        let slot = (db, key.to_owned());
        let now = Instant::now();
        // An expired lease is gone, as its key would be on Redis.
        if let Some(lease) = leases.held.get_mut(&slot).filter(|l| l.token == token && l.expires_at > now) {
            lease.expires_at = deadline(now, ttl);
            // A stamp the grant set (even) lives on with the lease, as on Redis (no invalidation
            // came since the grant: it would have removed the lease); an invalidation's is left.
            let current = leases.stamp(&slot);
            if grant != 0 && grant.is_multiple_of(2) && (current == grant || current == 0) {
                let life = self.stamp_life;
                leases.insert_stamp(slot, grant, now, life);
            }
            return Renewal::Renewed;
        }
        if leases.stamp(&slot) != grant {
            return Renewal::Revoked;
        }
        Renewal::Lost
    }

    /// Writes `value` under the lease of `token` (see `FILL` in `redis/scripts.rs`).
    pub(crate) fn fill(
        &self,
        db: u8,
        key: &str,
        token: u64,
        grant: u64,
        value: &[u8],
        ttl: Duration,
    ) -> FillOutcome {
        let mut leases = self.leases();
        let slot = (db, key.to_owned());
        match leases.held.get(&slot) {
            Some(lease) if lease.token == token => {
                leases.held.remove(&slot);
                // The stamp its grant set, if still there, was there for the lease (as on Redis).
                if grant.is_multiple_of(2) && leases.stamp(&slot) == grant {
                    leases.stamps.remove(&slot);
                }
            }
            _ if leases.stamp(&slot) != grant => return FillOutcome::Revoked,
            Some(lease) if lease.expires_at > Instant::now() => return FillOutcome::Superseded,
            _ => {}
        }
        self.write(db, key, value, ttl);
        FillOutcome::Written
    }

    /// Gives the lease up if it is still held by `token`.
    pub(crate) fn release(&self, db: u8, key: &str, token: u64) {
        let mut leases = self.leases();
        let slot = (db, key.to_owned());
        if leases.held.get(&slot).is_some_and(|l| l.token == token) {
            leases.held.remove(&slot);
        }
    }

    /// Deletes the entry, revokes its lease and gives the key a fresh stamp, atomically with
    /// respect to `fill`.
    pub(crate) fn invalidate(&self, db: u8, key: &str) {
        let mut leases = self.leases();
        let slot = (db, key.to_owned());
        leases.held.remove(&slot);
        let now = Instant::now();
        leases.insert_stamp(slot, super::protocol::invalidation_stamp(), now, self.stamp_life);
        self.entries.invalidate(&(db, key) as &dyn SlotRef);
        drop(leases);
        self.near.forget(key);
    }
}

/// The embedded store answers at once: each call is the inherent method of the same name.
impl Store for MemoryBackend {
    fn kind(&self) -> &'static str {
        "memory"
    }
    fn keeps_generations_in_process(&self) -> bool {
        true
    }
    /// Every change here is made through this store, which tells the tier itself.
    fn track(&self, _near: &Arc<NearTier>, _prefixes: Vec<String>) -> bool {
        true
    }
    async fn get_with<T>(
        &self,
        db: u8,
        key: &str,
        decode: impl Fn(&[u8]) -> T,
    ) -> Result<Option<T>, BackendError> {
        Ok(MemoryBackend::get_with(self, db, key, decode))
    }
    async fn get_with_generation<T>(
        &self,
        db: u8,
        key: &str,
        _: &str,
        _: Duration,
        decode: impl Fn(&[u8]) -> T,
    ) -> Result<(Option<T>, Option<u64>), BackendError> {
        Ok((MemoryBackend::get_with(self, db, key, decode), None))
    }
    async fn get_many_with<T>(
        &self,
        db: u8,
        keys: &[String],
        decode: impl Fn(&[u8]) -> T,
    ) -> Result<Vec<Option<T>>, BackendError> {
        Ok(MemoryBackend::get_many_with(self, db, keys, decode))
    }
    async fn set(&self, db: u8, key: &str, value: &[u8], ttl: Duration) -> Result<(), BackendError> {
        MemoryBackend::set(self, db, key, value, ttl);
        Ok(())
    }
    async fn delete(&self, db: u8, key: &str) -> Result<bool, BackendError> {
        Ok(MemoryBackend::delete(self, db, key))
    }
    async fn set_many(&self, db: u8, items: &[(String, Vec<u8>)], ttl: Duration) -> Result<(), BackendError> {
        MemoryBackend::set_many(self, db, items, ttl);
        Ok(())
    }
    async fn delete_many(&self, db: u8, keys: &[String]) -> Result<u64, BackendError> {
        Ok(MemoryBackend::delete_many(self, db, keys))
    }
    async fn exists(&self, db: u8, key: &str) -> Result<bool, BackendError> {
        Ok(MemoryBackend::exists(self, db, key))
    }
    async fn expire(&self, db: u8, key: &str, ttl: Duration) -> Result<bool, BackendError> {
        Ok(MemoryBackend::expire(self, db, key, ttl))
    }
    async fn ttl(&self, db: u8, key: &str) -> Result<Option<Duration>, BackendError> {
        Ok(MemoryBackend::ttl(self, db, key))
    }
    async fn clear(&self, db: u8, prefix: &str) -> Result<u64, BackendError> {
        Ok(MemoryBackend::clear(self, db, prefix))
    }
    async fn ping(&self, _: u8) -> Result<(), BackendError> {
        Ok(())
    }
    async fn info(&self) -> Result<BackendInfo, BackendError> {
        let now = Instant::now();
        let mut info =
            BackendInfo { used_bytes: Some(self.entries.weighted_size()), ..BackendInfo::default() };
        for (slot, entry) in self.entries.iter() {
            if entry.expires_at > now {
                *info.keys.entry(slot.db).or_default() += 1;
            }
        }
        Ok(info)
    }
    async fn acquire<T>(
        &self,
        db: u8,
        key: &str,
        ask: LeaseAsk,
        decode: impl FnOnce(&[u8]) -> T,
    ) -> Result<Acquired<T>, BackendError> {
        Ok(MemoryBackend::acquire(self, db, key, ask, decode))
    }
    async fn renew(
        &self,
        db: u8,
        key: &str,
        token: u64,
        grant: u64,
        lease: Duration,
    ) -> Result<Renewal, BackendError> {
        Ok(MemoryBackend::renew(self, db, key, token, grant, lease))
    }
    async fn fill(
        &self,
        db: u8,
        key: &str,
        (token, grant): (u64, u64),
        value: &[u8],
        ttl: Duration,
    ) -> Result<FillOutcome, BackendError> {
        Ok(MemoryBackend::fill(self, db, key, token, grant, value, ttl))
    }
    async fn release(&self, db: u8, key: &str, token: u64) -> Result<(), BackendError> {
        MemoryBackend::release(self, db, key, token);
        Ok(())
    }
    async fn invalidate(&self, db: u8, key: &str, _: Duration) -> Result<(), BackendError> {
        MemoryBackend::invalidate(self, db, key);
        Ok(())
    }
    async fn bump_generation(&self, _: u8, _: &str, _: Duration) -> Result<Option<u64>, BackendError> {
        // Generations of the embedded store live in the runtime.
        Ok(None)
    }
}

/// `now + ttl`, or `now` + the longest TTL for a `ttl` past what an `Instant` holds (callers bound
/// TTLs where they come in; this keeps a bad one from panicking all the same).
fn deadline(now: Instant, ttl: Duration) -> Instant {
    now.checked_add(ttl).unwrap_or_else(|| now + Duration::from_secs(cache_rules::MAX_TTL_SECONDS))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn near() -> Arc<NearTier> {
        Arc::new(NearTier::new(10, 1 << 20))
    }

    /// `set` on one thread, `expire` of the same key on another: a value read right after its
    /// `set` returned is that value or a later one, never an older one that `expire` read and
    /// wrote back. In the same run, `expire`'s body without the lock does write one back.
    #[test]
    fn an_expire_never_writes_back_an_older_value() {
        fn older_values_seen(m: &Arc<MemoryBackend>, locked: bool, limit: Duration) -> (u32, u32) {
            let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let expirer = {
                let (m, stop) = (Arc::clone(m), Arc::clone(&stop));
                std::thread::spawn(move || {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        if locked {
                            m.expire(5, "k", Duration::from_secs(60));
                        } else {
                            m.rewrite_ttl(5, "k", Duration::from_secs(60));
                        }
                    }
                })
            };
            let (started, mut older, mut writes) = (Instant::now(), 0, 0u32);
            while started.elapsed() < limit && (locked || older == 0) {
                writes += 1;
                m.set(5, "k", &writes.to_be_bytes(), Duration::from_secs(60));
                let read = m.get_with(5, "k", |b| u32::from_be_bytes(b.try_into().unwrap())).unwrap();
                older += u32::from(read < writes);
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            expirer.join().unwrap();
            (older, writes)
        }
        let m = Arc::new(MemoryBackend::new(&CacheConfig::memory(), &near()));
        let (older, writes) = older_values_seen(&m, false, Duration::from_secs(10));
        assert!(older > 0, "the race did not show without the lock in {writes} writes");
        let (older, writes) = older_values_seen(&m, true, Duration::from_secs(1));
        assert_eq!(older, 0, "{older} of {writes} reads saw an older value");
    }

    /// A holder whose lease an invalidation revoked fills after the invalidation's stamp was
    /// forgotten (past its life, pruned by later invalidations): the key has no stamp then, which
    /// must not read as the one its lease was granted under.
    #[test]
    fn a_fill_after_a_forgotten_invalidation_stamp_is_refused() {
        let lease = Duration::from_millis(100);
        let m = MemoryBackend::new(&CacheConfig::memory().with_lease_ttl(lease), &near());
        // A grant sets a stamp of its own; its fill removes it.
        let first = LeaseAsk { token: 6, ttl: lease, min_generation: 0 };
        let Acquired::Granted(grant) = m.acquire(5, "j", first, |_| ()) else { panic!("the lease is free") };
        assert_eq!(m.leases().stamp(&(5, "j".to_owned())), grant);
        assert_eq!(m.fill(5, "j", 6, grant, b"[0,1]", Duration::from_secs(60)), FillOutcome::Written);
        assert_eq!(m.leases().stamp(&(5, "j".to_owned())), 0, "left behind by a fill");
        let ask = LeaseAsk { token: 7, ttl: lease, min_generation: 0 };
        let Acquired::Granted(grant) = m.acquire(5, "k", ask, |_| ()) else { panic!("the lease is free") };
        m.invalidate(5, "k");
        std::thread::sleep(super::super::protocol::stamp_life(lease) + Duration::from_millis(100));
        for i in 0..1100 {
            m.invalidate(5, &format!("other{i}"));
        }
        assert_eq!(m.leases().stamp(&(5, "k".to_owned())), 0, "the stamp was forgotten");
        assert_eq!(m.fill(5, "k", 7, grant, b"[0,1]", Duration::from_secs(60)), FillOutcome::Revoked);
    }

    /// Leases given back without a fill (an `Err`, a `None`) leave their grants' stamps; those
    /// past their life are forgotten as new ones are set, invalidations or not.
    #[test]
    fn stamps_left_by_grants_are_forgotten_past_their_life() {
        let lease = Duration::from_millis(100);
        let m = MemoryBackend::new(&CacheConfig::memory().with_lease_ttl(lease), &near());
        let grant_and_release = |round: u32| {
            for i in 0..2000 {
                let key = format!("r{round}:{i}");
                let ask = LeaseAsk { token: 9, ttl: lease, min_generation: 0 };
                assert!(matches!(m.acquire(5, &key, ask, |_| ()), Acquired::Granted(_)));
                m.release(5, &key, 9);
            }
        };
        grant_and_release(0);
        std::thread::sleep(super::super::protocol::stamp_life(lease) + Duration::from_millis(100));
        grant_and_release(1);
        let held = m.leases().stamps.len();
        assert!(held <= 2100, "{held} stamps for 4,000 grants, half of them past their life");
    }

    #[test]
    fn bounded_in_bytes() {
        // 8 MiB for 100,000 entries: 64 values of 1 MiB cannot all stay.
        let config = CacheConfig::memory().with_memory_max_bytes(8 << 20);
        let m = MemoryBackend::new(&config, &near());
        let value = vec![7u8; 1 << 20];
        for i in 0..64 {
            m.set(5, &format!("big:{i}"), &value, Duration::from_secs(60));
        }
        let weight = m.weight();
        assert!(weight <= 8 << 20, "held {weight} bytes");
        assert!(weight >= 4 << 20, "kept too little: {weight} bytes");
    }

    #[test]
    fn bounded_in_entries() {
        let config = CacheConfig::memory().with_memory_capacity(100);
        let m = MemoryBackend::new(&config, &near());
        for i in 0..1000 {
            m.set(5, &format!("k:{i}"), b"v", Duration::from_secs(60));
        }
        m.entries.run_pending_tasks();
        let count = m.entries.entry_count();
        assert!((50..=100).contains(&count), "{count} entries");
    }

    #[test]
    fn duration_max_does_not_panic() {
        let m = MemoryBackend::new(&CacheConfig::memory(), &near());
        m.set(5, "k", b"v", Duration::MAX);
        assert!(m.exists(5, "k"));
    }

    #[test]
    fn aged_lease_fills_unless_invalidated() {
        let m = MemoryBackend::new(&CacheConfig::memory(), &near());
        let ask = |token| LeaseAsk { token, ttl: Duration::from_millis(1), min_generation: 0 };
        let Acquired::Granted(at) = m.acquire(5, "a", ask(1), |_| ()) else { panic!("granted") };
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(m.renew(5, "a", 1, at, Duration::from_secs(1)), Renewal::Lost, "aged, not taken back");
        assert_eq!(m.fill(5, "a", 1, at, b"[0,1]", Duration::from_secs(9)), FillOutcome::Written);
        m.invalidate(5, "b");
        let Acquired::Granted(at) = m.acquire(5, "b", ask(2), |_| ()) else { panic!("granted") };
        std::thread::sleep(Duration::from_millis(5));
        m.invalidate(5, "b");
        assert_eq!(m.fill(5, "b", 2, at, b"[0,1]", Duration::from_secs(9)), FillOutcome::Revoked);
        assert_eq!(m.renew(5, "b", 2, at, Duration::from_secs(1)), Renewal::Revoked);
    }
}
