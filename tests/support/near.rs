//! Near copies across a failover (Sentinel, Cluster): waits for a copy to answer or for a value
//! to be seen, given the call to make and its prefix, and [`near_function!`], which defines a
//! cached function with `near` and those waits for it in the test binary that asks (a cached
//! function written here would be registered in every test binary).

use std::future::Future;
use std::time::{Duration, Instant};

use cache_runtime::Runtime;

/// The near hits `rt` counted for functions of `prefix` in DB 5.
pub fn near_hits(rt: &Runtime, prefix: &str) -> u64 {
    rt.stats().get(5, prefix).map_or(0, |s| s.near_hits)
}

/// Makes `call` in `rt` until a near copy of `prefix` answers it (the tier trusted: tracking where
/// the store reads), within `within`; what it answered.
pub async fn until_near<F: Future<Output = u64>>(
    rt: &Runtime,
    prefix: &str,
    call: impl Fn() -> F,
    within: Duration,
) -> u64 {
    let started = Instant::now();
    loop {
        let before = near_hits(rt, prefix);
        let value = rt.scope(call()).await;
        if near_hits(rt, prefix) > before {
            return value;
        }
        assert!(started.elapsed() < within, "no near hit within {within:?}: {:?}", rt.near_status());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Makes `call` in `rt` until it answers `want`; how long that took (at most 10 s).
pub async fn until_value<F: Future<Output = u64>>(rt: &Runtime, call: impl Fn() -> F, want: u64) -> Duration {
    let started = Instant::now();
    loop {
        if rt.scope(call()).await == want {
            return started.elapsed();
        }
        assert!(started.elapsed() < Duration::from_secs(10), "still not {want} after 10 s");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// How many tracking connections (`cache-runtime-near`) the server on `port` has.
pub fn tracking_connections(port: u16) -> usize {
    super::cluster::cli(port, &["CLIENT", "LIST"])
        .lines()
        .filter(|l| l.contains("name=cache-runtime-near"))
        .count()
}

/// Waits until every copy of `rt` is dropped and none answers (the tier distrusted), within 2 s
/// of `since`; when that was.
pub async fn until_distrusted(rt: &Runtime, since: Instant) -> Duration {
    // Distrusted, then emptied (by the tracking task, on another thread: both are waited for).
    while rt.near_status().trusted || rt.near_status().copies > 0 {
        assert!(
            since.elapsed() < Duration::from_secs(2),
            "copies still kept after 2 s: {:?}",
            rt.near_status()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    since.elapsed()
}

/// Defines, where it is invoked, `near_level(n, source)` (cached with `near`, under `prefix`,
/// returning `source`'s version * 1000 + n) and, for it, `near_hits(rt)`,
/// `until_near(rt, n, source, within)` and `until_value(rt, n, source, want)`.
#[allow(unused_macros)] // each test binary uses part of the support
macro_rules! near_function {
    ($prefix:tt) => {
        /// `source`'s version and `n`: what the function returns now.
        #[cached(db = MarketData, prefix = $prefix, ttl = 300, near = "60s", skip(source))]
        async fn near_level(n: u32, source: &AtomicU64) -> u64 {
            source.load(SeqCst) * 1000 + u64::from(n)
        }

        fn near_hits(rt: &Runtime) -> u64 {
            support::near::near_hits(rt, $prefix)
        }

        /// `near_level(n)` in `rt` until a near copy answers it, within `within`; what it answered.
        async fn until_near(rt: &Runtime, n: u32, source: &AtomicU64, within: Duration) -> u64 {
            support::near::until_near(rt, $prefix, || near_level(n, source), within).await
        }

        /// `near_level(n)` in `rt` until it answers `want`; how long that took.
        async fn until_value(rt: &Runtime, n: u32, source: &AtomicU64, want: u64) -> Duration {
            support::near::until_value(rt, || near_level(n, source), want).await
        }
    };
}
#[allow(unused_imports)]
pub(crate) use near_function;
