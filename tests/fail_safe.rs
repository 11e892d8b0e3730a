//! `stale_if_error`: entries are kept past their TTL for a window; a read past the TTL runs the
//! function, and when it fails (an `Err`, a panic) the stale value answers instead. Each check is
//! made beside the same function without the option, whose callers see the failure.

mod support;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cache_runtime::db::MarketData;
use cache_runtime::{cached, invalidate, CacheConfig, KeyBuilder, Runtime};
use support::{Fixture, RedisServer};
use tokio::task::JoinSet;

/// The database behind the functions: answers its current version, fails, or panics.
#[derive(Default)]
pub struct Dependency {
    /// 0: answers; 1: returns `Err`; 2: panics.
    mode: AtomicU64,
    version: AtomicU64,
    calls: AtomicUsize,
}

impl Dependency {
    fn answers(&self, version: u64) {
        self.version.store(version, SeqCst);
        self.mode.store(0, SeqCst);
    }

    async fn read(&self) -> Result<u64, String> {
        self.calls.fetch_add(1, SeqCst);
        tokio::time::sleep(Duration::from_millis(5)).await;
        match self.mode.load(SeqCst) {
            0 => Ok(self.version.load(SeqCst)),
            1 => Err("the database is down".to_owned()),
            _ => panic!("the database driver panicked"),
        }
    }
}

#[cached(db = MarketData, prefix = "failsafe", ttl = 1, stale_if_error = "1h", skip(db))]
async fn price(symbol: &str, db: &Dependency) -> Result<u64, String> {
    let _ = symbol;
    db.read().await
}

#[cached(db = MarketData, prefix = "failsafe", ttl = 1, skip(db))]
async fn plain_price(symbol: &str, db: &Dependency) -> Result<u64, String> {
    let _ = symbol;
    db.read().await
}

async fn past_the_ttl() {
    tokio::time::sleep(Duration::from_millis(1_150)).await;
}

async fn a_failing_function_is_answered_by_its_stale_entry(fx: &mut Fixture) {
    let db = Dependency::default();
    db.answers(1);
    assert_eq!(fx.run(price("AAPL", &db)).await, Ok(1));
    assert_eq!(fx.run(plain_price("AAPL", &db)).await, Ok(1));
    // The entry lives its TTL plus the window.
    let key = KeyBuilder::new("fail_safe", "failsafe", "price").arg("AAPL").finish().unwrap();
    let left = fx.ttl::<MarketData>(&key).await.expect("filled");
    assert!(left > Duration::from_secs(3_599) && left <= Duration::from_secs(3_601), "{left:?}");

    past_the_ttl().await;
    db.mode.store(1, SeqCst);
    let before = db.calls.load(SeqCst);
    assert_eq!(fx.run(price("AAPL", &db)).await, Ok(1), "an Err is answered by the stale value");
    assert_eq!(db.calls.load(SeqCst), before + 1, "past its TTL, the function was tried first");
    // Within the throttle (a tenth of the TTL, at least 100 ms) it is not tried again.
    assert_eq!(fx.run(price("AAPL", &db)).await, Ok(1));
    assert_eq!(db.calls.load(SeqCst), before + 1, "tried again within the throttle");
    // Without the option the caller sees the failure: what the option prevents happens here.
    assert_eq!(fx.run(plain_price("AAPL", &db)).await, Err("the database is down".to_owned()));

    tokio::time::sleep(Duration::from_millis(150)).await;
    db.mode.store(2, SeqCst);
    let before = db.calls.load(SeqCst);
    assert_eq!(fx.run(price("AAPL", &db)).await, Ok(1), "a panic is answered by the stale value");
    assert_eq!(db.calls.load(SeqCst), before + 1, "past the throttle, the function was tried");
    let stats = fx.stats().await;
    let counted = stats.function(5, "failsafe", "price").unwrap();
    assert_eq!(counted.stale_served, 3);

    tokio::time::sleep(Duration::from_millis(150)).await;

    // The function succeeds again: its value is returned and filled (fresh for a TTL).
    db.answers(2);
    assert_eq!(fx.run(price("AAPL", &db)).await, Ok(2));
    let calls = db.calls.load(SeqCst);
    assert_eq!(fx.run(price("AAPL", &db)).await, Ok(2));
    assert_eq!(db.calls.load(SeqCst), calls, "the refreshed entry is a hit");

    // An invalidated entry is gone: no stale answer after a write.
    fx.run(invalidate!(price("AAPL"))).await;
    db.mode.store(1, SeqCst);
    assert_eq!(fx.run(price("AAPL", &db)).await, Err("the database is down".to_owned()));
    // A function-wide invalidation retires stale entries too.
    db.answers(3);
    assert_eq!(fx.run(price("MSFT", &db)).await, Ok(3));
    past_the_ttl().await;
    fx.run(invalidate!(price(..))).await;
    db.mode.store(1, SeqCst);
    assert_eq!(fx.run(price("MSFT", &db)).await, Err("the database is down".to_owned()));
}

#[cached(db = MarketData, prefix = "failsafe", ttl = 1, stale_if_error = "1h", skip(db))]
async fn slow_price(symbol: &str, db: &Dependency) -> Result<u64, String> {
    let _ = symbol;
    tokio::time::sleep(Duration::from_millis(300)).await;
    db.read().await
}

/// An invalidation that lands while the function runs (and fails) retires the stale value: the
/// caller gets the failure. The same failure without the invalidation is answered stale.
async fn an_invalidation_during_the_failing_call_wins(fx: &mut Fixture) {
    let db = Dependency::default();
    db.answers(1);
    for symbol in ["KEPT", "WRITTEN"] {
        assert_eq!(fx.run(slow_price(symbol, &db)).await, Ok(1));
    }
    past_the_ttl().await;
    db.mode.store(1, SeqCst);
    assert_eq!(fx.run(slow_price("KEPT", &db)).await, Ok(1), "no write: the stale value answers");
    let runtime = fx.runtime.clone();
    let write = async {
        tokio::time::sleep(Duration::from_millis(100)).await; // while the function runs
        runtime.scope(invalidate!(slow_price("WRITTEN"))).await;
    };
    let (read, ()) = tokio::join!(fx.run(slow_price("WRITTEN", &db)), write);
    assert_eq!(read, Err("the database is down".to_owned()), "a value from before the write was answered");
    // Invalidated and filled again by another caller before the function fails: the entry is
    // back under the same generation, but it is not the stale value.
    let good = Dependency::default();
    good.answers(2);
    assert_eq!(fx.run(hanging_price("REFILLED", &good, Duration::ZERO)).await, Ok(2));
    past_the_ttl().await;
    let write_and_refill = async {
        tokio::time::sleep(Duration::from_millis(100)).await; // while the function runs
        runtime.scope(invalidate!(hanging_price("REFILLED"))).await;
        good.answers(3);
        assert_eq!(runtime.scope(hanging_price("REFILLED", &good, Duration::ZERO)).await, Ok(3));
        runtime.flush().await.unwrap();
    };
    let (read, ()) =
        tokio::join!(fx.run(hanging_price("REFILLED", &db, Duration::from_millis(600))), write_and_refill);
    assert_eq!(read, Err("the database is down".to_owned()), "the value from before the write was answered");
}

#[cached(db = MarketData, prefix = "failsafe", ttl = 1, stale_if_error = "1h", skip(db))]
async fn maybe_price(symbol: &str, db: &Dependency) -> Option<u64> {
    let _ = symbol;
    db.read().await.ok().filter(|v| *v != 0)
}

/// A `None` is an answer, not a failure: past the TTL it is returned, not the stale `Some`.
async fn a_none_is_an_answer(fx: &mut Fixture) {
    let db = Dependency::default();
    db.answers(7);
    assert_eq!(fx.run(maybe_price("GONE", &db)).await, Some(7));
    past_the_ttl().await;
    db.answers(0); // the row was deleted
    assert_eq!(fx.run(maybe_price("GONE", &db)).await, None);
    let stats = fx.stats().await;
    assert_eq!(stats.function(5, "failsafe", "maybe_price").unwrap().stale_served, 0);
}

#[cached(db = MarketData, prefix = "failsafe", ttl = 1, stale_if_error = "1h", skip(db, delay))]
async fn hanging_price(symbol: &str, db: &Dependency, delay: Duration) -> Result<u64, String> {
    let _ = symbol;
    tokio::time::sleep(delay).await;
    db.read().await
}

/// A stale read dropped while its function runs (its caller timed out) gives the lease back at
/// once: the next caller tries the function and answers stale within a second, instead of
/// waiting for the lease to expire (`lease_ttl`, 5 s by default).
async fn a_dropped_stale_read_gives_the_lease_back(fx: &mut Fixture) {
    let db = Dependency::default();
    db.answers(1);
    assert_eq!(fx.run(hanging_price("HANG", &db, Duration::ZERO)).await, Ok(1));
    past_the_ttl().await;
    db.mode.store(1, SeqCst);
    let dropped = tokio::time::timeout(
        Duration::from_millis(100),
        fx.run(hanging_price("HANG", &db, Duration::from_secs(30))),
    )
    .await;
    assert!(dropped.is_err(), "the call was still running when dropped");
    let started = Instant::now();
    assert_eq!(fx.run(hanging_price("HANG", &db, Duration::ZERO)).await, Ok(1), "answered stale");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(1), "the next caller waited {took:?} for a dropped caller's lease");
    assert_eq!(db.calls.load(SeqCst), 2, "the next caller tried the function itself");
}

/// `call(db, delay)` filled at version 1 (no delay), past its TTL, the dependency at version 2,
/// then 8 callers of it at once, each with `delay` (one holds the lease, the others wait on it).
async fn eight_stale_callers<Fut>(
    fx: &Fixture,
    delay: Duration,
    call: impl Fn(Arc<Dependency>, Duration) -> Fut,
) -> (Arc<Dependency>, JoinSet<Result<u64, String>>)
where
    Fut: std::future::Future<Output = Result<u64, String>> + Send + 'static,
{
    let db = Arc::new(Dependency::default());
    db.answers(1);
    assert_eq!(fx.run(call(Arc::clone(&db), Duration::ZERO)).await, Ok(1));
    past_the_ttl().await;
    db.answers(2);
    let mut callers = JoinSet::new();
    for _ in 0..8 {
        let (runtime, call) = (fx.runtime.clone(), call(Arc::clone(&db), delay));
        callers.spawn(async move { runtime.scope(call).await });
    }
    (db, callers)
}

/// Callers waiting on a stale read's holder when the entry is invalidated do not each run the
/// function: the stale value is no answer any more, and they serve the call as any other miss,
/// one computation for all of them.
async fn callers_waiting_when_the_stale_entry_goes_compute_once(fx: &mut Fixture) {
    let (db, callers) = eight_stale_callers(fx, Duration::from_millis(800), |db, delay| async move {
        hanging_price("GOES", &db, delay).await
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await; // while the stale read's holder runs
    fx.run(invalidate!(hanging_price("GOES"))).await;
    let answers = callers.join_all().await;
    assert!(answers.iter().all(|answer| *answer == Ok(2)), "{answers:?}");
    assert_eq!(
        db.calls.load(SeqCst),
        3,
        "the warm-up, the stale read's holder, and one computation once the entry went (9: each of the 7 waiting callers ran it)"
    );
}

#[cached(db = MarketData, prefix = "failsafe", ttl = 1, stale_if_error = "1s", skip(db, delay))]
async fn brief_price(symbol: &str, db: &Dependency, delay: Duration) -> Result<u64, String> {
    let _ = symbol;
    tokio::time::sleep(delay).await;
    db.read().await
}

/// Callers waiting on a stale read's holder when the entry expires (its window is 1 s) go on
/// waiting as a plain miss, for the same holder: one lease wait each, counted once, and its value.
async fn callers_waiting_when_the_stale_entry_expires_count_one_wait_each(fx: &mut Fixture) {
    // The holder runs past the entry's expiry (1 s of TTL and 1 s of window).
    let (db, callers) = eight_stale_callers(fx, Duration::from_millis(1_500), |db, delay| async move {
        brief_price("BRIEF", &db, delay).await
    })
    .await;
    let answers = callers.join_all().await;
    assert!(answers.iter().all(|answer| *answer == Ok(2)), "{answers:?}");
    assert_eq!(db.calls.load(SeqCst), 2, "the warm-up and the holder");
    let stats = fx.stats().await;
    let waits = stats.function(5, "failsafe", "brief_price").unwrap().lease_waits;
    assert_eq!(
        waits, 7,
        "one lease wait per waiting caller (8: the one that led the plain miss counted twice)"
    );
}

/// A stale read that waited while a function-wide invalidation returned fills under the new
/// generation, so the next call is a hit (not a miss that computes once more).
async fn a_stale_read_after_a_function_wide_invalidation_fills_the_new_generation(fx: &mut Fixture) {
    let db = Arc::new(Dependency::default());
    db.answers(1);
    assert_eq!(fx.run(hanging_price("WIDE", &db, Duration::ZERO)).await, Ok(1));
    past_the_ttl().await;
    db.answers(2);
    // The lease's holder hangs, and its caller gives up at 600 ms (the lease goes back then).
    let holder = {
        let (runtime, db) = (fx.runtime.clone(), Arc::clone(&db));
        tokio::spawn(async move {
            let call = runtime.scope(hanging_price("WIDE", &db, Duration::from_secs(30)));
            tokio::time::timeout(Duration::from_millis(600), call).await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await; // the holder has the lease
    let waiter = {
        let (runtime, db) = (fx.runtime.clone(), Arc::clone(&db));
        tokio::spawn(async move { runtime.scope(hanging_price("WIDE", &db, Duration::ZERO)).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await; // the waiter polls
    fx.run(invalidate!(hanging_price(..))).await;
    assert!(holder.await.unwrap().is_err(), "the holder was still running when its caller gave up");
    assert_eq!(waiter.await.unwrap(), Ok(2));
    fx.runtime.flush().await.unwrap();
    assert_eq!(fx.run(hanging_price("WIDE", &db, Duration::ZERO)).await, Ok(2));
    assert_eq!(
        db.calls.load(SeqCst),
        2,
        "the warm-up and the waiter's computation; a third: its fill was under the old generation"
    );
}

on_every_backend!(
    callers_waiting_when_the_stale_entry_goes_compute_once,
    callers_waiting_when_the_stale_entry_expires_count_one_wait_each,
    a_stale_read_after_a_function_wide_invalidation_fills_the_new_generation,
    a_dropped_stale_read_gives_the_lease_back,
    a_failing_function_is_answered_by_its_stale_entry,
    an_invalidation_during_the_failing_call_wins,
    a_none_is_an_answer,
);

/// A stale read that gets the lease just after another process filled (its reads answered
/// late, through a proxy that holds each reply 300 ms) reads the entry again before computing:
/// the other process's value answers, and the function runs once, not twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_read_granted_after_another_process_filled_takes_its_value() {
    let server = RedisServer::start();
    let proxy = support::proxy::FaultProxy::start(server.port());
    let quiet = |c: CacheConfig| c.with_generation_refresh(Duration::from_secs(3600));
    let (near, far) =
        (support::redis_runtime(&server.url(), quiet), support::redis_runtime(&proxy.url(), quiet));
    let db = Arc::new(Dependency::default());
    db.answers(1);
    assert_eq!(near.scope(price("RACE", &db)).await, Ok(1));
    assert_eq!(far.scope(price("WARM", &db)).await, Ok(1), "the far process's connection and generation");
    past_the_ttl().await;
    db.answers(2);
    proxy.set(support::proxy::Fault::Latency(Duration::from_millis(300)));
    let late = tokio::spawn({
        let (far, db) = (far.clone(), Arc::clone(&db));
        async move { far.scope(price("RACE", &db)).await }
    });
    // The far process's read has run (its answer, stale, is held back); this one refills.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(near.scope(price("RACE", &db)).await, Ok(2));
    assert_eq!(late.await.unwrap(), Ok(2));
    assert_eq!(
        db.calls.load(SeqCst),
        3,
        "two warm-ups and one refill; the far process computed again (4) after the refill"
    );
}

/// 8 callers per runtime (two runtimes: two processes) for `run` on one key, the dependency down
/// from the start (after one warm-up fill and the TTL): how many calls got an answer, how many an
/// error, and how many times the dependency was tried.
async fn outage(runtimes: &[Runtime], fail_safe: bool, run: Duration) -> (usize, usize, usize) {
    let db = Arc::new(Dependency::default());
    db.answers(1);
    let call = move |runtime: Runtime, db: Arc<Dependency>| async move {
        if fail_safe {
            runtime.scope(price("OUTAGE", &db)).await
        } else {
            runtime.scope(plain_price("OUTAGE", &db)).await
        }
    };
    assert_eq!(call(runtimes[0].clone(), Arc::clone(&db)).await, Ok(1));
    past_the_ttl().await;
    db.mode.store(1, SeqCst);
    let tried_before = db.calls.load(SeqCst);
    let (answers, errors) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let deadline = Instant::now() + run;
    let mut tasks = JoinSet::new();
    for runtime in runtimes {
        for _ in 0..8 {
            let (runtime, db, answers, errors) =
                (runtime.clone(), Arc::clone(&db), Arc::clone(&answers), Arc::clone(&errors));
            tasks.spawn(async move {
                while Instant::now() < deadline {
                    match call(runtime.clone(), Arc::clone(&db)).await {
                        Ok(1) => answers.fetch_add(1, SeqCst),
                        Ok(other) => panic!("answered {other}, never written"),
                        Err(_) => errors.fetch_add(1, SeqCst),
                    };
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            });
        }
    }
    while let Some(done) = tasks.join_next().await {
        done.expect("a caller panicked");
    }
    (answers.load(SeqCst), errors.load(SeqCst), db.calls.load(SeqCst) - tried_before)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_keep_answering_through_an_outage() {
    let server = RedisServer::start();
    keep_answering(&[
        support::redis_runtime(&server.url(), |c| c),
        support::redis_runtime(&server.url(), |c| c),
    ])
    .await;
}

/// The same two processes on the disk backend (two runtimes on one directory), on Cluster and
/// behind Sentinel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_keep_answering_through_an_outage_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    keep_answering(&[
        Runtime::new(CacheConfig::disk(dir.path())),
        Runtime::new(CacheConfig::disk(dir.path())),
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_keep_answering_through_an_outage_on_cluster() {
    let (config, _namespace) = support::cluster_config();
    keep_answering(&[Runtime::new(config.clone()), Runtime::new(config)]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_keep_answering_through_an_outage_behind_sentinel() {
    let fx = support::Fixture::sentinel();
    let url = fx.sentinel.as_ref().expect("a Sentinel fixture").url();
    keep_answering(&[fx.runtime.clone(), support::redis_runtime(&url, |c| c)]).await;
}

/// With `stale_if_error`, every call of 16 callers over `runtimes` is answered through a 3 s
/// outage of the dependency, which is tried about once per process per throttle; without it,
/// every call fails.
async fn keep_answering(runtimes: &[Runtime]) {
    let run = Duration::from_secs(3);
    let (answers, errors, tried) = outage(runtimes, true, run).await;
    let (plain_answers, plain_errors, plain_tried) = outage(runtimes, false, run).await;
    println!(
        "dependency down for {run:?}, 16 callers over two runtimes: stale_if_error: {answers} answered, {errors} errors, dependency tried {tried} times; without: {plain_answers} answered, {plain_errors} errors, tried {plain_tried} times"
    );
    assert_eq!(errors, 0, "with stale_if_error every call is answered");
    assert!(answers > 100, "{answers} answers");
    assert_eq!(plain_answers, 0, "without it, every call past the TTL fails");
    assert!(plain_errors > 100, "{plain_errors} errors");
    // After a failure each process answers stale without a try for the throttle (100 ms with
    // `ttl = 1`): about one try per process per throttle, 2 × 31 here; the bound allows half as
    // much again for the throttle's edges (without the throttle, the waves of callers would try
    // hundreds of times).
    let bound = 3 * (run.as_millis() / 100 + 1) as usize;
    assert!(tried <= bound, "the dependency was tried {tried} times (at most {bound})");
    assert_eq!(plain_tried, plain_errors);
}
