//! Every `#[cached]` function and every invalidation site of the binary, registered at link time
//! (`inventory`): [`functions`] lists them, [`never_invalidated`] is the audit a team runs in its
//! tests, and [`key_space_conflicts`] is what a new [`Runtime`](crate::Runtime) reports at
//! start-up.
//!
//! ```
//! use cache_runtime::{cached, db::MarketData, invalidates, registry};
//!
//! #[cached(db = MarketData, prefix = "doc_registry", ttl = 300)]
//! async fn price(symbol: &str) -> f64 { 1.0 }
//!
//! #[invalidates(price(symbol))]
//! async fn set_price(symbol: &str) {}
//!
//! let price = registry::functions().into_iter().find(|f| f.prefix == "doc_registry").unwrap();
//! assert_eq!(price.name, "price");
//! assert_eq!(price.ttl_seconds, 300);
//! assert_eq!(price.key_pattern, "doc_registry:price:*");
//! assert!(price.invalidated_by[0].ends_with("::set_price"));
//! assert!(registry::never_invalidated().iter().all(|f| f.prefix != "doc_registry"));
//! ```
//!
//! A site names its target by path. A free function is resolved exactly (through its companion);
//! a method (`Type::f`, `Self::f`) is matched by the type's name and the function's name, since a
//! type's path cannot be followed at link time: `Self::f` matches the methods `f` written in the
//! site's own module.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use serde::Serialize;

use crate::key;
use crate::spec::{CachedFn, Spec};
use crate::value::Format;

/// One `#[cached]` function, as the macro registers it (not an API: built by the macro).
#[doc(hidden)]
pub struct Registration {
    spec: Spec,
    /// The `Self` type's name as written in the `impl` (last path segment), `""` for a free
    /// function.
    owner: &'static str,
    /// For a method of a non-generic `impl`, `type_name::<Self>` (what its keys hash); a generic
    /// `impl`'s type cannot be named without its arguments.
    owner_type: Option<fn() -> &'static str>,
    db_name: &'static str,
}

impl Registration {
    #[doc(hidden)]
    pub const fn new(
        spec: Spec,
        owner: &'static str,
        owner_type: Option<fn() -> &'static str>,
        db_name: &'static str,
    ) -> Self {
        Registration { spec, owner, owner_type, db_name }
    }

    /// The function as the runtime identifies it, if it can be named here.
    fn cached_fn(&'static self) -> Option<CachedFn> {
        match (self.owner, self.owner_type) {
            ("", Some(holder)) => Some(CachedFn::free_in(&self.spec, holder())),
            ("", None) => Some(CachedFn::free(&self.spec)),
            (_, Some(type_name)) => Some(CachedFn::method(&self.spec, type_name())),
            (_, None) => None,
        }
    }
}

/// The prefixes `Cache` handles of this process were made with, by DB.
static HANDLE_PREFIXES: Mutex<BTreeMap<u8, BTreeSet<String>>> = Mutex::new(BTreeMap::new());

/// Records that a [`Cache`](crate::Cache) handle of this process uses `prefix` in `db` (its
/// constructor calls it): the admin route clears the prefixes of this process's functions and
/// handles, and no other.
pub(crate) fn record_handle_prefix(db: u8, prefix: &str) {
    let mut known = HANDLE_PREFIXES.lock().unwrap_or_else(PoisonError::into_inner);
    let in_db = known.entry(db).or_default();
    if !in_db.contains(prefix) {
        in_db.insert(prefix.to_owned());
    }
}

/// Every `(db, prefix)` this process caches under: its `#[cached]` functions' and the handles
/// it has made, sorted (what the admin routes may clear).
#[cfg(feature = "admin")]
pub(crate) fn prefixes() -> BTreeSet<(u8, String)> {
    let mut all: BTreeSet<(u8, String)> =
        inventory::iter::<Registration>.into_iter().map(|r| (r.spec.db, r.spec.prefix.to_owned())).collect();
    let handles = HANDLE_PREFIXES.lock().unwrap_or_else(PoisonError::into_inner);
    for (db, in_db) in handles.iter() {
        all.extend(in_db.iter().map(|prefix| (*db, prefix.clone())));
    }
    all
}

/// The prefixes whose keys the near tier must hear about (`{prefix}:` of every function with the
/// `near` option, or of every function when `all`), none of which starts another.
pub(crate) fn near_prefixes(all: bool) -> Vec<String> {
    let mut prefixes: Vec<String> = inventory::iter::<Registration>
        .into_iter()
        .filter(|r| all || !r.spec.near.is_zero())
        .map(|r| format!("{}:", r.spec.prefix))
        .collect();
    prefixes.sort();
    prefixes.dedup();
    // Redis refuses overlapping prefixes; the shorter one covers the longer.
    let mut kept: Vec<String> = Vec::new();
    for prefix in prefixes {
        if !kept.iter().any(|k| prefix.starts_with(k.as_str())) {
            kept.push(prefix);
        }
    }
    kept
}

/// Why a name given at run time ([`Runtime::invalidate_function`](crate::Runtime::invalidate_function),
/// the admin clear route) names no single cached function.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FindError {
    /// No cached function has that path or name.
    Unknown(String),
    /// Several functions have that name: their paths, one of which to give instead.
    Ambiguous(Vec<String>),
    /// A method of a generic `impl`: it has no one type to name at run time; invalidate it with
    /// `invalidate!(Type::<Args>::f(..))` in code.
    Generic(String),
}

impl std::fmt::Display for FindError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FindError::Unknown(name) => write!(f, "no cached function is named `{name}`"),
            FindError::Ambiguous(paths) => {
                write!(f, "several cached functions have that name; give one of: {}", paths.join(", "))
            }
            FindError::Generic(path) => write!(
                f,
                "`{path}` is a method of a generic `impl`: invalidate it in code, with `invalidate!(Type::<..>::f(..))`"
            ),
        }
    }
}

impl std::error::Error for FindError {}

/// The cached function named `name`: its path (`module::name`, `module::Type::name`) or, when
/// only one function has it, its bare name (`name`, `Type::name`).
pub(crate) fn find(name: &str) -> Result<(FunctionInfo, CachedFn), FindError> {
    let all: Vec<(&'static Registration, FunctionInfo)> = inventory::iter::<Registration>
        .into_iter()
        .map(|r| (r, FunctionInfo::from_registration(r)))
        .collect();
    let found = match all.iter().find(|(_, info)| info.path == name) {
        Some(found) => found,
        None => {
            let suffix = format!("::{name}");
            let mut candidates: Vec<&(&Registration, FunctionInfo)> =
                all.iter().filter(|(_, info)| info.path.ends_with(&suffix)).collect();
            candidates.sort_by(|a, b| a.1.path.cmp(&b.1.path));
            candidates.dedup_by(|a, b| a.1.path == b.1.path);
            match candidates.as_slice() {
                [] => return Err(FindError::Unknown(name.to_owned())),
                [one] => *one,
                many => return Err(FindError::Ambiguous(many.iter().map(|(_, i)| i.path.clone()).collect())),
            }
        }
    };
    let (registration, info) = found;
    match registration.cached_fn() {
        Some(f) => Ok((info.clone(), f)),
        None => Err(FindError::Generic(info.path.clone())),
    }
}

/// One `#[invalidates(...)]` function or `invalidate!` call (not an API: built by the macro).
#[doc(hidden)]
pub struct Site {
    module: &'static str,
    /// The function carrying `#[invalidates]`, or `""` for `invalidate!`.
    function: &'static str,
    line: u32,
    targets: &'static [SiteTarget],
}

impl Site {
    #[doc(hidden)]
    pub const fn new(
        module: &'static str,
        function: &'static str,
        line: u32,
        targets: &'static [SiteTarget],
    ) -> Self {
        Site { module, function, line, targets }
    }

    fn name(&self) -> String {
        match self.function {
            "" => format!("invalidate! in {} (line {})", self.module, self.line),
            f => format!("{}::{f}", self.module),
        }
    }
}

/// What one entry of a site names (not an API: built by the macro).
#[doc(hidden)]
pub enum SiteTarget {
    /// A free function, through its spec companion.
    Free(fn() -> CachedFn),
    /// `Type::f` or `Self::f`.
    Method { owner: &'static str, function: &'static str },
}

inventory::collect!(Registration);
inventory::collect!(Site);

/// One `#[cached]` function of this binary: where it is written and how it caches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[non_exhaustive]
pub struct FunctionInfo {
    /// `module_path!()` where it is written.
    pub module: String,
    /// For a method, the `Self` type's name as the `impl` writes it (last path segment).
    pub owner: Option<String>,
    /// The function's name.
    pub name: String,
    /// `module::Type::name` or `module::name`: how logs and the admin routes name it.
    pub path: String,
    /// DB number.
    pub db: u8,
    /// The DB's name (`cache_db!`'s label).
    pub db_name: String,
    /// The `prefix` option.
    pub prefix: String,
    /// The `ttl` option, in seconds.
    pub ttl_seconds: u64,
    /// The `jitter = "N%"` option: each fill's TTL is shortened by up to this share (0: none).
    pub jitter_percent: u8,
    /// The `eager_refresh = "N%"` option: a hit past this share of the TTL refreshes (0: none).
    pub eager_refresh_percent: u8,
    /// The `stale_if_error` option, in seconds (0: none).
    pub stale_if_error_seconds: u64,
    /// The `near` option, in milliseconds (0: none; the runtime's default may still apply).
    pub near_millis: u64,
    /// The `version` option.
    pub version: Option<u32>,
    /// `json` or `msgpack`.
    pub format: &'static str,
    /// The keys its entries are written under: `{prefix}:{name}[:vN]:*` (one generation key
    /// among them).
    pub key_pattern: String,
    /// The `#[invalidates]` functions and `invalidate!` calls that name it.
    pub invalidated_by: Vec<String>,
}

impl FunctionInfo {
    /// Its TTL as a `Duration`.
    pub fn ttl(&self) -> Duration {
        Duration::from_secs(self.ttl_seconds)
    }

    fn from_registration(r: &Registration) -> Self {
        let spec = &r.spec;
        let owner = (!r.owner.is_empty()).then(|| r.owner.to_owned());
        // A free function written in another function's body: its companion type's path names
        // that function too.
        let nested = match (r.owner, r.owner_type) {
            ("", Some(holder)) => Some(crate::spec::free_owner(spec, holder())).filter(|o| !o.is_empty()),
            _ => None,
        };
        let path = match (&owner, nested) {
            // `type_name` names an `async fn`'s body `{{closure}}`: not part of a path one writes.
            (None, Some(holder)) => holder.replace("::{{closure}}", ""),
            (Some(owner), _) => format!("{}::{owner}::{}", spec.module, spec.function),
            (None, None) => format!("{}::{}", spec.module, spec.function),
        };
        FunctionInfo {
            module: spec.module.to_owned(),
            owner,
            name: spec.function.to_owned(),
            path,
            db: spec.db,
            db_name: r.db_name.to_owned(),
            prefix: spec.prefix.to_owned(),
            ttl_seconds: spec.ttl.as_secs(),
            jitter_percent: spec.jitter_percent,
            eager_refresh_percent: spec.eager_refresh_percent,
            stale_if_error_seconds: spec.stale_if_error.as_secs(),
            near_millis: u64::try_from(spec.near.as_millis()).unwrap_or(u64::MAX),
            version: spec.version,
            format: match spec.format {
                Format::Json => "json",
                Format::MessagePack => "msgpack",
            },
            key_pattern: format!("{}:*", key::function_base(spec)),
            invalidated_by: Vec::new(),
        }
    }

    /// Whether `target` (an entry of `site`) names this function.
    fn named_by(&self, site: &Site, target: &SiteTarget) -> bool {
        match target {
            SiteTarget::Free(spec) => {
                let f = spec();
                let spec = f.spec();
                self.owner.is_none() && self.module == spec.module && self.name == spec.function
            }
            SiteTarget::Method { owner: "Self", function } => {
                self.owner.is_some() && self.module == site.module && self.name == *function
            }
            SiteTarget::Method { owner, function } => {
                self.owner.as_deref() == Some(*owner) && self.name == *function
            }
        }
    }
}

/// Every `#[cached]` function linked into this binary, ordered by path, each with the sites that
/// invalidate it.
pub fn functions() -> Vec<FunctionInfo> {
    let mut functions: Vec<FunctionInfo> =
        inventory::iter::<Registration>.into_iter().map(FunctionInfo::from_registration).collect();
    functions.sort_by(|a, b| a.path.cmp(&b.path));
    functions.dedup_by(|a, b| a.path == b.path && a.db == b.db);
    for site in inventory::iter::<Site> {
        for target in site.targets {
            for f in functions.iter_mut().filter(|f| f.named_by(site, target)) {
                let name = site.name();
                if !f.invalidated_by.contains(&name) {
                    f.invalidated_by.push(name);
                }
            }
        }
    }
    for f in &mut functions {
        f.invalidated_by.sort();
    }
    functions
}

/// The audit: cached functions that no `#[invalidates]` or `invalidate!` names. Each can only
/// ever be as fresh as its TTL (`ttl_seconds`): a team can assert in its tests that this list is
/// what it expects.
///
/// ```
/// for f in cache_runtime::registry::never_invalidated() {
///     println!("{} is refreshed only by its TTL, {} s", f.path, f.ttl_seconds);
/// }
/// ```
pub fn never_invalidated() -> Vec<FunctionInfo> {
    functions().into_iter().filter(|f| f.invalidated_by.is_empty()).collect()
}

/// Pairs of functions whose keys share a space: in one DB, one's `{prefix}:{name}[:vN]:` begins
/// the other's (same prefix and name in two modules or types, or `prefix = "a"` with a function
/// `b` beside `prefix = "a:b"`). Their entries are still told apart by the hash (module and type
/// are in it), but a pattern (`SCAN`, an admin clear by prefix), a metric labelled by prefix and
/// function, or an operator reading keys cannot tell them apart.
pub fn key_space_conflicts() -> Vec<(FunctionInfo, FunctionInfo)> {
    let functions = functions();
    let base = |f: &FunctionInfo| f.key_pattern.trim_end_matches('*').to_owned();
    let mut conflicts = Vec::new();
    for (i, a) in functions.iter().enumerate() {
        for b in &functions[i + 1..] {
            let (ka, kb) = (base(a), base(b));
            if a.db == b.db && (ka.starts_with(&kb) || kb.starts_with(&ka)) {
                conflicts.push((a.clone(), b.clone()));
            }
        }
    }
    conflicts
}

/// Logs every conflict as an error, once per process (the first runtime built).
pub(crate) fn report_conflicts_once() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        for (a, b) in key_space_conflicts() {
            tracing::error!(
                first = %a.path,
                second = %b.path,
                db = a.db,
                "cached functions `{}` and `{}` share a key space in DB {} (`{}` and `{}`): their entries are \
                 apart, but key patterns, admin clears by prefix and metrics by function merge them; give one \
                 another prefix or name",
                a.path, b.path, a.db, a.key_pattern, b.key_pattern
            );
        }
    });
}
