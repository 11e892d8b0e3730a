//! Near copies across a failover (Sentinel, Cluster): a function that keeps them, and waits for
//! a copy to answer or for a value to be seen.

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::time::{Duration, Instant};

use cache_runtime::db::MarketData;
use cache_runtime::{cached, Runtime};

/// `source`'s version and `n`: what the function returns now.
#[cached(db = MarketData, prefix = "follow_near", ttl = 300, near = "60s", skip(source))]
pub async fn near_level(n: u32, source: &AtomicU64) -> u64 {
    source.load(SeqCst) * 1000 + u64::from(n)
}

/// The near hits `rt` counted for [`near_level`].
pub fn near_hits(rt: &Runtime) -> u64 {
    rt.stats().get(5, "follow_near").map_or(0, |s| s.near_hits)
}

/// Calls `near_level(n)` in `rt` until a near copy answers it (the tier trusted: tracking where the
/// store reads), within `within`; what it answered.
pub async fn until_near(rt: &Runtime, n: u32, source: &AtomicU64, within: Duration) -> u64 {
    let started = Instant::now();
    loop {
        let before = near_hits(rt);
        let value = rt.scope(near_level(n, source)).await;
        if near_hits(rt) > before {
            return value;
        }
        assert!(started.elapsed() < within, "no near hit within {within:?}: {:?}", rt.near_status());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Calls `near_level(n)` in `rt` until it answers `want`; how long that took (at most 10 s).
pub async fn until_value(rt: &Runtime, n: u32, source: &AtomicU64, want: u64) -> Duration {
    let started = Instant::now();
    loop {
        if rt.scope(near_level(n, source)).await == want {
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

/// The key of `near_level(n)` as README gives it (before a namespace or a Cluster DB's).
pub fn near_key(n: u32) -> String {
    cache_runtime::KeyBuilder::new(module_path!(), "follow_near", "near_level").arg(&n).finish().unwrap()
}
