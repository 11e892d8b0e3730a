//! The registry of every cached function in this test binary (`cache_runtime::registry`): what it
//! lists, which sites it links to which functions (free functions, `Type::f`, `Self::f`,
//! `invalidate!`), the audit of functions nothing invalidates, and the start-up report of two
//! functions sharing a key space.

mod support;

use cache_runtime::db::{MarketData, Session};
use cache_runtime::registry::{self, FunctionInfo};
use cache_runtime::{cached, cached_impl, invalidate, invalidates, CacheConfig, Runtime};
use support::logs::Logs;

const TTL: std::time::Duration = std::time::Duration::from_secs(120);

#[cached(
    db = MarketData,
    prefix = "reg_quotes",
    ttl = 60,
    version = 3,
    format = MessagePack,
    jitter = "10%",
    eager_refresh = "90%",
    stale_if_error = "1h"
)]
async fn quote(symbol: &str) -> u64 {
    symbol.len() as u64
}

#[cached(db = Session, prefix = "reg_quotes", ttl = TTL)]
async fn lonely(id: u32) -> u32 {
    id
}

#[invalidates(quote(symbol))]
async fn set_quote(symbol: &str) {
    let _ = symbol;
}

pub struct Book;

#[cached_impl]
impl Book {
    #[cached(db = MarketData, prefix = "reg_book", ttl = 30, skip(self))]
    async fn depth(&self, symbol: &str) -> u32 {
        symbol.len() as u32
    }

    #[cached(db = MarketData, prefix = "reg_book", ttl = 30)]
    async fn spread(symbol: &str) -> u32 {
        symbol.len() as u32
    }

    #[invalidates(Self::depth(symbol))]
    async fn trade(&self, symbol: &str) {
        let _ = symbol;
    }
}

#[invalidates(Book::spread(symbol))]
async fn reprice(symbol: &str) {
    let _ = symbol;
}

/// Two same-named functions with one prefix in two modules: their entries are apart (the module
/// is hashed into each key), their key pattern is not.
mod eu {
    use super::*;
    #[cached(db = MarketData, prefix = "reg_shared", ttl = 60)]
    pub async fn rate(pair: &str) -> u32 {
        pair.len() as u32
    }
}

mod us {
    use super::*;
    #[cached(db = MarketData, prefix = "reg_shared", ttl = 60)]
    pub async fn rate(pair: &str) -> u32 {
        pair.len() as u32 + 1
    }

    /// Same prefix and name in another DB: another key space.
    #[cached(db = Session, prefix = "reg_apart", ttl = 60)]
    pub async fn rate_apart(pair: &str) -> u32 {
        pair.len() as u32
    }
}

/// A `version`ed function of the same name and prefix: its keys are within the others' pattern.
mod asia {
    use super::*;
    #[cached(db = MarketData, prefix = "reg_shared", ttl = 60, version = 2)]
    pub async fn rate(pair: &str) -> u32 {
        pair.len() as u32 + 2
    }
}

fn ours(prefix: &str) -> Vec<FunctionInfo> {
    registry::functions().into_iter().filter(|f| f.prefix == prefix).collect()
}

fn by_name(name: &str) -> FunctionInfo {
    let mut found: Vec<_> = registry::functions().into_iter().filter(|f| f.name == name).collect();
    assert_eq!(found.len(), 1, "one function named {name}: {found:?}");
    found.remove(0)
}

#[test]
fn every_cached_function_is_listed_with_its_options() {
    let quote = by_name("quote");
    assert_eq!(quote.module, "registry");
    assert_eq!(quote.path, "registry::quote");
    assert_eq!(quote.owner, None);
    assert_eq!((quote.db, quote.db_name.as_str()), (5, "market"));
    assert_eq!((quote.ttl_seconds, quote.version, quote.format), (60, Some(3), "msgpack"));
    assert_eq!(quote.key_pattern, "reg_quotes:quote:v3:*");
    assert_eq!(
        (quote.jitter_percent, quote.eager_refresh_percent, quote.stale_if_error_seconds),
        (10, 90, 3600)
    );

    // A `Duration` constant, another DB.
    let lonely = by_name("lonely");
    assert_eq!((lonely.db, lonely.ttl_seconds, lonely.format), (3, 120, "json"));
    assert_eq!(
        (lonely.jitter_percent, lonely.eager_refresh_percent, lonely.stale_if_error_seconds),
        (0, 0, 0)
    );

    // Methods and associated functions, with their type.
    let books = ours("reg_book");
    let paths: Vec<_> = books.iter().map(|f| f.path.as_str()).collect();
    assert_eq!(paths, ["registry::Book::depth", "registry::Book::spread"]);
    assert!(books.iter().all(|f| f.owner.as_deref() == Some("Book")));
}

#[test]
fn sites_are_linked_to_the_functions_they_name() {
    assert_eq!(by_name("quote").invalidated_by, ["registry::set_quote"]);
    // `Self::depth`, from a method of the same module.
    assert_eq!(by_name("depth").invalidated_by, ["registry::trade"]);
    // `Book::spread`, from a free function.
    assert_eq!(by_name("spread").invalidated_by, ["registry::reprice"]);
    // `invalidate!` in a function never called, named by its module and line.
    let rate_apart = by_name("rate_apart");
    assert_eq!(rate_apart.invalidated_by.len(), 1, "{rate_apart:?}");
    assert!(rate_apart.invalidated_by[0].starts_with("invalidate! in registry (line "), "{rate_apart:?}");
}

/// Registered at link time, whether or not it ever runs.
#[allow(dead_code)]
async fn retire_rates() {
    invalidate!(us::rate_apart(..)).await;
}

#[test]
fn the_audit_lists_what_nothing_invalidates() {
    let never: Vec<String> = registry::never_invalidated()
        .into_iter()
        .map(|f| format!("{} ({} s)", f.path, f.ttl_seconds))
        .collect();
    assert_eq!(
        never,
        [
            "registry::asia::rate (60 s)",
            "registry::eu::rate (60 s)",
            "registry::lonely (120 s)",
            "registry::us::rate (60 s)",
        ]
    );
}

#[test]
fn shared_key_spaces_are_reported_loudly_when_a_runtime_starts() {
    let conflicts: Vec<(String, String)> =
        registry::key_space_conflicts().into_iter().map(|(a, b)| (a.path, b.path)).collect();
    // Same prefix and name in two modules, with or without a version (`reg_shared:rate:*` holds
    // `reg_shared:rate:v2:*`). Not the same prefix in another DB, nor two names under one prefix
    // (`depth`, `spread`).
    let pair = |a: &str, b: &str| (format!("registry::{a}::rate"), format!("registry::{b}::rate"));
    assert_eq!(conflicts, [pair("asia", "eu"), pair("asia", "us"), pair("eu", "us")]);

    // The only test of this binary that builds a runtime first: the report is made once per
    // process, by the first one.
    let (logs, _guard) = Logs::capture();
    let runtime = Runtime::new(CacheConfig::memory());
    assert_eq!(runtime.functions(), registry::functions());
    let text = logs.text();
    assert_eq!(logs.count("ERROR", "share a key space"), 3, "{text}");
    assert!(
        text.contains("`registry::eu::rate` and `registry::us::rate` share a key space in DB 5"),
        "{text}"
    );
    assert!(text.contains("`reg_shared:rate:*`"), "{text}");
}
