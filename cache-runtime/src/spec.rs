//! What the macro knows about one cached function ([`Spec`], a constant) and how the runtime
//! identifies it ([`CachedFn`]: the spec plus, for methods, the `Self` type). Every layer that
//! needs a function's identity imports it from here.

use std::time::Duration;

use crate::value::Format;

/// Everything the macro knows about one cached function, as a constant.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    /// The Redis DB number of the `db = ...` option (never 15).
    pub db: u8,
    /// The `prefix = "..."` option: the first part of every key.
    pub prefix: &'static str,
    /// The function's name as written.
    pub function: &'static str,
    /// `module_path!()` where the function is written: two same-named functions with the same
    /// prefix in two modules never share entries.
    pub module: &'static str,
    /// The `ttl = ...` option.
    pub ttl: Duration,
    /// The `version = N` option, part of the key when set.
    pub version: Option<u32>,
    /// The `format = ...` option (the encoding of stored values).
    pub format: Format,
    /// The `jitter = "N%"` option (0 without it): each fill's TTL is drawn uniformly from
    /// `[ttl × (100 − N) / 100, ttl]`, so entries filled together do not expire together.
    pub jitter_percent: u8,
    /// The `eager_refresh = "N%"` option (0 without it): a hit on an entry with less than
    /// `100 − N` % of the TTL left refreshes it, if no other caller is refreshing it.
    pub eager_refresh_percent: u8,
    /// The `stale_if_error = ...` option (zero without it): entries live this long past `ttl`,
    /// and answer in that window only when the function fails.
    pub stale_if_error: Duration,
    /// The `near = ...` option (zero without it): keep typed copies in process, each for at most
    /// this long (see `near.rs`).
    pub near: Duration,
}

impl Spec {
    /// Whether a hit on an entry with `left` to live (its fresh part) is due for an eager refresh.
    pub(crate) fn refresh_due(&self, left: Duration) -> bool {
        self.eager_refresh_percent != 0
            && left.as_millis() * 100 < self.ttl.as_millis() * u128::from(100 - self.eager_refresh_percent)
    }

    /// The longest an entry lives in the store: `ttl` plus the `stale_if_error` window. What
    /// outlives entries (generation keys, queued invalidations) is sized by it.
    pub(crate) fn entry_life(&self) -> Duration {
        self.ttl + self.stale_if_error
    }

    /// After the function failed on a key, how long its stale value answers without trying the
    /// function again (in this process): a tenth of the TTL, from 100 ms to 30 s.
    pub(crate) fn stale_throttle(&self) -> Duration {
        (self.ttl / 10).clamp(Duration::from_millis(100), Duration::from_secs(30))
    }

    /// Whether lookups need the entry's remaining time (eager refresh, fail-safe).
    pub(crate) fn reads_ttl(&self) -> bool {
        self.eager_refresh_percent != 0 || !self.stale_if_error.is_zero()
    }

    /// What an entry that has `left` to live in the store has left of its fresh life, or `None`
    /// when it is past its TTL (kept only for `stale_if_error`).
    pub(crate) fn fresh_left(&self, left: Duration) -> Option<Duration> {
        left.checked_sub(self.stale_if_error).filter(|fresh| !fresh.is_zero())
    }

    /// How long a near copy of an entry may live: at most `life`, and never past the entry's
    /// fresh life (`left`) or, with `eager_refresh`, the point a hit would refresh it (so that
    /// such hits still reach the store).
    pub(crate) fn near_copy_life(&self, life: Duration, left: Duration) -> Duration {
        let until = if self.eager_refresh_percent == 0 {
            left
        } else {
            let due_at = self.ttl.as_millis() * u128::from(100 - self.eager_refresh_percent) / 100;
            left.saturating_sub(Duration::from_millis(u64::try_from(due_at).unwrap_or(u64::MAX)))
        };
        life.min(until)
    }

    /// The TTL of one fill: the declared TTL, shortened by a random share of at most
    /// `jitter_percent` (never longer than declared), plus the `stale_if_error` window.
    pub(crate) fn fill_ttl(&self) -> Duration {
        if self.jitter_percent == 0 {
            return self.entry_life();
        }
        let ttl_ms = u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX);
        // The TTL is at most 365 days (checked at compile time), so this never saturates.
        let spread = ttl_ms.saturating_mul(u64::from(self.jitter_percent)) / 100;
        Duration::from_millis(ttl_ms - fastrand::u64(0..=spread)) + self.stale_if_error
    }
}

/// One cached function as the runtime identifies it: its [`Spec`] and, for methods, the name of
/// the `Self` type (`std::any::type_name`), so that two `impl` blocks' same-named methods never
/// share entries.
#[derive(Debug, Clone, Copy)]
pub struct CachedFn {
    spec: &'static Spec,
    owner: &'static str,
    memo: Option<&'static StateMemo>,
}

impl CachedFn {
    /// A free function.
    pub const fn free(spec: &'static Spec) -> CachedFn {
        CachedFn { spec, owner: "", memo: None }
    }

    /// A free function whose companion type (the hidden struct `#[cached]` declares beside it,
    /// of its name) is named `holder` (`type_name`): as [`CachedFn::free`] when it is written
    /// at module level (`holder` is its module's path and its name); written in a function's
    /// body, which `module_path!()` does not name, `holder` (that function's path too) is its
    /// owner, so that same-named functions in two function bodies of one module never share
    /// entries.
    #[inline]
    pub fn free_in(spec: &'static Spec, holder: &'static str) -> CachedFn {
        CachedFn { spec, owner: free_owner(spec, holder), memo: None }
    }

    /// A method or associated function of the type named `owner` (`type_name::<Self>()`).
    pub const fn method(spec: &'static Spec, owner: &'static str) -> CachedFn {
        CachedFn { spec, owner, memo: None }
    }

    /// The same function, whose calls find its state through `memo` (a `static` of the call
    /// site; see [`StateMemo`]).
    pub const fn remembered(self, memo: &'static StateMemo) -> CachedFn {
        CachedFn { memo: Some(memo), ..self }
    }

    pub(crate) fn memo(&self) -> Option<&'static StateMemo> {
        self.memo
    }

    pub(crate) fn spec(&self) -> &'static Spec {
        self.spec
    }

    /// The `Self` type's full name, generic arguments included: part of every key's hash.
    pub(crate) fn owner(&self) -> &'static str {
        self.owner
    }

    /// Where calls come from, as addresses (the spec constant's and the owner name's, with its length): cheap
    /// to hash, and the same for every call of one function (two may share a state, see
    /// `functions.rs`).
    pub(crate) fn site(&self) -> (usize, usize, usize) {
        (std::ptr::from_ref(self.spec) as usize, self.owner.as_ptr() as usize, self.owner.len())
    }

    /// The function, whatever its generic arguments: what `f(..)` invalidates. Instantiations of
    /// a generic function (or of a generic `impl`) have their own entries but one generation.
    pub(crate) fn id(&self) -> FunctionId {
        let s = self.spec;
        let owner = self.owner.split('<').next().unwrap_or("");
        (s.db, s.prefix, s.function, s.version, s.module, owner)
    }
}

/// The owner of a free function whose companion type is named `holder` (see
/// [`CachedFn::free_in`]): none at module level, `holder` in a function's body.
pub(crate) fn free_owner(spec: &Spec, holder: &'static str) -> &'static str {
    let at_module_level =
        holder.strip_suffix(spec.function).and_then(|rest| rest.strip_suffix("::")) == Some(spec.module);
    if at_module_level {
        ""
    } else {
        holder
    }
}

/// (db, prefix, function, version, module, owner without generic arguments).
pub(crate) type FunctionId = (u8, &'static str, &'static str, Option<u32>, &'static str, &'static str);

/// What one entry of `#[invalidates(...)]` drops.
#[derive(Debug, Clone)]
pub enum Target {
    /// One entry: the key of a call (`None` if an argument failed to serialize: nothing to drop,
    /// since such a call was never cached).
    Key(CachedFn, Option<String>),
    /// Every entry of a function.
    All(CachedFn),
}

impl Target {
    pub(crate) fn function(&self) -> &CachedFn {
        match self {
            Target::Key(f, _) | Target::All(f) => f,
        }
    }
}

impl Spec {
    /// A plain function's spec for unit tests: JSON, a 100 s TTL, no option set.
    #[cfg(test)]
    pub(crate) const EXAMPLE: Spec = Spec {
        db: 5,
        prefix: "market",
        function: "quote",
        module: "svc",
        ttl: Duration::from_secs(100),
        version: None,
        format: Format::Json,
        jitter_percent: 0,
        eager_refresh_percent: 0,
        stale_if_error: Duration::ZERO,
        near: Duration::ZERO,
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: Spec = Spec { jitter_percent: 20, ..Spec::EXAMPLE };

    #[test]
    fn a_jittered_ttl_is_never_longer_than_declared_and_spreads_over_the_share() {
        let draws: Vec<Duration> = (0..2000).map(|_| SPEC.fill_ttl()).collect();
        let (min, max) = (draws.iter().min().unwrap(), draws.iter().max().unwrap());
        assert!(*max <= SPEC.ttl && *min >= Duration::from_secs(80), "{min:?}..{max:?}");
        // Uniform over 20 s: 2000 draws cover most of it (a spread of half would be a bug).
        assert!(*max - *min > Duration::from_secs(18), "{min:?}..{max:?}");
        let none = Spec { jitter_percent: 0, ..SPEC };
        assert!((0..100).all(|_| none.fill_ttl() == none.ttl));
    }

    #[test]
    fn an_eager_refresh_is_due_past_its_share_of_the_ttl() {
        let eager = Spec { eager_refresh_percent: 80, ..SPEC };
        assert!(!eager.refresh_due(Duration::from_secs(21)));
        assert!(!eager.refresh_due(Duration::from_secs(20)));
        assert!(eager.refresh_due(Duration::from_millis(19_999)));
        assert!(!SPEC.refresh_due(Duration::ZERO), "never without the option");
    }
}

/// Where a `#[cached]` function's definition keeps the state the function has in one runtime
/// (the first that serves it: in a service, the one runtime there is), so that its calls find it
/// with one load instead of a map lookup (`functions.rs`). One per definition: the
/// instantiations of a generic function or `impl` share it, and those it does not serve (another
/// `Self`, another runtime) use the map. The state stays here for the life of the process, also
/// after its runtime is dropped (held, unused: the function's counters and its generation,
/// as a runtime's map would hold them).
#[derive(Debug)]
pub struct StateMemo(pub(crate) std::sync::OnceLock<Remembered>);

/// What a [`StateMemo`] holds: a runtime's state of the function (`functions.rs` puts it there,
/// and only it reads it), for that runtime and call site only.
#[derive(Debug)]
pub(crate) struct Remembered {
    /// The runtime's number (an address could be reused).
    pub(crate) runtime: u64,
    pub(crate) site: (usize, usize, usize),
    pub(crate) state: Box<dyn std::any::Any + Send + Sync>,
}

impl StateMemo {
    /// An empty memo, for a `static`.
    #[allow(clippy::new_without_default)] // a `static`'s value: `Default` is not `const`
    pub const fn new() -> Self {
        StateMemo(std::sync::OnceLock::new())
    }
}
