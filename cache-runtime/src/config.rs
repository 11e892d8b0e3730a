//! What the runtime connects to: built in code ([`CacheConfig`]) or read from the environment the
//! Python services already use ([`CacheConfig::from_env`]).

use std::fmt;
use std::time::Duration;

use redis::IntoConnectionInfo;

/// Default bound on every backend call; a dead server costs a cached call at most this much.
pub const DEFAULT_OP_TIMEOUT: Duration = Duration::from_millis(250);
/// Default bound on opening a connection.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_millis(250);
/// Default number of entries the embedded backend keeps per DB before evicting.
pub const DEFAULT_MEMORY_CAPACITY: u64 = 100_000;
/// Default connections per DB. One multiplexed connection pipelines every concurrent command;
/// `cargo run --release --example bench` measures 1 against more (see README).
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
    /// No caching: every call runs the function.
    None,
}

/// Where the Redis server is. Its `Debug` and `Display` never show the password.
#[derive(Clone)]
pub struct RedisTarget {
    pub(crate) info: redis::ConnectionInfo,
}

impl RedisTarget {
    /// Parses a `redis://[user:password@]host:port[/db]` URL. The DB in the URL is ignored:
    /// each cached function names its DB by type.
    pub fn from_url(url: &str) -> Result<Self, ConfigError> {
        let info = url
            .into_connection_info()
            .map_err(|e| ConfigError::InvalidRedisUrl { url: redact_url(url), reason: e.to_string() })?;
        Ok(RedisTarget { info })
    }

    /// `host:port`, for logs.
    pub fn address(&self) -> String {
        self.info.addr().to_string()
    }

    pub(crate) fn for_db(&self, db: u8) -> redis::ConnectionInfo {
        let settings = self.info.redis_settings().clone().set_db(i64::from(db));
        self.info.clone().set_redis_settings(settings)
    }
}

impl fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let has_password = self.info.redis_settings().password().is_some();
        f.debug_struct("RedisTarget")
            .field("address", &self.address())
            .field("password", &if has_password { "<redacted>" } else { "<none>" })
            .finish()
    }
}

impl fmt::Display for RedisTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "redis://{}", self.address())
    }
}

/// Replaces the password of a URL-like string by `***`, for error messages.
fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{}:***{}", &url[..scheme_end + 3], user, &url[at..])
        }
        _ => url.to_owned(),
    }
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
    /// Which store serves the cache.
    pub backend: BackendKind,
    /// Bound on each backend call (get, set, delete, ...). A call that takes longer counts as a
    /// backend error and the cached function runs as if it had missed.
    pub op_timeout: Duration,
    /// Bound on opening a connection to Redis.
    pub connect_timeout: Duration,
    /// Entries the embedded backend keeps per DB.
    pub memory_capacity: u64,
    /// Life of a fill lease (see README, "Stampedes and leases").
    pub lease_ttl: Duration,
    /// How long this process trusts its copy of a function's generation before reading it again
    /// with the next lookup (same round trip). Zero reads it with every lookup.
    pub generation_refresh: Duration,
    /// Multiplexed connections per DB, handed out round robin (Redis).
    pub pool_size: usize,
    /// Most fills written in one pipeline (Redis).
    pub batch_max: usize,
    /// How long the batcher waits for more fills after the first before writing (zero: it writes
    /// what has queued up while the previous pipeline was in flight).
    pub batch_delay: Duration,
    /// Fills the batcher holds per DB; a full queue means the caller writes directly. Zero turns
    /// write-behind off.
    pub batch_queue: usize,
    /// Whether a lookup that timed out is tried once more (each try bounded by `op_timeout`).
    pub retry_on_timeout: bool,
}

impl CacheConfig {
    fn with_backend(backend: BackendKind) -> Self {
        CacheConfig {
            backend,
            op_timeout: DEFAULT_OP_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            memory_capacity: DEFAULT_MEMORY_CAPACITY,
            lease_ttl: DEFAULT_LEASE_TTL,
            generation_refresh: DEFAULT_GENERATION_REFRESH,
            pool_size: DEFAULT_POOL_SIZE,
            batch_max: DEFAULT_BATCH_MAX,
            batch_delay: DEFAULT_BATCH_DELAY,
            batch_queue: DEFAULT_BATCH_QUEUE,
            retry_on_timeout: false,
        }
    }

    /// The embedded in-process backend.
    pub fn memory() -> Self {
        Self::with_backend(BackendKind::Memory)
    }

    /// A Redis server at `url` (`redis://[:password@]host:port`).
    pub fn redis(url: &str) -> Result<Self, ConfigError> {
        Ok(Self::with_backend(BackendKind::Redis(RedisTarget::from_url(url)?)))
    }

    /// No caching at all.
    pub fn disabled() -> Self {
        Self::with_backend(BackendKind::None)
    }

    /// Sets the bound on each backend call.
    pub fn with_op_timeout(mut self, timeout: Duration) -> Self {
        self.op_timeout = timeout;
        self
    }

    /// Sets the bound on opening a connection.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets the life of a fill lease (more than zero).
    pub fn with_lease_ttl(mut self, ttl: Duration) -> Self {
        self.lease_ttl = ttl.max(Duration::from_millis(1));
        self
    }

    /// Sets how long a function's generation is trusted before it is read again.
    pub fn with_generation_refresh(mut self, refresh: Duration) -> Self {
        self.generation_refresh = refresh;
        self
    }

    /// Sets the number of multiplexed connections per DB (at least 1).
    pub fn with_pool_size(mut self, connections: usize) -> Self {
        self.pool_size = connections.max(1);
        self
    }

    /// Sets the write-behind batcher: most fills per pipeline, wait for more, queue per DB (0
    /// turns write-behind off: every fill is written before the call returns).
    pub fn with_batching(mut self, max: usize, delay: Duration, queue: usize) -> Self {
        self.batch_max = max.max(1);
        self.batch_delay = delay;
        self.batch_queue = queue;
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

    /// Sets how many entries the embedded backend keeps per DB.
    pub fn with_memory_capacity(mut self, entries: u64) -> Self {
        self.memory_capacity = entries;
        self
    }

    /// Reads the variables the services already use:
    ///
    /// | variable | meaning |
    /// |---|---|
    /// | `CACHE_ENABLED` | `false`/`0`/`no`/`off` turns caching off |
    /// | `CACHE_BACKEND` | `memory`, `redis` or `none` (case-insensitive) |
    /// | `REDIS_URL` | `redis://[:password@]host:port` |
    /// | `REDIS_HOST`, `REDIS_PORT`, `REDIS_PASSWORD` | used when `REDIS_URL` is unset |
    /// | `CACHE_OP_TIMEOUT_MS` | bound on each backend call, in milliseconds |
    /// | `CACHE_POOL_SIZE` | multiplexed connections per DB (Redis) |
    /// | `CACHE_ENV` | `development` or `production` preset ([`Environment`]) |
    ///
    /// With no `CACHE_BACKEND`, Redis serves when `REDIS_URL` or `REDIS_HOST` is set, and the
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
        let redis_url = || -> Result<Option<String>, ConfigError> {
            if let Some(url) = var("REDIS_URL") {
                return Ok(Some(url));
            }
            let Some(host) = var("REDIS_HOST") else {
                return Ok(None);
            };
            let port = var("REDIS_PORT").unwrap_or_else(|| "6379".to_owned());
            if port.trim().parse::<u16>().is_err() {
                return Err(ConfigError::InvalidValue {
                    variable: "REDIS_PORT",
                    value: port,
                    expected: "a port number",
                });
            }
            let auth = var("REDIS_PASSWORD").map(|p| format!(":{p}@")).unwrap_or_default();
            Ok(Some(format!("redis://{auth}{}:{}", host.trim(), port.trim())))
        };
        let config = match var("CACHE_BACKEND").map(|b| b.trim().to_ascii_lowercase()) {
            None => match redis_url()? {
                Some(url) => Self::redis(&url)?,
                None => Self::memory(),
            },
            Some(b) if b == "memory" => Self::memory(),
            Some(b) if b == "none" => Self::disabled(),
            Some(b) if b == "redis" => {
                Self::redis(&redis_url()?.unwrap_or_else(|| "redis://127.0.0.1:6379".to_owned()))?
            }
            Some(other) => {
                return Err(ConfigError::InvalidValue {
                    variable: "CACHE_BACKEND",
                    value: other,
                    expected: "memory, redis or none",
                })
            }
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

    /// The numeric settings: `CACHE_OP_TIMEOUT_MS`, `CACHE_POOL_SIZE`.
    fn with_env_timeout(mut self, var: &impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let positive = |variable: &'static str, expected: &'static str| -> Result<Option<u64>, ConfigError> {
            match var(variable) {
                None => Ok(None),
                Some(v) => match v.trim().parse::<u64>() {
                    Ok(n) if n > 0 => Ok(Some(n)),
                    _ => Err(ConfigError::InvalidValue { variable, value: v, expected }),
                },
            }
        };
        if let Some(ms) = positive("CACHE_OP_TIMEOUT_MS", "a whole number of milliseconds greater than 0")? {
            self = self.with_op_timeout(Duration::from_millis(ms));
        }
        if let Some(n) = positive("CACHE_POOL_SIZE", "a whole number of connections greater than 0")? {
            self = self.with_pool_size(usize::try_from(n).unwrap_or(usize::MAX));
        }
        Ok(self)
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
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::InvalidRedisUrl { url, reason } => {
                write!(f, "invalid Redis URL `{url}`: {reason} (expected redis://[:password@]host:port)")
            }
            ConfigError::InvalidValue { variable, value, expected } => {
                write!(f, "{variable}=`{value}` is not valid: expected {expected}")
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
        assert!(err.to_string().contains("memory, redis or none"), "{err}");
    }

    #[test]
    fn bad_url_is_an_error_without_the_password() {
        let err = from(&[("REDIS_URL", "redis://:hunter2@exa mple:notaport")]).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("invalid Redis URL"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
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
