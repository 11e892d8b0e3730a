//! `#[cached]` behaviour, each test run against the embedded backend and a real Redis.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use cache_runtime::db::{MarketData, Session, User};
use cache_runtime::{cached, cached_impl, KeyBuilder};
use serde::{Deserialize, Serialize};
use support::Fixture;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Quote {
    symbol: String,
    price: f64,
}

#[derive(Debug, PartialEq)]
pub struct FeedError;

#[cached(db = MarketData, prefix = "market", ttl = 300, skip(calls))]
async fn quote(symbol: &str, calls: &AtomicUsize) -> Result<Quote, FeedError> {
    calls.fetch_add(1, SeqCst);
    Ok(Quote { symbol: symbol.to_owned(), price: 150.25 })
}

fn quote_key(symbol: &str) -> String {
    KeyBuilder::new("cached", "market", "quote").arg(symbol).finish().unwrap()
}

async fn miss_then_hit(fx: &mut Fixture) {
    let calls = AtomicUsize::new(0);
    let first = fx.run(quote("AAPL", &calls)).await;
    let second = fx.run(quote("AAPL", &calls)).await;
    assert_eq!(first, second);
    assert_eq!(first.unwrap().symbol, "AAPL");
    if calls.load(SeqCst) != 1 {
        let stats = fx.stats().await;
        panic!("the second call must be a hit; counted: {:?}", stats.get(5, "market"));
    }
    fx.run(quote("MSFT", &calls)).await.unwrap();
    assert_eq!(calls.load(SeqCst), 2, "another argument is another entry");
    let stats = fx.stats().await;
    let market = stats.get(5, "market").expect("counted under DB 5 / market");
    assert_eq!((market.hits, market.misses, market.fills), (1, 2, 2));
    assert_eq!(market.hit_rate(), Some(1.0 / 3.0));
}

async fn key_is_pinned(fx: &mut Fixture) {
    // The exact key of known arguments: if this changes, every deployed cache is cold and every
    // other language reading these keys breaks. Change it only on purpose.
    assert_eq!(quote_key("AAPL"), "market:quote:{b0c98e3d57a1c3c74d3011602d995cbb}");
    let calls = AtomicUsize::new(0);
    fx.run(quote("AAPL", &calls)).await.unwrap();
    assert!(fx.ttl::<MarketData>(&quote_key("AAPL")).await.is_some(), "the call wrote the pinned key");
}

async fn every_entry_has_a_bounded_ttl(fx: &mut Fixture) {
    let calls = AtomicUsize::new(0);
    fx.run(quote("TTL", &calls)).await.unwrap();
    let ttl = fx.ttl::<MarketData>(&quote_key("TTL")).await.expect("entry present with a TTL");
    assert!(ttl > Duration::from_secs(290) && ttl <= Duration::from_secs(300), "ttl = {ttl:?}");
}

#[cached(db = MarketData, prefix = "market", ttl = "2s", skip(calls))]
async fn short_lived(n: u32, calls: &AtomicUsize) -> u32 {
    calls.fetch_add(1, SeqCst);
    n * 2
}

async fn entries_expire(fx: &mut Fixture) {
    let calls = AtomicUsize::new(0);
    assert_eq!(fx.run(short_lived(21, &calls)).await, 42);
    assert_eq!(fx.run(short_lived(21, &calls)).await, 42);
    assert_eq!(calls.load(SeqCst), 1);
    tokio::time::sleep(Duration::from_millis(2300)).await;
    assert_eq!(fx.run(short_lived(21, &calls)).await, 42);
    assert_eq!(calls.load(SeqCst), 2, "after its TTL the entry is gone");
}

async fn entry_lands_in_its_db_only(fx: &mut Fixture) {
    let calls = AtomicUsize::new(0);
    fx.run(quote("DB5", &calls)).await.unwrap();
    let key = quote_key("DB5");
    match fx.is_remote() {
        true => {
            for db in 0..16u8 {
                let n: u64 = fx.raw(db, "EXISTS", &key, &[]).await.unwrap();
                assert_eq!(n, u64::from(db == 5), "key in DB {db}");
            }
        }
        false => {
            assert!(fx.ttl::<MarketData>(&key).await.is_some());
            assert!(fx.ttl::<User>(&key).await.is_none(), "not in DB 0");
            assert!(fx.ttl::<Session>(&key).await.is_none(), "not in DB 3");
        }
    }
}

mod other_team {
    use super::*;
    /// Same function name and arguments as `quote`, another namespace.
    #[cached(db = MarketData, prefix = "market-eu", ttl = 300, skip(calls))]
    pub async fn quote(symbol: &str, calls: &AtomicUsize) -> Result<Quote, FeedError> {
        calls.fetch_add(1, SeqCst);
        Ok(Quote { symbol: symbol.to_owned(), price: 99.0 })
    }
}

async fn prefixes_namespace_keys(fx: &mut Fixture) {
    let calls = AtomicUsize::new(0);
    let ours = fx.run(quote("NS", &calls)).await.unwrap();
    let theirs = fx.run(other_team::quote("NS", &calls)).await.unwrap();
    assert_eq!(calls.load(SeqCst), 2, "one entry per prefix");
    assert_ne!(ours, theirs);
    let key = KeyBuilder::new("cached::other_team", "market-eu", "quote").arg("NS").finish().unwrap();
    assert!(key.starts_with("market-eu:quote:{"), "{key}");
    assert!(fx.ttl::<MarketData>(&key).await.is_some());
}

#[cached(db = MarketData, prefix = "market", ttl = 300, skip(calls))]
async fn fallible(n: i32, calls: &AtomicUsize) -> Result<i32, String> {
    calls.fetch_add(1, SeqCst);
    if n < 0 {
        Err(format!("{n} is negative"))
    } else {
        Ok(n)
    }
}

#[cached(db = MarketData, prefix = "market", ttl = 300, skip(calls))]
async fn lookup(n: i32, calls: &AtomicUsize) -> Option<i32> {
    calls.fetch_add(1, SeqCst);
    (n > 0).then_some(n)
}

async fn result_caches_ok_only(fx: &mut Fixture) {
    let calls = AtomicUsize::new(0);
    for _ in 0..3 {
        assert_eq!(fx.run(fallible(-1, &calls)).await, Err("-1 is negative".to_owned()));
    }
    assert_eq!(calls.load(SeqCst), 3, "errors are never cached");
    for _ in 0..3 {
        assert_eq!(fx.run(fallible(7, &calls)).await, Ok(7));
    }
    assert_eq!(calls.load(SeqCst), 4, "Ok is cached");
}

async fn option_caches_some_only(fx: &mut Fixture) {
    let calls = AtomicUsize::new(0);
    for _ in 0..3 {
        assert_eq!(fx.run(lookup(0, &calls)).await, None);
    }
    assert_eq!(calls.load(SeqCst), 3, "None is never cached");
    for _ in 0..3 {
        assert_eq!(fx.run(lookup(5, &calls)).await, Some(5));
    }
    assert_eq!(calls.load(SeqCst), 4, "Some is cached");
}

/// A connection handle that is no part of the key (and could not be: it is not Serialize).
pub struct Pool {
    calls: AtomicUsize,
}

#[cached(db = MarketData, prefix = "market", ttl = 300, skip(pool, trace_id))]
async fn candles(pool: &Pool, symbol: String, trace_id: u64, interval: &str) -> Vec<f64> {
    pool.calls.fetch_add(1, SeqCst);
    assert!(trace_id > 0);
    vec![symbol.len() as f64, interval.len() as f64]
}

async fn skipped_args_are_not_in_the_key(fx: &mut Fixture) {
    let pool = Pool { calls: AtomicUsize::new(0) };
    let a = fx.run(candles(&pool, "AAPL".into(), 1, "1m")).await;
    let b = fx.run(candles(&pool, "AAPL".into(), 2, "1m")).await;
    assert_eq!(a, b);
    assert_eq!(pool.calls.load(SeqCst), 1, "trace_id is skipped: same entry");
    fx.run(candles(&pool, "AAPL".into(), 1, "5m")).await;
    assert_eq!(pool.calls.load(SeqCst), 2, "interval is part of the key");
    let key = KeyBuilder::new("cached", "market", "candles").arg("AAPL").arg("1m").finish().unwrap();
    assert!(fx.ttl::<MarketData>(&key).await.is_some(), "key = symbol and interval, in order");
}

mod v1 {
    use super::*;
    #[cached(db = MarketData, prefix = "market", ttl = 300, skip(calls))]
    pub async fn depth(symbol: &str, calls: &AtomicUsize) -> u32 {
        calls.fetch_add(1, SeqCst);
        symbol.len() as u32
    }
}

mod v2 {
    use super::*;
    #[cached(db = MarketData, prefix = "market", ttl = 300, version = 2, skip(calls))]
    pub async fn depth(symbol: &str, calls: &AtomicUsize) -> String {
        calls.fetch_add(1, SeqCst);
        symbol.to_lowercase()
    }
}

async fn version_retires_old_entries(fx: &mut Fixture) {
    let calls = AtomicUsize::new(0);
    assert_eq!(fx.run(v1::depth("ABC", &calls)).await, 3);
    // Same function name and arguments, new value shape: version 2 must not read version 1's u32.
    assert_eq!(fx.run(v2::depth("ABC", &calls)).await, "abc");
    assert_eq!(fx.run(v2::depth("ABC", &calls)).await, "abc");
    assert_eq!(calls.load(SeqCst), 2);
    let v2_key = KeyBuilder::new("cached::v2", "market", "depth").version(2).arg("ABC").finish().unwrap();
    assert!(v2_key.starts_with("market:depth:v2:{"), "{v2_key}");
    assert!(fx.ttl::<MarketData>(&v2_key).await.is_some());
    assert_eq!(fx.stats().await.get(5, "market").unwrap().decode_failures, 0);
}

pub struct QuoteService {
    calls: AtomicUsize,
    venue: String,
}

#[cached_impl]
impl QuoteService {
    /// Docs and attributes survive the expansion. `skip(self)`: every instance shares entries,
    /// as the attribute says (without it, `Self` must be `Serialize`: see tests/keys.rs).
    #[cached(db = MarketData, prefix = "svc", ttl = 60, skip(self))]
    pub async fn best_bid(&self, symbol: &str) -> Result<f64, FeedError> {
        self.calls.fetch_add(1, SeqCst);
        Ok(symbol.len() as f64 + self.venue.len() as f64)
    }
}

async fn methods_on_self(fx: &mut Fixture) {
    let svc = QuoteService { calls: AtomicUsize::new(0), venue: "XNAS".into() };
    assert_eq!(fx.run(svc.best_bid("AAPL")).await, Ok(8.0));
    assert_eq!(fx.run(svc.best_bid("AAPL")).await, Ok(8.0));
    assert_eq!(svc.calls.load(SeqCst), 1);
    // `skip(self)`: another instance reads the same entry.
    let other = QuoteService { calls: AtomicUsize::new(0), venue: "XNYS".into() };
    assert_eq!(fx.run(other.best_bid("AAPL")).await, Ok(8.0));
    assert_eq!(other.calls.load(SeqCst), 0);
}

async fn corrupt_value_is_recomputed(fx: &mut Fixture) {
    let calls = AtomicUsize::new(0);
    let key = quote_key("BAD");
    fx.plant::<MarketData>(&key, b"\xff\xfenot json").await;
    let q = fx.run(quote("BAD", &calls)).await.unwrap();
    assert_eq!(q, Quote { symbol: "BAD".into(), price: 150.25 });
    assert_eq!(calls.load(SeqCst), 1, "a value that does not decode is a miss");
    fx.run(quote("BAD", &calls)).await.unwrap();
    assert_eq!(calls.load(SeqCst), 1, "the entry was overwritten with a good value");
    let market = fx.stats().await.get(5, "market").cloned().unwrap();
    assert_eq!((market.decode_failures, market.hits), (1, 1));
}

/// Not a backend behaviour: run once, on a runtime with caching off.
#[tokio::test]
async fn disabled_runtime_always_runs() {
    let off = Fixture::bare(cache_runtime::Runtime::new(cache_runtime::CacheConfig::disabled()));
    let calls = AtomicUsize::new(0);
    for _ in 0..3 {
        off.run(quote("OFF", &calls)).await.unwrap();
    }
    assert_eq!(calls.load(SeqCst), 3);
    // Counted as calls that skipped the cache, as `PrefixStats::misses` says.
    let counted = off.runtime.stats().get(5, "market").cloned().expect("the calls were counted");
    assert_eq!((counted.misses, counted.hits, counted.fills), (3, 0, 0));
}

/// An argument whose `Serialize` fails cannot make a key: the call runs uncached, and is counted
/// (`key_failures`) and logged once.
pub struct Unhashable;

impl Serialize for Unhashable {
    fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom("this argument cannot be serialized"))
    }
}

#[cached(db = MarketData, prefix = "unhashable", ttl = 60, skip(calls))]
async fn odd(arg: Unhashable, calls: &AtomicUsize) -> u32 {
    let _ = arg;
    calls.fetch_add(1, SeqCst) as u32
}

async fn key_failures_run_uncached_and_are_counted(fx: &mut Fixture) {
    let calls = AtomicUsize::new(0);
    for i in 0..3 {
        assert_eq!(fx.run(odd(Unhashable, &calls)).await, i, "each call runs the function");
    }
    let s = fx.stats().await.get(5, "unhashable").cloned().unwrap();
    assert_eq!((s.key_failures, s.misses, s.hits, s.fills), (3, 3, 0, 0));
}

#[cached(db = MarketData, prefix = "spread", ttl = 100, jitter = "20%")]
async fn jittered(n: u32) -> u32 {
    n
}

#[cached(db = MarketData, prefix = "spread", ttl = 100)]
async fn unjittered(n: u32) -> u32 {
    n
}

/// The TTLs (ms) of the entries of `function` for the arguments `0..n`, filled now.
async fn fill_and_read_ttls(fx: &mut Fixture, function: &str, n: u32) -> Vec<u128> {
    let mut ttls = Vec::new();
    for i in 0..n {
        match function {
            "jittered" => fx.run(jittered(i)).await,
            _ => fx.run(unjittered(i)).await,
        };
    }
    for i in 0..n {
        let key = KeyBuilder::new("cached", "spread", function).arg(&i).finish().unwrap();
        ttls.push(fx.ttl::<MarketData>(&key).await.expect("filled with a TTL").as_millis());
    }
    ttls
}

async fn jitter_spreads_expiry_never_past_the_ttl(fx: &mut Fixture) {
    let spread = |t: &[u128]| t.iter().max().unwrap() - t.iter().min().unwrap();
    // Without the option, entries filled together expire together (within the fill loop's time).
    let together = fill_and_read_ttls(fx, "unjittered", 60).await;
    assert!(spread(&together) < 2_000, "unjittered TTLs spread {} ms: {together:?}", spread(&together));
    // With `jitter = "20%"`, each TTL is drawn from [80 s, 100 s]: never longer than declared, and
    // 60 uniform draws over 20 s span more than half of it (all 60 inside 10 s: p < 1e-15).
    let jittered = fill_and_read_ttls(fx, "jittered", 60).await;
    assert!(jittered.iter().all(|&t| t <= 100_000), "longer than the TTL: {jittered:?}");
    assert!(jittered.iter().all(|&t| t >= 78_000), "shorter than the share allows: {jittered:?}");
    assert!(spread(&jittered) > 10_000, "jittered TTLs spread only {} ms: {jittered:?}", spread(&jittered));
}

on_every_backend!(
    jitter_spreads_expiry_never_past_the_ttl,
    key_failures_run_uncached_and_are_counted,
    miss_then_hit,
    key_is_pinned,
    every_entry_has_a_bounded_ttl,
    entries_expire,
    entry_lands_in_its_db_only,
    prefixes_namespace_keys,
    result_caches_ok_only,
    option_caches_some_only,
    skipped_args_are_not_in_the_key,
    version_retires_old_entries,
    methods_on_self,
    corrupt_value_is_recomputed,
);

#[cached(db = MarketData, prefix = "packed", ttl = 300, format = MessagePack, skip(calls))]
async fn packed_quote(symbol: &str, calls: &AtomicUsize) -> Result<Quote, FeedError> {
    calls.fetch_add(1, SeqCst);
    Ok(Quote { symbol: symbol.to_owned(), price: 99.5 })
}

async fn message_pack_format(fx: &mut Fixture) {
    let calls = AtomicUsize::new(0);
    let first = fx.run(packed_quote("MP", &calls)).await.unwrap();
    assert_eq!(fx.run(packed_quote("MP", &calls)).await.unwrap(), first);
    if calls.load(SeqCst) != 1 {
        let stats = fx.stats().await;
        panic!("the second call must be a hit; counted: {:?}", stats.get(5, "packed"));
    }
    let key = KeyBuilder::new("cached", "packed", "packed_quote").arg("MP").finish().unwrap();
    assert!(fx.ttl::<MarketData>(&key).await.is_some());
    if let Some(raw) = fx.raw::<Vec<u8>>(5, "GET", &key, &[]).await {
        assert_eq!(raw[0], 0x93, "a three-element MessagePack array, not JSON: {raw:?}");
        // 1 + 9 (a microsecond generation) + 13 (the quote, fields by position) + 9 (its shape).
        assert!(raw.len() <= 32, "compact: fields by position ({} bytes)", raw.len());
    }
}

mod formats {
    use super::*;
    on_every_backend!(message_pack_format);
}
