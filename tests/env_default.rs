//! With nothing configured, the first cached call reads the environment and serves from the
//! embedded backend. (Its own test binary: the process-wide runtime can be set only once.)

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

use cache_runtime::{cached, db::Grpc};

#[cached(db = Grpc, prefix = "grpc", ttl = 60, skip(calls))]
async fn greet(name: &str, calls: &AtomicUsize) -> String {
    calls.fetch_add(1, SeqCst);
    format!("hello {name}")
}

#[tokio::test]
async fn nothing_configured_means_the_embedded_backend() {
    for var in ["CACHE_BACKEND", "CACHE_ENABLED", "REDIS_URL", "REDIS_HOST", "REDIS_PORT", "REDIS_PASSWORD"] {
        assert!(std::env::var_os(var).is_none(), "run this test without {var} set");
    }
    let calls = AtomicUsize::new(0);
    assert_eq!(greet("ada", &calls).await, "hello ada");
    assert_eq!(greet("ada", &calls).await, "hello ada");
    assert_eq!(calls.load(SeqCst), 1, "the second call is served from the embedded backend");
    assert_eq!(cache_runtime::global().backend_kind(), "memory");
    assert!(matches!(
        cache_runtime::init(cache_runtime::CacheConfig::memory()),
        Err(cache_runtime::ConfigError::AlreadyInitialized)
    ));
}
