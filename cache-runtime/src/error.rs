//! Errors a [`Cache`](crate::Cache) handle can return. A `#[cached]` function never returns
//! them: it logs, counts and runs the function instead.

use std::fmt;
use std::time::Duration;

/// A backend call that did not succeed.
#[derive(Debug)]
#[non_exhaustive]
pub enum BackendError {
    /// Redis answered with an error, or the connection failed.
    Redis(redis::RedisError),
    /// The call took longer than the configured bound.
    Timeout(Duration),
    /// A pipelined batch of writes failed as a whole (the connection's error, as text).
    Batch(String),
}

impl fmt::Display for BackendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendError::Redis(e) => write!(f, "redis: {e}"),
            BackendError::Timeout(d) => write!(f, "backend call timed out after {d:?}"),
            BackendError::Batch(e) => write!(f, "batched write failed: {e}"),
        }
    }
}

impl BackendError {
    /// Whether the backend did not answer in time.
    pub fn is_timeout(&self) -> bool {
        match self {
            BackendError::Timeout(_) => true,
            BackendError::Redis(e) => e.is_timeout(),
            BackendError::Batch(_) => false,
        }
    }
}

impl std::error::Error for BackendError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            BackendError::Redis(e) => Some(e),
            BackendError::Timeout(_) | BackendError::Batch(_) => None,
        }
    }
}

impl From<redis::RedisError> for BackendError {
    fn from(e: redis::RedisError) -> Self {
        BackendError::Redis(e)
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
}

impl fmt::Display for CacheError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CacheError::Backend(e) => write!(f, "cache backend failed: {e}"),
            CacheError::Decode(e) => write!(f, "stored value does not decode: {e}"),
            CacheError::Encode(e) => write!(f, "value does not encode: {e}"),
            CacheError::InvalidKey(why) => write!(f, "invalid cache key: {why}"),
        }
    }
}

impl std::error::Error for CacheError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            CacheError::Backend(e) => Some(e),
            CacheError::Decode(e) | CacheError::Encode(e) => Some(e),
            CacheError::InvalidKey(_) => None,
        }
    }
}

impl From<BackendError> for CacheError {
    fn from(e: BackendError) -> Self {
        CacheError::Backend(e)
    }
}
