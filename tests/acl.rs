//! ACL users (`redis://user:password@host`, `REDIS_USERNAME`/`REDIS_PASSWORD`), with a user the
//! test creates (`ACL SETUSER`) limited to its key patterns: what the user may touch is cached;
//! a denied key pattern or a wrong password is logged and counted, the function still runs, and
//! the password appears nowhere.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use cache_runtime::db::MarketData;
use cache_runtime::{cached, CacheConfig, Runtime};
use support::logs::Logs;
use support::RedisServer;

const PASSWORD: &str = "s3cret-Pw/9";

#[cached(db = MarketData, prefix = "acl", ttl = 60, skip(calls))]
async fn allowed(n: u32, calls: &AtomicUsize) -> u32 {
    calls.fetch_add(1, SeqCst);
    n * 2
}

#[cached(db = MarketData, prefix = "elsewhere", ttl = 60, skip(calls))]
async fn denied(n: u32, calls: &AtomicUsize) -> u32 {
    calls.fetch_add(1, SeqCst);
    n * 3
}

/// A server with the user `cache`, allowed the keys `acl:*` only.
async fn server_with_user() -> RedisServer {
    let server = RedisServer::start();
    ::redis::cmd("ACL")
        .arg(&["SETUSER", "cache", "on", &format!(">{PASSWORD}"), "~acl:*", "+@all", "-@dangerous"])
        .query_async::<()>(&mut server.raw(0).await)
        .await
        .unwrap();
    server
}

fn relaxed(config: CacheConfig) -> CacheConfig {
    config.with_op_timeout(Duration::from_secs(5)).with_connect_timeout(Duration::from_secs(5))
}

#[tokio::test]
async fn a_user_limited_to_its_key_patterns() {
    let server = server_with_user().await;
    let (logs, _guard) = Logs::capture();
    let url = format!("redis://cache:{}@127.0.0.1:{}", PASSWORD.replace('/', "%2F"), server.port());
    let config = relaxed(CacheConfig::redis(&url).unwrap());
    assert!(!format!("{config:?}").contains(PASSWORD));
    let rt = Runtime::new(config);
    let (a, d) = (AtomicUsize::new(0), AtomicUsize::new(0));
    // Denied first, more often than the breaker's threshold: NOPERM is about that request only.
    for _ in 0..8 {
        assert_eq!(rt.scope(denied(1, &d)).await, 3);
    }
    assert_eq!(d.load(SeqCst), 8, "a key the user may not touch is never cached: the function runs");
    assert_eq!(rt.scope(allowed(1, &a)).await, 2);
    assert_eq!(rt.scope(allowed(1, &a)).await, 2);
    assert_eq!(a.load(SeqCst), 1, "the user's own keys are cached");
    rt.flush().await.unwrap();
    let stats = rt.stats();
    let (ok, no) = (stats.get(5, "acl").unwrap(), stats.get(5, "elsewhere").unwrap());
    assert_eq!((ok.hits, ok.backend_errors, ok.bypassed), (1, 0, 0));
    assert!(no.backend_errors >= 8, "{no:?}");
    let text = logs.text();
    assert!(
        text.contains("NOPERM") || text.to_lowercase().contains("permission"),
        "the log says why:\n{text}"
    );
    assert_eq!(logs.count("WARN", "cache backend refused a request"), 1, "logged once:\n{text}");
    assert_eq!(logs.count("WARN", "cache backend failing"), 0, "the server is up:\n{text}");
    assert!(!text.contains(PASSWORD), "the password is never logged");
    assert!(!text.contains("s3cret-Pw%2F9"), "nor its URL encoding");
    // The entry is where the user may write it.
    let keys: Vec<String> =
        ::redis::cmd("KEYS").arg("acl:*").query_async(&mut server.raw(5).await).await.unwrap();
    assert!(keys.iter().any(|k| k.starts_with("acl:allowed:{")), "{keys:?}");
}

#[tokio::test]
async fn a_wrong_password_is_logged_and_counted_and_never_shown() {
    let server = server_with_user().await;
    let wrong = "not-the-Password-42";
    for config in [
        CacheConfig::redis(&format!("redis://cache:{wrong}@127.0.0.1:{}", server.port())).unwrap(),
        CacheConfig::from_lookup(|name| match name {
            "REDIS_HOST" => Some("127.0.0.1".into()),
            "REDIS_PORT" => Some(server.port().to_string()),
            "REDIS_USERNAME" => Some("cache".into()),
            "REDIS_PASSWORD" => Some(wrong.into()),
            _ => None,
        })
        .unwrap(),
    ] {
        let (logs, _guard) = Logs::capture();
        assert!(!format!("{config:?}").contains(wrong));
        let rt = Runtime::new(relaxed(config));
        let calls = AtomicUsize::new(0);
        for _ in 0..3 {
            assert_eq!(rt.scope(allowed(2, &calls)).await, 4);
        }
        assert_eq!(calls.load(SeqCst), 3);
        let s = rt.stats().get(5, "acl").cloned().unwrap();
        assert!(s.backend_errors + s.bypassed >= 3, "{s:?}");
        let text = logs.text();
        assert!(
            text.contains("WRONGPASS") || text.to_lowercase().contains("auth"),
            "the log says why:\n{text}"
        );
        assert!(!text.contains(wrong), "the password is never logged:\n{text}");
        // The same user with the right password from the environment caches.
        let right = CacheConfig::from_lookup(|name| match name {
            "REDIS_HOST" => Some("127.0.0.1".into()),
            "REDIS_PORT" => Some(server.port().to_string()),
            "REDIS_USERNAME" => Some("cache".into()),
            "REDIS_PASSWORD" => Some(PASSWORD.into()),
            _ => None,
        })
        .unwrap();
        let rt = Runtime::new(relaxed(right));
        let calls = AtomicUsize::new(0);
        rt.scope(allowed(3, &calls)).await;
        rt.flush().await.unwrap();
        rt.scope(allowed(3, &calls)).await;
        assert_eq!(calls.load(SeqCst), 1);
        let _ = ::redis::cmd("DEL").arg("x").query_async::<()>(&mut server.raw(5).await).await;
        ::redis::cmd("FLUSHALL").query_async::<()>(&mut server.raw(0).await).await.unwrap();
    }
}

/// An ACL user on Cluster, from the environment (`REDIS_CLUSTER_NODES`, `REDIS_USERNAME`,
/// `REDIS_PASSWORD`): the user is created on every node (ACLs are per node) of this binary's
/// cluster, limited to its own key namespace.
#[tokio::test]
async fn an_acl_user_on_cluster_from_the_environment() {
    let cluster = support::RedisCluster::shared();
    let namespace = support::unique_namespace();
    for node in &cluster.nodes {
        let reply = support::cluster::cli(
            node.port,
            &[
                "ACL",
                "SETUSER",
                "clusterapp",
                "on",
                &format!(">{PASSWORD}"),
                &format!("~{namespace}:*"),
                "+@all",
                "-@dangerous",
                "+cluster|slots",
                "+cluster|shards",
            ],
        );
        assert!(reply.contains("OK"), "{reply}");
    }
    let nodes = cluster.addresses().join(",");
    let (logs, _guard) = Logs::capture();
    let config = CacheConfig::from_lookup(|name| match name {
        "REDIS_CLUSTER_NODES" => Some(nodes.clone()),
        "REDIS_USERNAME" => Some("clusterapp".into()),
        "REDIS_PASSWORD" => Some(PASSWORD.into()),
        "CACHE_KEY_NAMESPACE" => Some(namespace.clone()),
        _ => None,
    })
    .unwrap();
    assert!(!format!("{config:?}").contains(PASSWORD));
    let rt = Runtime::new(relaxed(config));
    let calls = AtomicUsize::new(0);
    for n in 0..20 {
        rt.scope(allowed(n, &calls)).await;
    }
    rt.flush().await.unwrap();
    for n in 0..20 {
        assert_eq!(rt.scope(allowed(n, &calls)).await, n * 2);
    }
    assert_eq!(calls.load(SeqCst), 20, "every second call was a hit, on every primary");
    let s = rt.stats().get(5, "acl").cloned().unwrap();
    assert_eq!((s.hits, s.backend_errors), (20, 0), "{s:?}\n{}", logs.text());
    assert!(!logs.text().contains(PASSWORD));
}
