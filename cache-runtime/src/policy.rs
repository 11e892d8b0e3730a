//! Which part of a function's return value is cached, chosen by the macro from the return type
//! as written: `Result` caches `Ok`, `Option` caches `Some`, anything else is cached whole.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// How a return type `R` maps to what is stored: [`Whole`], [`OkOnly`] or [`SomeOnly`], chosen by
/// `#[cached]` from the return type as written (not implemented by users).
pub trait Policy<R> {
    /// The part of `R` that is written to the cache.
    type Stored: Serialize + DeserializeOwned;
    /// The part to store, or `None` when this output is not cached (an `Err`, a `None`).
    fn stored(output: &R) -> Option<&Self::Stored>;
    /// Rebuilds the return value from a cached entry.
    fn restore(stored: Self::Stored) -> R;
    /// Whether the output is a failure that `stale_if_error` answers for (an `Err`); a `None`
    /// is an answer, not a failure.
    fn failed(_output: &R) -> bool {
        false
    }
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
    fn failed(output: &Result<T, E>) -> bool {
        output.is_err()
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
