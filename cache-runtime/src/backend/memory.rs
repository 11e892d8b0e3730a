//! The embedded backend: one moka cache per DB, each entry expiring at its own deadline.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use moka::sync::Cache;
use moka::Expiry;

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

/// Each entry lives until its own `expires_at`, as with `SET ... EX` on Redis.
struct UntilDeadline;

impl Expiry<String, Entry> for UntilDeadline {
    fn expire_after_create(&self, _: &String, entry: &Entry, now: Instant) -> Option<Duration> {
        Some(entry.remaining(now))
    }

    fn expire_after_update(
        &self,
        _: &String,
        entry: &Entry,
        now: Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(entry.remaining(now))
    }
}

pub(crate) struct MemoryBackend {
    capacity: u64,
    dbs: [OnceLock<Cache<String, Entry>>; 16],
    leases: MemoryLeases,
}

impl MemoryBackend {
    pub(crate) fn new(capacity: u64) -> Self {
        MemoryBackend { capacity, dbs: Default::default(), leases: MemoryLeases::default() }
    }

    fn db(&self, db: u8) -> &Cache<String, Entry> {
        self.dbs[usize::from(db & 0x0f)]
            .get_or_init(|| Cache::builder().max_capacity(self.capacity).expire_after(UntilDeadline).build())
    }

    /// A live entry; moka may still hold an expired one until its next maintenance run.
    fn live(&self, db: u8, key: &str) -> Option<Entry> {
        let now = Instant::now();
        self.db(db).get(key).filter(|e| e.expires_at > now)
    }

    pub(crate) fn get_with<T>(&self, db: u8, key: &str, decode: impl FnOnce(&[u8]) -> T) -> Option<T> {
        // moka does not return an entry past its per-entry expiry, so the hit path skips `live`'s
        // clock read (`tests/cached.rs` checks expiry on this backend).
        self.db(db).get(key).map(|e| decode(&e.bytes))
    }

    pub(crate) fn set(&self, db: u8, key: &str, value: &[u8], ttl: Duration) {
        let entry = Entry { bytes: Arc::from(value), expires_at: Instant::now() + ttl };
        self.db(db).insert(key.to_owned(), entry);
    }

    pub(crate) fn delete(&self, db: u8, key: &str) -> bool {
        self.db(db).remove(key).is_some_and(|e| e.expires_at > Instant::now())
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

    pub(crate) fn expire(&self, db: u8, key: &str, ttl: Duration) -> bool {
        match self.live(db, key) {
            Some(mut entry) => {
                entry.expires_at = Instant::now() + ttl;
                self.db(db).insert(key.to_owned(), entry);
                true
            }
            None => false,
        }
    }

    pub(crate) fn ttl(&self, db: u8, key: &str) -> Option<Duration> {
        self.live(db, key).map(|e| e.remaining(Instant::now()))
    }

    pub(crate) fn clear(&self, db: u8, prefix: &str) -> u64 {
        let pattern = format!("{prefix}:");
        let cache = self.db(db);
        let keys: Vec<Arc<String>> =
            cache.iter().filter(|(k, _)| k.starts_with(&pattern)).map(|(k, _)| k).collect();
        for key in &keys {
            cache.invalidate(key.as_str());
        }
        keys.len() as u64
    }
}

/// A fill lease on the embedded backend: the same protocol as the Redis scripts, under one lock.
struct Lease {
    token: u64,
    expires_at: Instant,
}

/// Leases of the embedded backend, and the lock that makes fill and invalidation atomic.
#[derive(Default)]
pub(crate) struct MemoryLeases {
    leases: std::sync::Mutex<std::collections::HashMap<(u8, String), Lease>>,
}

impl MemoryBackend {
    fn leases(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<(u8, String), Lease>> {
        self.leases.leases.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A fresh value (written at `min_generation` or later), else the lease for `token`, else busy.
    pub(crate) fn acquire<T>(
        &self,
        db: u8,
        key: &str,
        ask: super::LeaseAsk,
        decode: impl FnOnce(&[u8]) -> T,
    ) -> super::Acquired<T> {
        let mut leases = self.leases();
        if let Some(entry) = self.live(db, key) {
            if crate::value::generation_of(&entry.bytes).is_some_and(|g| g >= ask.min_generation) {
                return super::Acquired::Value(decode(&entry.bytes));
            }
        }
        let now = Instant::now();
        let slot = (db, key.to_owned());
        if leases.get(&slot).is_some_and(|l| l.expires_at > now) {
            return super::Acquired::Busy;
        }
        leases.insert(slot, Lease { token: ask.token, expires_at: now + ask.ttl });
        super::Acquired::Granted
    }

    /// Writes `value` if the lease for `token` is still held; `false` if it was revoked or expired.
    pub(crate) fn fill(&self, db: u8, key: &str, token: u64, value: &[u8], ttl: Duration) -> bool {
        let mut leases = self.leases();
        let slot = (db, key.to_owned());
        let held = leases.get(&slot).is_some_and(|l| l.token == token && l.expires_at > Instant::now());
        if held {
            leases.remove(&slot);
            self.set(db, key, value, ttl);
        }
        held
    }

    /// Gives the lease up if it is still held by `token`.
    pub(crate) fn release(&self, db: u8, key: &str, token: u64) {
        let mut leases = self.leases();
        let slot = (db, key.to_owned());
        if leases.get(&slot).is_some_and(|l| l.token == token) {
            leases.remove(&slot);
        }
    }

    /// Deletes the entry and revokes its lease, atomically with respect to `fill`.
    pub(crate) fn invalidate(&self, db: u8, key: &str) {
        let mut leases = self.leases();
        leases.remove(&(db, key.to_owned()));
        self.db(db).invalidate(key);
    }
}
