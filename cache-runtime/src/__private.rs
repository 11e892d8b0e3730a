//! What `#[cached]` expands into. Not a stable API: generated code reaches the runtime only
//! through `::cache_runtime::__private`, and everything here may change in any release.

use std::future::Future;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

pub use crate::key::KeyHasher;
use crate::runtime::Runtime;

/// Everything the macro knows about one cached function, as a constant.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    pub db: u8,
    pub prefix: &'static str,
    pub function: &'static str,
    pub ttl: Duration,
    pub version: Option<u32>,
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

/// A cached call: look up `key`; on a hit return the stored value; otherwise run `body`, store
/// what the policy keeps, and return the body's value. No cache failure reaches the caller.
pub async fn call<P, R, F>(spec: &Spec, key: Option<String>, body: F) -> R
where
    P: Policy<R>,
    F: Future<Output = R>,
{
    let Some(key) = key else {
        tracing::warn!(
            prefix = spec.prefix,
            function = spec.function,
            "an argument failed to serialize; calling uncached"
        );
        return body.await;
    };
    let runtime = Runtime::current();
    let rt = runtime.inner();
    if matches!(rt.backend, crate::backend::Backend::None) {
        return body.await;
    }
    let counters = rt.stats.counters(spec.db, spec.prefix);
    let looked_up = rt
        .backend
        .get_with(rt.op_timeout, spec.db, &key, |bytes| {
            serde_json::from_slice::<P::Stored>(bytes)
        })
        .await;
    let backend_answered = looked_up.is_ok();
    match looked_up {
        Ok(Some(Ok(value))) => {
            counters.hit();
            tracing::debug!(db = spec.db, prefix = spec.prefix, function = spec.function, %key, "cache hit");
            return P::restore(value);
        }
        Ok(Some(Err(error))) => {
            counters.decode_failure();
            counters.miss();
            tracing::warn!(db = spec.db, prefix = spec.prefix, function = spec.function, %key, %error, "cached value no longer decodes; recomputing");
        }
        Ok(None) => {
            counters.miss();
            tracing::debug!(db = spec.db, prefix = spec.prefix, function = spec.function, %key, "cache miss");
        }
        Err(error) => {
            counters.backend_error();
            counters.miss();
            tracing::warn!(db = spec.db, prefix = spec.prefix, function = spec.function, %key, %error, "cache lookup failed; calling the function");
        }
    }
    let output = body.await;
    // A backend that just failed the lookup would most likely fail the fill too, costing the
    // caller a second timeout: skip it (the next call tries again).
    if !backend_answered {
        return output;
    }
    if let Some(value) = P::stored(&output) {
        match serde_json::to_vec(value) {
            Ok(bytes) => match rt
                .backend
                .set(rt.op_timeout, spec.db, &key, &bytes, spec.ttl)
                .await
            {
                Ok(()) => counters.fill(),
                Err(error) => {
                    counters.backend_error();
                    tracing::warn!(db = spec.db, prefix = spec.prefix, function = spec.function, %key, %error, "cache fill failed");
                }
            },
            Err(error) => {
                counters.encode_failure();
                tracing::warn!(db = spec.db, prefix = spec.prefix, function = spec.function, %key, %error, "value does not encode; not cached");
            }
        }
    }
    output
}
