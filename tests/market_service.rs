//! `examples/market_service.rs`, run as a user runs it (its own process, built by `cargo test`
//! with the other examples) and driven over real HTTP: against a real `redis-server`, then on the
//! embedded default.

mod support;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::http::{get, request_with};
use support::{free_port, signal, RedisServer};

const TOKEN: &str = "admin-token-for-tests";

/// The example's binary, next to this test's (`target/<profile>/examples/`).
fn example_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).expect("target/<profile>/deps/<test>");
    let binary = profile_dir.join("examples").join("market_service");
    assert!(
        binary.exists(),
        "{} is missing: `cargo test` builds the examples; alone, run `cargo build --example market_service`",
        binary.display()
    );
    binary
}

struct Service {
    child: Child,
    port: u16,
}

impl Service {
    fn start(redis_url: Option<&str>) -> Service {
        let port = free_port();
        let mut command = Command::new(example_binary());
        command.env("PORT", port.to_string()).env("ADMIN_TOKEN", TOKEN).env("RUST_LOG", "warn");
        command.env_remove("REDIS_URL").env_remove("REDIS_HOST").env_remove("CACHE_BACKEND");
        if let Some(url) = redis_url {
            command.env("REDIS_URL", url);
        }
        let child =
            command.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().expect("the example starts");
        let service = Service { child, port };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "market_service did not listen on {port} within 20 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        service
    }

    async fn call(&self, method: &str, path: &str, body: Option<&str>) -> support::http::Reply {
        request_with(self.port, method, path, &[], body).await
    }

    async fn admin(&self, method: &str, path: &str, body: Option<&str>) -> support::http::Reply {
        let auth = format!("Authorization: Bearer {TOKEN}");
        request_with(self.port, method, path, &[&auth], body).await
    }

    /// SIGTERM: the service drains and flushes, then exits with success.
    fn stop(mut self) {
        signal(self.child.id(), "-TERM");
        let status = self.child.wait().unwrap();
        assert!(status.success(), "market_service exited with {status}");
    }
}

/// The value of one sample line of the exposition.
fn sample(text: &str, line_start: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(line_start).and_then(|rest| rest.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("{line_start} in:\n{text}"))
        .parse()
        .unwrap()
}

async fn exercise(service: &Service, backend: &str) {
    // A cached read: the second is a hit.
    let first = service.call("GET", "/quotes/AAPL", None).await;
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(first.json(), serde_json::json!({"symbol": "AAPL", "price": 150.25}));
    let second = service.call("GET", "/quotes/AAPL", None).await;
    assert_eq!(second.body, first.body);
    let missing = service.call("GET", "/quotes/NOPE", None).await;
    assert_eq!(missing.status, 404);

    // The write invalidates: the next read shows the new price.
    let put = service.call("PUT", "/quotes/AAPL", Some("{\"price\": 151.0}")).await;
    assert_eq!(put.status, 204, "{}", put.body);
    let after = service.call("GET", "/quotes/AAPL", None).await;
    assert_eq!(after.json()["price"], 151.0);
    let bad = service.call("PUT", "/quotes/AAPL", Some("{\"price\": \"high\"}")).await;
    assert!((400..500).contains(&bad.status), "{}", bad.status);

    // The scrape: AAPL was computed twice (first read, read after the write), read once from
    // the cache; NOPE computed once (an `Err` is not cached).
    let metrics = get(service.port, "/metrics").await;
    assert_eq!(metrics.status, 200);
    let labels = "{db=\"5\",prefix=\"market\",function=\"quote\"}";
    assert_eq!(sample(&metrics.body, &format!("cache_hits_total{labels}")), 1, "{}", metrics.body);
    assert_eq!(sample(&metrics.body, &format!("cache_misses_total{labels}")), 3, "{}", metrics.body);
    assert_eq!(sample(&metrics.body, &format!("cache_invalidations_total{labels}")), 1, "{}", metrics.body);
    assert!(
        metrics.body.contains(&format!("cache_breaker_open{{backend=\"{backend}\"}} 0")),
        "{}",
        metrics.body
    );

    // The admin routes, behind the service's token.
    assert_eq!(service.call("GET", "/cache/status", None).await.status, 401);
    let status = service.admin("GET", "/cache/status", None).await;
    assert_eq!(status.status, 200, "{}", status.body);
    let status = status.json();
    assert_eq!(status["backend"], backend);
    let quote = status["functions"].as_array().unwrap().iter().find(|f| f["function"] == "quote").unwrap();
    assert_eq!(quote["hit_rate"], 0.25);
    let functions = service.admin("GET", "/cache/functions", None).await.json();
    assert_eq!(functions[0]["path"], "market_service::quote");
    assert_eq!(functions[0]["invalidated_by"][0], "market_service::update_quote");
    let cleared =
        service.admin("POST", "/cache/clear", Some("{\"db\": \"market\", \"prefix\": \"market\"}")).await;
    assert_eq!(cleared.status, 200, "{}", cleared.body);
    assert!(cleared.json()["removed"].as_u64().unwrap() >= 1, "{}", cleared.body);
    let refused = service.admin("POST", "/cache/clear", Some("{\"db\": 15, \"prefix\": \"market\"}")).await;
    assert_eq!(refused.status, 400);
}

#[tokio::test]
async fn the_service_example_serves_caches_and_reports_over_redis() {
    let server = RedisServer::start();
    let service = Service::start(Some(&server.url()));
    exercise(&service, "redis").await;
    service.stop();
    // The cleared prefix was filled again by nothing: only what the last reads wrote is left.
    let mut conn = server.raw(5).await;
    let left: Vec<String> = redis::cmd("KEYS").arg("market:quote:{*").query_async(&mut conn).await.unwrap();
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test]
async fn the_service_example_runs_on_the_embedded_default() {
    let service = Service::start(None);
    exercise(&service, "memory").await;
    service.stop();
}
