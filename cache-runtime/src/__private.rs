//! What `#[cached]` expands into. Not a stable API: generated code reaches the runtime only
//! through `::cache_runtime::__private`, and everything here may change in any release. This
//! module only re-exports and forwards; nothing in the crate imports from it.

use std::future::Future;

use serde::Serialize;

pub use crate::db::CacheDb;
pub use crate::invalidate::{invalidate, Target};
pub use crate::key::{KeyHasher, KeyReceiver};
pub use crate::policy::{OkOnly, Policy, SomeOnly, Whole};
pub use crate::spec::{CachedFn, Spec};
pub use crate::value::Format;

/// Spanned at an argument by the macro, so an argument that cannot be hashed is reported there.
pub fn key_arg<T: Serialize + ?Sized>(hasher: &mut KeyHasher, value: &T) {
    hasher.arg(value)
}

/// Spanned at `self` by the macro: a receiver that cannot be hashed is reported there, with the
/// advice to write `skip(self)`.
pub fn key_receiver<T: KeyReceiver + ?Sized>(hasher: &mut KeyHasher, receiver: &T) {
    receiver.hash_into(hasher)
}

/// A `ttl` given as a constant expression, checked where the compiler evaluates it: more than 0
/// and at most `cache_rules::MAX_TTL_SECONDS` (a negative constant arrives here as a huge one).
pub const fn checked_ttl(seconds: u64) -> u64 {
    if seconds == 0 || seconds > cache_rules::MAX_TTL_SECONDS {
        panic!("`ttl` must be more than 0 and at most 365 days (31536000 seconds): every cache entry must expire, and none may live longer");
    }
    seconds
}

/// A cached call (see `read_through.rs`).
pub async fn call<P, R, F>(function: CachedFn, key: Option<String>, body: F) -> R
where
    P: Policy<R>,
    F: Future<Output = R>,
{
    crate::read_through::call::<P, R, F>(function, key, body).await
}
