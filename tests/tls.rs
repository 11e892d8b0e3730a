//! `rediss://` through rustls, against TLS-only `redis-server`s with certificates this test
//! generates: one server and a cluster, trusting a private CA (`REDIS_CA_CERT`,
//! `with_ca_cert`); a certificate the client must reject is rejected, logged, and the function
//! still runs.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use cache_runtime::db::MarketData;
use cache_runtime::{cached, CacheConfig, Runtime};
use support::logs::Logs;
use support::tls::{tls_cli, Certificates, TlsCluster, TlsServer};

#[cached(db = MarketData, prefix = "fx", ttl = 60, skip(calls))]
async fn rate(pair: &str, calls: &AtomicUsize) -> u64 {
    calls.fetch_add(1, SeqCst);
    pair.len() as u64
}

fn config(config: CacheConfig) -> CacheConfig {
    config.with_op_timeout(Duration::from_secs(5)).with_connect_timeout(Duration::from_secs(5))
}

#[tokio::test]
async fn one_server_over_tls_with_a_private_ca() {
    let certs = Certificates::generate();
    let server = TlsServer::start(&certs);
    let config = config(CacheConfig::redis(&server.url()).unwrap())
        .with_ca_cert(certs.ca().to_str().unwrap())
        .unwrap();
    let rt = Runtime::new(config);
    let calls = AtomicUsize::new(0);
    assert_eq!(rt.scope(rate("EURUSD", &calls)).await, 6);
    assert_eq!(rt.scope(rate("EURUSD", &calls)).await, 6);
    assert_eq!(calls.load(SeqCst), 1, "the second call was a hit over TLS");
    rt.flush().await.unwrap();
    let s = rt.stats().get(5, "fx").cloned().unwrap();
    assert_eq!((s.hits, s.backend_errors), (1, 0));
    // The entry is on the server, in DB 5.
    let keys = tls_cli(&certs.ca(), server.port, &["-n", "5", "KEYS", "fx:rate:{*"]);
    assert_eq!(keys.lines().filter(|l| l.starts_with("fx:rate:{")).count(), 1, "{keys}");
}

/// A server whose certificate a CA we do not trust signed: with the system roots (no
/// `REDIS_CA_CERT`) and with another private CA, the connection is refused, the failure is
/// logged once, and every call runs its function.
#[tokio::test]
async fn a_certificate_the_client_must_reject_is_rejected() {
    let certs = Certificates::generate();
    let server = TlsServer::start(&certs);
    for trust in [None, Some(certs.other_ca())] {
        let (logs, _guard) = Logs::capture();
        let mut config =
            config(CacheConfig::redis(&server.url()).unwrap()).with_breaker(0, Duration::from_millis(500));
        if let Some(ca) = &trust {
            config = config.with_ca_cert(ca.to_str().unwrap()).unwrap();
        }
        let rt = Runtime::new(config);
        let calls = AtomicUsize::new(0);
        for _ in 0..3 {
            assert_eq!(rt.scope(rate("EURUSD", &calls)).await, 6);
        }
        assert_eq!(calls.load(SeqCst), 3, "no value from an untrusted server: the function ran each time");
        let s = rt.stats().get(5, "fx").cloned().unwrap();
        assert_eq!(s.hits, 0);
        assert!(s.backend_errors >= 3, "counted: {s:?}");
        let text = logs.text();
        assert_eq!(logs.count("WARN", "cache backend failing"), 1, "logged once ({trust:?}):\n{text}");
        assert!(
            text.contains("invalid peer certificate: UnknownIssuer"),
            "the log says why ({trust:?}):\n{text}"
        );
    }
}

#[tokio::test]
async fn cluster_over_tls() {
    let certs = Certificates::generate();
    let cluster = TlsCluster::start(&certs);
    let config = config(CacheConfig::cluster(&cluster.nodes()).unwrap())
        .with_ca_cert(certs.ca().to_str().unwrap())
        .unwrap();
    let rt = Runtime::new(config);
    let calls = AtomicUsize::new(0);
    let pairs: Vec<String> = (0..30).map(|i| format!("PAIR{i}")).collect();
    for pair in &pairs {
        rt.scope(rate(pair, &calls)).await;
    }
    rt.flush().await.unwrap();
    for pair in &pairs {
        assert_eq!(rt.scope(rate(pair, &calls)).await, pair.len() as u64);
    }
    assert_eq!(calls.load(SeqCst), 30, "every second call was a hit");
    let s = rt.stats().get(5, "fx").cloned().unwrap();
    assert_eq!((s.hits, s.backend_errors), (30, 0));
    // Spread over the three TLS primaries.
    let per_node: Vec<usize> = cluster
        .ports
        .iter()
        .map(|&p| {
            tls_cli(&certs.ca(), p, &["--scan", "--pattern", "db5:fx:rate:{*"])
                .lines()
                .filter(|l| !l.is_empty())
                .count()
        })
        .collect();
    assert_eq!(per_node.iter().sum::<usize>(), 30, "{per_node:?}");
    assert!(per_node.iter().all(|&n| n > 0), "{per_node:?}");
}

/// The same from the environment the services use: `REDIS_HOST`, `REDIS_PORT`, `REDIS_TLS=true`,
/// `REDIS_CA_CERT`.
#[tokio::test]
async fn tls_from_the_environment() {
    let certs = Certificates::generate();
    let server = TlsServer::start(&certs);
    let port = server.port.to_string();
    let ca = certs.ca().to_str().unwrap().to_owned();
    let config = CacheConfig::from_lookup(|name| match name {
        "REDIS_HOST" => Some("127.0.0.1".into()),
        "REDIS_PORT" => Some(port.clone()),
        "REDIS_TLS" => Some("true".into()),
        "REDIS_CA_CERT" => Some(ca.clone()),
        _ => None,
    })
    .unwrap();
    cached_once(config, "GBPUSD").await;
}

/// Two calls of `rate(pair)` through a runtime of `config`, each flushed: the second is a hit,
/// and no call failed.
async fn cached_once(config: CacheConfig, pair: &str) {
    let rt = Runtime::new(config);
    let calls = AtomicUsize::new(0);
    for _ in 0..2 {
        assert_eq!(rt.scope(rate(pair, &calls)).await, pair.len() as u64);
        rt.flush().await.unwrap();
    }
    assert_eq!(calls.load(SeqCst), 1, "the second call was a hit");
    assert_eq!(rt.stats().get(5, "fx").unwrap().backend_errors, 0);
}

/// A CA is for TLS connections: `REDIS_CA_CERT` beside a plain `redis://` `REDIS_URL` (a
/// variable set for the whole fleet, some of whose servers speak plain TCP) leaves the connection
/// plain, and the calls cache. The same environment gives the URL its password
/// (`REDIS_PASSWORD`). Before this release, the CA made redis-rs refuse to build the client
/// ("requires a URL with the `rediss://` scheme") and every call ran uncached; the password was
/// ignored.
#[tokio::test]
async fn a_ca_leaves_a_plain_url_plain_and_the_environments_password_reaches_it() {
    let certs = Certificates::generate();
    let server = support::RedisServer::start_with_args(&["--requirepass", "env-pw"]);
    let url = format!("redis://127.0.0.1:{}", server.port());
    let ca = certs.ca().to_str().unwrap().to_owned();
    let config = CacheConfig::from_lookup(|name| match name {
        "REDIS_URL" => Some(url.clone()),
        "REDIS_PASSWORD" => Some("env-pw".into()),
        "REDIS_CA_CERT" => Some(ca.clone()),
        _ => None,
    })
    .unwrap();
    cached_once(config, "USDJPY").await;
}
