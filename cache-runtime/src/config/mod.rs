//! What the runtime connects to: built in code ([`CacheConfig`]) or read from the environment the
//! Python services already use ([`CacheConfig::from_env`]).

use std::fmt;
use std::time::Duration;

pub(crate) mod targets;

pub use self::targets::{ClusterTarget, DiskTarget, RedisTarget, SentinelTarget, DEFAULT_DISK_MAX_SIZE};

/// Default bound on each backend call. A cached call makes at most two before its function runs
/// (the lookup and the lease request), so a failing server costs it at most twice this.
pub const DEFAULT_OP_TIMEOUT: Duration = Duration::from_millis(250);
/// Default bound on opening a connection.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_millis(250);
/// Default number of entries the embedded backend keeps (over all DBs) before evicting.
pub const DEFAULT_MEMORY_CAPACITY: u64 = 100_000;
/// Default bound on the embedded backend's memory, in bytes (keys, values and a fixed overhead
/// per entry, over all DBs): 256 MiB. `CACHE_MAX_SIZE` sets it.
pub const DEFAULT_MEMORY_MAX_BYTES: u64 = 256 << 20;
/// Default consecutive server failures that open the circuit breaker.
pub const DEFAULT_BREAKER_THRESHOLD: u32 = 5;
/// Default time the breaker stays open before one probe call decides.
pub const DEFAULT_BREAKER_COOLDOWN: Duration = Duration::from_millis(500);
/// Default delay after which an acknowledged invalidation is checked again on Cluster and
/// Sentinel (see [`CacheConfig::with_invalidation_recheck`]).
pub const DEFAULT_INVALIDATION_RECHECK: Duration = Duration::from_secs(2);
/// Default bound on `flush`, `shutdown` and the shutdown guard.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);
/// The most connections per DB `with_pool_size` and `CACHE_POOL_SIZE` take; more are taken as this.
pub const MAX_POOL_SIZE: usize = 64;
/// The longest write-behind queue per DB (and largest batch) `with_batching` takes.
pub const MAX_BATCH_QUEUE: usize = 1 << 20;
/// The longest any duration setting may be: longer ones are taken as this (so no caller-supplied
/// duration, `Duration::MAX` included, can overflow the arithmetic done with it).
pub const MAX_SETTING: Duration = Duration::from_secs(86_400);
/// Default connections per DB. One multiplexed connection pipelines every concurrent command;
/// `cargo run --release -p cache-bench --example bench` measures 1 against more (see README).
pub const DEFAULT_POOL_SIZE: usize = 1;
/// Default most fills per pipeline.
pub const DEFAULT_BATCH_MAX: usize = 256;
/// Default wait for more fills before writing a batch.
pub const DEFAULT_BATCH_DELAY: Duration = Duration::ZERO;
/// Default fills queued per DB before callers write directly.
pub const DEFAULT_BATCH_QUEUE: usize = 16_384;
/// Default life of a fill lease: how long one caller may compute a missing value while the others
/// (in every process) wait for it, and so the longest they wait if it never finishes.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(5);
/// Default bound on how stale this process's copy of a function's generation may be (Redis only):
/// how soon another process's `function(..)` invalidation is seen here.
pub const DEFAULT_GENERATION_REFRESH: Duration = Duration::from_millis(100);

/// Which store serves the cache.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum BackendKind {
    /// The embedded in-process backend (moka): no server, per-entry TTL, not shared between
    /// processes.
    Memory,
    /// A Redis server, one pooled client per DB number.
    Redis(RedisTarget),
    /// A Redis Cluster (DB 0 only: each DB marker gets a key namespace of its own).
    Cluster(ClusterTarget),
    /// A Redis primary found through Sentinel, followed across failovers.
    Sentinel(SentinelTarget),
    /// A SQLite file on local disk, shared by the processes of one machine, kept across restarts.
    Disk(DiskTarget),
    /// No caching: every call runs the function.
    None,
}

/// The runtime's configuration. Build it with [`CacheConfig::memory`], [`CacheConfig::redis`],
/// [`CacheConfig::disabled`] or [`CacheConfig::from_env`], then adjust with the `with_*` methods.
///
/// ```
/// use std::time::Duration;
/// use cache_runtime::CacheConfig;
///
/// let config = CacheConfig::redis("redis://:secret@127.0.0.1:6379")?
///     .with_op_timeout(Duration::from_millis(100));
/// assert!(!format!("{config:?}").contains("secret"));
/// # Ok::<(), cache_runtime::ConfigError>(())
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct CacheConfig {
    pub(crate) backend: BackendKind,
    pub(crate) op_timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) memory_capacity: u64,
    pub(crate) memory_max_bytes: u64,
    pub(crate) lease_ttl: Duration,
    pub(crate) generation_refresh: Duration,
    pub(crate) pool_size: usize,
    pub(crate) coalesce_reads: bool,
    pub(crate) sentinel_announcements: bool,
    pub(crate) batch_max: usize,
    pub(crate) batch_delay: Duration,
    pub(crate) batch_queue: usize,
    pub(crate) retry_on_timeout: bool,
    pub(crate) breaker_threshold: u32,
    pub(crate) breaker_cooldown: Duration,
    pub(crate) shutdown_timeout: Duration,
    pub(crate) key_namespace: String,
    pub(crate) invalidation_recheck: Duration,
    pub(crate) near: bool,
    pub(crate) near_default: Option<Duration>,
    pub(crate) near_capacity: u64,
    pub(crate) near_max_bytes: u64,
}

/// How many typed copies the near tier keeps by default.
pub const DEFAULT_NEAR_CAPACITY: u64 = 100_000;
/// How many bytes (encoded size) the near tier keeps by default: 64 MiB.
pub const DEFAULT_NEAR_MAX_BYTES: u64 = 64 << 20;

/// The most bytes `with_near_bounds` takes (1 PiB); more are taken as this, so that the copies'
/// weights add up far from `u64`'s end.
pub const MAX_NEAR_BYTES: u64 = 1 << 50;

/// A duration setting, bounded up front (see [`MAX_SETTING`]).
fn bounded(d: Duration) -> Duration {
    d.min(MAX_SETTING)
}

/// The settings as read back; each one is documented on its `with_*` method.
impl CacheConfig {
    /// Which store serves the cache.
    pub fn backend(&self) -> &BackendKind {
        &self.backend
    }
    /// Bound on each backend call.
    pub fn op_timeout(&self) -> Duration {
        self.op_timeout
    }
    /// Bound on opening a connection.
    pub fn connect_timeout(&self) -> Duration {
        self.connect_timeout
    }
    /// Most entries the embedded backend keeps.
    pub fn memory_capacity(&self) -> u64 {
        self.memory_capacity
    }
    /// Most bytes the embedded backend keeps.
    pub fn memory_max_bytes(&self) -> u64 {
        self.memory_max_bytes
    }
    /// The near tier: whether it is on, its default life for functions without `near` (on
    /// Redis), and its bounds (copies, bytes).
    pub fn near(&self) -> (bool, Option<Duration>, u64, u64) {
        (self.near, self.near_default, self.near_capacity, self.near_max_bytes)
    }
    /// Life of a fill lease between renewals.
    pub fn lease_ttl(&self) -> Duration {
        self.lease_ttl
    }
    /// How long a function's generation is trusted before it is read again.
    pub fn generation_refresh(&self) -> Duration {
        self.generation_refresh
    }
    /// Multiplexed connections per DB.
    pub fn pool_size(&self) -> usize {
        self.pool_size
    }
    /// Whether lookups are coalesced under load (see `with_read_coalescing`).
    pub fn read_coalescing(&self) -> bool {
        self.coalesce_reads
    }
    /// Whether the sentinels' `+switch-master` announcements are listened to (see
    /// `with_sentinel_announcements`).
    pub fn sentinel_announcements(&self) -> bool {
        self.sentinel_announcements
    }
    /// Most fills per pipeline, wait for more, and fills queued per DB.
    pub fn batching(&self) -> (usize, Duration, usize) {
        (self.batch_max, self.batch_delay, self.batch_queue)
    }
    /// Whether a timed-out lookup is tried once more.
    pub fn retry_on_timeout(&self) -> bool {
        self.retry_on_timeout
    }
    /// Consecutive failures that open the breaker (0: never), and its cool-down.
    pub fn breaker(&self) -> (u32, Duration) {
        (self.breaker_threshold, self.breaker_cooldown)
    }
    /// Bound on `flush`, `shutdown` and the shutdown guard.
    pub fn shutdown_timeout(&self) -> Duration {
        self.shutdown_timeout
    }
    /// How long after an acknowledged invalidation it is checked again (Cluster, Sentinel).
    pub fn invalidation_recheck(&self) -> Duration {
        self.invalidation_recheck
    }
    /// What every key on a Redis deployment starts with (empty: nothing).
    pub fn key_namespace(&self) -> &str {
        &self.key_namespace
    }
}

impl CacheConfig {
    fn with_backend(backend: BackendKind) -> Self {
        CacheConfig {
            backend,
            op_timeout: DEFAULT_OP_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            memory_capacity: DEFAULT_MEMORY_CAPACITY,
            memory_max_bytes: DEFAULT_MEMORY_MAX_BYTES,
            lease_ttl: DEFAULT_LEASE_TTL,
            generation_refresh: DEFAULT_GENERATION_REFRESH,
            pool_size: DEFAULT_POOL_SIZE,
            coalesce_reads: true,
            sentinel_announcements: true,
            batch_max: DEFAULT_BATCH_MAX,
            batch_delay: DEFAULT_BATCH_DELAY,
            batch_queue: DEFAULT_BATCH_QUEUE,
            retry_on_timeout: false,
            breaker_threshold: DEFAULT_BREAKER_THRESHOLD,
            breaker_cooldown: DEFAULT_BREAKER_COOLDOWN,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            key_namespace: String::new(),
            invalidation_recheck: DEFAULT_INVALIDATION_RECHECK,
            near: true,
            near_default: None,
            near_capacity: DEFAULT_NEAR_CAPACITY,
            near_max_bytes: DEFAULT_NEAR_MAX_BYTES,
        }
    }

    /// The embedded in-process backend.
    pub fn memory() -> Self {
        Self::with_backend(BackendKind::Memory)
    }

    /// A Redis server at `url`: `redis://[user:password@]host:port`, `rediss://...` for TLS, or
    /// `redis+sentinel://[user:password@]host:port,.../master` for a primary behind Sentinel.
    pub fn redis(url: &str) -> Result<Self, ConfigError> {
        if url.trim_start().starts_with("redis+sentinel://") {
            return Ok(Self::with_backend(BackendKind::Sentinel(SentinelTarget::from_url(url.trim())?)));
        }
        Ok(Self::with_backend(BackendKind::Redis(RedisTarget::from_url(url)?)))
    }

    /// The disk backend in `dir` (see [`DiskTarget`]; `with_disk_max_size` bounds it).
    pub fn disk(dir: impl Into<std::path::PathBuf>) -> Self {
        Self::with_backend(BackendKind::Disk(DiskTarget::new(dir)))
    }

    /// The most bytes the disk backend's entries may take (see [`DiskTarget::with_max_size`]);
    /// no effect on other backends.
    pub fn with_disk_max_size(mut self, bytes: u64) -> Self {
        if let BackendKind::Disk(target) = self.backend {
            self.backend = BackendKind::Disk(target.with_max_size(bytes));
        }
        self
    }

    /// A Redis Cluster, discovered from any of `nodes` (`host:port`, `redis://...` or
    /// `rediss://...`; see [`ClusterTarget::new`]).
    pub fn cluster<S: AsRef<str>>(nodes: &[S]) -> Result<Self, ConfigError> {
        Ok(Self::with_backend(BackendKind::Cluster(ClusterTarget::new(nodes, false)?)))
    }

    /// The primary the `sentinels` (`host:port` each) know as `master`.
    pub fn sentinel<S: AsRef<str>>(sentinels: &[S], master: &str) -> Result<Self, ConfigError> {
        Ok(Self::with_backend(BackendKind::Sentinel(SentinelTarget::new(sentinels, master)?)))
    }

    /// Trusts the CA certificates in the PEM file at `path` (instead of the system roots) for TLS
    /// connections. Read now: a missing or empty file is an error here. Also `REDIS_CA_CERT`.
    pub fn with_ca_cert(mut self, path: &str) -> Result<Self, ConfigError> {
        let ca = targets::CaCert::read(path)?;
        match &mut self.backend {
            BackendKind::Redis(target) => target.set_ca(ca),
            BackendKind::Cluster(target) => target.set_ca(ca),
            BackendKind::Sentinel(target) => target.set_ca(ca),
            BackendKind::Memory | BackendKind::Disk(_) | BackendKind::None => {}
        }
        Ok(self)
    }

    /// Sets how long after an acknowledged invalidation it is checked again on Cluster and
    /// Sentinel (at most [`MAX_SETTING`]; zero: never). Replication is asynchronous: a primary can
    /// acknowledge an invalidation and fail before its replica has it, and the promoted replica
    /// would serve the old entry. The check applies the invalidation again if it is missing.
    /// Behind Sentinel it first asks every sentinel where the primary is (each within
    /// `connect_timeout`; once a majority answered, the others only as long again as it took,
    /// plus 50 ms; one round serves the checks acknowledged before it began), so that an
    /// invalidation taken by a primary demoted while alive is applied on the new one; zero turns
    /// that off too. See README, "An invalidation acknowledged by a primary that dies before
    /// replicating it".
    pub fn with_invalidation_recheck(mut self, delay: Duration) -> Self {
        self.invalidation_recheck = bounded(delay);
        self
    }

    /// Puts every key this runtime reads or writes on a Redis deployment under `namespace:`, so
    /// that several environments (or test runs) share one server or cluster without sharing
    /// entries. Lowercase letters, digits, `-`, `_` and `.`, at most 64. Also
    /// `CACHE_KEY_NAMESPACE`. Empty (the default): keys as README's key format gives them.
    pub fn with_key_namespace(mut self, namespace: &str) -> Result<Self, ConfigError> {
        let ok = namespace.len() <= 64
            && namespace.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b));
        if !ok {
            return Err(ConfigError::InvalidValue {
                variable: "CACHE_KEY_NAMESPACE",
                value: namespace.to_owned(),
                expected: "at most 64 lowercase letters, digits, '-', '_' or '.'",
            });
        }
        self.key_namespace = namespace.to_owned();
        Ok(self)
    }

    /// No caching at all.
    pub fn disabled() -> Self {
        Self::with_backend(BackendKind::None)
    }

    /// Sets the bound on each backend call (at least 1 ms, at most [`MAX_SETTING`]). A call that
    /// takes longer counts as a backend error and the cached function runs as if it had missed.
    pub fn with_op_timeout(mut self, timeout: Duration) -> Self {
        self.op_timeout = bounded(timeout).max(Duration::from_millis(1));
        self
    }

    /// Sets the bound on opening a connection (at most [`MAX_SETTING`]), and behind Sentinel on
    /// each sentinel's answer.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = bounded(timeout).max(Duration::from_millis(1));
        self
    }

    /// Sets the life of a fill lease between renewals (at least 10 ms, at most [`MAX_SETTING`]).
    /// Its holder renews it every third of this while the function runs, so a function of any
    /// duration keeps it; a holder that dies or hangs loses it after this (see README, "Stampedes
    /// and leases").
    pub fn with_lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = bounded(ttl).max(Duration::from_millis(10));
        self
    }

    /// Sets how long this process trusts its copy of a function's generation before reading it
    /// again with the next lookup (same round trip). Zero reads it with every lookup.
    pub fn with_generation_refresh(mut self, refresh: Duration) -> Self {
        self.generation_refresh = bounded(refresh);
        self
    }

    /// Sets the circuit breaker: `threshold` consecutive server failures open it (0 turns it
    /// off), and it stays open `cooldown` before one probe call decides (see README, "Failure
    /// model").
    pub fn with_breaker(mut self, threshold: u32, cooldown: Duration) -> Self {
        self.breaker_threshold = threshold;
        self.breaker_cooldown = bounded(cooldown);
        self
    }

    /// Sets the bound on `flush`, `shutdown` and the shutdown guard (at most [`MAX_SETTING`]).
    pub fn with_shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown_timeout = bounded(timeout);
        self
    }

    /// Sets the number of multiplexed connections per DB (1 to [`MAX_POOL_SIZE`]).
    pub fn with_pool_size(mut self, connections: usize) -> Self {
        self.pool_size = connections.clamp(1, MAX_POOL_SIZE);
        self
    }

    /// Sets whether lookups on one Redis server (or the primary behind Sentinel) are coalesced
    /// under load (on by default). A lookup that finds fewer than 8 of its connection's lookups
    /// in flight is sent at once, one `GET`; one that finds more opens a batch, and the lookups
    /// made before the batch's task next runs go with it, one `MGET`. Off, every lookup is its
    /// own `GET`. Cluster never coalesces (README, "Connections").
    pub fn with_read_coalescing(mut self, on: bool) -> Self {
        self.coalesce_reads = on;
        self
    }

    /// Sets whether, behind Sentinel, the runtime listens to each sentinel's `+switch-master`
    /// announcements (on by default): one subscription per sentinel, started once the first
    /// primary is found. When one names a new primary for this master, every sentinel is asked
    /// where the primary is (as before an invalidation's recheck) and the connections move to
    /// the newest answer, if a majority answered and it is not older than one taken, so a process
    /// that only reads, and its near copies, follows a failover without waiting for a call to
    /// fail. Off, the primary is asked for only on first use, after a failed call, when the near
    /// tier's tracking connection cannot reach the primary, and before a recheck.
    pub fn with_sentinel_announcements(mut self, on: bool) -> Self {
        self.sentinel_announcements = on;
        self
    }

    /// Behind Sentinel: the password the sentinels themselves ask for (their `requirepass`), and
    /// the ACL user it belongs to if not `default`. The primary's own credentials are another
    /// pair (`redis+sentinel://user:password@...`, `REDIS_USERNAME`, `REDIS_PASSWORD`). Every
    /// question to the sentinels and every subscription to their announcements authenticates
    /// with it. Also `REDIS_SENTINEL_USERNAME` and `REDIS_SENTINEL_PASSWORD`. No effect on other
    /// backends.
    pub fn with_sentinel_credentials(mut self, username: Option<&str>, password: &str) -> Self {
        if let BackendKind::Sentinel(target) = &mut self.backend {
            target.set_sentinel_credentials(username.map(str::to_owned), password.to_owned());
        }
        self
    }

    /// Behind Sentinel: whether the primary the sentinels name is reached over TLS (off by
    /// default), trusting the CA of [`Self::with_ca_cert`] if one is given, else the system
    /// roots. The sentinels themselves are [`Self::with_sentinel_tls`]. Also `REDIS_TLS`. No
    /// effect on other backends (a `rediss://` URL or Cluster node says TLS there).
    pub fn with_primary_tls(mut self, on: bool) -> Self {
        if let BackendKind::Sentinel(target) = &mut self.backend {
            target.set_tls(on);
        }
        self
    }

    /// Behind Sentinel: whether the sentinels are reached over TLS (off by default), trusting
    /// the CA of [`Self::with_ca_cert`] if one is given, else the system roots. TLS to the
    /// primary is its own setting ([`Self::with_primary_tls`]). Also `REDIS_SENTINEL_TLS`. No
    /// effect on other backends.
    pub fn with_sentinel_tls(mut self, on: bool) -> Self {
        if let BackendKind::Sentinel(target) = &mut self.backend {
            target.set_sentinel_tls(on);
        }
        self
    }

    /// Sets the write-behind batcher: most fills per pipeline, wait for more, queue per DB (0
    /// turns write-behind off: every fill is written before the call returns).
    pub fn with_batching(mut self, max: usize, delay: Duration, queue: usize) -> Self {
        self.batch_max = max.clamp(1, MAX_BATCH_QUEUE);
        self.batch_delay = bounded(delay);
        self.batch_queue = queue.min(MAX_BATCH_QUEUE);
        self
    }

    /// Whether a lookup that timed out is tried once more.
    pub fn with_retry_on_timeout(mut self, retry: bool) -> Self {
        self.retry_on_timeout = retry;
        self
    }

    /// Applies a documented preset (see [`Environment`]) to the timeouts, pool and queue.
    pub fn for_environment(mut self, environment: Environment) -> Self {
        match environment {
            Environment::Development => {
                self.op_timeout = Duration::from_secs(1);
                self.connect_timeout = Duration::from_secs(1);
                self.pool_size = 1;
                self.batch_queue = 1024;
            }
            Environment::Production => {
                self.op_timeout = DEFAULT_OP_TIMEOUT;
                self.connect_timeout = DEFAULT_CONNECT_TIMEOUT;
                self.pool_size = DEFAULT_POOL_SIZE;
                self.batch_queue = DEFAULT_BATCH_QUEUE;
                self.retry_on_timeout = false;
            }
        }
        self
    }

    /// Sets how many entries the embedded backend keeps, over all DBs (at least 1).
    pub fn with_memory_capacity(mut self, entries: u64) -> Self {
        self.memory_capacity = entries.max(1);
        self
    }

    /// Sets how many bytes the embedded backend keeps, over all DBs: keys, values and about 100
    /// bytes per entry (at least 1 KiB). Also `CACHE_MAX_SIZE`.
    pub fn with_memory_max_bytes(mut self, bytes: u64) -> Self {
        self.memory_max_bytes = bytes.max(1024);
        self
    }

    /// Turns the near tier on (the default) or off. Off, no value is kept in process as a typed
    /// copy: every hit reads the backend (and decodes), whatever a function's `near` option says.
    pub fn with_near(mut self, on: bool) -> Self {
        self.near = on;
        self
    }

    /// Keeps near copies on Redis for every cached function whose value type is
    /// `Clone + Send + Sync + 'static` (and whose `#[cached]` is not in a generic function),
    /// each for at most `life`, as if each had `near = life`; a function's own `near` option wins.
    /// Without it (the default) only functions with the option keep copies on Redis. Bounded at
    /// [`MAX_SETTING`].
    pub fn with_near_default(mut self, life: Duration) -> Self {
        self.near_default = (!life.is_zero()).then(|| bounded(life));
        self
    }

    /// Sets how many copies the near tier keeps (at least 1) and how many bytes (their encoded
    /// size and 128 bytes each, the key's share included; at least 1 KiB, at most
    /// [`MAX_NEAR_BYTES`]: `u64::MAX` bounds by entries alone).
    pub fn with_near_bounds(mut self, entries: u64, bytes: u64) -> Self {
        self.near_capacity = entries.max(1);
        self.near_max_bytes = bytes.clamp(1024, MAX_NEAR_BYTES);
        self
    }

    /// Reads the variables the services already use:
    ///
    /// | variable | meaning |
    /// |---|---|
    /// | `CACHE_ENABLED` | `false`/`0`/`no`/`off` turns caching off |
    /// | `CACHE_BACKEND` | `memory`, `disk`, `redis`, `cluster`, `sentinel` or `none` (case-insensitive) |
    /// | `CACHE_DIR`, `CACHE_MAX_SIZE` | with `disk`: the directory (required) and the bound in bytes (default 1 GiB) |
    /// | `REDIS_URL` | `redis://[user:password@]host:port`, `rediss://...` (TLS), `redis+sentinel://host:port,.../master` |
    /// | `REDIS_HOST`, `REDIS_PORT` | used when `REDIS_URL` is unset |
    /// | `REDIS_USERNAME`, `REDIS_PASSWORD` | the ACL user and its password (one server, Cluster, and Sentinel's primary; each over a URL's own) |
    /// | `REDIS_TLS` | `true`: TLS with `REDIS_HOST`, Cluster nodes given as `host:port`, and Sentinel's primary; an error with a `redis://` `REDIS_URL` (write `rediss://`) |
    /// | `REDIS_CA_CERT` | a PEM file of CA certificates trusted instead of the system roots |
    /// | `REDIS_CLUSTER_NODES` | `host:port,host:port,...`: Redis Cluster |
    /// | `REDIS_SENTINELS`, `REDIS_SENTINEL_MASTER` | `host:port,...` and the primary's name: Sentinel |
    /// | `REDIS_SENTINEL_USERNAME`, `REDIS_SENTINEL_PASSWORD` | what the sentinels themselves ask for ([`CacheConfig::with_sentinel_credentials`]) |
    /// | `REDIS_SENTINEL_TLS` | `true`: TLS to the sentinels ([`CacheConfig::with_sentinel_tls`]) |
    /// | `CACHE_KEY_NAMESPACE` | what every key on Redis starts with ([`CacheConfig::with_key_namespace`]) |
    /// | `CACHE_OP_TIMEOUT_MS` | bound on each backend call, in milliseconds |
    /// | `CACHE_POOL_SIZE` | multiplexed connections per DB (Redis) |
    /// | `CACHE_MAX_SIZE` | bytes the embedded backend keeps |
    /// | `CACHE_BREAKER_THRESHOLD` | consecutive failures that open the breaker (0: off) |
    /// | `CACHE_BREAKER_COOLDOWN_MS` | how long it stays open before a probe |
    /// | `CACHE_SHUTDOWN_TIMEOUT_MS` | bound on flush and shutdown |
    /// | `CACHE_ENV` | `development` or `production` preset ([`Environment`]) |
    ///
    /// With no `CACHE_BACKEND`, Cluster serves when `REDIS_CLUSTER_NODES` is set, else Sentinel
    /// when `REDIS_SENTINELS` is, else one Redis when `REDIS_URL` or `REDIS_HOST` is, and the
    /// embedded backend otherwise. `CACHE_BACKEND=redis` with neither set means
    /// `redis://127.0.0.1:6379`.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok().filter(|v| !v.trim().is_empty()))
    }

    /// [`Self::from_env`] over any source of variables (tests use a map).
    pub fn from_lookup(var: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        if let Some(enabled) = var("CACHE_ENABLED") {
            match enabled.trim().to_ascii_lowercase().as_str() {
                "false" | "0" | "no" | "off" => return Self::disabled().with_env_timeout(&var),
                "true" | "1" | "yes" | "on" => {}
                _ => {
                    return Err(ConfigError::InvalidValue {
                        variable: "CACHE_ENABLED",
                        value: enabled,
                        expected: "true or false",
                    })
                }
            }
        }
        let username = var("REDIS_USERNAME");
        let password = var("REDIS_PASSWORD");
        let tls = env_flag(&var, "REDIS_TLS")?;
        let sentinel_tls = env_flag(&var, "REDIS_SENTINEL_TLS")?;
        let redis_url = || -> Result<Option<String>, ConfigError> {
            if let Some(url) = var("REDIS_URL") {
                return Ok(Some(url));
            }
            let Some(host) = var("REDIS_HOST") else {
                return Ok(None);
            };
            let port = var("REDIS_PORT").unwrap_or_else(|| "6379".to_owned());
            if !matches!(port.trim().parse::<u16>(), Ok(1..)) {
                return Err(ConfigError::InvalidValue {
                    variable: "REDIS_PORT",
                    value: port,
                    expected: "a port number, 1 to 65535",
                });
            }
            // The user and password are not written into the URL: they are set on it below, as
            // on a `REDIS_URL`, as given (no escaping to get right). An IPv6 address is written
            // in brackets, as a URL needs it.
            let scheme = if tls { "rediss" } else { "redis" };
            let host = host.trim();
            let host = if host.contains(':') && !host.starts_with('[') {
                format!("[{host}]")
            } else {
                host.to_owned()
            };
            Ok(Some(format!("{scheme}://{host}:{}", port.trim())))
        };
        let cluster = || -> Result<Option<Self>, ConfigError> {
            let Some(nodes) = var("REDIS_CLUSTER_NODES") else { return Ok(None) };
            let nodes: Vec<&str> = nodes.split(',').map(str::trim).filter(|n| !n.is_empty()).collect();
            let mut target = ClusterTarget::new(&nodes, tls)?;
            target.set_credentials(username.clone(), password.clone());
            Ok(Some(Self::with_backend(BackendKind::Cluster(target))))
        };
        let sentinel = || -> Result<Option<Self>, ConfigError> {
            let Some(sentinels) = var("REDIS_SENTINELS") else { return Ok(None) };
            let sentinels: Vec<&str> =
                sentinels.split(',').map(str::trim).filter(|n| !n.is_empty()).collect();
            let master = var("REDIS_SENTINEL_MASTER").unwrap_or_default();
            let mut target = SentinelTarget::new(&sentinels, &master)?;
            target.set_credentials(username.clone(), password.clone());
            target.set_tls(tls);
            Ok(Some(Self::with_backend(BackendKind::Sentinel(target))))
        };
        let config = match var("CACHE_BACKEND").map(|b| b.trim().to_ascii_lowercase()) {
            None => match (cluster()?, sentinel()?) {
                (Some(config), _) | (None, Some(config)) => config,
                (None, None) => match redis_url()? {
                    Some(url) => Self::redis(&url)?,
                    None => Self::memory(),
                },
            },
            Some(b) if b == "memory" => Self::memory(),
            Some(b) if b == "none" => Self::disabled(),
            Some(b) if b == "disk" => {
                let dir = var("CACHE_DIR").filter(|d| !d.trim().is_empty()).ok_or(ConfigError::InvalidValue {
                    variable: "CACHE_DIR",
                    value: String::new(),
                    expected: "a directory (CACHE_BACKEND=disk keeps its file there)",
                })?;
                let config = Self::disk(dir.trim());
                match var("CACHE_MAX_SIZE") {
                    None => config,
                    Some(size) => match size.trim().parse::<u64>() {
                        Ok(bytes) if bytes > 0 => config.with_disk_max_size(bytes),
                        _ => {
                            return Err(ConfigError::InvalidValue {
                                variable: "CACHE_MAX_SIZE",
                                value: size,
                                expected: "a number of bytes, more than 0",
                            })
                        }
                    },
                }
            }
            Some(b) if b == "redis" => {
                let local = if tls { "rediss://127.0.0.1:6379" } else { "redis://127.0.0.1:6379" };
                Self::redis(&redis_url()?.unwrap_or_else(|| local.to_owned()))?
            }
            Some(b) if b == "cluster" => cluster()?.ok_or(ConfigError::InvalidValue {
                variable: "REDIS_CLUSTER_NODES",
                value: String::new(),
                expected: "host:port,host:port,... (CACHE_BACKEND=cluster needs the nodes)",
            })?,
            Some(b) if b == "sentinel" => match sentinel()? {
                Some(config) => config,
                None => match redis_url()? {
                    Some(url) if url.starts_with("redis+sentinel://") => Self::redis(&url)?,
                    _ => {
                        return Err(ConfigError::InvalidValue {
                            variable: "REDIS_SENTINELS",
                            value: String::new(),
                            expected: "host:port,... with REDIS_SENTINEL_MASTER, or REDIS_URL=redis+sentinel://... (CACHE_BACKEND=sentinel needs them)",
                        })
                    }
                },
            },
            Some(other) => {
                return Err(ConfigError::InvalidValue {
                    variable: "CACHE_BACKEND",
                    value: other,
                    expected: "memory, disk, redis, cluster, sentinel or none",
                })
            }
        };
        // A `redis+sentinel://` URL takes the user, password and TLS of the environment too,
        // and the sentinels' own.
        let config = match config.backend {
            BackendKind::Sentinel(mut target) => {
                target.set_credentials(username.clone(), password.clone());
                if tls {
                    target.set_tls(true);
                }
                match (var("REDIS_SENTINEL_USERNAME"), var("REDIS_SENTINEL_PASSWORD")) {
                    (username, Some(password)) => target.set_sentinel_credentials(username, password),
                    (Some(_), None) => {
                        return Err(ConfigError::InvalidValue {
                            variable: "REDIS_SENTINEL_PASSWORD",
                            value: String::new(),
                            expected: "the sentinels' password: REDIS_SENTINEL_USERNAME is set without it, and a user is only sent with a password",
                        })
                    }
                    (None, None) => {}
                }
                if sentinel_tls {
                    target.set_sentinel_tls(true);
                }
                CacheConfig { backend: BackendKind::Sentinel(target), ..config }
            }
            // `REDIS_URL` (or `REDIS_HOST`) takes the user and password of the environment as
            // well, as the other deployments do; `REDIS_TLS` cannot turn a `redis://` URL, which
            // says plain TCP, into TLS, and is not ignored either.
            BackendKind::Redis(mut target) => {
                if tls && target.is_plain_tcp() {
                    return Err(ConfigError::InvalidValue {
                        variable: "REDIS_TLS",
                        value: var("REDIS_TLS").unwrap_or_default(),
                        expected: "false, or unset, with a plain-TCP REDIS_URL (redis://): for TLS write rediss:// in REDIS_URL",
                    });
                }
                if password.is_some() && target.info.redis_settings().password().is_some() {
                    tracing::info!("REDIS_PASSWORD is set: it is used over the password in REDIS_URL");
                }
                target.set_credentials(username.clone(), password.clone());
                CacheConfig { backend: BackendKind::Redis(target), ..config }
            }
            _ => config,
        };
        // A user is only sent with a password (the client sends no `AUTH` without one): a
        // `REDIS_USERNAME` with no password anywhere would be dropped in silence, and the
        // connections made as the default user.
        let user_without_password = match &config.backend {
            BackendKind::Redis(target) => target.info.redis_settings().password().is_none(),
            BackendKind::Cluster(target) => target.password.is_none(),
            BackendKind::Sentinel(target) => target.password.is_none(),
            _ => false,
        };
        // `default` without a password is what the connections are made as anyway.
        let named_user = username.as_deref().is_some_and(|user| user.trim() != "default");
        if named_user && user_without_password {
            return Err(ConfigError::InvalidValue {
                variable: "REDIS_PASSWORD",
                value: String::new(),
                expected: "the user's password (in REDIS_PASSWORD or the URL; any one for a `nopass` user): REDIS_USERNAME is set without one, and a user is only sent with a password",
            });
        }
        let config = match var("REDIS_CA_CERT") {
            Some(path) => config.with_ca_cert(path.trim())?,
            None => config,
        };
        let config = match var("CACHE_KEY_NAMESPACE") {
            Some(namespace) => config.with_key_namespace(namespace.trim())?,
            None => config,
        };
        let config = match var("CACHE_ENV").map(|e| e.trim().to_ascii_lowercase()) {
            None => config,
            Some(e) if e == "development" || e == "dev" => config.for_environment(Environment::Development),
            Some(e) if e == "production" || e == "prod" => config.for_environment(Environment::Production),
            Some(other) => {
                return Err(ConfigError::InvalidValue {
                    variable: "CACHE_ENV",
                    value: other,
                    expected: "development or production",
                })
            }
        };
        config.with_env_timeout(&var)
    }

    /// The numeric settings: `CACHE_OP_TIMEOUT_MS`, `CACHE_POOL_SIZE`, `CACHE_MAX_SIZE`,
    /// `CACHE_BREAKER_THRESHOLD`, `CACHE_BREAKER_COOLDOWN_MS`, `CACHE_SHUTDOWN_TIMEOUT_MS`.
    fn with_env_timeout(mut self, var: &impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let number =
            |variable: &'static str, min: u64, expected: &'static str| -> Result<Option<u64>, ConfigError> {
                match var(variable) {
                    None => Ok(None),
                    Some(v) => match v.trim().parse::<u64>() {
                        Ok(n) if n >= min => Ok(Some(n)),
                        _ => Err(ConfigError::InvalidValue { variable, value: v, expected }),
                    },
                }
            };
        let positive = |variable, expected| number(variable, 1, expected);
        if let Some(bytes) = positive("CACHE_MAX_SIZE", "a whole number of bytes greater than 0")? {
            self = self.with_memory_max_bytes(bytes);
        }
        let threshold =
            number("CACHE_BREAKER_THRESHOLD", 0, "a whole number of failures (0 turns the breaker off)")?;
        let cooldown =
            positive("CACHE_BREAKER_COOLDOWN_MS", "a whole number of milliseconds greater than 0")?;
        if threshold.is_some() || cooldown.is_some() {
            let threshold =
                threshold.map_or(self.breaker_threshold, |t| u32::try_from(t).unwrap_or(u32::MAX));
            let cooldown = cooldown.map_or(self.breaker_cooldown, Duration::from_millis);
            self = self.with_breaker(threshold, cooldown);
        }
        if let Some(ms) =
            positive("CACHE_SHUTDOWN_TIMEOUT_MS", "a whole number of milliseconds greater than 0")?
        {
            self = self.with_shutdown_timeout(Duration::from_millis(ms));
        }
        if let Some(ms) = positive("CACHE_OP_TIMEOUT_MS", "a whole number of milliseconds greater than 0")? {
            self = self.with_op_timeout(Duration::from_millis(ms));
        }
        if let Some(n) = positive("CACHE_POOL_SIZE", "a whole number of connections greater than 0")? {
            self = self.with_pool_size(usize::try_from(n).unwrap_or(usize::MAX));
        }
        Ok(self)
    }
}

/// A variable that is `true` or `false` (also `1`/`0`, `yes`/`no`, `on`/`off`); unset is
/// `false`.
fn env_flag(var: &impl Fn(&str) -> Option<String>, variable: &'static str) -> Result<bool, ConfigError> {
    match var(variable).map(|t| t.trim().to_ascii_lowercase()) {
        None => Ok(false),
        Some(t) if matches!(t.as_str(), "true" | "1" | "yes" | "on") => Ok(true),
        Some(t) if matches!(t.as_str(), "false" | "0" | "no" | "off") => Ok(false),
        Some(other) => Err(ConfigError::InvalidValue { variable, value: other, expected: "true or false" }),
    }
}

/// Presets for [`CacheConfig::for_environment`] (also `CACHE_ENV=development|production`).
///
/// | preset | op timeout | connect timeout | pool per DB | batch queue per DB |
/// |---|---|---|---|---|
/// | development | 1 s | 1 s | 1 | 1,024 |
/// | production (the defaults) | 250 ms | 250 ms | 1 | 16,384 |
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Environment {
    /// A laptop or a shared dev server: lenient timeouts, little memory.
    Development,
    /// Services under load: tight timeouts so a slow Redis costs little.
    Production,
}

/// Configuration that cannot be used. Reported when the runtime is built, never later.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// The Redis URL does not parse (the password, if any, is replaced by `***`).
    InvalidRedisUrl {
        /// The URL, redacted.
        url: String,
        /// What the parser said.
        reason: String,
    },
    /// An environment variable holds a value the runtime does not understand.
    InvalidValue {
        /// The variable's name.
        variable: &'static str,
        /// What it held.
        value: String,
        /// What it may hold.
        expected: &'static str,
    },
    /// [`crate::init`] was called after a runtime was already installed.
    AlreadyInitialized,
    /// The CA certificate file (`REDIS_CA_CERT`, [`CacheConfig::with_ca_cert`]) cannot be used.
    CaCert {
        /// The file.
        path: String,
        /// Why not.
        reason: String,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::InvalidRedisUrl { url, reason } => {
                write!(f, "invalid Redis URL `{url}`: {reason} (expected redis://[user:password@]host:port, rediss://... or redis+sentinel://host:port,.../master)")
            }
            ConfigError::InvalidValue { variable, value, expected } => {
                write!(f, "{variable}=`{value}` is not valid: expected {expected}")
            }
            ConfigError::CaCert { path, reason } => {
                write!(f, "REDIS_CA_CERT `{path}` cannot be used: {reason} (expected a PEM file of CA certificates)")
            }
            ConfigError::AlreadyInitialized => write!(
                f,
                "the cache runtime is already initialized (cache_runtime::init runs once, before the first cached call)"
            ),
        }
    }
}

impl std::error::Error for ConfigError {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn from(vars: &[(&str, &str)]) -> Result<CacheConfig, ConfigError> {
        let map: HashMap<String, String> = vars.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        CacheConfig::from_lookup(|name| map.get(name).cloned())
    }

    #[test]
    fn nothing_configured_means_memory() {
        assert!(matches!(from(&[]).unwrap().backend, BackendKind::Memory));
    }

    #[test]
    fn an_ipv6_redis_host_is_bracketed_and_port_0_refused() {
        for host in ["::1", "[::1]"] {
            let config = from(&[("REDIS_HOST", host), ("REDIS_PORT", "6380")]).unwrap();
            match config.backend {
                BackendKind::Redis(target) => {
                    assert_eq!(target.info.addr(), &redis::ConnectionAddr::Tcp("::1".into(), 6380), "{host}")
                }
                other => panic!("expected redis, got {other:?}"),
            }
        }
        for port in ["0", "65536", "x"] {
            let error = from(&[("REDIS_HOST", "h"), ("REDIS_PORT", port)]).unwrap_err().to_string();
            assert!(error.contains("REDIS_PORT") && error.contains("1 to 65535"), "{error}");
        }
    }

    #[test]
    fn a_user_without_a_password_is_refused() {
        let alone: [&[(&str, &str)]; 4] = [
            &[("REDIS_HOST", "h")],
            &[("REDIS_URL", "redis://h:6379")],
            &[("REDIS_CLUSTER_NODES", "h:7000")],
            &[("REDIS_SENTINELS", "h:26379"), ("REDIS_SENTINEL_MASTER", "m")],
        ];
        for vars in alone {
            let mut vars = vars.to_vec();
            vars.push(("REDIS_USERNAME", "app"));
            let error = from(&vars).unwrap_err().to_string();
            assert!(
                error.contains("REDIS_PASSWORD") && error.contains("REDIS_USERNAME"),
                "{vars:?}: {error}"
            );
            vars.push(("REDIS_PASSWORD", "pw"));
            assert!(from(&vars).is_ok(), "{vars:?}");
        }
        // The URL's password serves the environment's user; `default` needs none.
        assert!(from(&[("REDIS_URL", "redis://:pw@h:6379"), ("REDIS_USERNAME", "app")]).is_ok());
        assert!(from(&[("REDIS_HOST", "h"), ("REDIS_USERNAME", "default")]).is_ok());
    }

    #[test]
    fn redis_host_without_backend_means_redis() {
        let config = from(&[("REDIS_HOST", "10.1.2.3"), ("REDIS_PORT", "6380")]).unwrap();
        match config.backend {
            BackendKind::Redis(target) => assert_eq!(target.address(), "10.1.2.3:6380"),
            other => panic!("expected redis, got {other:?}"),
        }
    }

    #[test]
    fn cache_enabled_false_wins() {
        let config = from(&[("CACHE_ENABLED", "false"), ("REDIS_URL", "redis://x:1")]).unwrap();
        assert!(matches!(config.backend, BackendKind::None));
    }

    #[test]
    fn numeric_settings_and_presets() {
        let c =
            from(&[("CACHE_POOL_SIZE", "3"), ("CACHE_OP_TIMEOUT_MS", "80"), ("CACHE_ENV", "dev")]).unwrap();
        assert_eq!(
            (c.pool_size, c.op_timeout),
            (3, Duration::from_millis(80)),
            "explicit values win over the preset"
        );
        assert!(from(&[("CACHE_POOL_SIZE", "0")]).unwrap_err().to_string().contains("CACHE_POOL_SIZE"));
        assert!(from(&[("CACHE_ENV", "staging")]).is_err());
        let dev = from(&[("CACHE_ENV", "development")]).unwrap();
        assert_eq!(dev.op_timeout, Duration::from_secs(1));
    }

    #[test]
    fn unknown_backend_is_an_error() {
        let err = from(&[("CACHE_BACKEND", "memcached")]).unwrap_err();
        assert!(err.to_string().contains("memory, disk, redis, cluster, sentinel or none"), "{err}");
    }

    #[test]
    fn disk_takes_its_directory_and_bound() {
        let config =
            from(&[("CACHE_BACKEND", "Disk"), ("CACHE_DIR", "/var/cache/svc"), ("CACHE_MAX_SIZE", "5000")])
                .unwrap();
        let BackendKind::Disk(target) = &config.backend else { panic!("{config:?}") };
        assert_eq!((target.dir(), target.max_size()), (std::path::Path::new("/var/cache/svc"), 5000));
        let default = from(&[("CACHE_BACKEND", "disk"), ("CACHE_DIR", "/tmp/c")]).unwrap();
        assert!(matches!(&default.backend, BackendKind::Disk(t) if t.max_size() == DEFAULT_DISK_MAX_SIZE));
        let err = from(&[("CACHE_BACKEND", "disk")]).unwrap_err();
        assert!(err.to_string().starts_with("CACHE_DIR=``"), "{err}");
        for bad in ["0", "-1", "1GB"] {
            let err = from(&[("CACHE_BACKEND", "disk"), ("CACHE_DIR", "/tmp/c"), ("CACHE_MAX_SIZE", bad)])
                .unwrap_err();
            assert!(err.to_string().contains("a number of bytes, more than 0"), "{err}");
        }
    }

    #[test]
    fn cluster_nodes_select_cluster_with_the_users_credentials() {
        let config = from(&[
            ("REDIS_CLUSTER_NODES", "10.0.0.1:7000, 10.0.0.2:7001,"),
            ("REDIS_USERNAME", "cache"),
            ("REDIS_PASSWORD", "s3cret"),
            ("REDIS_URL", "redis://ignored:1"),
        ])
        .unwrap();
        let BackendKind::Cluster(target) = &config.backend else { panic!("{config:?}") };
        assert_eq!(target.address(), "10.0.0.1:7000,10.0.0.2:7001");
        assert_eq!((target.username.as_deref(), target.password.as_deref()), (Some("cache"), Some("s3cret")));
        assert!(!target.tls);
        assert!(!format!("{config:?}").contains("s3cret"));
        let tls = from(&[("REDIS_CLUSTER_NODES", "a:1"), ("REDIS_TLS", "true")]).unwrap();
        assert!(matches!(&tls.backend, BackendKind::Cluster(t) if t.tls));
        let url = from(&[("CACHE_BACKEND", "cluster"), ("REDIS_CLUSTER_NODES", "rediss://u:p@a:1")]).unwrap();
        assert!(
            matches!(&url.backend, BackendKind::Cluster(t) if t.tls && t.username.as_deref() == Some("u"))
        );
        let err = from(&[("CACHE_BACKEND", "cluster")]).unwrap_err();
        assert!(err.to_string().contains("REDIS_CLUSTER_NODES"), "{err}");
    }

    #[test]
    fn sentinels_select_sentinel() {
        let config = from(&[
            ("REDIS_SENTINELS", "h1:26379,h2:26380"),
            ("REDIS_SENTINEL_MASTER", "cache"),
            ("REDIS_PASSWORD", "pw"),
        ])
        .unwrap();
        let BackendKind::Sentinel(target) = &config.backend else { panic!("{config:?}") };
        assert_eq!(target.address(), "cache@h1:26379,h2:26380");
        assert_eq!(target.password.as_deref(), Some("pw"));
        assert!(!format!("{config:?}").contains("pw\""));
        let url = from(&[("REDIS_URL", "redis+sentinel://app:p%40ss@h1:26379,h2:26379/cache")]).unwrap();
        let BackendKind::Sentinel(target) = &url.backend else { panic!("{url:?}") };
        assert_eq!((target.username.as_deref(), target.password.as_deref()), (Some("app"), Some("p@ss")));
        assert_eq!(target.sentinels, ["h1:26379", "h2:26379"]);
        assert!(from(&[("REDIS_SENTINELS", "h1:26379")]).is_err(), "no master name");
        assert!(from(&[("REDIS_SENTINELS", "h1"), ("REDIS_SENTINEL_MASTER", "m")]).is_err(), "no port");
        let err = CacheConfig::redis("redis+sentinel://u:hunter2@h1:26379").unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
        // Credentials written into the list: refused, and not repeated.
        for listed in ["redis://:hunter2@h1:26379", "app:hunter2@h1", "h2:26379,app:hunter2@h1:26379"] {
            let err = from(&[("REDIS_SENTINELS", listed), ("REDIS_SENTINEL_MASTER", "m")]).unwrap_err();
            let said = format!("{err} {err:?}");
            assert!(!said.contains("hunter2") && said.contains("REDIS_SENTINEL_PASSWORD"), "{said}");
        }
    }

    #[test]
    fn the_sentinels_own_credentials_and_tls_are_apart_from_the_primarys() {
        let sentinel_vars = [
            ("REDIS_SENTINEL_USERNAME", "watcher"),
            ("REDIS_SENTINEL_PASSWORD", "s3ntinel"),
            ("REDIS_SENTINEL_TLS", "yes"),
            ("REDIS_PASSWORD", "pw"),
        ];
        let listed = [("REDIS_SENTINELS", "h1:26379"), ("REDIS_SENTINEL_MASTER", "cache")];
        let url = [("REDIS_URL", "redis+sentinel://h1:26379/cache")];
        for first in [&listed[..], &url[..]] {
            let vars: Vec<_> = first.iter().chain(&sentinel_vars).copied().collect();
            let config = from(&vars).unwrap();
            let BackendKind::Sentinel(target) = &config.backend else { panic!("{config:?}") };
            assert_eq!(
                (target.sentinel_username.as_deref(), target.sentinel_password.as_deref()),
                (Some("watcher"), Some("s3ntinel"))
            );
            assert!(target.sentinel_tls && !target.tls, "TLS to the sentinels only: {target:?}");
            assert_eq!((target.username.as_deref(), target.password.as_deref()), (None, Some("pw")));
            assert!(!format!("{config:?}").contains("s3ntinel"), "{config:?}");
        }
        let built = CacheConfig::sentinel(&["h1:26379"], "cache")
            .unwrap()
            .with_sentinel_credentials(Some("watcher"), "s3ntinel")
            .with_sentinel_tls(true);
        let BackendKind::Sentinel(target) = &built.backend else { panic!("{built:?}") };
        assert_eq!(target.sentinel_password.as_deref(), Some("s3ntinel"));
        assert!(target.sentinel_tls);
        assert!(from(&[("REDIS_SENTINEL_TLS", "maybe")]).is_err());
        let alone = [
            ("REDIS_SENTINELS", "h1:26379"),
            ("REDIS_SENTINEL_MASTER", "cache"),
            ("REDIS_SENTINEL_USERNAME", "watcher"),
        ];
        let err = from(&alone).unwrap_err().to_string();
        assert!(err.contains("REDIS_SENTINEL_PASSWORD"), "{err}");
        // The builder sets both: no user is the default user, whatever was set before.
        let reset = built.with_sentinel_credentials(None, "other").with_primary_tls(true);
        let BackendKind::Sentinel(target) = &reset.backend else { panic!("{reset:?}") };
        assert_eq!(
            (target.sentinel_username.as_deref(), target.sentinel_password.as_deref()),
            (None, Some("other"))
        );
        assert!(target.tls && target.sentinel_tls);
        // Not behind Sentinel: nothing to set, and nothing else changes.
        let one = CacheConfig::redis("redis://h:6379").unwrap().with_sentinel_credentials(None, "s3ntinel");
        assert!(matches!(&one.backend, BackendKind::Redis(_)) && !format!("{one:?}").contains("s3ntinel"));
    }

    #[test]
    fn tls_and_users_reach_the_url() {
        let config = from(&[
            ("REDIS_HOST", "h"),
            ("REDIS_USERNAME", "app"),
            ("REDIS_PASSWORD", "pw"),
            ("REDIS_TLS", "1"),
        ])
        .unwrap();
        let BackendKind::Redis(target) = &config.backend else { panic!("{config:?}") };
        assert!(target.is_tls());
        assert_eq!(target.to_string(), "rediss://h:6379");
        assert_eq!(target.info.redis_settings().username(), Some("app"));
        assert!(from(&[("REDIS_TLS", "maybe")]).is_err());
    }

    #[test]
    fn the_environments_user_and_password_reach_a_redis_url_and_tls_cannot_be_asked_of_a_plain_one() {
        let config =
            from(&[("REDIS_URL", "redis://h:1"), ("REDIS_USERNAME", "app"), ("REDIS_PASSWORD", "pw")])
                .unwrap();
        let BackendKind::Redis(target) = &config.backend else { panic!("{config:?}") };
        assert_eq!(target.info.redis_settings().username(), Some("app"));
        assert_eq!(target.info.redis_settings().password(), Some("pw"));
        assert!(!format!("{config:?}").contains("pw"), "the password in Debug: {config:?}");
        // Over the URL's own, as behind Sentinel; a URL's own is kept when the environment has none.
        let config = from(&[("REDIS_URL", "redis://:url-pw@h:1"), ("REDIS_PASSWORD", "env-pw")]).unwrap();
        let BackendKind::Redis(target) = &config.backend else { panic!("{config:?}") };
        assert_eq!(target.info.redis_settings().password(), Some("env-pw"));
        let config = from(&[("REDIS_URL", "redis://:url-pw@h:1")]).unwrap();
        let BackendKind::Redis(target) = &config.backend else { panic!("{config:?}") };
        assert_eq!(target.info.redis_settings().password(), Some("url-pw"));

        let err = from(&[("REDIS_URL", "redis://h:1"), ("REDIS_TLS", "yes")]).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("REDIS_TLS") && text.contains("yes") && text.contains("rediss://"), "{err}");
        assert!(from(&[("REDIS_URL", "rediss://h:1"), ("REDIS_TLS", "true")]).is_ok());
        // Not a plain-TCP URL: a Unix socket has no TLS to ask for, and is left as it was.
        assert!(from(&[("REDIS_URL", "redis+unix:///tmp/redis.sock"), ("REDIS_TLS", "true")]).is_ok());
        let local = from(&[("CACHE_BACKEND", "redis"), ("REDIS_TLS", "true")]).unwrap();
        let BackendKind::Redis(target) = &local.backend else { panic!("{local:?}") };
        assert!(target.is_tls(), "the local default over TLS: {local:?}");
    }

    #[test]
    fn a_ca_cert_is_read_at_start_up() {
        let err =
            from(&[("REDIS_URL", "rediss://h:1"), ("REDIS_CA_CERT", "/nonexistent/ca.pem")]).unwrap_err();
        assert!(matches!(err, ConfigError::CaCert { .. }), "{err}");
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
        let not_pem = std::env::temp_dir().join(format!("not-a-ca-{}.pem", std::process::id()));
        std::fs::write(&not_pem, "hello").unwrap();
        let err =
            CacheConfig::redis("rediss://h:1").unwrap().with_ca_cert(not_pem.to_str().unwrap()).unwrap_err();
        let _ = std::fs::remove_file(&not_pem);
        assert!(err.to_string().contains("no PEM certificate"), "{err}");
    }

    #[test]
    fn key_namespaces_are_checked() {
        assert_eq!(from(&[("CACHE_KEY_NAMESPACE", "staging-2")]).unwrap().key_namespace(), "staging-2");
        for bad in ["Staging", "a:b", "a b", "a{b}", &"x".repeat(65)] {
            assert!(CacheConfig::memory().with_key_namespace(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_url_is_an_error_without_the_password() {
        let err = from(&[("REDIS_URL", "redis://:hunter2@exa mple:notaport")]).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("invalid Redis URL"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
        // Without a scheme (issue: the password was printed).
        let err = from(&[("REDIS_URL", ":s3cret@cache:6379")]).unwrap_err().to_string();
        assert!(!err.contains("s3cret") && err.contains("no scheme"), "{err}");
    }

    #[test]
    fn password_with_reserved_characters_reaches_the_server_unchanged() {
        let password = "p@ss/w?rd#1%2 :x";
        for url in [("REDIS_HOST", "h"), ("REDIS_URL", "redis://h:6379")] {
            let config = from(&[url, ("REDIS_USERNAME", "a@b"), ("REDIS_PASSWORD", password)]).unwrap();
            let BackendKind::Redis(target) = &config.backend else { panic!("expected redis") };
            assert_eq!(target.info.redis_settings().password(), Some(password));
            assert_eq!(target.info.redis_settings().username(), Some("a@b"));
            assert_eq!(target.address(), "h:6379");
        }
    }

    #[test]
    fn durations_are_bounded_up_front() {
        let c = CacheConfig::memory()
            .with_op_timeout(Duration::MAX)
            .with_lease_ttl(Duration::MAX)
            .with_breaker(3, Duration::MAX)
            .with_shutdown_timeout(Duration::MAX)
            .with_invalidation_recheck(Duration::MAX);
        assert_eq!((c.op_timeout(), c.lease_ttl(), c.breaker().1), (MAX_SETTING, MAX_SETTING, MAX_SETTING));
        assert_eq!(c.invalidation_recheck(), MAX_SETTING);
        assert_eq!(
            CacheConfig::memory().with_lease_ttl(Duration::ZERO).lease_ttl(),
            Duration::from_millis(10)
        );
    }

    #[test]
    fn breaker_and_size_from_the_environment() {
        let c = from(&[
            ("CACHE_MAX_SIZE", "1048576"),
            ("CACHE_BREAKER_THRESHOLD", "0"),
            ("CACHE_BREAKER_COOLDOWN_MS", "750"),
            ("CACHE_SHUTDOWN_TIMEOUT_MS", "1200"),
        ])
        .unwrap();
        assert_eq!(c.memory_max_bytes(), 1 << 20);
        assert_eq!(c.breaker(), (0, Duration::from_millis(750)));
        assert_eq!(c.shutdown_timeout(), Duration::from_millis(1200));
        assert!(from(&[("CACHE_MAX_SIZE", "lots")]).is_err());
    }

    #[test]
    fn password_never_in_debug_or_display() {
        let config = from(&[("REDIS_HOST", "h"), ("REDIS_PASSWORD", "hunter2")]).unwrap();
        let BackendKind::Redis(target) = &config.backend else { panic!("expected redis") };
        assert_eq!(target.info.redis_settings().password(), Some("hunter2"));
        assert!(!format!("{config:?}").contains("hunter2"));
        assert!(!format!("{target}").contains("hunter2"));
    }
}
