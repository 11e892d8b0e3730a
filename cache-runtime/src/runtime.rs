//! The runtime every cached call reads through: the configured backend, its timeouts and the
//! counters. One is installed for the process ([`init`], or read from the environment on first
//! use); [`Runtime::scope`] runs a future against another one (tests, multi-tenant services).

use std::future::Future;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::backend::{Backend, Store};
use crate::config::{BackendKind, CacheConfig, ConfigError};
use crate::flight::Flights;
use crate::functions::Functions;
use crate::invalidate::queue::Pending;
use crate::near::{NearStatus, NearTier};
use crate::spec::Spec;
use crate::stats::{StatsRegistry, StatsSnapshot};

/// A configured cache: backend, timeouts and counters. Cheap to clone (one `Arc`).
///
/// ```
/// use cache_runtime::{cached, db::MarketData, CacheConfig, Runtime};
///
/// #[cached(db = MarketData, prefix = "market", ttl = 300)]
/// async fn quote(symbol: &str) -> f64 {
///     150.25
/// }
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let runtime = Runtime::new(CacheConfig::memory());
/// runtime.scope(async {
///     quote("AAPL").await; // miss: runs the body and fills
///     quote("AAPL").await; // hit
/// }).await;
///
/// let stats = runtime.stats();
/// let market = stats.function(5, "market", "quote").unwrap();
/// assert_eq!((market.hits, market.misses), (1, 1));
/// assert!(runtime.functions().iter().any(|f| f.name == "quote" && f.ttl_seconds == 300));
///
/// // What an operator would do by name: the next call runs the body again.
/// let invalidated = runtime.invalidate_function("quote").await.unwrap();
/// assert_eq!(invalidated.prefix, "market");
/// runtime.scope(quote("AAPL")).await;
/// assert_eq!(runtime.stats().function(5, "market", "quote").unwrap().misses, 2);
///
/// assert_eq!(runtime.backend_kind(), "memory");
/// assert_eq!(runtime.backend_info().await.unwrap().keys.get(&5), Some(&1));
/// runtime.shutdown().await.unwrap(); // flushes what it accepted
/// # });
/// ```
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) backend: Backend,
    pub(crate) op_timeout: Duration,
    pub(crate) lease_ttl: Duration,
    pub(crate) shutdown_timeout: Duration,
    pub(crate) stats: StatsRegistry,
    pub(crate) flights: Arc<Flights>,
    pub(crate) functions: Functions,
    pub(crate) pending: Pending,
    /// Typed copies of values (`near.rs`), used once [`Inner::near_tracked`] says the store tells
    /// it of changes.
    pub(crate) near: Arc<NearTier>,
    near_tracked: OnceLock<bool>,
    description: String,
    config: CacheConfig,
}

static GLOBAL: OnceLock<Runtime> = OnceLock::new();

tokio::task_local! {
    static SCOPED: Runtime;
}

impl Runtime {
    /// Builds a runtime. Nothing connects yet: Redis connections are opened per DB on first use.
    pub fn new(config: CacheConfig) -> Self {
        let description = match &config.backend {
            BackendKind::Memory => "memory".to_owned(),
            BackendKind::Redis(target) => format!("redis at {target}"),
            BackendKind::Cluster(target) => format!("redis cluster at {}", target.address()),
            BackendKind::Sentinel(target) => format!("redis sentinel {}", target.address()),
            BackendKind::Disk(target) => format!("disk at {}", target.dir().display()),
            BackendKind::None => "none (caching disabled)".to_owned(),
        };
        crate::registry::report_conflicts_once();
        let near = Arc::new(NearTier::new(config.near_capacity, config.near_max_bytes));
        let backend = Backend::new(&config, &near);
        let functions = Functions::new(
            backend.keeps_generations_in_process(),
            config.generation_refresh,
            Arc::clone(&near),
        );
        Runtime {
            inner: Arc::new(Inner {
                backend,
                op_timeout: config.op_timeout,
                lease_ttl: config.lease_ttl,
                shutdown_timeout: config.shutdown_timeout,
                stats: StatsRegistry::default(),
                flights: Arc::default(),
                functions,
                pending: Pending::default(),
                near,
                near_tracked: OnceLock::new(),
                description,
                config,
            }),
        }
    }

    /// Builds a runtime from the environment ([`CacheConfig::from_env`]).
    pub fn from_env() -> Result<Self, ConfigError> {
        Ok(Self::new(CacheConfig::from_env()?))
    }

    /// The runtime serving the current task: the one of an enclosing [`Runtime::scope`], else the
    /// process-wide one (initialized from the environment on first use).
    pub fn current() -> Runtime {
        SCOPED.try_with(Runtime::clone).unwrap_or_else(|_| global().clone())
    }

    /// Runs `f` on the current runtime, borrowed (no reference count touched).
    pub(crate) fn with_current<T>(f: impl FnOnce(&Runtime) -> T) -> T {
        let mut f = Some(f);
        match SCOPED.try_with(|runtime| f.take().map(|f| f(runtime))) {
            Ok(Some(done)) => done,
            _ => (f.take().expect("not run when the scope was not there"))(global()),
        }
    }

    /// [`Runtime::current`] without touching the reference count when the process-wide runtime
    /// serves (the hit path).
    pub(crate) fn current_ref() -> Current {
        match SCOPED.try_with(Runtime::clone) {
            Ok(scoped) => Current::Scoped(scoped),
            Err(_) => Current::Global(global()),
        }
    }

    /// Runs `fut` with this runtime serving every cached call made inside it (on this task; a task
    /// spawned inside needs its own `scope`).
    pub async fn scope<F: Future>(&self, fut: F) -> F::Output {
        SCOPED.scope(self.clone(), fut).await
    }

    /// Every `#[cached]` function of the binary ([`registry::functions`](crate::registry::functions)).
    pub fn functions(&self) -> Vec<crate::registry::FunctionInfo> {
        crate::registry::functions()
    }

    /// Invalidates every entry of the cached function named `name` (its path, `module::f` or
    /// `module::Type::f` as [`registry::functions`](crate::registry::functions) lists it, or its
    /// bare name when only one function has it), as `invalidate!(f(..))` would: for operators
    /// and tools that have a name, not the function. Returns what it invalidated.
    pub async fn invalidate_function(
        &self,
        name: &str,
    ) -> Result<crate::registry::FunctionInfo, crate::registry::FindError> {
        let (info, function) = crate::registry::find(name)?;
        let targets = [crate::spec::Target::All(function)];
        self.scope(crate::invalidate::invalidate(&targets)).await;
        Ok(info)
    }

    /// The counters of every DB and prefix used so far.
    pub fn stats(&self) -> StatsSnapshot {
        self.inner.stats.snapshot()
    }

    /// Waits until every cache write this runtime accepted so far has been answered by the
    /// backend (fills are written behind the caller's back, in batches), for at most the
    /// configured `shutdown_timeout` (default 5 s). `Err` says how many were still unanswered.
    /// A write the backend refused or timed out (or the open breaker skipped) is answered too:
    /// counted in the stats (`backend_errors`, `bypassed`), not in the `Err`.
    pub async fn flush(&self) -> Result<(), Unflushed> {
        let left = self.inner.backend.flush(self.inner.shutdown_timeout).await;
        self.unflushed(left)
    }

    /// Flushes every accepted write (within `shutdown_timeout`), then writes fills directly
    /// (before the call returns) from now on. Call it before the process exits;
    /// [`Runtime::shutdown_guard`] does it on drop.
    pub async fn shutdown(&self) -> Result<(), Unflushed> {
        let left = self.inner.backend.shutdown(self.inner.shutdown_timeout).await;
        match self.unflushed(left) {
            Ok(()) => {
                tracing::info!(backend = %self.inner.description, "cache runtime shut down; every accepted write answered (failed ones are counted as backend errors)");
                Ok(())
            }
            Err(e) => {
                tracing::error!(backend = %self.inner.description, unanswered = e.writes, "cache runtime shut down with writes unanswered");
                Err(e)
            }
        }
    }

    fn unflushed(&self, writes: usize) -> Result<(), Unflushed> {
        match writes {
            0 => Ok(()),
            writes => Err(Unflushed { writes, waited: self.inner.shutdown_timeout }),
        }
    }

    /// A guard that shuts this runtime down when dropped: it blocks the dropping thread until the
    /// accepted writes are flushed or `shutdown_timeout` has passed, which a multi-threaded tokio
    /// runtime allows. Where it cannot block (a current-thread runtime, or no runtime), it logs
    /// an error with the number of writes still queued: call [`Runtime::shutdown`] there.
    pub fn shutdown_guard(&self) -> ShutdownGuard {
        ShutdownGuard { runtime: self.clone() }
    }

    /// Whether the circuit breaker is open: cached calls skip the backend until a probe succeeds.
    pub fn breaker_open(&self) -> bool {
        self.inner.backend.breaker_open()
    }

    /// Invalidations that failed (or were interrupted) and are queued for retry.
    pub fn pending_invalidations(&self) -> usize {
        self.inner.pending.len()
    }

    /// Cache writes accepted and not yet answered by the backend.
    pub fn queued_writes(&self) -> usize {
        self.inner.backend.queued()
    }

    /// The configuration it was built with (its `Debug` never shows a password).
    pub fn config(&self) -> &CacheConfig {
        &self.inner.config
    }

    /// What the backend is: `memory at ...`, `redis at host:port/db` (never a password).
    pub fn description(&self) -> &str {
        &self.inner.description
    }

    /// The store's version, memory and keys per DB, asked within `op_timeout` (on Redis, `INFO`
    /// of every primary).
    pub async fn backend_info(&self) -> Result<crate::BackendInfo, crate::BackendError> {
        self.inner.backend.info().await
    }

    /// `memory`, `redis` or `none`.
    pub fn backend_kind(&self) -> &'static str {
        self.inner.backend.kind()
    }

    /// The near tier (typed copies in process): whether it answers now, how many copies it
    /// keeps, how many it dropped because their entry changed.
    pub fn near_status(&self) -> NearStatus {
        self.inner.near.status()
    }

    pub(crate) fn inner(&self) -> &Inner {
        &self.inner
    }
}

impl Inner {
    /// How long `spec`'s function keeps near copies here, if it does: its `near` option, else the
    /// runtime's default (on Redis), else its TTL on the embedded backend (whose every change
    /// the tier hears of at once). Starts the store's notifications on first use.
    pub(crate) fn near_life(&self, spec: &Spec) -> Option<Duration> {
        if !self.config.near {
            return None;
        }
        let life = if !spec.near.is_zero() {
            spec.near
        } else if self.backend.keeps_generations_in_process() {
            spec.ttl
        } else {
            self.config.near_default?
        };
        let tracked = *self.near_tracked.get_or_init(|| {
            let all = self.config.near_default.is_some();
            let tracked = self.backend.track(&self.near, crate::registry::near_prefixes(all));
            if !tracked {
                tracing::info!(backend = self.backend.kind(), "the near tier is not available on this backend: functions with `near` read through it like the others (logged once)");
            }
            tracked
        });
        tracked.then_some(life)
    }
}

/// The runtime serving the current task, borrowed when it is the process-wide one.
pub(crate) enum Current {
    Global(&'static Runtime),
    Scoped(Runtime),
}

impl std::ops::Deref for Current {
    type Target = Runtime;
    fn deref(&self) -> &Runtime {
        match self {
            Current::Global(r) => r,
            Current::Scoped(r) => r,
        }
    }
}

/// Flushes the runtime's accepted writes when dropped (see [`Runtime::shutdown_guard`]).
#[must_use = "the guard flushes when dropped; bind it to a variable that lives until shutdown"]
pub struct ShutdownGuard {
    runtime: Runtime,
}

impl Drop for ShutdownGuard {
    fn drop(&mut self) {
        use tokio::runtime::{Handle, RuntimeFlavor};
        match Handle::try_current() {
            Ok(handle) if handle.runtime_flavor() == RuntimeFlavor::MultiThread => {
                // Bounded by `shutdown_timeout`; an error is logged by `shutdown`.
                let _ = tokio::task::block_in_place(|| handle.block_on(self.runtime.shutdown()));
            }
            _ => {
                let queued = self.runtime.queued_writes();
                if queued > 0 {
                    tracing::error!(queued, "cache runtime dropped where it cannot block: call `shutdown().await` before exiting, or these writes are not made");
                }
            }
        }
    }
}

/// Writes still unanswered when `flush` or `shutdown` gave up waiting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unflushed {
    /// Accepted writes the backend had not answered.
    pub writes: usize,
    /// How long it waited (the runtime's `shutdown_timeout`).
    pub waited: Duration,
}

impl std::fmt::Display for Unflushed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} cache writes were still unanswered after {:?}", self.writes, self.waited)
    }
}

impl std::error::Error for Unflushed {}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime").field("backend", &self.inner.description).finish_non_exhaustive()
    }
}

/// Installs the process-wide runtime. Call it once, before the first cached call; without it the
/// first cached call reads the environment ([`CacheConfig::from_env`]).
///
/// ```
/// let runtime = cache_runtime::init(cache_runtime::CacheConfig::memory())?;
/// assert_eq!(runtime.backend_kind(), "memory");
/// # Ok::<(), cache_runtime::ConfigError>(())
/// ```
pub fn init(config: CacheConfig) -> Result<Runtime, ConfigError> {
    let runtime = Runtime::new(config);
    GLOBAL.set(runtime.clone()).map_err(|_| ConfigError::AlreadyInitialized)?;
    tracing::info!(backend = %runtime.inner.description, "cache runtime initialized");
    Ok(runtime)
}

/// Reads the environment and installs the result; a bad configuration is returned, not logged.
pub fn init_from_env() -> Result<Runtime, ConfigError> {
    init(CacheConfig::from_env()?)
}

/// The process-wide runtime, from the environment if nobody called [`init`]. A bad environment is
/// logged as an error and caching is turned off: cached functions still run, uncached.
pub fn global() -> &'static Runtime {
    GLOBAL.get_or_init(|| match CacheConfig::from_env() {
        Ok(config) => {
            let runtime = Runtime::new(config);
            tracing::info!(backend = %runtime.inner.description, "cache runtime initialized from the environment");
            runtime
        }
        Err(error) => {
            tracing::error!(%error, "cache configuration is invalid; caching is disabled until it is fixed");
            Runtime::new(CacheConfig::disabled())
        }
    })
}
