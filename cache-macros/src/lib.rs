//! Attribute macros of `cache-runtime`. Depend on `cache-runtime`, which re-exports them; the
//! user documentation is there and on each macro below.
//!
//! Where things are: `args.rs` parses an attribute into a model, `validate.rs` holds every rule
//! and its message, `expand/` generates code (one file per attribute), `ctxt.rs` collects errors.

mod args;
mod ctxt;
mod expand;
mod validate;

use proc_macro::TokenStream;

/// Caches an `async fn`'s results under a namespaced, hashed key with a TTL.
///
/// ```ignore
/// use cache_runtime::{cached, db::MarketData};
///
/// #[cached(db = MarketData, prefix = "market", ttl = 300)]
/// async fn quote(symbol: &str) -> Result<Quote, FeedError> { feed.fetch(symbol).await }
/// ```
///
/// | option | required | meaning |
/// |---|---|---|
/// | `db = Type` | yes | the Redis DB, by marker type (`cache_runtime::db`); numbers and `Reserved` do not compile |
/// | `prefix = "..."` | yes | namespace: lowercase letters, digits, `_`, `-` |
/// | `ttl = 300` / `ttl = "5m"` / `ttl = TTL_MARKET` | yes | seconds (or s/m/h/d units, or an integer constant expression), more than 0, at most 365 days |
/// | `skip(a, b)` | no | parameters left out of the key (pools, handles); `skip(self)` lets every instance share entries, otherwise a method's receiver is part of the key (`Self: Serialize`) |
/// | `version = 2` | no | goes into the key, to retire entries when the values' meaning changes (a changed shape of the value's type retires them by itself) |
/// | `format = MessagePack` | no | `Json` (default, readable by other languages) or `MessagePack` (smaller, faster) |
///
/// `Result<T, E>` caches only `Ok`, `Option<T>` only `Some`, any other type always. Cache
/// failures never reach the caller: the function runs, and the failure is logged and counted.
///
/// Entries of different computations never share a key: besides the key arguments, the key
/// holds the module the function is written in, for a method its `Self` type (and its receiver,
/// unless `skip(self)`), and for a generic function its type and const arguments.
#[proc_macro_attribute]
pub fn cached(args: TokenStream, item: TokenStream) -> TokenStream {
    expand::cached::expand(args.into(), item.into()).into()
}

/// Lets `#[cached]` work on the functions of an `impl` block, inherent or trait impl (native
/// `async fn` in traits, or `#[async_trait]`, written below this attribute), with `self` or
/// without. Every `impl` block with `#[cached]` functions needs it: an attribute on a function
/// cannot tell an inherent impl from a trait impl, which may hold only the trait's items.
///
/// ```ignore
/// #[cached_impl]
/// impl Repo for PgRepo {
///     #[cached(db = MarketData, prefix = "repo", ttl = 60, skip(self))]
///     async fn quote(&self, symbol: &str) -> Result<Quote, DbError> { .. }
/// }
///
/// #[invalidates(PgRepo::quote(symbol))]   // the type's name, not the trait's
/// async fn update(symbol: &str) -> Result<(), DbError> { .. }
/// ```
///
/// The `#[cached]` functions are expanded in place; the companions that `#[invalidates]` calls
/// go into an inherent `impl` block of the same type emitted beside it, so the type must be
/// local to the crate, and two traits of one type may not both cache a function of one name.
#[proc_macro_attribute]
pub fn cached_impl(args: TokenStream, item: TokenStream) -> TokenStream {
    expand::cached_impl::expand(args.into(), item.into()).into()
}

/// Drops cache entries after the function succeeds (`Ok`, or any non-`Result` return).
///
/// ```ignore
/// #[invalidates(quote(symbol), top_movers(..))]
/// async fn update_quote(symbol: &str, q: Quote) -> Result<(), DbError> { ... }
/// ```
///
/// Each entry names a `#[cached]` function (a path: `quote`, `crate::market::quote`,
/// `Self::quote`, `temperature::<Celsius>`) with expressions for its key arguments (the ones it
/// does not `skip`; for a method whose receiver is part of the key, the instance first:
/// `Self::quote(self, symbol)`, `Feed::quote(&feed, symbol)`), or `..` to drop every entry of
/// that function, whatever its generic arguments, in O(1) (its generation is raised). The
/// compiler checks that the function is `#[cached]` and that the arguments fit. Keys are
/// computed from the arguments before the body runs; on `Err` nothing is dropped. An
/// invalidation the backend fails is retried in the background until it succeeds or every entry
/// it covers has expired.
#[proc_macro_attribute]
pub fn invalidates(args: TokenStream, item: TokenStream) -> TokenStream {
    expand::invalidates::expand_attribute(args.into(), item.into()).into()
}

/// `invalidate!(quote(symbol), top_movers(..)).await`: the runtime form of `#[invalidates]`,
/// with the same compile-time checks, for code that cannot be annotated.
#[proc_macro]
pub fn invalidate(input: TokenStream) -> TokenStream {
    expand::invalidates::expand_macro(input.into()).into()
}
