//! `eager_refresh`: a hot entry is refreshed before it expires, by one caller per key across
//! processes, while every other caller keeps getting the current value. Measured side by side
//! with the same function without the option, under the same load, in the same run.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cache_runtime::db::MarketData;
use cache_runtime::{cached, CacheConfig, Runtime};
use support::RedisServer;
use tokio::task::JoinSet;

/// How long each body computes: a call that took this long waited for a computation.
const COMPUTE: Duration = Duration::from_millis(100);

#[derive(Default)]
struct Load {
    /// Bodies run.
    computations: AtomicUsize,
    /// Calls that took at least most of `COMPUTE` (they ran the body, or waited for whoever did).
    waited: AtomicUsize,
    calls: AtomicUsize,
}

#[cached(db = MarketData, prefix = "eager", ttl = 1, eager_refresh = "50%", skip(load))]
async fn eager(symbol: &str, load: &Load) -> u64 {
    load.computations.fetch_add(1, SeqCst);
    tokio::time::sleep(COMPUTE).await;
    symbol.len() as u64
}

#[cached(db = MarketData, prefix = "eager", ttl = 1, skip(load))]
async fn plain(symbol: &str, load: &Load) -> u64 {
    load.computations.fetch_add(1, SeqCst);
    tokio::time::sleep(COMPUTE).await;
    symbol.len() as u64
}

/// Calls `eager` and `plain` on one hot key from 8 tasks each per runtime (a runtime stands
/// for a process) for `run`, after one warm-up call each; returns the two loads.
async fn hammer(runtimes: &[Runtime], run: Duration) -> (Arc<Load>, Arc<Load>) {
    let (with, without) = (Arc::new(Load::default()), Arc::new(Load::default()));
    runtimes[0].scope(eager("AAPL", &with)).await;
    runtimes[0].scope(plain("AAPL", &without)).await;
    let deadline = Instant::now() + run;
    let mut tasks = JoinSet::new();
    for runtime in runtimes {
        for task in 0..16 {
            let (runtime, load) = (runtime.clone(), Arc::clone(if task % 2 == 0 { &with } else { &without }));
            tasks.spawn(async move {
                while Instant::now() < deadline {
                    let started = Instant::now();
                    let value = if task % 2 == 0 {
                        runtime.scope(eager("AAPL", &load)).await
                    } else {
                        runtime.scope(plain("AAPL", &load)).await
                    };
                    assert_eq!(value, 4);
                    load.calls.fetch_add(1, SeqCst);
                    if started.elapsed() >= COMPUTE * 8 / 10 {
                        load.waited.fetch_add(1, SeqCst);
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            });
        }
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("a caller panicked");
    }
    (with, without)
}

fn check(runtimes: &[Runtime], with: &Load, without: &Load, run: Duration) {
    let (wc, ww) = (with.computations.load(SeqCst), with.waited.load(SeqCst));
    let (oc, ow) = (without.computations.load(SeqCst), without.waited.load(SeqCst));
    println!(
        "over {run:?}: eager_refresh: {} calls, {wc} computations, {ww} calls waited; without: {} calls, {oc} computations, {ow} calls waited",
        with.calls.load(SeqCst),
        without.calls.load(SeqCst)
    );
    // Without the option, each expiry makes every caller that arrives during the recomputation
    // wait for it (here, most of the 8 tasks per runtime): the problem exists in this run.
    assert!(oc >= 3, "the plain function expired at least three times ({oc} computations)");
    assert!(
        ow >= 3 * oc,
        "without eager refresh, callers wait at each expiry: {ow} waited, {oc} computations"
    );
    // With it, the only calls that wait are the refreshers themselves (the warm-up was outside
    // the load): no caller ever waits for another's computation, or sees the entry expire.
    assert!(ww <= wc, "with eager refresh, {ww} calls waited for {wc} computations");
    // One refresh per key across processes: a refresh is due half a TTL (500 ms) after the last
    // fill, so the run has room for at most run / 500 ms of them (+1 for the warm-up); twice as
    // many would mean two processes refreshing the same key.
    let bound = (run.as_millis() / 500) as usize + 1;
    assert!(wc <= bound, "{wc} computations with eager refresh in {run:?} (at most {bound})");
    assert!(wc >= 3, "the entry was refreshed ({wc} computations)");
    let refreshes: u64 = runtimes
        .iter()
        .map(|r| r.stats().function(5, "eager", "eager").map_or(0, |s| s.eager_refreshes))
        .sum();
    assert_eq!(refreshes as usize, wc - 1, "every computation after the warm-up was an eager refresh");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_hot_key_never_waits_for_its_expiry() {
    let runtimes = [Runtime::new(CacheConfig::memory())];
    let run = Duration::from_millis(4_500);
    let (with, without) = hammer(&runtimes, run).await;
    check(&runtimes, &with, &without, run);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_two_processes_refresh_a_hot_key_once() {
    let server = RedisServer::start();
    let runtimes =
        [support::redis_runtime(&server.url(), |c| c), support::redis_runtime(&server.url(), |c| c)];
    let run = Duration::from_millis(4_500);
    let (with, without) = hammer(&runtimes, run).await;
    check(&runtimes, &with, &without, run);
}

/// The same two processes on the disk backend (two runtimes on one directory, as two
/// processes on one host share it), on Cluster and behind Sentinel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_two_processes_refresh_a_hot_key_once() {
    let dir = tempfile::tempdir().unwrap();
    let runtimes = [Runtime::new(CacheConfig::disk(dir.path())), Runtime::new(CacheConfig::disk(dir.path()))];
    let run = Duration::from_millis(4_500);
    let (with, without) = hammer(&runtimes, run).await;
    check(&runtimes, &with, &without, run);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_two_processes_refresh_a_hot_key_once() {
    let (config, _namespace) = support::cluster_config();
    let runtimes = [Runtime::new(config.clone()), Runtime::new(config)];
    let run = Duration::from_millis(4_500);
    let (with, without) = hammer(&runtimes, run).await;
    check(&runtimes, &with, &without, run);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sentinel_two_processes_refresh_a_hot_key_once() {
    let fx = support::Fixture::sentinel();
    let url = fx.sentinel.as_ref().expect("a Sentinel fixture").url();
    let runtimes = [fx.runtime.clone(), support::redis_runtime(&url, |c| c)];
    let run = Duration::from_millis(4_500);
    let (with, without) = hammer(&runtimes, run).await;
    check(&runtimes, &with, &without, run);
}

#[cached(db = MarketData, prefix = "eager", ttl = 4, eager_refresh = "50%", skip(delay))]
async fn slow_eager(symbol: &str, delay: Duration) -> u64 {
    tokio::time::sleep(delay).await;
    symbol.len() as u64
}

/// A refresher dropped at its `.await` (its caller timed out) gives the lease back at once, so the
/// next due hit refreshes, instead of every hit finding the lease held until `lease_ttl` (5 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_refresher_gives_the_lease_back() {
    let server = RedisServer::start();
    let runtime = support::redis_runtime(&server.url(), |c| c);
    assert_eq!(runtime.scope(slow_eager("AAPL", Duration::ZERO)).await, 4);
    runtime.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(2_100)).await; // past half of the 4 s TTL: due
    let refreshes =
        |r: &Runtime| r.stats().function(5, "eager", "slow_eager").map_or(0, |s| s.eager_refreshes);
    let dropped = tokio::time::timeout(
        Duration::from_millis(100),
        runtime.scope(slow_eager("AAPL", Duration::from_secs(30))),
    )
    .await;
    assert!(dropped.is_err(), "the refresher was still computing when dropped");
    assert_eq!(refreshes(&runtime), 1, "the dropped call had taken the lease");
    let started = Instant::now();
    while refreshes(&runtime) < 2 && started.elapsed() < Duration::from_millis(1_500) {
        assert_eq!(runtime.scope(slow_eager("AAPL", Duration::ZERO)).await, 4, "hits keep the current value");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let took = started.elapsed();
    assert_eq!(refreshes(&runtime), 2, "no refresh after the dropped one within {took:?}");
    // The lease's own expiry would have taken 5 s (the default `lease_ttl`).
    assert!(took < Duration::from_millis(1_500), "{took:?}");
}

#[cached(db = MarketData, prefix = "eager", ttl = 2, eager_refresh = "50%", skip(mode))]
async fn fragile(symbol: &str, mode: &AtomicUsize) -> Result<u64, String> {
    match mode.load(SeqCst) {
        0 => Ok(symbol.len() as u64),
        1 => Err("the feed is down".to_owned()),
        _ => panic!("the feed client panicked"),
    }
}

/// A refresh whose function fails returns the value the caller read: without the option the
/// same call would have been a plain hit, so the option never turns a hit into a failure.
#[tokio::test]
async fn a_failed_refresh_returns_the_value_read() {
    let runtime = Runtime::new(CacheConfig::memory());
    let mode = AtomicUsize::new(0);
    assert_eq!(runtime.scope(fragile("AAPL", &mode)).await, Ok(4));
    tokio::time::sleep(Duration::from_millis(1_100)).await; // past half of the 2 s TTL: due
    for failure in [1, 2] {
        mode.store(failure, SeqCst);
        assert_eq!(runtime.scope(fragile("AAPL", &mode)).await, Ok(4), "mode {failure}");
        tokio::time::sleep(Duration::from_millis(50)).await; // the lease goes back in the background
    }
    let stats = runtime.stats();
    assert_eq!(stats.function(5, "eager", "fragile").unwrap().eager_refreshes, 2, "both calls refreshed");
}
