//! What callers see when Redis fails in the middle: correct results, bounded time, counted errors.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant};

use cache_runtime::cached;
use cache_runtime::db::Indicator;
use support::Fixture;

const OP_TIMEOUT: Duration = Duration::from_millis(200);
/// Scheduling on a shared 2-core machine: far less than another timeout, so a bound twice as bad
/// fails.
const MARGIN: Duration = Duration::from_millis(150);
/// One backend call's timeout and the margin: what a call may cost when the server fails.
const CALL_BOUND: Duration = Duration::from_millis(200 + 150);

#[cached(db = Indicator, prefix = "indicator", ttl = 600, skip(calls))]
async fn sma(symbol: &str, window: u32, calls: &AtomicUsize) -> Result<f64, String> {
    calls.fetch_add(1, SeqCst);
    Ok(symbol.len() as f64 * f64::from(window))
}

/// Calls `sma` `n` times on fresh arguments and returns the slowest call.
async fn slowest_of(fx: &Fixture, n: u32, calls: &AtomicUsize) -> Duration {
    let mut slowest = Duration::ZERO;
    for window in 0..n {
        let started = Instant::now();
        let value = fx.run(sma("ABCD", window, calls)).await;
        slowest = slowest.max(started.elapsed());
        assert_eq!(value, Ok(4.0 * f64::from(window)), "the caller always gets the function's result");
    }
    slowest
}

fn errors(fx: &Fixture) -> u64 {
    fx.runtime.stats().get(7, "indicator").map_or(0, |s| s.backend_errors)
}

/// Calls that did not get an answer from the cache: failed, or skipped by the open breaker.
fn uncached(fx: &Fixture) -> u64 {
    fx.runtime.stats().get(7, "indicator").map_or(0, |s| s.backend_errors + s.bypassed)
}

#[tokio::test]
async fn killed_server_callers_still_get_results_then_cache_resumes() {
    let mut fx = Fixture::redis_with(|c| c.with_op_timeout(OP_TIMEOUT));
    let calls = AtomicUsize::new(0);
    fx.run(sma("WARM", 1, &calls)).await.unwrap();
    fx.run(sma("WARM", 1, &calls)).await.unwrap();
    assert_eq!(calls.load(SeqCst), 1, "cache works before the failure");

    fx.server().stop();
    let slowest = slowest_of(&fx, 20, &calls).await;
    eprintln!("server killed: slowest of 20 calls took {slowest:?}");
    assert!(slowest < CALL_BOUND, "a call took {slowest:?} with the server down");
    assert!(uncached(&fx) >= 20, "every failed lookup is counted, got {}", uncached(&fx));
    assert_eq!(errors(&fx), u64::from(cache_runtime::DEFAULT_BREAKER_THRESHOLD), "then the breaker opened");

    fx.server().restart();
    // The connection comes back by itself; give it a few attempts.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let before = calls.load(SeqCst);
        fx.run(sma("BACK", 3, &calls)).await.unwrap();
        fx.run(sma("BACK", 3, &calls)).await.unwrap();
        if calls.load(SeqCst) == before + 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the cache did not resume after the server came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// After an outage, the first call once the server is back reaches it: a call that finds the
/// last connection attempt failed (longer ago than the 50 ms retry gap) starts the next attempt
/// and waits for it, within `op_timeout`, instead of failing on the old one.
#[tokio::test]
async fn the_first_call_after_an_outage_reaches_the_server() {
    let mut fx = Fixture::redis_with(|c| c.with_op_timeout(OP_TIMEOUT));
    let calls = AtomicUsize::new(0);
    fx.run(sma("WARM", 1, &calls)).await.unwrap();
    fx.runtime.flush().await.unwrap(); // its fill is written, not failed by the outage
    fx.server().stop();
    // The connection is found lost; the attempt it starts is refused.
    fx.run(sma("DOWN", 1, &calls)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let failed = errors(&fx);
    assert!(failed >= 1, "the call during the outage failed over to the function");
    fx.server().restart(); // returns once the server answers PING
    let started = Instant::now();
    fx.run(sma("BACK", 1, &calls)).await.unwrap();
    let took = started.elapsed();
    eprintln!(
        "first call after the outage: {took:?}; backend errors {failed} before it, {} after",
        errors(&fx)
    );
    assert_eq!(errors(&fx), failed, "the first call after the server came back reached it");
    assert!(took < CALL_BOUND, "and within one call's bound ({took:?})");
    let before = calls.load(SeqCst);
    fx.run(sma("BACK", 1, &calls)).await.unwrap();
    assert_eq!(calls.load(SeqCst), before, "what it computed was cached");
}

#[tokio::test]
async fn hung_server_costs_at_most_the_timeout() {
    let fx = Fixture::redis_with(|c| c.with_op_timeout(OP_TIMEOUT));
    let calls = AtomicUsize::new(0);
    fx.run(sma("WARM", 1, &calls)).await.unwrap();
    fx.server.as_ref().unwrap().freeze();
    let started = Instant::now();
    let slowest = slowest_of(&fx, 5, &calls).await;
    let total = started.elapsed();
    fx.server.as_ref().unwrap().thaw();
    eprintln!("server frozen: slowest call {slowest:?}, 5 calls in {total:?}");
    // Each call waits for the lookup's timeout, and skips the fill after a failed lookup.
    assert!(slowest >= OP_TIMEOUT, "the frozen server cannot have answered ({slowest:?})");
    assert!(slowest < CALL_BOUND, "a call took {slowest:?} with the server hung");
    assert!(errors(&fx) >= 5);
}

#[tokio::test]
async fn unreachable_server_from_the_start() {
    let mut server = support::RedisServer::start();
    let url = server.url();
    server.stop();
    let fx = Fixture::bare(cache_runtime::Runtime::new(
        cache_runtime::CacheConfig::redis(&url).unwrap().with_op_timeout(OP_TIMEOUT),
    ));
    let calls = AtomicUsize::new(0);
    let slowest = slowest_of(&fx, 10, &calls).await;
    assert!(slowest < CALL_BOUND, "{slowest:?}");
    assert_eq!(calls.load(SeqCst), 10, "every call ran the function");
    assert!(uncached(&fx) >= 10);
}

#[tokio::test]
async fn retry_on_timeout_tries_a_lookup_twice() {
    let fx = Fixture::redis_with(|c| c.with_op_timeout(OP_TIMEOUT).with_retry_on_timeout(true));
    let calls = AtomicUsize::new(0);
    fx.run(sma("WARM", 1, &calls)).await.unwrap();
    fx.server.as_ref().unwrap().freeze();
    let slowest = slowest_of(&fx, 2, &calls).await;
    fx.server.as_ref().unwrap().thaw();
    eprintln!("retry on timeout, server frozen: slowest call {slowest:?}");
    assert!(slowest >= OP_TIMEOUT * 2, "two bounded tries ({slowest:?})");
    assert!(slowest < OP_TIMEOUT * 2 + MARGIN, "two bounded tries, not more ({slowest:?})");
}

/// The tokio runtime that made the first call, and so ran the first connection attempt, ends
/// while the attempt waits on a host that never answers. Calls from another tokio runtime still
/// get their results, and the cache serves hits there once the host answers: the ended attempt
/// only failed, the next one started.
#[test]
fn a_tokio_runtime_ending_mid_connect_does_not_break_the_connection() {
    let server = support::RedisServer::start();
    let proxy = support::proxy::FaultProxy::start(server.port());
    proxy.set(support::proxy::Fault::Blackhole);
    let cache = cache_runtime::Runtime::new(
        cache_runtime::CacheConfig::redis(&proxy.url())
            .unwrap()
            .with_op_timeout(OP_TIMEOUT)
            .with_connect_timeout(Duration::from_secs(5))
            .with_breaker(0, Duration::ZERO),
    );
    let calls = AtomicUsize::new(0);
    let first = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let started = Instant::now();
    assert_eq!(first.block_on(cache.scope(sma("MID", 3, &calls))), Ok(9.0));
    assert!(started.elapsed() < CALL_BOUND, "bounded while connecting ({:?})", started.elapsed());
    drop(first); // the attempt, still waiting on the blackhole, ends with it
    proxy.set(support::proxy::Fault::Pass);

    let second = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    second.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let before = calls.load(SeqCst);
            assert_eq!(cache.scope(sma("MID", 3, &calls)).await, Ok(9.0));
            if calls.load(SeqCst) == before {
                break; // a hit
            }
            assert!(Instant::now() < deadline, "no hit 5 s after the host answered again");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
}

/// Every duration setting at `Duration::MAX` (each is bounded when set): the runtime connects,
/// caches and answers as usual, with no overflow anywhere on the way.
#[tokio::test]
async fn duration_settings_at_their_maximum_still_cache() {
    let server = support::RedisServer::start();
    let config = cache_runtime::CacheConfig::redis(&server.url())
        .unwrap()
        .with_op_timeout(Duration::MAX)
        .with_connect_timeout(Duration::MAX)
        .with_lease_ttl(Duration::MAX)
        .with_breaker(5, Duration::MAX)
        .with_shutdown_timeout(Duration::MAX)
        .with_generation_refresh(Duration::MAX);
    let cache = cache_runtime::Runtime::new(config);
    let calls = AtomicUsize::new(0);
    for _ in 0..3 {
        assert_eq!(cache.scope(sma("MAX", 2, &calls)).await, Ok(6.0));
    }
    assert_eq!(calls.load(SeqCst), 1, "computed once, then hits");
    cache.shutdown().await.unwrap();
}
