//! Stampedes: concurrent misses on one key run the function once, in one process (single flight)
//! and across processes (fill lease); a failing, panicking or hung caller releases the others.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cache_runtime::db::Indicator;
use cache_runtime::{cached, Cache, CacheConfig, KeyBuilder, Runtime};
use support::Fixture;
use tokio::task::JoinSet;

/// What a body does on its `n`th execution (counting from 0).
#[derive(Clone, Copy)]
enum Script {
    Succeed,
    FailFirst,
    PanicFirst,
    HangFirst,
}

pub struct Source {
    executions: AtomicUsize,
    script: Script,
    delay: Duration,
}

impl Source {
    fn new(script: Script, delay: Duration) -> Arc<Source> {
        Arc::new(Source { executions: AtomicUsize::new(0), script, delay })
    }
    fn executions(&self) -> usize {
        self.executions.load(SeqCst)
    }
}

#[cached(db = Indicator, prefix = "herd", ttl = 60, skip(source))]
async fn rsi(symbol: &str, source: Arc<Source>) -> Result<u64, String> {
    let n = source.executions.fetch_add(1, SeqCst);
    match (source.script, n) {
        (Script::FailFirst, 0) => return Err("upstream timeout".into()),
        (Script::PanicFirst, 0) => panic!("the body panicked (on purpose)"),
        // Hung: the body blocks its thread, so nothing in that runtime runs (no lease renewal).
        (Script::HangFirst, 0) => std::thread::sleep(Duration::from_secs(3)),
        _ => {}
    }
    tokio::time::sleep(source.delay).await;
    Ok(symbol.len() as u64 * 10)
}

/// `callers` concurrent calls of `rsi(symbol)` on `runtime`, each its own task.
fn herd(
    set: &mut JoinSet<Result<u64, String>>,
    runtime: &Runtime,
    callers: usize,
    symbol: &'static str,
    source: &Arc<Source>,
) {
    for _ in 0..callers {
        let (runtime, source) = (runtime.clone(), Arc::clone(source));
        set.spawn(async move { runtime.scope(rsi(symbol, source)).await });
    }
}

/// Generous: proves nobody hangs, not speed.
const NO_HANG: Duration = Duration::from_secs(20);

async fn collect(mut set: JoinSet<Result<u64, String>>) -> (Vec<Result<u64, String>>, usize) {
    let mut results = Vec::new();
    let mut panics = 0;
    let all = async {
        while let Some(joined) = set.join_next().await {
            match joined {
                Ok(result) => results.push(result),
                Err(e) if e.is_panic() => panics += 1,
                Err(e) => panic!("task failed: {e}"),
            }
        }
    };
    tokio::time::timeout(NO_HANG, all).await.expect("callers hung");
    (results, panics)
}

/// The same herd through a hand-written cache-aside (GET, compute, SET): what the teams do today.
async fn naive_herd(
    runtimes: &[Runtime],
    callers: usize,
    symbol: &'static str,
    source: &Arc<Source>,
) -> usize {
    let mut set = JoinSet::new();
    for (runtime, _) in runtimes.iter().flat_map(|rt| std::iter::repeat_n(rt, callers)).zip(0..) {
        let cache: Cache<Indicator, u64> =
            Cache::new("naive", Duration::from_secs(60)).unwrap().with_runtime(runtime.clone());
        let (cache, source) = (cache.clone(), Arc::clone(source));
        set.spawn(async move {
            if let Ok(Some(v)) = cache.get(symbol).await {
                return Ok(v);
            }
            let v = rsi_body(symbol, &source).await;
            cache.set(symbol, &v).await.unwrap();
            Ok(v)
        });
    }
    let (results, _) = collect(set).await;
    assert!(results.iter().all(|r| *r == Ok(symbol.len() as u64 * 10)));
    source.executions()
}

async fn rsi_body(symbol: &str, source: &Source) -> u64 {
    source.executions.fetch_add(1, SeqCst);
    tokio::time::sleep(source.delay).await;
    symbol.len() as u64 * 10
}

async fn thousand_concurrent_misses_run_the_body_once(fx: &mut Fixture) {
    let source = Source::new(Script::Succeed, Duration::from_millis(50));
    let mut set = JoinSet::new();
    herd(&mut set, &fx.runtime, 1000, "AAPL", &source);
    let (results, panics) = collect(set).await;
    let naive = naive_herd(
        std::slice::from_ref(&fx.runtime),
        1000,
        "AAPL",
        &Source::new(Script::Succeed, Duration::from_millis(50)),
    )
    .await;
    eprintln!(
        "1000 concurrent cold calls: {} body execution(s); naive cache-aside: {naive}",
        source.executions()
    );
    assert_eq!((results.len(), panics), (1000, 0));
    assert!(results.iter().all(|r| *r == Ok(40)));
    assert_eq!(source.executions(), 1, "one execution for 1000 concurrent misses");
    assert!(naive > 1, "without the protection the herd runs the body more than once ({naive})");
}

async fn failing_body_releases_waiters(fx: &mut Fixture) {
    let source = Source::new(Script::FailFirst, Duration::from_millis(20));
    let mut set = JoinSet::new();
    herd(&mut set, &fx.runtime, 50, "MSFT", &source);
    let (results, _) = collect(set).await;
    let errors = results.iter().filter(|r| r.is_err()).count();
    assert_eq!(
        (results.len(), errors),
        (50, 1),
        "one caller saw the failure; the others got their own results"
    );
    assert!(results.iter().filter(|r| r.is_ok()).all(|r| *r == Ok(40)));
    // Nothing is poisoned: the next call is served normally, then cached.
    let before = source.executions();
    assert_eq!(fx.run(rsi("MSFT", Arc::clone(&source))).await, Ok(40));
    assert_eq!(fx.run(rsi("MSFT", Arc::clone(&source))).await, Ok(40));
    assert!(source.executions() <= before + 1);
}

async fn panicking_body_releases_waiters(fx: &mut Fixture) {
    let source = Source::new(Script::PanicFirst, Duration::from_millis(20));
    let mut set = JoinSet::new();
    herd(&mut set, &fx.runtime, 50, "NVDA", &source);
    let (results, panics) = collect(set).await;
    assert_eq!(panics, 1, "only the caller whose body panicked sees the panic");
    assert_eq!(results.len(), 49);
    assert!(results.iter().all(|r| *r == Ok(40)));
    assert_eq!(source.executions(), 2, "the panic, then one execution for everyone else");
}

on_every_backend!(
    thousand_concurrent_misses_run_the_body_once,
    failing_body_releases_waiters,
    panicking_body_releases_waiters,
);

/// Several processes, each with its own connections, on one server: one execution per cold key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn independent_runtimes_share_one_execution() {
    let server = support::RedisServer::start();
    let runtimes: Vec<Runtime> = (0..4).map(|_| support::redis_runtime(&server.url(), |c| c)).collect();
    for (round, symbol) in ["A", "BB", "CCC"].into_iter().enumerate() {
        let source = Source::new(Script::Succeed, Duration::from_millis(200));
        let mut set = JoinSet::new();
        for rt in &runtimes {
            herd(&mut set, rt, 50, symbol, &source);
        }
        let (results, _) = collect(set).await;
        assert_eq!(results.len(), 200);
        assert!(results.iter().all(|r| *r == Ok(symbol.len() as u64 * 10)));
        let naive =
            naive_herd(&runtimes, 50, symbol, &Source::new(Script::Succeed, Duration::from_millis(200)))
                .await;
        eprintln!(
            "round {round}: 4 runtimes x 50 callers, {} execution(s); naive cache-aside: {naive}",
            source.executions()
        );
        assert_eq!(source.executions(), 1, "at most one execution per cold key across processes");
        assert!(naive > 1, "without leases the processes each compute ({naive})");
    }
    let waits: u64 = runtimes.iter().filter_map(|rt| rt.stats().get(7, "herd").map(|s| s.lease_waits)).sum();
    assert!(waits >= 3, "the other runtimes waited for the lease holder ({waits})");
}

/// A holder that never finishes keeps the others waiting only until its lease expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_holder_costs_the_others_one_lease() {
    let server = support::RedisServer::start();
    let lease = Duration::from_millis(800);
    let config = || support::relaxed(CacheConfig::redis(&server.url()).unwrap()).with_lease_ttl(lease);
    let (holder, other) = (Runtime::new(config()), Runtime::new(config()));
    let source = Source::new(Script::HangFirst, Duration::ZERO);
    let hung = {
        let (rt, source) = (holder.clone(), Arc::clone(&source));
        std::thread::spawn(move || {
            let local = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            local.block_on(rt.scope(rsi("TSLA", source)))
        })
    };
    while source.executions() == 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let started = Instant::now();
    let value = other.scope(rsi("TSLA", Arc::clone(&source))).await;
    let waited = started.elapsed();
    eprintln!("hung holder: the other process waited {waited:?} (lease {lease:?})");
    assert_eq!(value, Ok(40));
    assert_eq!(source.executions(), 2, "the hung holder, then the other process after its lease expired");
    assert!(waited >= lease / 2, "it did wait for the holder ({waited:?})");
    assert!(waited < Duration::from_secs(5), "bounded by the lease, not by the holder ({waited:?})");
    assert!(!hung.is_finished(), "the holder is still hung");
    assert_eq!(hung.join().unwrap(), Ok(40));
}

/// A process that took the lease and died (the lease key is all that is left of it).
#[tokio::test]
async fn dead_holder_lease_expires() {
    let server = support::RedisServer::start();
    let rt = Runtime::new(
        support::relaxed(CacheConfig::redis(&server.url()).unwrap()).with_lease_ttl(Duration::from_secs(2)),
    );
    let key = KeyBuilder::new("stampede", "herd", "rsi").arg("AMD").finish().unwrap();
    let mut raw = server.raw(7).await;
    ::redis::cmd("SET")
        .arg(format!("{key}:lease"))
        .arg("dead-process-token")
        .arg("PX")
        .arg(600)
        .query_async::<()>(&mut raw)
        .await
        .unwrap();
    let source = Source::new(Script::Succeed, Duration::ZERO);
    let started = Instant::now();
    assert_eq!(rt.scope(rsi("AMD", Arc::clone(&source))).await, Ok(30));
    let waited = started.elapsed();
    eprintln!("dead holder: waited {waited:?} for a 600 ms lease");
    assert!(waited >= Duration::from_millis(400) && waited < Duration::from_secs(5), "{waited:?}");
    assert_eq!(source.executions(), 1);
    assert_eq!(rt.scope(rsi("AMD", Arc::clone(&source))).await, Ok(30));
    assert_eq!(source.executions(), 1, "its fill landed");
}

#[cached(db = Indicator, prefix = "herd", ttl = 60, format = MessagePack, skip(source))]
async fn packed_rsi(symbol: &str, source: Arc<Source>) -> Result<u64, String> {
    source.executions.fetch_add(1, SeqCst);
    tokio::time::sleep(source.delay).await;
    Ok(symbol.len() as u64)
}

/// The lease script reads the generation of a MessagePack value too: processes waiting on a
/// lease take the holder's MessagePack fill instead of computing again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_read_a_message_pack_fill() {
    let server = support::RedisServer::start();
    let runtimes: Vec<Runtime> = (0..3).map(|_| support::redis_runtime(&server.url(), |c| c)).collect();
    let source = Source::new(Script::Succeed, Duration::from_millis(200));
    let mut set = JoinSet::new();
    for rt in &runtimes {
        for _ in 0..10 {
            let (rt, source) = (rt.clone(), Arc::clone(&source));
            set.spawn(async move { rt.scope(packed_rsi("MSGP", source)).await });
        }
    }
    let (results, _) = collect(set).await;
    assert!(results.iter().all(|r| *r == Ok(4)));
    assert_eq!(source.executions(), 1);
}

/// A cached call dropped at each of its `.await`s (lookup, lease request, body, fill), by a
/// timeout of 0 to 30 ms around it: no caller after it hangs, and the lease it may have taken is
/// given back, so another process does not wait `lease_ttl` (here 5 s) for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_dropped_at_any_await_leaves_nothing_behind() {
    let server = support::RedisServer::start();
    let (a, b) = (support::redis_runtime(&server.url(), |c| c), support::redis_runtime(&server.url(), |c| c));
    let source = Source::new(Script::Succeed, Duration::from_millis(10));
    let mut slowest = Duration::ZERO;
    for (i, ms) in (0..30u64).enumerate() {
        let symbol: &'static str = Box::leak(format!("DROP{i}").into_boxed_str());
        let dropped =
            tokio::time::timeout(Duration::from_millis(ms), a.scope(rsi(symbol, Arc::clone(&source)))).await;
        let started = Instant::now();
        let value =
            tokio::time::timeout(NO_HANG, b.scope(rsi(symbol, Arc::clone(&source)))).await.expect("hung");
        slowest = slowest.max(started.elapsed());
        assert_eq!(value, Ok(symbol.len() as u64 * 10), "after a drop at {ms} ms ({dropped:?})");
    }
    eprintln!("calls dropped after 0-30 ms: the next call from another process took at most {slowest:?}");
    assert!(slowest < Duration::from_secs(1), "no orphaned lease made the next call wait ({slowest:?})");
}
