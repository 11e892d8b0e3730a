//! Slow functions are cached, with one execution: a body three times slower than `lease_ttl`
//! keeps its lease (renewed, token-checked, while it runs), and a holder that cannot renew (its
//! thread is blocked: hung) loses it after `lease_ttl`, which is the race renewal prevents. A
//! fill whose lease merely aged is written; one an invalidation revoked is refused.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cache_runtime::db::Backtest;
use cache_runtime::{cached, invalidate, CacheConfig, KeyBuilder, Runtime};
use tokio::task::JoinSet;

const LEASE: Duration = Duration::from_millis(300);
const BODY: Duration = Duration::from_millis(900);
/// Scheduling and round trips on a shared 2-core machine; well under another body time.
const MARGIN: Duration = Duration::from_millis(450);

#[cached(db = Backtest, prefix = "slow", ttl = 60, skip(runs))]
async fn backtest(strategy: &str, runs: Arc<AtomicUsize>) -> u64 {
    runs.fetch_add(1, SeqCst);
    tokio::time::sleep(BODY).await;
    strategy.len() as u64
}

/// 8 callers spread over `runtimes` (processes): one execution, everyone back in about one body
/// time, a hit afterwards.
async fn eight_callers(runtimes: &[Runtime], strategy: &'static str) {
    let runs = Arc::new(AtomicUsize::new(0));
    let mut set = JoinSet::new();
    let started = Instant::now();
    for i in 0..8 {
        let (rt, runs) = (runtimes[i % runtimes.len()].clone(), Arc::clone(&runs));
        set.spawn(async move {
            let v = rt.scope(backtest(strategy, runs)).await;
            (v, started.elapsed())
        });
    }
    let mut slowest = Duration::ZERO;
    while let Some(joined) = set.join_next().await {
        let (v, took) = joined.unwrap();
        assert_eq!(v, strategy.len() as u64);
        slowest = slowest.max(took);
    }
    eprintln!("{} runtime(s): 8 callers, body {BODY:?}, lease {LEASE:?}: {} execution(s), slowest caller {slowest:?}", runtimes.len(), runs.load(SeqCst));
    assert_eq!(runs.load(SeqCst), 1, "one execution for 8 callers of a body 3x the lease");
    assert!(slowest < BODY + MARGIN, "every caller back in about one body time: {slowest:?}");
    for rt in runtimes {
        rt.flush().await.unwrap();
    }
    let hit = Instant::now();
    assert_eq!(runtimes[0].scope(backtest(strategy, Arc::clone(&runs))).await, strategy.len() as u64);
    assert!(hit.elapsed() < BODY / 3, "a hit afterwards");
    assert_eq!(runs.load(SeqCst), 1);
    let renewals: u64 = runtimes.iter().map(|r| r.stats().get(6, "slow").map_or(0, |s| s.renewals)).sum();
    assert!(renewals >= 2, "the lease was renewed while the body ran ({renewals})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_body_embedded() {
    eight_callers(&[Runtime::new(CacheConfig::memory().with_lease_ttl(LEASE))], "mean-reversion").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_body_redis_two_runtimes() {
    let server = support::RedisServer::start();
    let rt = || support::redis_runtime(&server.url(), |c| c.with_lease_ttl(LEASE));
    eight_callers(&[rt(), rt()], "momentum").await;
}

/// A holder that cannot renew (its thread is blocked) loses the lease after `lease_ttl`: the
/// other process then computes too. This is the race renewal prevents above, shown in the same
/// run. Its fill, made after its lease aged, is written when nobody else filled the key and
/// nothing invalidated it ("alone"); refused when the other process filled it since, with a
/// value computed later ("aged"); refused when something invalidated it ("revoked"), also once
/// that invalidation's stamp has expired ("forgotten").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_holder_loses_the_lease_and_aged_fills_are_told_from_revoked_ones() {
    let server = support::RedisServer::start();
    let rt = || support::redis_runtime(&server.url(), |c| c.with_lease_ttl(LEASE));
    let (holder, other) = (rt(), rt());
    let mut refused_before = 0;
    for (strategy, other_computes, invalidated) in
        [("alone", false, false), ("aged", true, false), ("revoked", true, true), ("forgotten", true, true)]
    {
        let runs = Arc::new(AtomicUsize::new(0));
        let (h, r) = (holder.clone(), Arc::clone(&runs));
        // The holder's runtime is one thread that the body blocks: nothing renews its lease.
        let blocked = std::thread::spawn(move || {
            let local = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            local.block_on(h.scope(blocked_backtest(strategy, r)))
        });
        while runs.load(SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut waited = Duration::ZERO;
        if other_computes {
            let started = Instant::now();
            let v = other.scope(blocked_backtest(strategy, Arc::clone(&runs))).await;
            waited = started.elapsed();
            assert_eq!(v, strategy.len() as u64);
            assert_eq!(runs.load(SeqCst), 2, "the blocked holder lost its lease; the other process computed");
            assert!(waited >= LEASE - Duration::from_millis(50), "it waited for the lease ({waited:?})");
            assert!(waited < LEASE + MARGIN, "for the lease, not for the hung holder ({waited:?})");
        }
        if invalidated {
            other.scope(invalidate!(blocked_backtest(strategy))).await;
        }
        assert_eq!(blocked.join().unwrap(), 1000);
        holder.flush().await.unwrap();
        let key = KeyBuilder::new("slow", "slow", "blocked_backtest").arg(strategy).finish().unwrap();
        let stored: Option<String> =
            redis::cmd("GET").arg(&key).query_async(&mut server.raw(6).await).await.unwrap();
        let refused = holder.stats().get(6, "slow").map_or(0, |s| s.refused_fills) - refused_before;
        refused_before += refused;
        // `[generation, value, shape]`
        let value = stored.map(|s| serde_json::from_str::<serde_json::Value>(&s).unwrap()[1].clone());
        eprintln!("{strategy}: the other process waited {waited:?}; stored {value:?}; the holder's fill refused: {refused}");
        let (want, what) = match strategy {
            "alone" => (Some(1000.into()), "an aged fill nobody else made or invalidated is written"),
            "aged" => (Some(4.into()), "the other process's later value stays"),
            _ => (None, "a fill whose lease an invalidation revoked is refused"),
        };
        assert_eq!(value, want, "{strategy}: {what}");
        assert_eq!(refused, u64::from(strategy != "alone"), "{strategy}");
    }
}

/// The holder's first execution blocks its thread for three leases (hung, no renewal); for
/// `forgotten`, for eight, past the life of a stamp set after one (4 leases).
#[cached(db = Backtest, prefix = "slow", ttl = 60, skip(runs))]
async fn blocked_backtest(strategy: &str, runs: Arc<AtomicUsize>) -> u64 {
    if runs.fetch_add(1, SeqCst) == 0 {
        std::thread::sleep(if strategy == "forgotten" { LEASE * 8 } else { LEASE * 3 });
        return 1000;
    }
    strategy.len() as u64
}
