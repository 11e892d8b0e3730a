//! What `#[cached]` expands into. Not a stable API: generated code reaches the runtime only
//! through `::cache_runtime::__private`, and everything here may change in any release. This
//! module only re-exports and forwards; nothing in the crate imports from it.

use std::future::Future;

use serde::Serialize;

pub use crate::db::CacheDb;
pub use crate::invalidate::{invalidate, Target};
pub use crate::key::{CallKey, KeyHasher, KeyReceiver};
pub use crate::near::Keeper;
pub use crate::policy::{OkOnly, Policy, SomeOnly, Whole};
pub use crate::registry::{Registration, Site, SiteTarget};
pub use crate::spec::{CachedFn, Spec, StateMemo};
pub use crate::value::Format;
pub use inventory;

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
    if seconds == FRACTIONAL {
        panic!("a `Duration` `ttl` must be whole seconds: entries are written with a TTL in seconds");
    }
    if seconds == 0 || seconds > cache_rules::MAX_TTL_SECONDS {
        panic!("`ttl` must be more than 0 and at most 365 days (31536000 seconds): every cache entry must expire, and none may live longer");
    }
    seconds
}

/// `ttl = CONSTANT`: the constant's value in seconds, in a constant context, by its type. An
/// integer (zero or negative reads as 0, which [`checked_ttl`] refuses) or a `Duration` of whole
/// seconds, made a `Ttl` by [`ttl`]; any other type is refused where the user wrote it, by
/// [`TtlType`], and only there (the type `ttl` returns is then unknown, so rustc adds no error
/// about its missing `seconds`).
pub struct Ttl<T>(T);

/// The types a `ttl` constant may have; `Ttl` is always `Ttl<Self>`.
#[diagnostic::on_unimplemented(
    message = "`ttl` takes whole seconds: an integer constant or a `Duration` constant, not `{Self}`",
    label = "a `{Self}`"
)]
pub trait TtlType {
    type Ttl;
}

/// The `Ttl` of a `ttl` constant (see [`Ttl`]).
pub const fn ttl<T: TtlType<Ttl = Ttl<T>>>(value: T) -> T::Ttl {
    Ttl(value)
}

macro_rules! ttl_integers {
    ($($t:ty),*) => {$(
        impl TtlType for $t {
            type Ttl = Ttl<$t>;
        }
        impl Ttl<$t> {
            #[allow(unused_comparisons, clippy::cast_sign_loss, clippy::absurd_extreme_comparisons)]
            pub const fn seconds(self) -> u64 {
                if self.0 <= 0 {
                    0
                } else if self.0 as u128 > u64::MAX as u128 {
                    u64::MAX
                } else {
                    self.0 as u64
                }
            }

        }
    )*};
}

ttl_integers!(u8, u16, u32, u64, u128, usize, i8, i16, i32, i64, i128, isize);

impl TtlType for std::time::Duration {
    type Ttl = Ttl<std::time::Duration>;
}

/// What [`Ttl::seconds`] answers for a `Duration` with a fraction of a second, which
/// [`checked_ttl`] refuses with its own message (one check, so one error, where the user wrote it).
const FRACTIONAL: u64 = u64::MAX - 1;

impl Ttl<std::time::Duration> {
    pub const fn seconds(self) -> u64 {
        if self.0.subsec_nanos() != 0 {
            FRACTIONAL
        } else {
            self.0.as_secs()
        }
    }
}

/// Asked first by a cached function: whether a near copy may answer this call (see
/// `read_through::near_on`); if so it awaits [`budget`] before asking.
#[inline]
pub fn near_on<T>(function: &CachedFn, keeper: &Option<Keeper<T>>) -> bool {
    crate::read_through::near_on(function, keeper)
}

/// Asked next, with its key's hasher (see `read_through::near_first`): the stored value if a
/// near copy answers, else the call's key.
#[inline]
pub fn near_first<T>(
    function: &CachedFn,
    hasher: &mut KeyHasher,
    keeper: Option<Keeper<T>>,
    near: bool,
) -> Result<T, Option<CallKey>> {
    crate::read_through::near_first(function, hasher, keeper, near)
}

/// Awaited before asking for a near copy: a near hit never waits on I/O, so it never yields;
/// this spends tokio's cooperative budget so that a loop of hits cannot starve other tasks.
pub async fn budget() {
    tokio::task::coop::consume_budget().await
}

/// A cached call (see `read_through.rs`); `keeper` when the stored type can be kept as a typed
/// copy in the near tier (`near.rs`). `body` makes the function's future: only a call that runs
/// it pays for its size.
pub fn call<P, R, B, F>(
    function: CachedFn,
    key: Option<CallKey>,
    keeper: Option<Keeper<P::Stored>>,
    body: B,
) -> impl Future<Output = R>
where
    P: Policy<R>,
    B: FnOnce() -> F,
    F: Future<Output = R>,
{
    // Not an `async fn`: a wrapper's future would keep the arguments beside the one it awaits.
    crate::read_through::call::<P, R, B, F>(function, key, keeper, body)
}

/// Which stored types the near tier can keep, chosen by method resolution where the type is
/// concrete (autoref specialization): `(&Probe::<T>::new()).keeper()` is `Some` through
/// [`Typed`] when `T: Clone + Send + Sync + 'static`, else `None` through [`Untyped`] (and in a
/// generic function, whose type parameters are not known to be `Clone` there).
pub struct Probe<T>(std::marker::PhantomData<T>);

impl<T> Probe<T> {
    pub const fn new() -> Self {
        Probe(std::marker::PhantomData)
    }
}

impl<T> Default for Probe<T> {
    fn default() -> Self {
        Self::new()
    }
}

pub trait Typed<T> {
    fn keeper(&self) -> Option<Keeper<T>>;
}

impl<T: Clone + Send + Sync + 'static> Typed<T> for Probe<T> {
    fn keeper(&self) -> Option<Keeper<T>> {
        Some(Keeper::of())
    }
}

pub trait Untyped<T> {
    fn keeper(&self) -> Option<Keeper<T>>;
}

impl<T> Untyped<T> for &Probe<T> {
    fn keeper(&self) -> Option<Keeper<T>> {
        None
    }
}

/// The keeper of a function with the `near` option, spanned at the option: its stored type must
/// be keepable, and is reported there if not.
pub fn near_keeper<T: NearValue>() -> Option<Keeper<T>> {
    Some(Keeper::of())
}

/// What a `near` function's cached type must be.
#[diagnostic::on_unimplemented(
    message = "`near` keeps typed copies of `{Self}` in process: it must be `Clone + Send + Sync + 'static`",
    label = "the cached type is `{Self}`",
    note = "derive or implement `Clone` for it, or leave `near` out (hits then read the backend and decode)"
)]
pub trait NearValue: Clone + Send + Sync + 'static {}

impl<T: Clone + Send + Sync + 'static> NearValue for T {}
