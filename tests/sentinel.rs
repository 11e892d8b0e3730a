//! A primary behind Sentinel (`redis+sentinel://`): caching follows the primary when the
//! sentinels fail it over to its replica under load, with no wrong answer and no error reaching a
//! caller. `cargo test --test sentinel -- --nocapture` prints README's figures.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant};

use cache_runtime::db::MarketData;
use cache_runtime::{cached, CacheConfig, Runtime};
use support::load::Load;
use support::sentinel::SentinelSet;

#[cached(db = MarketData, prefix = "sn", ttl = 300, skip(calls))]
async fn level(n: u32, calls: &AtomicUsize) -> u64 {
    calls.fetch_add(1, SeqCst);
    u64::from(n) + 1
}

/// Whether `level(n)` is answered from the cache now: two calls, no execution.
async fn is_hit(rt: &Runtime, n: u32, calls: &AtomicUsize) -> bool {
    let before = calls.load(SeqCst);
    assert_eq!(rt.scope(level(n, calls)).await, u64::from(n) + 1);
    assert_eq!(rt.scope(level(n, calls)).await, u64::from(n) + 1);
    calls.load(SeqCst) == before
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_primary_fails_over_under_load() {
    static EXECUTIONS: AtomicUsize = AtomicUsize::new(0);
    let mut set = SentinelSet::start();
    let config = CacheConfig::redis(&set.url()).unwrap().with_op_timeout(Duration::from_millis(250));
    let rt = Runtime::new(config);
    for n in 0..100 {
        rt.scope(level(n, &EXECUTIONS)).await;
    }
    rt.flush().await.unwrap();
    assert!(is_hit(&rt, 7, &EXECUTIONS).await, "cached through the sentinels' primary");
    let old_primary = set.primary.port();
    assert_eq!(set.primary_port(), old_primary);

    let load = Load::start(8, {
        let rt = rt.clone();
        move |i| {
            let (rt, n) = (rt.clone(), i % 100);
            async move { rt.scope(level(n, &EXECUTIONS)).await == u64::from(n) + 1 }
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let killed = Instant::now();
    set.primary.stop();
    let resumed = loop {
        if set.primary_port() == set.replica.port() && is_hit(&rt, 7, &EXECUTIONS).await {
            break killed.elapsed();
        }
        assert!(killed.elapsed() < Duration::from_secs(60), "caching never resumed on the new primary");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let promoted = set.primary_port();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (calls, wrong) = load.stop().await;
    // A new entry is written to the new primary and read back from it.
    let before = EXECUTIONS.load(SeqCst);
    rt.scope(level(1000, &EXECUTIONS)).await;
    rt.flush().await.unwrap();
    assert!(is_hit(&rt, 1000, &EXECUTIONS).await);
    assert_eq!(EXECUTIONS.load(SeqCst), before + 1);
    let s = rt.stats().get(5, "sn").cloned().unwrap();
    println!(
        "sentinel failover: caching resumed on the promoted replica :{promoted} {:.2} s after the primary :{old_primary} \
         was killed (down-after-milliseconds 1000); {calls} calls under load, {wrong} wrong answers, \
         {} backend errors and {} bypassed calls counted",
        resumed.as_secs_f64(),
        s.backend_errors,
        s.bypassed
    );
    assert_eq!(wrong, 0, "every caller got its function's value");
    assert!(calls > 100, "the load ran ({calls} calls)");
    assert_eq!(promoted, set.replica.port());
}
