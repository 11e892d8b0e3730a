//! Near copies across a failover (Sentinel, Cluster): waits for a copy to answer or for a value
//! to be seen, given the call to make (a cached function with `near`, of the test's own: a
//! cached function here would be registered in every test binary) and its prefix.

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
