//! Per-function state of one runtime, found with one lookup per call: the function's counters,
//! and its generation, which is what makes `function(..)` invalidation O(1).
//!
//! Every stored value carries the generation its writer saw (`value.rs`); a lookup treats a value
//! from an older generation as a miss. Invalidating every entry of a function is one write: raise
//! its generation. On Redis the generation lives in `{prefix}:{function}[:vN]:gen:{id}` and this
//! process keeps a copy, read again (in the same round trip as a lookup) once it is older than
//! `generation_refresh`; the process that invalidates sees the new generation at once. On the
//! embedded backend this copy is the generation itself.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, RwLock};

use arc_swap::ArcSwap;
use std::time::{Duration, Instant};

use crate::key;
use crate::near::NearTier;
use crate::spec::{CachedFn, FunctionId, Remembered};
use crate::stats::{Counters, StatsRegistry};

/// One cached function's state in one runtime.
pub(crate) struct Function {
    /// The counters of the function's DB and prefix (shared with other functions of that prefix).
    pub(crate) counters: Arc<Counters>,
    /// Where its generation lives on the backend (`key::generation_key`).
    pub(crate) generation_key: String,
    generation: AtomicU64,
    /// Nanoseconds since `Functions::epoch` when last read from the backend; 0 = never.
    read_at: AtomicU64,
    /// Whether a key failure was logged already (logged once per function, counted always).
    key_failure_logged: AtomicBool,
    /// Whether stale values are being served for it (`stale_if_error`): logged when it starts
    /// and when a computation succeeds again, not per call.
    serving_stale: AtomicBool,
    /// Function-wide invalidations made here: a near copy kept under an older count is dead.
    pub(crate) near_epoch: Arc<AtomicU64>,
    /// Changes of the generation key pushed by Redis (a function-wide invalidation anywhere, or
    /// only its life extended: Redis does not say which). Until a lookup reads the generation
    /// again after the latest, no near copy of the function answers; then those written under
    /// the generation read (or a later one) answer again.
    pub(crate) pushed: Arc<AtomicU64>,
    /// The number of its key base in the near tier (`near::NearKey`).
    pub(crate) near_base: u32,
    /// `pushed` when the generation was last read: a change of it makes the next lookup read the
    /// generation again.
    read_epoch: AtomicU64,
    /// Keys whose function just failed, and until when their stale value answers without trying
    /// the function again (`stale_if_error`'s throttle).
    failed_keys: std::sync::Mutex<HashMap<String, Instant>>,
}

/// The most keys a function remembers as failing; past it, the oldest are forgotten (their next
/// stale read tries the function again).
const MAX_FAILED_KEYS: usize = 10_000;

impl Function {
    /// `true` the first time it is asked: the one key failure of this function to log.
    pub(crate) fn first_key_failure(&self) -> bool {
        !self.key_failure_logged.swap(true, Relaxed)
    }

    /// Records that a stale value was served; `true` when this starts an episode (to log).
    pub(crate) fn stale_served(&self) -> bool {
        !self.serving_stale.swap(true, Relaxed)
    }

    /// Whether `key`'s function failed less than the throttle ago: answer with the stale value.
    pub(crate) fn throttled(&self, key: &str) -> bool {
        let failed = self.failed_keys.lock().unwrap_or_else(|e| e.into_inner());
        failed.get(key).is_some_and(|until| Instant::now() < *until)
    }

    /// Remembers that `key`'s function failed: stale answers without a try for `throttle`.
    pub(crate) fn failed(&self, key: &str, throttle: Duration) {
        let mut failed = self.failed_keys.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if failed.len() >= MAX_FAILED_KEYS {
            failed.retain(|_, until| *until > now);
            if failed.len() >= MAX_FAILED_KEYS {
                failed.clear();
            }
        }
        failed.insert(key.to_owned(), now + throttle);
    }

    /// Forgets a failure of `key` (its function succeeded).
    pub(crate) fn succeeded(&self, key: &str) {
        let mut failed = self.failed_keys.lock().unwrap_or_else(|e| e.into_inner());
        if !failed.is_empty() {
            failed.remove(key);
        }
    }

    /// Records a successful computation; `true` when it ends an episode of stale answers.
    pub(crate) fn recovered(&self) -> bool {
        self.serving_stale.load(Relaxed) && self.serving_stale.swap(false, Relaxed)
    }
}

/// Numbers each runtime's `Functions`, for `spec::Remembered`: an address could be reused.
static RUNTIMES: AtomicU64 = AtomicU64::new(0);

/// Function states by call site (`CachedFn::site`).
type BySite = HashMap<(usize, usize, usize), Arc<Function>, foldhash::fast::RandomState>;

pub(crate) struct Functions {
    /// This runtime's number (`RUNTIMES`).
    id: u64,
    /// The copy is the truth (embedded backend): never read again.
    authoritative: bool,
    refresh: Duration,
    epoch: Instant,
    by_id: RwLock<HashMap<FunctionId, Arc<Function>, foldhash::fast::RandomState>>,
    /// The same states by where a call comes from (`CachedFn::site`): a pointer pair hashes and
    /// compares in a few nanoseconds, the id's strings do not. Several sites may share a state.
    /// Read without a lock or a reference count (`arc_swap`); replaced whole when a site is
    /// added, which happens once per site.
    by_site: ArcSwap<BySite>,
    near: Arc<NearTier>,
}

impl Functions {
    pub(crate) fn new(authoritative: bool, refresh: Duration, near: Arc<NearTier>) -> Self {
        Functions {
            id: RUNTIMES.fetch_add(1, SeqCst),
            authoritative,
            refresh,
            epoch: Instant::now(),
            by_id: RwLock::default(),
            by_site: ArcSwap::default(),
            near,
        }
    }

    /// The state of `function`, created on first use.
    pub(crate) fn get(&self, function: &CachedFn, stats: &StatsRegistry) -> Arc<Function> {
        self.with(function, stats, Arc::clone)
    }

    /// The state of `function` for one call: borrowed from its call site's memo when this runtime
    /// is the one the memo keeps (no reference count touched: a call holds it across awaits), else
    /// shared.
    pub(crate) fn hold(&self, function: &CachedFn, stats: &StatsRegistry) -> Cow<'static, Arc<Function>> {
        match self.remembered(function) {
            Some(state) => Cow::Borrowed(state),
            None => Cow::Owned(self.get(function, stats)),
        }
    }

    /// The state the call site's memo keeps for this runtime, if it does.
    fn remembered(&self, function: &CachedFn) -> Option<&'static Arc<Function>> {
        let known = function.memo()?.0.get()?;
        if known.runtime != self.id || known.site != function.site() {
            return None;
        }
        known.state.downcast_ref::<Arc<Function>>()
    }

    /// Runs `f` on the state of `function` (created on first use), borrowed: no reference count
    /// is touched on the hit path.
    pub(crate) fn with<T>(
        &self,
        function: &CachedFn,
        stats: &StatsRegistry,
        f: impl FnOnce(&Arc<Function>) -> T,
    ) -> T {
        if let Some(state) = self.remembered(function) {
            return f(state);
        }
        let site = function.site();
        let memo = function.memo();
        if let Some(state) = self.by_site.load().get(&site) {
            return f(state);
        }
        let state = self.by_id(function, stats);
        self.by_site.rcu(|sites| {
            let mut sites = HashMap::clone(sites);
            sites.insert(site, Arc::clone(&state));
            sites
        });
        if let Some(memo) = memo {
            // The first runtime to serve the site keeps it; others use the map.
            let _ = memo.0.set(Remembered { runtime: self.id, site, state: Box::new(Arc::clone(&state)) });
        }
        f(&state)
    }

    fn by_id(&self, function: &CachedFn, stats: &StatsRegistry) -> Arc<Function> {
        let id = function.id();
        if let Some(f) = self.by_id.read().unwrap_or_else(|e| e.into_inner()).get(&id) {
            return Arc::clone(f);
        }
        let spec = function.spec();
        let counters = stats.counters(spec.db, spec.prefix, spec.function);
        let generation_key = key::generation_key(function);
        let mut by_id = self.by_id.write().unwrap_or_else(|e| e.into_inner());
        Arc::clone(by_id.entry(id).or_insert_with(|| {
            let pushed = Arc::new(AtomicU64::new(0));
            let near_base = self.near.register(&generation_key, &key::function_base(spec), &pushed);
            Arc::new(Function {
                near_epoch: Arc::new(AtomicU64::new(0)),
                pushed,
                near_base,
                read_epoch: AtomicU64::new(0),
                counters,
                generation_key,
                generation: AtomicU64::new(0),
                read_at: AtomicU64::new(0),
                key_failure_logged: AtomicBool::new(false),
                serving_stale: AtomicBool::new(false),
                failed_keys: std::sync::Mutex::default(),
            })
        }))
    }

    fn now(&self) -> u64 {
        // +1 so that 0 keeps meaning "never read".
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX) + 1
    }

    /// The generation this process knows, and whether it must be read again with this lookup:
    /// when it is older than `generation_refresh`, or a function-wide change was pushed since
    /// it was read (until a read observes it: nothing here marks it seen).
    pub(crate) fn current(&self, f: &Function) -> Known {
        // The count first: a generation read observed with it saw every change pushed before.
        // Then when it was read, before the generation: `observe` stores them in the other
        // order, so a recent read comes with its generation.
        let epoch = f.pushed.load(SeqCst);
        let read_at = f.read_at.load(SeqCst);
        let generation = f.generation.load(SeqCst);
        if self.authoritative {
            return Known { generation, stale: false, epoch };
        }
        let stale = read_at == 0
            || self.now().saturating_sub(read_at) >= self.refresh.as_nanos() as u64
            || f.read_epoch.load(SeqCst) < epoch;
        Known { generation, stale, epoch }
    }

    /// Records a generation read from (or returned by) the backend by a lookup that started at
    /// `known`; returns the one to use.
    pub(crate) fn observe(&self, f: &Function, generation: u64, known: &Known) -> u64 {
        let generation = f.generation.fetch_max(generation, SeqCst).max(generation);
        f.read_epoch.fetch_max(known.epoch, SeqCst);
        f.read_at.store(self.now(), SeqCst);
        generation
    }

    /// The generation known here if it reflects every change of the generation key pushed so
    /// far (a near copy written under it or later may answer); `None` until a lookup has read it
    /// again after the latest.
    #[inline]
    pub(crate) fn confirmed_generation(&self, f: &Function) -> Option<u64> {
        // The count first, then the generation: `observe` stores them in the other order, so a
        // read count that covers the pushed one comes with its generation.
        let pushed = f.pushed.load(SeqCst);
        if !self.authoritative && f.read_epoch.load(SeqCst) < pushed {
            return None;
        }
        Some(f.generation.load(SeqCst))
    }

    /// Raises the generation kept here (embedded backend: this is the invalidation itself).
    pub(crate) fn bump_local(&self, f: &Function) -> u64 {
        f.generation.fetch_add(1, SeqCst) + 1
    }
}

/// What [`Functions::current`] knows.
pub(crate) struct Known {
    pub(crate) generation: u64,
    /// Read the generation again with this lookup.
    pub(crate) stale: bool,
    /// The function's count of pushed generation changes when it was asked.
    pub(crate) epoch: u64,
}
