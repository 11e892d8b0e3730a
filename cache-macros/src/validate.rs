//! Validation: the parsed options of `#[cached]` and the function they sit on, checked against
//! the platform's rules. Every rule the compiler enforces for users is here, with its message.

use proc_macro2::Span;
use syn::spanned::Spanned;
use syn::{FnArg, Ident, ItemFn, LitStr, Pat, Path, ReturnType, Token, Type};

use crate::args::{CachedArgs, DbArg, OPTIONS};
use crate::ctxt::{Errors, Given};

/// Which part of the return value is cached (see `cache_runtime::__private::Policy`).
pub(crate) enum Policy {
    Whole,
    OkOnly,
    SomeOnly,
}

/// How a method's receiver enters the key.
pub(crate) enum Receiver {
    /// The function takes no `self`.
    None,
    /// `skip(self)`: every instance shares the function's entries.
    Skipped,
    /// Hashed, so instances with different state have different entries: through `&*self`
    /// (`&self`, `&mut self`, `self: Arc<Self>`, ...) or, for `self` taken by value, `&self`.
    Hashed { self_token: Token![self], by_value: bool },
}

/// A `#[cached]` function that follows every rule: what the expansion needs, nothing more.
pub(crate) struct Cached {
    pub(crate) db: Path,
    pub(crate) prefix: LitStr,
    pub(crate) ttl: TtlValue,
    pub(crate) version: Option<u32>,
    /// The value format's variant name in `cache_runtime::__private::Format`.
    pub(crate) format: Ident,
    /// `jitter = "N%"`: each fill's TTL is drawn from `[ttl × (100 − N) %, ttl]`; 0 when absent.
    pub(crate) jitter_percent: u8,
    /// `eager_refresh = "N%"`: a hit on an entry past N % of its TTL refreshes it; 0 when absent.
    pub(crate) eager_refresh_percent: u8,
    /// `stale_if_error = ...`: seconds an entry is kept past its TTL to answer when the function
    /// fails; 0 when absent.
    pub(crate) stale_if_error_seconds: u64,
    /// `near = ...`: seconds a typed copy may answer in process, and where the option is written
    /// (the cached type's `Clone` requirement is reported there); `None` when absent.
    pub(crate) near: Option<(u64, Span)>,
    pub(crate) receiver: Receiver,
    /// The parameters hashed into the key, in declaration order, with their types.
    pub(crate) key_params: Vec<(Ident, Type)>,
    /// The types of the `skip`ped parameters.
    pub(crate) skipped_types: Vec<Type>,
    /// Parameters written as patterns (`(a, b): (u32, u32)`): the name the expansion binds the
    /// whole argument to (and hashes), and the pattern it destructures it with in the body.
    pub(crate) destructured: Vec<(Ident, Pat)>,
    pub(crate) ret: Type,
    pub(crate) policy: Policy,
}

/// Checks everything, reporting every problem; `None` if there was any.
pub(crate) fn cached(args: CachedArgs, func: &ItemFn, errors: &mut Errors) -> Option<Cached> {
    let db = db(args.db, errors);
    let prefix = prefix(args.prefix, errors);
    let ttl_seconds = ttl(args.ttl, errors);
    let receiver = receiver(func, &args.skip, errors);
    let params = key_params(func, &args.skip, errors);
    let format = format(args.format, errors);
    let jitter_percent = jitter(args.jitter, errors);
    let eager_refresh_percent = eager_refresh(args.eager_refresh, errors);
    let stale_if_error_seconds = stale_if_error(args.stale_if_error, errors);
    let near = near(args.near, errors);
    let ret = return_type(func, errors);
    if func.sig.asyncness.is_none() {
        errors.on(
            func.sig.fn_token,
            "#[cached] needs an `async fn`: a cache lookup is network I/O and must not block the caller; write `async fn`",
        );
    }
    let (policy, ret) = ret?;
    let params = params?;
    Some(Cached {
        db: db?,
        prefix: prefix?,
        ttl: ttl_seconds?,
        version: args.version,
        format: format?,
        jitter_percent: jitter_percent?,
        eager_refresh_percent: eager_refresh_percent?,
        stale_if_error_seconds: stale_if_error_seconds?,
        near: near?,
        receiver: receiver?,
        key_params: params.key,
        skipped_types: params.skipped,
        destructured: params.destructured,
        ret,
        policy,
    })
}

fn missing(option: &str, example: &str, why: &str) -> syn::Error {
    syn::Error::new(
        Span::call_site(),
        format!("missing option `{option}`: {why}; add `{example}` (options: {OPTIONS})"),
    )
}

fn db(db: Given<DbArg>, errors: &mut Errors) -> Option<Path> {
    match db {
        Given::Invalid => None,
        Given::Absent => {
            errors.push(missing("db", "db = MarketData", "every cached function names its Redis DB by type"));
            None
        }
        Given::Valid(DbArg::Number(n)) => {
            errors.on(
                &n,
                format_args!(
                    "hard-coded DB numbers are forbidden by the DB allocation standard: name the DB by its type instead of `{n}`, e.g. `db = MarketData` (the types are in cache_runtime::db)"
                ),
            );
            None
        }
        Given::Valid(DbArg::Type(path)) if path.segments.last().is_some_and(|s| s.ident == "Reserved") => {
            errors.on(&path, "DB 15 (`Reserved`) is reserved for the platform: pick a DB type for 0-14 from cache_runtime::db");
            None
        }
        Given::Valid(DbArg::Type(path)) => Some(path),
    }
}

fn prefix(prefix: Given<LitStr>, errors: &mut Errors) -> Option<LitStr> {
    let lit = match prefix {
        Given::Valid(lit) => lit,
        Given::Invalid => return None,
        Given::Absent => {
            let why = "keys without a namespace are forbidden";
            errors.push(missing("prefix", "prefix = \"market\"", why));
            return None;
        }
    };
    // One rule for compile time and run time (`cache_runtime::Cache::new` applies it too).
    let problem = cache_rules::prefix_problem(&lit.value());
    match problem {
        Some(problem) => {
            errors.on(&lit, problem);
            None
        }
        None => Some(lit),
    }
}

/// The largest `jitter`: beyond it an entry could live a small fraction of its declared TTL.
const MAX_JITTER_PERCENT: u64 = 50;

fn jitter(jitter: Option<(u64, LitStr)>, errors: &mut Errors) -> Option<u8> {
    let bounds = 1..=MAX_JITTER_PERCENT;
    percent(jitter, &bounds, errors, format_args!("`jitter` is from 1% to {MAX_JITTER_PERCENT}% of the TTL (entries expire between the TTL less that share and the TTL, never later); leave it out for none"))
}

/// The bounds of `eager_refresh`: earlier than half the TTL would refresh most entries twice as
/// often as they expire; 100 % is the expiry itself.
const EAGER_REFRESH_PERCENT: std::ops::RangeInclusive<u64> = 50..=99;

fn eager_refresh(eager_refresh: Option<(u64, LitStr)>, errors: &mut Errors) -> Option<u8> {
    let (low, high) = (EAGER_REFRESH_PERCENT.start(), EAGER_REFRESH_PERCENT.end());
    percent(eager_refresh, &EAGER_REFRESH_PERCENT, errors, format_args!("`eager_refresh` is from {low}% to {high}% of the TTL (a hit on an entry that old refreshes it); leave it out to refresh on expiry"))
}

/// A percentage option: 0 when absent, the value when within `bounds`, else `message` on its
/// literal.
fn percent(
    given: Option<(u64, LitStr)>,
    bounds: &std::ops::RangeInclusive<u64>,
    errors: &mut Errors,
    message: std::fmt::Arguments<'_>,
) -> Option<u8> {
    match given {
        None => Some(0),
        Some((percent, _)) if bounds.contains(&percent) => u8::try_from(percent).ok(),
        Some((_, lit)) => {
            errors.on(&lit, message);
            None
        }
    }
}

fn stale_if_error(window: Option<(u64, Span)>, errors: &mut Errors) -> Option<u64> {
    match window {
        None => Some(0),
        Some((seconds @ 1..=cache_rules::MAX_TTL_SECONDS, _)) => Some(seconds),
        Some((_, span)) => {
            errors.at(
                span,
                format_args!(
                    "`stale_if_error` is from 1 second to {} days: how long past its TTL an entry may still answer when the function fails",
                    cache_rules::MAX_TTL_SECONDS / 86_400
                ),
            );
            None
        }
    }
}

fn near(life: Option<(u64, Span)>, errors: &mut Errors) -> Option<Option<(u64, Span)>> {
    match life {
        None => Some(None),
        Some((seconds @ 1..=cache_rules::MAX_TTL_SECONDS, span)) => Some(Some((seconds, span))),
        Some((_, span)) => {
            errors.at(
                span,
                format_args!(
                    "`near` is from 1 second to {} days: how long a typed copy may answer in this process (never past the entry's TTL)",
                    cache_rules::MAX_TTL_SECONDS / 86_400
                ),
            );
            None
        }
    }
}

fn format(format: Option<Ident>, errors: &mut Errors) -> Option<Ident> {
    match format {
        None => Some(Ident::new("Json", Span::call_site())),
        Some(f) if f == "Json" || f == "MessagePack" => Some(f),
        Some(f) => {
            errors.on(&f, format_args!("unknown format `{f}`: `format` is `Json` (the default, readable by other languages) or `MessagePack`"));
            None
        }
    }
}

/// A TTL that follows the rule: seconds known now, or a constant expression whose value the
/// expansion checks at compile time (`__private::checked_ttl`, the same bounds).
pub(crate) enum TtlValue {
    Seconds(u64),
    Const(syn::Expr),
}

fn ttl(ttl: Given<crate::args::Ttl>, errors: &mut Errors) -> Option<TtlValue> {
    use crate::args::Ttl;
    match ttl {
        Given::Invalid => None,
        Given::Absent => {
            errors.push(missing("ttl", "ttl = 300", "every cache entry must expire"));
            None
        }
        Given::Valid(Ttl::Seconds { seconds: 0, span }) => {
            errors.at(span, "`ttl` must be more than 0 seconds: every cache entry must expire");
            None
        }
        Given::Valid(Ttl::Seconds { seconds, span }) if seconds > cache_rules::MAX_TTL_SECONDS => {
            let max = cache_rules::MAX_TTL_SECONDS;
            errors.at(
                span,
                format_args!(
                    "`ttl` may be at most {days} days ({max} seconds): write `ttl = \"{days}d\"` or less",
                    days = max / 86_400
                ),
            );
            None
        }
        Given::Valid(Ttl::Seconds { seconds, .. }) => Some(TtlValue::Seconds(seconds)),
        // The generated `const` items cannot see an `impl`'s `Self`; `#[cached_impl]` writes the
        // type's name in its place before this runs.
        Given::Valid(Ttl::Const(expr)) if crate::expand::mentions(&expr, "Self") => {
            errors.on(
                &expr,
                "a `ttl` that names `Self` needs `#[cached_impl]` on the `impl` block (or a module-level constant)",
            );
            None
        }
        Given::Valid(Ttl::Const(expr)) => Some(TtlValue::Const(expr)),
    }
}

/// Whether `self` is hashed, skipped, or absent; `skip(self)` needs a `self`.
fn receiver(func: &ItemFn, skip: &[Ident], errors: &mut Errors) -> Option<Receiver> {
    let skipped = skip.iter().find(|name| *name == "self");
    match (func.sig.receiver(), skipped) {
        (Some(_), Some(_)) => Some(Receiver::Skipped),
        (Some(r), None) => {
            let by_value = r.reference.is_none()
                && matches!(&*r.ty, Type::Path(p) if p.qself.is_none() && p.path.is_ident("Self"));
            Some(Receiver::Hashed { self_token: r.self_token, by_value })
        }
        (None, None) => Some(Receiver::None),
        (None, Some(name)) => {
            errors.on(
                name,
                format_args!(
                    "`{}` takes no `self`: `skip(self)` leaves a method's receiver out of the key; remove it",
                    func.sig.ident
                ),
            );
            None
        }
    }
}

/// The typed parameters, minus `skip`ped ones; every other `skip` name must be a parameter.
/// The parameters, sorted: hashed into the key, skipped, written as patterns.
struct Params {
    key: Vec<(Ident, Type)>,
    skipped: Vec<Type>,
    destructured: Vec<(Ident, Pat)>,
}

/// The typed parameters, minus `skip`ped ones; every `skip` name must be a parameter. A
/// parameter written as a pattern is hashed whole, under a name of its own.
fn key_params(func: &ItemFn, skip: &[Ident], errors: &mut Errors) -> Option<Params> {
    let mut ok = true;
    let mut params = Vec::new();
    let mut destructured = Vec::new();
    for (i, input) in func.sig.inputs.iter().enumerate() {
        let FnArg::Typed(typed) = input else { continue };
        match &*typed.pat {
            Pat::Ident(p) if p.subpat.is_none() => params.push((p.ident.clone(), (*typed.ty).clone())),
            pattern => {
                // Spanned at the pattern: an argument that is not Serialize is reported there.
                let name = Ident::new(&format!("__cache_arg{i}"), pattern.span());
                destructured.push((name.clone(), pattern.clone()));
                params.push((name, (*typed.ty).clone()));
            }
        }
    }
    // `self` is judged by `receiver`.
    for name in skip.iter().filter(|name| *name != "self") {
        if !params.iter().any(|(p, _)| p == name) {
            ok = false;
            let in_pattern =
                destructured.iter().any(|(_, pattern)| crate::expand::mentions(pattern, &name.to_string()));
            if in_pattern {
                errors.on(
                    name,
                    format_args!(
                        "`{name}` is bound by a pattern, and `skip` names whole parameters: give that \
                         parameter a plain name, skip that name, and destructure it in the body"
                    ),
                );
            } else {
                errors.on(
                    name,
                    format_args!(
                        "`{name}` is not a parameter of `{}`: `skip` names parameters to leave out of the key",
                        func.sig.ident
                    ),
                );
            }
        }
    }
    let (skipped, key): (Vec<_>, Vec<_>) = params.into_iter().partition(|(p, _)| skip.contains(p));
    ok.then(|| Params { key, skipped: skipped.into_iter().map(|(_, ty)| ty).collect(), destructured })
}

fn return_type(func: &ItemFn, errors: &mut Errors) -> Option<(Policy, Type)> {
    const NOTHING: &str = "a #[cached] function must return the value to cache: this one returns nothing";
    let ReturnType::Type(_, ty) = &func.sig.output else {
        errors.on(&func.sig.ident, NOTHING);
        return None;
    };
    // `-> ()` written out is the same as no return type.
    if matches!(&**ty, Type::Tuple(t) if t.elems.is_empty()) {
        errors.on(ty, NOTHING);
        return None;
    }
    let last = match &**ty {
        Type::Path(p) if p.qself.is_none() => p.path.segments.last().map(|s| s.ident.to_string()),
        _ => None,
    };
    let policy = match last.as_deref() {
        Some("Result") => Policy::OkOnly,
        Some("Option") => Policy::SomeOnly,
        _ => Policy::Whole,
    };
    if matches!(&**ty, Type::ImplTrait(_)) {
        errors.on(ty, "a #[cached] function must return a concrete type the cache can store (Serialize + Deserialize), not `impl Trait`");
        return None;
    }
    Some((policy, (**ty).clone()))
}

/// One checked entry of `#[invalidates(...)]`: a path to a `#[cached]` function and what to drop.
pub(crate) struct Invalidation {
    pub(crate) path: Path,
    /// `None` for `f(..)`: every entry of the function.
    pub(crate) args: Option<Vec<syn::Expr>>,
}

/// Checks the entries (and, for the attribute, that the function is `async`).
pub(crate) fn invalidations(
    entries: Vec<syn::Expr>,
    func: Option<&ItemFn>,
    errors: &mut Errors,
) -> Vec<Invalidation> {
    const FORM: &str = "each entry names a #[cached] function with its key arguments, `quote(symbol)`, or `quote(..)` to drop every entry of it";
    if let Some(func) = func {
        if func.sig.asyncness.is_none() && crate::expand::mentions(&func.sig.output, "Pin") {
            // `#[async_trait]` expanded first, and made the `async fn` one returning a boxed future.
            errors.on(func.sig.fn_token, "in an `#[async_trait]` impl, write `#[cached_impl]` above `#[async_trait]` on the `impl` block: it expands `#[invalidates]` while the function is the `async fn` you wrote");
        } else if func.sig.asyncness.is_none() {
            errors.on(func.sig.fn_token, "#[invalidates] needs an `async fn`: invalidation talks to the cache after the body returns; write `async fn`");
        }
    }
    if entries.is_empty() {
        errors.at(Span::call_site(), format_args!("name what to invalidate: {FORM}"));
    }
    let mut checked = Vec::new();
    for entry in entries {
        let syn::Expr::Call(call) = entry else {
            errors.on(&entry, FORM);
            continue;
        };
        let syn::Expr::Path(path) = &*call.func else {
            errors.on(&call.func, FORM);
            continue;
        };
        if path.qself.is_some() {
            errors.on(&call.func, FORM);
            continue;
        }
        let is_all = |e: &syn::Expr| matches!(e, syn::Expr::Range(r) if r.start.is_none() && r.end.is_none());
        let args: Vec<syn::Expr> = call.args.into_iter().collect();
        let args = match args.as_slice() {
            [only] if is_all(only) => None,
            _ => {
                if let Some(range) = args.iter().find(|a| is_all(a)) {
                    errors.on(range, "`..` stands alone: `quote(..)` drops every entry of `quote`; name all key arguments to drop one");
                    continue;
                }
                Some(args)
            }
        };
        checked.push(Invalidation { path: path.path.clone(), args });
    }
    checked
}

/// Whether the function's result says "it worked", by the return type as written: `Result`
/// means `Ok`; anything else always.
pub(crate) fn returns_result(func: &ItemFn) -> bool {
    match &func.sig.output {
        ReturnType::Type(_, ty) => {
            matches!(&**ty, Type::Path(p) if p.path.segments.last().is_some_and(|s| s.ident == "Result"))
        }
        ReturnType::Default => false,
    }
}
