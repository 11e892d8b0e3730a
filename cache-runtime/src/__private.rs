//! What `#[cached]` expands into. Not a stable API: generated code reaches the runtime only
//! through `::cache_runtime::__private`, and everything here may change in any release.

use std::future::Future;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

pub use crate::db::CacheDb;
pub use crate::key::KeyHasher;
pub use crate::value::Format;

/// Everything the macro knows about one cached function, as a constant.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    pub db: u8,
    pub prefix: &'static str,
    pub function: &'static str,
    pub ttl: Duration,
    pub version: Option<u32>,
    pub format: Format,
}

/// Which part of a function's return value is cached, chosen by the macro from the return type
/// as written: `Result` caches `Ok`, `Option` caches `Some`, anything else is cached whole.
pub trait Policy<R> {
    type Stored: Serialize + DeserializeOwned;
    fn stored(output: &R) -> Option<&Self::Stored>;
    fn restore(stored: Self::Stored) -> R;
}

/// Caches the whole value.
pub struct Whole;
/// Caches `Ok(T)` only.
pub struct OkOnly;
/// Caches `Some(T)` only.
pub struct SomeOnly;

impl<T: Serialize + DeserializeOwned> Policy<T> for Whole {
    type Stored = T;
    fn stored(output: &T) -> Option<&T> {
        Some(output)
    }
    fn restore(stored: T) -> T {
        stored
    }
}

impl<T: Serialize + DeserializeOwned, E> Policy<Result<T, E>> for OkOnly {
    type Stored = T;
    fn stored(output: &Result<T, E>) -> Option<&T> {
        output.as_ref().ok()
    }
    fn restore(stored: T) -> Result<T, E> {
        Ok(stored)
    }
}

impl<T: Serialize + DeserializeOwned> Policy<Option<T>> for SomeOnly {
    type Stored = T;
    fn stored(output: &Option<T>) -> Option<&T> {
        output.as_ref()
    }
    fn restore(stored: T) -> Option<T> {
        Some(stored)
    }
}

/// Spanned at an argument by the macro, so an argument that cannot be hashed is reported there.
pub fn key_arg<T: Serialize + ?Sized>(hasher: &mut KeyHasher, value: &T) {
    hasher.arg(value)
}

/// A cached call (see `read_through.rs`).
pub async fn call<P, R, F>(spec: &'static Spec, key: Option<String>, body: F) -> R
where
    P: Policy<R>,
    F: Future<Output = R>,
{
    crate::read_through::call::<P, R, F>(spec, key, body).await
}

pub use crate::invalidate::{invalidate, Target};
