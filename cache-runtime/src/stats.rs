//! Counters per DB, prefix and function: hits, misses, fills, decode failures, backend errors;
//! and the latency histograms each function records through the `metrics` facade (the counters
//! reach it when published, see `telemetry.rs`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// Live counters of one function (or of the `Cache` handles of one prefix: function `""`), and
/// its latency histograms. Cheap to bump from any thread.
#[derive(Debug)]
pub(crate) struct Counters {
    latency: Latency,
    hits: AtomicU64,
    misses: AtomicU64,
    fills: AtomicU64,
    decode_failures: AtomicU64,
    encode_failures: AtomicU64,
    backend_errors: AtomicU64,
    invalidations: AtomicU64,
    invalidation_retries: AtomicU64,
    invalidations_expired: AtomicU64,
    refused_fills: AtomicU64,
    lease_waits: AtomicU64,
    direct_fills: AtomicU64,
    bypassed: AtomicU64,
    key_failures: AtomicU64,
    invalidations_coalesced: AtomicU64,
    renewals: AtomicU64,
    eager_refreshes: AtomicU64,
    stale_served: AtomicU64,
    near_hits: Striped,
}

/// A counter bumped by every near hit, on every worker thread: a near hit is a few hundred
/// nanoseconds, and one shared counter passed its cache line between the cores on each of them
/// (at 64 callers on two workers, that one `lock` instruction was 7 % of the hit path's time).
/// Each thread bumps a stripe of its own, on a line of its own; reading sums them.
#[derive(Debug, Default)]
struct Striped([Padded; STRIPES]);

/// Stripes of a [`Striped`] counter: threads beyond this many share them, still far apart.
const STRIPES: usize = 8;

#[derive(Debug, Default)]
#[repr(align(128))]
struct Padded(AtomicU64);

impl Striped {
    fn add(&self) {
        static THREADS: AtomicUsize = AtomicUsize::new(0);
        thread_local! {
            static STRIPE: usize = THREADS.fetch_add(1, Relaxed) % STRIPES;
        }
        let stripe = STRIPE.try_with(|stripe| *stripe).unwrap_or(0);
        self.0[stripe].0.fetch_add(1, Relaxed);
    }

    fn load(&self) -> u64 {
        self.0.iter().map(|stripe| stripe.0.load(Relaxed)).sum()
    }
}

/// The histograms of one function, registered with the `metrics` recorder installed when the
/// function is first called (the no-op recorder before one is).
struct Latency {
    lookup: ::metrics::Histogram,
    fill: ::metrics::Histogram,
    compute: ::metrics::Histogram,
}

impl std::fmt::Debug for Latency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Latency")
    }
}

macro_rules! zeroed {
    ($latency:expr; $($field:ident),*) => {
        Counters { latency: $latency, $($field: AtomicU64::new(0),)* near_hits: Striped::default() }
    };
}

impl Counters {
    fn new(db: u8, prefix: &str, function: &str) -> Self {
        let labels = crate::telemetry::labels(db, prefix, function);
        let latency = Latency {
            lookup: ::metrics::histogram!(crate::telemetry::LOOKUP_SECONDS, labels.iter()),
            fill: ::metrics::histogram!(crate::telemetry::FILL_SECONDS, labels.iter()),
            compute: ::metrics::histogram!(crate::telemetry::COMPUTE_SECONDS, labels.iter()),
        };
        zeroed!(latency; hits, misses, fills, decode_failures, encode_failures, backend_errors, invalidations,
            invalidation_retries, invalidations_expired, refused_fills, lease_waits, direct_fills, bypassed,
            key_failures, invalidations_coalesced, renewals, eager_refreshes, stale_served)
    }

    /// How long one lookup took the backend (hit or miss).
    pub(crate) fn lookup_took(&self, took: Duration) {
        self.latency.lookup.record(took);
    }
    /// How long the backend took to answer one fill (queueing in the write-behind batcher included).
    pub(crate) fn fill_took(&self, took: Duration) {
        self.latency.fill.record(took);
    }
    /// How long the function ran on a miss.
    pub(crate) fn compute_took(&self, took: Duration) {
        self.latency.compute.record(took);
    }

    pub(crate) fn bypass(&self) {
        self.bypassed.fetch_add(1, Relaxed);
    }
    pub(crate) fn key_failure(&self) {
        self.key_failures.fetch_add(1, Relaxed);
    }
    pub(crate) fn invalidations_coalesced(&self, n: u64) {
        self.invalidations_coalesced.fetch_add(n, Relaxed);
    }
    pub(crate) fn renewal(&self) {
        self.renewals.fetch_add(1, Relaxed);
    }
    pub(crate) fn eager_refresh(&self) {
        self.eager_refreshes.fetch_add(1, Relaxed);
    }
    pub(crate) fn near_hit(&self) {
        self.near_hits.add();
    }
    pub(crate) fn stale(&self) {
        self.stale_served.fetch_add(1, Relaxed);
    }
    pub(crate) fn direct_fill(&self) {
        self.direct_fills.fetch_add(1, Relaxed);
    }
    pub(crate) fn invalidation(&self) {
        self.invalidations.fetch_add(1, Relaxed);
    }
    pub(crate) fn invalidation_retry(&self) {
        self.invalidation_retries.fetch_add(1, Relaxed);
    }
    pub(crate) fn invalidation_expired(&self) {
        self.invalidations_expired.fetch_add(1, Relaxed);
    }
    pub(crate) fn refused_fill(&self) {
        self.refused_fills.fetch_add(1, Relaxed);
    }
    pub(crate) fn lease_wait(&self) {
        self.lease_waits.fetch_add(1, Relaxed);
    }
    pub(crate) fn hit(&self) {
        self.hits.fetch_add(1, Relaxed);
    }
    pub(crate) fn miss(&self) {
        self.misses.fetch_add(1, Relaxed);
    }
    pub(crate) fn fill(&self) {
        self.fills.fetch_add(1, Relaxed);
    }
    pub(crate) fn decode_failure(&self) {
        self.decode_failures.fetch_add(1, Relaxed);
    }
    pub(crate) fn encode_failure(&self) {
        self.encode_failures.fetch_add(1, Relaxed);
    }
    pub(crate) fn backend_error(&self) {
        self.backend_errors.fetch_add(1, Relaxed);
    }
    /// A backend call that failed: `bypassed` when the open breaker refused it (no network),
    /// else a backend error. Not logged here: the breaker logs each episode once.
    pub(crate) fn failed(&self, error: &crate::error::BackendError) {
        if error.is_bypassed() {
            self.bypass();
        } else {
            self.backend_error();
        }
    }

    fn snapshot(&self, db: u8, prefix: &str, function: Option<&str>) -> PrefixStats {
        PrefixStats {
            db,
            prefix: prefix.to_owned(),
            function: function.map(str::to_owned),
            // A near hit counts once, as `near_hits` (one counter touched per hit).
            hits: self.hits.load(Relaxed) + self.near_hits.load(),
            misses: self.misses.load(Relaxed),
            fills: self.fills.load(Relaxed),
            decode_failures: self.decode_failures.load(Relaxed),
            encode_failures: self.encode_failures.load(Relaxed),
            backend_errors: self.backend_errors.load(Relaxed),
            invalidations: self.invalidations.load(Relaxed),
            invalidation_retries: self.invalidation_retries.load(Relaxed),
            invalidations_expired: self.invalidations_expired.load(Relaxed),
            refused_fills: self.refused_fills.load(Relaxed),
            lease_waits: self.lease_waits.load(Relaxed),
            direct_fills: self.direct_fills.load(Relaxed),
            bypassed: self.bypassed.load(Relaxed),
            key_failures: self.key_failures.load(Relaxed),
            invalidations_coalesced: self.invalidations_coalesced.load(Relaxed),
            renewals: self.renewals.load(Relaxed),
            eager_refreshes: self.eager_refreshes.load(Relaxed),
            stale_served: self.stale_served.load(Relaxed),
            near_hits: self.near_hits.load(),
        }
    }
}

/// (prefix, function): the function's name, or `""` for the `Cache` handles of the prefix.
type CountersKey = (String, String);

/// All counters of one runtime, one set per DB, prefix and function.
#[derive(Debug, Default)]
pub(crate) struct StatsRegistry {
    by_db: [RwLock<HashMap<CountersKey, Arc<Counters>, foldhash::fast::RandomState>>; 16],
}

impl StatsRegistry {
    /// The counters for `db`, `prefix` and `function` (`""` for a `Cache` handle), created on
    /// first use.
    pub(crate) fn counters(&self, db: u8, prefix: &str, function: &str) -> Arc<Counters> {
        let map = &self.by_db[usize::from(db & 0x0f)];
        let key = (prefix.to_owned(), function.to_owned());
        if let Some(c) = map.read().unwrap_or_else(|e| e.into_inner()).get(&key) {
            return Arc::clone(c);
        }
        let mut map = map.write().unwrap_or_else(|e| e.into_inner());
        Arc::clone(map.entry(key).or_insert_with(|| Arc::new(Counters::new(db, prefix, function))))
    }

    pub(crate) fn snapshot(&self) -> StatsSnapshot {
        let mut functions = Vec::new();
        for (db, map) in self.by_db.iter().enumerate() {
            let map = map.read().unwrap_or_else(|e| e.into_inner());
            functions.extend(map.iter().map(|((prefix, function), c)| {
                c.snapshot(db as u8, prefix, (!function.is_empty()).then_some(function.as_str()))
            }));
        }
        functions.sort_by(|a, b| (a.db, &a.prefix, &a.function).cmp(&(b.db, &b.prefix, &b.function)));
        let mut entries: Vec<PrefixStats> = Vec::new();
        for f in &functions {
            match entries.last_mut() {
                Some(total) if (total.db, &total.prefix) == (f.db, &f.prefix) => total.add(f),
                _ => entries.push(PrefixStats { function: None, ..f.clone() }),
            }
        }
        StatsSnapshot { entries, functions }
    }
}

/// The counters of one DB and prefix (or of one function of it) at one moment.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct PrefixStats {
    /// DB number.
    pub db: u8,
    /// Key prefix (the `prefix` option of `#[cached]` or of a [`Cache`](crate::Cache) handle).
    pub prefix: String,
    /// In [`StatsSnapshot::functions`], the function's name (`None` for the prefix's
    /// [`Cache`](crate::Cache) handles); `None` in [`StatsSnapshot::entries`], which sum them.
    pub function: Option<String>,
    /// Lookups answered from the cache.
    pub hits: u64,
    /// Calls that ran the function: absent entries, entries that no longer decode, lookups the
    /// backend failed to answer, and calls that skipped the cache (`bypassed`, `key_failures`).
    pub misses: u64,
    /// Values written to the cache.
    pub fills: u64,
    /// Stored values that no longer decode as the function's type (recomputed and overwritten).
    pub decode_failures: u64,
    /// Values that could not be encoded (not cached; the caller still got them).
    pub encode_failures: u64,
    /// Backend calls that failed or timed out.
    pub backend_errors: u64,
    /// Invalidations applied to the backend (first try or a retry).
    pub invalidations: u64,
    /// Invalidation attempts that failed and were queued for another try.
    pub invalidation_retries: u64,
    /// Queued invalidations given up because every entry they covered had expired by then.
    pub invalidations_expired: u64,
    /// Fills refused by the lease protocol: an invalidation revoked their lease (a stale write
    /// prevented), or their lease aged out and the key was filled again since, or the stamp it
    /// was granted under expired (the protocol cannot tell these apart, so none is written).
    pub refused_fills: u64,
    /// Misses that waited for another caller's fill instead of running the function.
    pub lease_waits: u64,
    /// Fills written before the call returned because the write-behind queue was full or shut
    /// down (on Redis; the embedded backend always writes at once and does not count here).
    pub direct_fills: u64,
    /// Calls that skipped the cache because the circuit breaker was open (no network cost).
    pub bypassed: u64,
    /// Calls that ran uncached because an argument failed to serialize into the key.
    pub key_failures: u64,
    /// Single-key invalidations folded into one function-wide invalidation because too many of
    /// one function were queued for retry (the queue's memory bound).
    pub invalidations_coalesced: u64,
    /// Fill leases renewed while a slow function computed.
    pub renewals: u64,
    /// Hits past a function's `eager_refresh` share of the TTL that refreshed the entry (each
    /// also counts as a miss: the caller ran the function).
    pub eager_refreshes: u64,
    /// Calls answered with an entry past its TTL (within `stale_if_error`) because the function
    /// failed (an `Err` or a panic: also a miss), or another caller's computation of it just did
    /// (also a hit).
    pub stale_served: u64,
    /// Hits answered by the near tier (a typed copy in this process; also counted as hits).
    pub near_hits: u64,
}

impl PrefixStats {
    /// Every counter, named as in the metrics (`cache_{name}_total`), in one order.
    pub fn counters(&self) -> [(&'static str, u64); 19] {
        [
            ("hits", self.hits),
            ("misses", self.misses),
            ("fills", self.fills),
            ("decode_failures", self.decode_failures),
            ("encode_failures", self.encode_failures),
            ("backend_errors", self.backend_errors),
            ("invalidations", self.invalidations),
            ("invalidation_retries", self.invalidation_retries),
            ("invalidations_expired", self.invalidations_expired),
            ("refused_fills", self.refused_fills),
            ("lease_waits", self.lease_waits),
            ("direct_fills", self.direct_fills),
            ("bypassed", self.bypassed),
            ("key_failures", self.key_failures),
            ("invalidations_coalesced", self.invalidations_coalesced),
            ("lease_renewals", self.renewals),
            ("eager_refreshes", self.eager_refreshes),
            ("stale_served", self.stale_served),
            ("near_hits", self.near_hits),
        ]
    }

    fn add(&mut self, other: &PrefixStats) {
        self.hits += other.hits;
        self.misses += other.misses;
        self.fills += other.fills;
        self.decode_failures += other.decode_failures;
        self.encode_failures += other.encode_failures;
        self.backend_errors += other.backend_errors;
        self.invalidations += other.invalidations;
        self.invalidation_retries += other.invalidation_retries;
        self.invalidations_expired += other.invalidations_expired;
        self.refused_fills += other.refused_fills;
        self.lease_waits += other.lease_waits;
        self.direct_fills += other.direct_fills;
        self.bypassed += other.bypassed;
        self.key_failures += other.key_failures;
        self.invalidations_coalesced += other.invalidations_coalesced;
        self.renewals += other.renewals;
        self.eager_refreshes += other.eager_refreshes;
        self.stale_served += other.stale_served;
        self.near_hits += other.near_hits;
    }

    /// `hits / (hits + misses)`, or `None` before the first lookup.
    pub fn hit_rate(&self) -> Option<f64> {
        let lookups = self.hits + self.misses;
        (lookups > 0).then(|| self.hits as f64 / lookups as f64)
    }
}

/// Every DB and prefix the runtime has seen, ordered by DB then prefix.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct StatsSnapshot {
    /// One entry per DB and prefix: the sum of its functions and handles.
    pub entries: Vec<PrefixStats>,
    /// One entry per DB, prefix and function (`function: None` for the prefix's `Cache` handles),
    /// ordered by DB, prefix, function.
    pub functions: Vec<PrefixStats>,
}

impl StatsSnapshot {
    /// The counters of one DB and prefix, if it was used.
    pub fn get(&self, db: u8, prefix: &str) -> Option<&PrefixStats> {
        self.entries.iter().find(|e| e.db == db && e.prefix == prefix)
    }

    /// The counters of one function (by name) under one DB and prefix, if it was called.
    pub fn function(&self, db: u8, prefix: &str, function: &str) -> Option<&PrefixStats> {
        self.functions
            .iter()
            .find(|e| e.db == db && e.prefix == prefix && e.function.as_deref() == Some(function))
    }

    /// The hit rate over every DB and prefix.
    pub fn hit_rate(&self) -> Option<f64> {
        let hits: u64 = self.entries.iter().map(|e| e.hits).sum();
        let misses: u64 = self.entries.iter().map(|e| e.misses).sum();
        (hits + misses > 0).then(|| hits as f64 / (hits + misses) as f64)
    }
}
