//! The typed `Cache` handle, the same on both backends.

mod support;

use std::time::Duration;

use cache_runtime::db::{Backtest, Strategy};
use cache_runtime::{Cache, CacheError};
use serde::{Deserialize, Serialize};
use support::Fixture;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Job {
    id: u32,
    state: String,
}

fn jobs(fx: &Fixture, prefix: &str) -> Cache<Backtest, Job> {
    Cache::new(prefix, Duration::from_secs(3600)).unwrap().with_runtime(fx.runtime.clone())
}

async fn get_set_delete_exists(fx: &mut Fixture) {
    let cache = jobs(fx, "walkforward");
    let job = Job { id: 123, state: "running".into() };
    assert_eq!(cache.get("job:123").await.unwrap(), None);
    assert!(!cache.exists("job:123").await.unwrap());
    cache.set("job:123", &job).await.unwrap();
    assert_eq!(cache.get("job:123").await.unwrap(), Some(job));
    assert!(cache.exists("job:123").await.unwrap());
    assert!(cache.delete("job:123").await.unwrap());
    assert!(!cache.delete("job:123").await.unwrap(), "second delete finds nothing");
    assert_eq!(cache.get("job:123").await.unwrap(), None);
    let stats = fx.stats().await;
    let s = stats.get(6, "walkforward").unwrap();
    assert_eq!((s.hits, s.misses, s.fills), (1, 2, 1));
}

async fn ttl_and_expire(fx: &mut Fixture) {
    let cache = jobs(fx, "walkforward");
    let job = Job { id: 1, state: "done".into() };
    cache.set("a", &job).await.unwrap();
    let ttl = cache.ttl("a").await.unwrap().unwrap();
    assert!(ttl > Duration::from_secs(3590) && ttl <= Duration::from_secs(3600), "{ttl:?}");
    // The handle's answer agrees with a raw PTTL (on Redis) on the full key `{prefix}:{key}`.
    let raw = fx.ttl::<Backtest>("walkforward:a").await.expect("the full key is walkforward:a");
    assert!(raw <= ttl && ttl - raw < Duration::from_secs(2), "{raw:?} vs {ttl:?}");
    cache.set_with_ttl("b", &job, Duration::from_secs(5)).await.unwrap();
    assert!(cache.ttl("b").await.unwrap().unwrap() <= Duration::from_secs(5));
    assert!(cache.expire("b", Duration::from_secs(100)).await.unwrap());
    let b = cache.ttl("b").await.unwrap().unwrap();
    assert!(b > Duration::from_secs(95) && b <= Duration::from_secs(100), "{b:?}");
    assert!(!cache.expire("missing", Duration::from_secs(5)).await.unwrap());
    assert_eq!(cache.ttl("missing").await.unwrap(), None);
    cache.set_with_ttl("c", &job, Duration::from_millis(300)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(cache.get("c").await.unwrap(), None, "expired");
    assert!(matches!(cache.set_with_ttl("d", &job, Duration::ZERO).await, Err(CacheError::InvalidTtl(_))));
    // A caller-supplied Duration::MAX is an error, never a panic (Instant overflow).
    assert!(matches!(cache.set_with_ttl("d", &job, Duration::MAX).await, Err(CacheError::InvalidTtl(_))));
    assert!(matches!(cache.expire("a", Duration::MAX).await, Err(CacheError::InvalidTtl(_))));
    let year_and_a_day = Duration::from_secs(366 * 86_400);
    assert!(matches!(cache.set_with_ttl("d", &job, year_and_a_day).await, Err(CacheError::InvalidTtl(_))));
    assert!(cache.set_with_ttl("d", &job, Duration::from_secs(365 * 86_400)).await.is_ok());
}

async fn clear_removes_its_prefix_only(fx: &mut Fixture) {
    let ours = jobs(fx, "walkforward");
    let neighbours = jobs(fx, "walkforward-eu");
    let other_db: Cache<Strategy, Job> =
        Cache::new("walkforward", Duration::from_secs(60)).unwrap().with_runtime(fx.runtime.clone());
    let job = Job { id: 7, state: "x".into() };
    for i in 0..2500 {
        ours.set(&i.to_string(), &job).await.unwrap();
    }
    neighbours.set("1", &job).await.unwrap();
    other_db.set("1", &job).await.unwrap();
    assert_eq!(ours.clear().await.unwrap(), 2500);
    assert_eq!(ours.get("1").await.unwrap(), None);
    assert_eq!(
        neighbours.get("1").await.unwrap(),
        Some(job.clone()),
        "a prefix that merely starts the same survives"
    );
    assert_eq!(other_db.get("1").await.unwrap(), Some(job), "the same prefix in another DB survives");
}

async fn wrong_type_is_a_decode_error(fx: &mut Fixture) {
    let numbers: Cache<Backtest, u64> =
        Cache::new("walkforward", Duration::from_secs(60)).unwrap().with_runtime(fx.runtime.clone());
    numbers.set("n", &5).await.unwrap();
    let as_jobs = jobs(fx, "walkforward");
    assert!(matches!(as_jobs.get("n").await, Err(CacheError::Decode(_))));
}

async fn health_check_answers(fx: &mut Fixture) {
    jobs(fx, "walkforward").health_check().await.unwrap();
    if let Some(server) = &mut fx.server {
        server.stop();
        assert!(matches!(jobs(fx, "walkforward").health_check().await, Err(CacheError::Backend(_))));
    }
}

on_every_backend!(
    get_set_delete_exists,
    ttl_and_expire,
    clear_removes_its_prefix_only,
    wrong_type_is_a_decode_error,
    health_check_answers,
);

#[test]
fn prefixes_and_ttls_are_checked() {
    for bad in ["", "Market", "market:quote", "mar ket"] {
        let err = Cache::<Backtest, Job>::new(bad, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(err, CacheError::InvalidKey(_)), "{bad:?}");
    }
    assert!(Cache::<Backtest, Job>::new("ok_prefix-2", Duration::from_secs(1)).is_ok());
    assert!(Cache::<Backtest, Job>::new("ok", Duration::ZERO).is_err(), "every entry must expire");
}
