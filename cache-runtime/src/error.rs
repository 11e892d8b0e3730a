//! Errors a [`Cache`](crate::Cache) handle can return. A `#[cached]` function never returns
//! them: it logs, counts and runs the function instead.

use std::fmt;
use std::time::Duration;

/// A backend call that did not succeed.
#[derive(Debug)]
#[non_exhaustive]
pub enum BackendError {
    /// Redis answered with an error, or the connection failed.
    Redis(RedisFailure),
    /// The call took longer than the configured bound.
    Timeout(Duration),
    /// A pipelined batch of writes failed as a whole (the connection's error, as text).
    Batch(String),
    /// The circuit breaker is open: the server failed repeatedly, and calls skip it until a
    /// probe succeeds.
    Bypassed,
    /// The disk backend's file failed (full disk, permissions, a corrupt file being rebuilt):
    /// SQLite's message.
    Disk(String),
}

/// What Redis (or the connection to it) answered, without exposing the `redis` crate's types.
#[derive(Debug)]
pub struct RedisFailure(redis::RedisError);

impl RedisFailure {
    pub(crate) fn into_inner(self) -> redis::RedisError {
        self.0
    }

    pub(crate) fn as_redis(&self) -> &redis::RedisError {
        &self.0
    }

    /// The error code Redis answered with (`WRONGPASS`, `NOPERM`, `LOADING`...), if it answered.
    pub fn code(&self) -> Option<&str> {
        self.0.code()
    }

    /// Whether the server refused the credentials it was given ([`refuses_credentials`]).
    pub(crate) fn is_authentication_failure(&self) -> bool {
        refuses_credentials(&self.0)
    }

    /// Whether the connection failed (refused, reset, dropped, an I/O error), rather than the
    /// server answering with an error.
    pub fn is_connection_failure(&self) -> bool {
        self.0.is_io_error() || self.0.is_connection_dropped() || self.0.is_connection_refusal()
    }

    /// Whether the connection is gone (dropped, reset, refused): a connection failure that is
    /// not a time-out (redis-rs reports its response timeout as an I/O error).
    pub(crate) fn is_connection_lost(&self) -> bool {
        self.is_connection_failure() && !self.0.is_timeout()
    }
}

/// What a sentinel's refusal of its credentials says (`backend/sentinel`): its own setting, not
/// the primary's.
pub(crate) const SENTINEL_REFUSAL: &str = "a sentinel refused the credentials it was given; the sentinels' own password (requirepass) is set with CacheConfig::with_sentinel_credentials or REDIS_SENTINEL_PASSWORD, apart from the primary's";

/// Whether `error` is a refusal of the credentials given (none, or wrong ones): a failed `AUTH`,
/// a `NOAUTH` or `WRONGPASS` answer (a pipeline's included: Cluster's first commands come as
/// one), or the `SELECT` of a new connection answered "Authentication required" (which redis-rs
/// reports without the `NOAUTH` code).
pub(crate) fn refuses_credentials(error: &redis::RedisError) -> bool {
    error.kind() == redis::ErrorKind::AuthenticationFailed
        || error.detail().is_some_and(|detail| detail.starts_with("Authentication required"))
        || error.clone().into_server_errors().is_some_and(|errors| {
            errors.iter().any(|(_, error)| matches!(error.code(), "NOAUTH" | "WRONGPASS"))
        })
}

impl fmt::Display for RedisFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)?;
        // What to do; a sentinel's refusal says its own.
        let credentials = "the password goes in the URL (redis://:password@host:port/, user:password@ for an ACL user; the same in a redis+sentinel:// URL or a cluster node's), or, configured from the environment, in REDIS_PASSWORD (with REDIS_USERNAME), which overrides the URL's";
        if self.is_authentication_failure() && !self.0.to_string().starts_with(SENTINEL_REFUSAL) {
            write!(f, "; the server refused the credentials it was given (none, wrong ones, or a password where it asks for none): {credentials}")?;
        } else if self.0.kind() == redis::ErrorKind::ClusterConnectionNotFound {
            // redis-rs reports a cluster whose every node refused the password it was given
            // (not none: that is `NOAUTH`, above) as a cluster whose nodes are all down, and a
            // node asked by address that refused it as a node that is down.
            if self.0.to_string().starts_with("No connections found") {
                write!(f, "; no node of the cluster could be used: each is down or unreachable, or refused the credentials it was given ({credentials})")?;
            } else {
                write!(f, "; that node is down or unreachable, or refused the credentials it was given ({credentials})")?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for RedisFailure {}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendError::Redis(e) => write!(f, "redis: {e}"),
            BackendError::Timeout(d) => write!(f, "backend call timed out after {d:?}"),
            BackendError::Batch(e) => write!(f, "batched write failed: {e}"),
            BackendError::Bypassed => f.write_str("the cache breaker is open: the backend is skipped"),
            BackendError::Disk(e) => write!(f, "disk: {e}"),
        }
    }
}

impl BackendError {
    /// Whether the backend did not answer in time.
    pub fn is_timeout(&self) -> bool {
        match self {
            BackendError::Timeout(_) => true,
            BackendError::Redis(e) => e.0.is_timeout(),
            BackendError::Batch(_) | BackendError::Bypassed | BackendError::Disk(_) => false,
        }
    }

    /// Whether the call was refused by the open circuit breaker, without reaching the server.
    pub fn is_bypassed(&self) -> bool {
        matches!(self, BackendError::Bypassed)
    }

    /// Whether this says the server is unusable (what the circuit breaker counts): the
    /// connection failed or timed out, authentication failed, the server is loading, down or
    /// read-only. An error answer about the request itself (a script error, a wrong type) is not.
    pub(crate) fn is_server_failure(&self) -> bool {
        use redis::{ErrorKind, ServerErrorKind as S};
        match self {
            BackendError::Timeout(_) | BackendError::Batch(_) => true,
            BackendError::Bypassed => false,
            // The disk backend's file: every failure of it (full, locked past `op_timeout`,
            // corrupt) says the file is unusable for now. Its breaker never opens; this is what
            // it logs.
            BackendError::Disk(_) => true,
            BackendError::Redis(e) => match e.0.kind() {
                ErrorKind::Io
                | ErrorKind::AuthenticationFailed
                | ErrorKind::Parse
                | ErrorKind::ClusterConnectionNotFound => true,
                // Not TRYAGAIN: a Cluster node answers it while a slot it serves is being moved,
                // for the keys of that slot only; the node is up.
                // Not NOPERM either: an ACL user denied one key pattern or command is answered
                // about that request; its other requests go on.
                ErrorKind::Server(S::BusyLoading | S::ClusterDown | S::MasterDown | S::ReadOnly) => true,
                _ => e.is_authentication_failure(),
            },
        }
    }
}

impl std::error::Error for BackendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BackendError::Redis(e) => Some(e),
            BackendError::Timeout(_)
            | BackendError::Batch(_)
            | BackendError::Bypassed
            | BackendError::Disk(_) => None,
        }
    }
}

impl From<redis::RedisError> for BackendError {
    fn from(e: redis::RedisError) -> Self {
        BackendError::Redis(RedisFailure(e))
    }
}

/// A reply of an unexpected shape.
impl From<redis::ParsingError> for BackendError {
    fn from(e: redis::ParsingError) -> Self {
        BackendError::Redis(RedisFailure(redis::RedisError::from(e)))
    }
}

/// What a [`Cache`](crate::Cache) handle call can fail with.
#[derive(Debug)]
#[non_exhaustive]
pub enum CacheError {
    /// The backend failed or timed out.
    Backend(BackendError),
    /// A stored value does not decode as the handle's type.
    Decode(serde_json::Error),
    /// A value could not be encoded.
    Encode(serde_json::Error),
    /// The handle's prefix or a key breaks the naming rules.
    InvalidKey(String),
    /// A TTL of zero, or longer than the longest an entry may live
    /// (`cache_rules::MAX_TTL_SECONDS`, 365 days).
    InvalidTtl(Duration),
}

impl fmt::Display for CacheError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CacheError::Backend(e) => write!(f, "cache backend failed: {e}"),
            CacheError::Decode(e) => write!(f, "stored value does not decode: {e}"),
            CacheError::Encode(e) => write!(f, "value does not encode: {e}"),
            CacheError::InvalidKey(why) => write!(f, "invalid cache key: {why}"),
            CacheError::InvalidTtl(ttl) => write!(
                f,
                "invalid TTL {ttl:?}: every entry must expire, after more than 0 and at most {} seconds",
                cache_rules::MAX_TTL_SECONDS
            ),
        }
    }
}

impl std::error::Error for CacheError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CacheError::Backend(e) => Some(e),
            CacheError::Decode(e) | CacheError::Encode(e) => Some(e),
            CacheError::InvalidKey(_) | CacheError::InvalidTtl(_) => None,
        }
    }
}

impl From<BackendError> for CacheError {
    fn from(e: BackendError) -> Self {
        CacheError::Backend(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(code: &str, detail: &str) -> redis::RedisError {
        redis::make_extension_error(code.to_owned(), Some(detail.to_owned()))
    }

    #[test]
    fn a_refusal_of_the_credentials_is_told_apart_from_a_refused_request() {
        let select = |detail: &str| {
            redis::RedisError::from((
                redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError),
                "Redis server refused to switch database",
                detail.to_owned(),
            ))
        };
        assert!(refuses_credentials(&select("Authentication required.")));
        assert!(!refuses_credentials(&select("DB index is out of range")));
        assert!(refuses_credentials(&server("NOAUTH", "Authentication required.")));
        assert!(refuses_credentials(&server("WRONGPASS", "invalid username-password pair")));
        assert!(!refuses_credentials(&server("NOPERM", "this user has no permissions")));
        assert!(refuses_credentials(&redis::RedisError::from((
            redis::ErrorKind::AuthenticationFailed,
            "Password authentication failed"
        ))));
        let failure = |e| BackendError::Redis(RedisFailure(e));
        assert!(failure(select("Authentication required.")).is_server_failure());
        assert!(!failure(server("NOPERM", "no permissions")).is_server_failure());
    }

    #[test]
    fn a_refusal_says_where_the_password_goes_once_and_a_sentinels_names_its_own() {
        let text = BackendError::from(server("NOAUTH", "Authentication required.")).to_string();
        assert_eq!(text.matches("REDIS_PASSWORD").count(), 1, "{text}");
        assert!(!text.starts_with("redis: redis:"), "{text}");
        let sentinel = BackendError::from(redis::RedisError::from((
            redis::ErrorKind::AuthenticationFailed,
            SENTINEL_REFUSAL,
            "sentinel h:1: NOAUTH".to_owned(),
        )))
        .to_string();
        assert!(!sentinel.contains("REDIS_PASSWORD ("), "{sentinel}");
        let lost = BackendError::from(redis::RedisError::from((
            redis::ErrorKind::ClusterConnectionNotFound,
            "No connections found",
        )))
        .to_string();
        assert!(lost.contains("no node of the cluster") && lost.contains("REDIS_PASSWORD"), "{lost}");
        let one = BackendError::from(redis::RedisError::from((
            redis::ErrorKind::ClusterConnectionNotFound,
            "Requested connection not found",
            "10.0.0.1:7000".to_owned(),
        )))
        .to_string();
        assert!(one.contains("that node is down") && !one.contains("no node of the cluster"), "{one}");
    }
}
