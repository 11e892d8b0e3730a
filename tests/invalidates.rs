//! `#[invalidates]` and `invalidate!`: what is dropped, when, and what happens when the backend
//! fails in between. Each behaviour runs against both backends.

mod support;

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cache_runtime::db::MarketData;
use cache_runtime::{cached, cached_impl, invalidate, invalidates, CacheConfig, KeyBuilder, Runtime};
use support::Fixture;

/// The source of truth the cached functions read: a price per symbol, and a read counter.
pub struct Db {
    price: AtomicU32,
    reads: AtomicUsize,
}

impl Db {
    fn new(price: u32) -> Db {
        Db { price: AtomicU32::new(price), reads: AtomicUsize::new(0) }
    }
}

pub mod market {
    use super::*;

    #[cached(db = MarketData, prefix = "inv", ttl = 300, skip(db))]
    pub async fn quote(symbol: &str, db: &Db) -> Result<u32, String> {
        db.reads.fetch_add(1, SeqCst);
        assert!(!symbol.is_empty());
        Ok(db.price.load(SeqCst))
    }

    #[cached(db = MarketData, prefix = "inv", ttl = 300, skip(db))]
    pub async fn movers(limit: u32, db: &Db) -> Vec<u32> {
        db.reads.fetch_add(1, SeqCst);
        vec![db.price.load(SeqCst); limit as usize]
    }
}

use market::{movers, quote};

/// A write path: changes the source of truth, then (on `Ok`) drops `quote(symbol)`.
#[invalidates(crate::market::quote(symbol))]
async fn update_quote(symbol: &str, price: u32, db: &Db, fail: bool) -> Result<(), String> {
    if fail {
        return Err("the database refused the write".into());
    }
    db.price.store(price, SeqCst);
    Ok(())
}

/// A write path that drops every entry of `movers`, and one quote.
#[invalidates(movers(..), quote(symbol))]
async fn reprice_all(symbol: &str, price: u32, db: &Db) {
    db.price.store(price, SeqCst);
}

/// Write paths as services write them: an axum-style handler returning `impl Trait` (plain, and
/// in a `Result`), naming the function through a renamed import.
mod handlers {
    use super::Db;
    use crate::market::quote as market_quote;
    use cache_runtime::invalidates;
    use std::sync::atomic::Ordering::SeqCst;

    #[invalidates(market_quote(symbol))]
    pub async fn put_quote(symbol: &str, price: u32, db: &Db) -> impl std::fmt::Display {
        db.price.store(price, SeqCst);
        format!("{symbol} = {price}")
    }

    #[invalidates(market_quote(symbol))]
    pub async fn try_put_quote(symbol: &str, price: u32, db: &Db) -> Result<impl std::fmt::Display, String> {
        let price = u8::try_from(price).map_err(|e| e.to_string())?;
        db.price.store(u32::from(price), SeqCst);
        Ok(price)
    }
}

async fn impl_trait_write_paths_through_a_renamed_import(fx: &mut Fixture) {
    let db = Db::new(100);
    assert_eq!(fx.run(quote("AAPL", &db)).await, Ok(100));
    assert_eq!(fx.run(handlers::put_quote("AAPL", 101, &db)).await.to_string(), "AAPL = 101");
    assert_eq!(fx.run(quote("AAPL", &db)).await, Ok(101), "dropped through the renamed import");
    assert_eq!(fx.run(handlers::try_put_quote("AAPL", 102, &db)).await.unwrap().to_string(), "102");
    assert_eq!(fx.run(quote("AAPL", &db)).await, Ok(102));
    assert!(fx.run(handlers::try_put_quote("AAPL", 1000, &db)).await.is_err());
    assert_eq!(fx.run(quote("AAPL", &db)).await, Ok(102), "an `Err` drops nothing");
    assert_eq!(db.reads.load(SeqCst), 3);
}

async fn drops_the_entry_after_ok(fx: &mut Fixture) {
    let db = Db::new(100);
    assert_eq!(fx.run(quote("AAPL", &db)).await, Ok(100));
    assert_eq!(fx.run(quote("MSFT", &db)).await, Ok(100));
    fx.run(update_quote("AAPL", 101, &db, false)).await.unwrap();
    assert_eq!(fx.run(quote("AAPL", &db)).await, Ok(101), "the new value, not the cached one");
    assert_eq!(fx.run(quote("MSFT", &db)).await, Ok(100), "MSFT's entry was not dropped");
    assert_eq!(db.reads.load(SeqCst), 3);
    let s = fx.stats().await.get(5, "inv").cloned().unwrap();
    assert_eq!(s.invalidations, 1);
}

async fn nothing_dropped_on_err(fx: &mut Fixture) {
    let db = Db::new(100);
    assert_eq!(fx.run(quote("AAPL", &db)).await, Ok(100));
    db.price.store(555, SeqCst); // a change the failed write path did not own
    let result = fx.run(update_quote("AAPL", 101, &db, true)).await;
    assert_eq!(result, Err("the database refused the write".to_owned()), "the caller's result is untouched");
    assert_eq!(fx.run(quote("AAPL", &db)).await, Ok(100), "still the cached value");
    assert_eq!(fx.stats().await.get(5, "inv").unwrap().invalidations, 0);
}

async fn dot_dot_drops_every_entry_in_one_write(fx: &mut Fixture) {
    let db = Db::new(7);
    for limit in 1..=20 {
        assert_eq!(fx.run(movers(limit, &db)).await, vec![7; limit as usize]);
    }
    assert_eq!(db.reads.load(SeqCst), 20);
    fx.run(reprice_all("AAPL", 8, &db)).await;
    if let Some(all) = fx.raw_keys(5, "*").await {
        // O(1): the 20 entries are still there, untouched; only the generation moved.
        assert_eq!(
            all.len(),
            22,
            "20 old entries, the generation key, and quote(\"AAPL\")'s invalidation stamp"
        );
        let keys = fx.raw_keys(5, "inv:movers:gen:*").await.unwrap();
        assert_eq!(keys.len(), 1, "{keys:?}");
        let ttl: i64 = fx.raw(5, "PTTL", &keys[0], &[]).await.unwrap();
        assert!(ttl > 0 && ttl <= 600_000, "the generation key expires too, after twice the TTL ({ttl} ms)");
    }
    for limit in 1..=20 {
        assert_eq!(fx.run(movers(limit, &db)).await, vec![8; limit as usize], "limit {limit}");
    }
    assert_eq!(db.reads.load(SeqCst), 40, "every entry was recomputed");
    for limit in 1..=20 {
        fx.run(movers(limit, &db)).await;
    }
    assert_eq!(db.reads.load(SeqCst), 40, "and cached again");
}

async fn runtime_form_checks_and_drops(fx: &mut Fixture) {
    let db = Db::new(1);
    assert_eq!(fx.run(quote("IBM", &db)).await, Ok(1));
    db.price.store(2, SeqCst);
    let symbol = String::from("IBM");
    fx.run(invalidate!(quote(&symbol), market::movers(..))).await;
    assert_eq!(fx.run(quote("IBM", &db)).await, Ok(2));
}

pub struct Portfolio {
    db: Db,
}

#[cached_impl]
impl Portfolio {
    #[cached(db = MarketData, prefix = "inv", ttl = 300, skip(self))]
    async fn value(&self, account: u64) -> u64 {
        self.db.reads.fetch_add(1, SeqCst);
        account + u64::from(self.db.price.load(SeqCst))
    }

    #[invalidates(Self::value(account))]
    async fn deposit(&self, account: u64, amount: u32) -> Result<(), String> {
        self.db.price.fetch_add(amount, SeqCst);
        Ok(())
    }
}

async fn methods_invalidate_through_self(fx: &mut Fixture) {
    let p = Portfolio { db: Db::new(10) };
    assert_eq!(fx.run(p.value(1)).await, 11);
    assert_eq!(fx.run(p.value(1)).await, 11);
    fx.run(p.deposit(1, 5)).await.unwrap();
    assert_eq!(fx.run(p.value(1)).await, 16);
    assert_eq!(p.db.reads.load(SeqCst), 2);
}

on_every_backend!(
    drops_the_entry_after_ok,
    nothing_dropped_on_err,
    dot_dot_drops_every_entry_in_one_write,
    runtime_form_checks_and_drops,
    methods_invalidate_through_self,
    impl_trait_write_paths_through_a_renamed_import,
);

/// Another process's `quote(..)` is seen here within `generation_refresh`; with a refresh of zero,
/// at once.
#[tokio::test]
async fn generation_reaches_other_processes() {
    let server = support::RedisServer::start();
    let with_refresh =
        |refresh| support::redis_runtime(&server.url(), |c| c.with_generation_refresh(refresh));
    let writer = with_refresh(Duration::from_millis(100));
    let strict = with_refresh(Duration::ZERO);
    let lazy = with_refresh(Duration::from_secs(3600));
    let db = Db::new(1);
    for rt in [&writer, &strict, &lazy] {
        assert_eq!(rt.scope(movers(3, &db)).await, vec![1; 3]);
    }
    assert_eq!(db.reads.load(SeqCst), 1, "one shared entry");
    writer.scope(reprice_all("X", 2, &db)).await;
    // `lazy` read the generation less than its refresh (an hour) ago: it may serve the old entry
    // until then. This is the documented bound, shown so that the next line proves something.
    assert_eq!(lazy.scope(movers(3, &db)).await, vec![1; 3], "documented staleness bound");
    assert_eq!(
        strict.scope(movers(3, &db)).await,
        vec![2; 3],
        "refresh 0 reads the generation with every lookup"
    );
    assert_eq!(writer.scope(movers(3, &db)).await, vec![2; 3], "the invalidating process sees it at once");
    assert_eq!(lazy.scope(movers(3, &db)).await, vec![2; 3], "a newer entry is always taken");
}

#[cached(db = MarketData, prefix = "retry", ttl = 600, skip(db))]
async fn balance(account: u32, db: &Db) -> u32 {
    db.reads.fetch_add(1, SeqCst);
    assert!(account > 0);
    db.price.load(SeqCst)
}

#[invalidates(balance(account))]
async fn set_balance(account: u32, value: u32, db: &Db) {
    db.price.store(value, SeqCst);
}

/// Regression test for "a failed invalidation is lost": stop the real server between a write and
/// a read, restart it with its data, and the stale entry must not be served, in this process or
/// (once the queued retry lands) in any other.
#[tokio::test]
async fn failed_invalidation_is_retried_after_the_server_returns() {
    let mut server = support::RedisServer::start_persistent();
    let url = server.url();
    let config = || CacheConfig::redis(&url).unwrap().with_op_timeout(Duration::from_millis(200));
    let rt = Runtime::new(config());
    let db = Db::new(10);
    assert_eq!(rt.scope(balance(1, &db)).await, 10);
    rt.flush().await.unwrap(); // the fill is written behind the call: make sure it is on the server
    let key = KeyBuilder::new("invalidates", "retry", "balance").arg(&1u32).finish().unwrap();

    server.stop();
    rt.scope(set_balance(1, 20, &db)).await; // the write returns; its invalidation could not
    let s = rt.stats().get(5, "retry").cloned().unwrap();
    assert!(s.invalidation_retries >= 1 && s.invalidations == 0, "{s:?}");

    assert!(
        server.data_contains(&key),
        "the stale entry is in the append-only file, or this test proves nothing"
    );
    server.restart(); // the stale entry is back from the append-only file
    assert_eq!(rt.scope(balance(1, &db)).await, 20, "this process never serves the stale entry");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let exists: u64 =
            ::redis::cmd("EXISTS").arg(&key).query_async(&mut server.raw(5).await).await.unwrap();
        if exists == 0 && rt.stats().get(5, "retry").unwrap().invalidations >= 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the queued invalidation never reached the server");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Another process (fresh runtime, own connections) sees the new value.
    let other = Runtime::new(config());
    assert_eq!(other.scope(balance(1, &db)).await, 20);
    let s = rt.stats().get(5, "retry").cloned().unwrap();
    assert!(s.invalidations >= 1, "{s:?}");
}

/// While an invalidation cannot reach the server (writes paused with `CLIENT PAUSE ... WRITE`,
/// reads still answered), this process must not serve the entry it drops, though the server
/// still has it and answers the read.
#[tokio::test]
async fn a_pending_invalidation_is_not_served_meanwhile() {
    let server = support::RedisServer::start();
    // Two connections: the paused UNLINK holds up the one it was sent on (a connection's commands
    // are answered in order), so reads must also go to the other one to reach the stale entry.
    let rt = support::redis_runtime(&server.url(), |c| {
        c.with_op_timeout(Duration::from_millis(200)).with_pool_size(2)
    });
    let db = Db::new(10);
    assert_eq!(rt.scope(balance(2, &db)).await, 10);
    rt.flush().await.unwrap();
    let key = KeyBuilder::new("invalidates", "retry", "balance").arg(&2u32).finish().unwrap();
    let mut admin = server.raw(0).await;
    ::redis::cmd("CLIENT").arg("PAUSE").arg(3000).arg("WRITE").query_async::<()>(&mut admin).await.unwrap();
    rt.scope(set_balance(2, 30, &db)).await; // its UNLINK is held by the pause and times out
    assert!(rt.stats().get(5, "retry").unwrap().invalidation_retries >= 1);
    let stale: Option<Vec<u8>> =
        ::redis::cmd("GET").arg(&key).query_async(&mut server.raw(5).await).await.unwrap();
    assert!(stale.is_some(), "the server still has the old entry and answers reads");
    // Round robin sends these reads to both connections; the ones on the free connection find the
    // stale entry, and must not return it.
    for _ in 0..4 {
        assert_eq!(rt.scope(balance(2, &db)).await, 30, "but this process does not serve it");
    }
    ::redis::cmd("CLIENT").arg("UNPAUSE").query_async::<()>(&mut admin).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while rt.stats().get(5, "retry").unwrap().invalidations == 0 {
        assert!(Instant::now() < deadline, "the queued invalidation never landed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(support::redis_runtime(&server.url(), |c| c).scope(balance(2, &db)).await, 30);
}

#[invalidates(balance(from), balance(to))]
async fn transfer(from: u32, to: u32, db: &Db) -> Result<(), String> {
    db.price.fetch_add(from + to, SeqCst);
    Ok(())
}

async fn stored(server: &support::RedisServer, account: u32) -> bool {
    let key = KeyBuilder::new("invalidates", "retry", "balance").arg(&account).finish().unwrap();
    let n: u64 = ::redis::cmd("EXISTS").arg(&key).query_async(&mut server.raw(5).await).await.unwrap();
    n == 1
}

/// An `#[invalidates]` future dropped after its body returned (a client that disconnects, a
/// `tokio::time::timeout` around the call) still invalidates: what it had not applied is queued.
/// Right after the drop the second entry is still on the server (so nothing but the queue can
/// remove it), and then it goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_write_path_still_invalidates() {
    let server = support::RedisServer::start();
    let rt = support::redis_runtime(&server.url(), |c| c.with_op_timeout(Duration::from_millis(300)));
    let db = Db::new(10);
    for account in [3, 4] {
        rt.scope(balance(account, &db)).await;
    }
    rt.flush().await.unwrap();
    server.pause_writes(800).await;
    let dropped = tokio::time::timeout(Duration::from_millis(100), rt.scope(transfer(3, 4, &db))).await;
    assert!(dropped.is_err(), "the call was dropped while invalidating");
    assert_eq!(db.price.load(SeqCst), 17, "its body had committed");
    assert!(stored(&server, 4).await, "the second entry was not touched by the interrupted call");
    assert!(rt.pending_invalidations() >= 1, "what it had not applied was queued");
    let deadline = Instant::now() + Duration::from_secs(10);
    while stored(&server, 3).await || stored(&server, 4).await {
        assert!(Instant::now() < deadline, "the dropped call's invalidations never landed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let fresh = support::redis_runtime(&server.url(), |c| c);
    assert_eq!(fresh.scope(balance(4, &db)).await, 17);
}

/// The retry worker does not belong to the tokio runtime that queued the invalidation: that
/// runtime ends (a test's, a request's), and the invalidation still lands when the server returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_retry_worker_outlives_the_tokio_runtime_that_queued() {
    let mut server = support::RedisServer::start_persistent();
    let rt =
        Runtime::new(CacheConfig::redis(&server.url()).unwrap().with_op_timeout(Duration::from_millis(200)));
    let db = Arc::new(Db::new(10));
    rt.scope(balance(6, &db)).await;
    rt.flush().await.unwrap();
    server.stop();
    let (queued_rt, queued_db) = (rt.clone(), Arc::clone(&db));
    std::thread::spawn(move || {
        let local = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        local.block_on(queued_rt.scope(set_balance(6, 60, &queued_db)));
        // `local` ends here, and with it every task it spawned.
    })
    .join()
    .unwrap();
    assert!(rt.pending_invalidations() >= 1);
    server.restart();
    assert!(server
        .data_contains(&KeyBuilder::new("invalidates", "retry", "balance").arg(&6u32).finish().unwrap()));
    let deadline = Instant::now() + Duration::from_secs(15);
    // Applied on the server, then settled in the queue: both happen, in that order.
    while stored(&server, 6).await || rt.pending_invalidations() > 0 {
        assert!(Instant::now() < deadline, "the queued invalidation died with its runtime");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A generation key that is lost (evicted under maxmemory, deleted by an operator) is not read as
/// generation 0: a fresh process does not serve an entry older than the last `f(..)`, though the
/// server still holds it.
#[tokio::test]
async fn a_lost_generation_key_is_not_read_as_zero() {
    let server = support::RedisServer::start();
    let writer = support::redis_runtime(&server.url(), |c| c);
    let db = Db::new(1);
    assert_eq!(writer.scope(movers(5, &db)).await, vec![1; 5]);
    writer.flush().await.unwrap();
    writer.scope(reprice_all("X", 2, &db)).await;
    let mut raw = server.raw(5).await;
    let gens: Vec<String> = ::redis::cmd("KEYS").arg("inv:movers:gen:*").query_async(&mut raw).await.unwrap();
    assert_eq!(gens.len(), 1);
    ::redis::cmd("DEL").arg(&gens[0]).query_async::<()>(&mut raw).await.unwrap();
    let old: Vec<String> = ::redis::cmd("KEYS").arg("inv:movers:{*").query_async(&mut raw).await.unwrap();
    assert_eq!(
        old.len(),
        1,
        "the entry from before movers(..) is still stored (a reader taking the lost key as 0 would serve it)"
    );
    let fresh = support::redis_runtime(&server.url(), |c| c);
    assert_eq!(fresh.scope(movers(5, &db)).await, vec![2; 5], "the fresh process does not serve it");
    assert_eq!(db.reads.load(SeqCst), 2);
}
