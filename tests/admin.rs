//! The operator's view, over real HTTP against a real `redis-server` (with a password): the admin
//! routes (`cache_runtime::admin`), the Prometheus exposition scraped from `/metrics`, and the
//! `cache.call` span around each cached call.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::OnceLock;

use cache_runtime::db::{MarketData, Session};
use cache_runtime::telemetry::Prometheus;
use cache_runtime::{admin, cached, invalidates, Runtime};
use support::http::{get, post, serve};
use support::RedisServer;

static QUOTES: AtomicUsize = AtomicUsize::new(0);

#[cached(db = MarketData, prefix = "adm_quotes", ttl = 300)]
async fn quote(symbol: &str) -> u64 {
    QUOTES.fetch_add(1, SeqCst);
    tracing::info!(symbol, "computing a quote");
    symbol.len() as u64
}

#[invalidates(quote(symbol))]
async fn set_quote(symbol: &str) {
    let _ = symbol;
}

#[cached(db = MarketData, prefix = "adm_rates", ttl = 300)]
async fn rate(pair: &str) -> u64 {
    pair.len() as u64
}

/// The same prefix as `quote`, in another DB.
#[cached(db = Session, prefix = "adm_quotes", ttl = 300)]
async fn session(id: u32) -> u32 {
    id
}

const PASSWORD: &str = "s3cret-admin";

/// One Prometheus recorder per process, installed before the first cached call.
fn prometheus() -> &'static Prometheus {
    static PROMETHEUS: OnceLock<Prometheus> = OnceLock::new();
    PROMETHEUS.get_or_init(|| Prometheus::install().expect("the first recorder of this process"))
}

async fn raw(server: &RedisServer, db: u8) -> redis::aio::MultiplexedConnection {
    let url = format!("redis://:{PASSWORD}@127.0.0.1:{}/{db}", server.port());
    redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap()
}

async fn keys(server: &RedisServer, db: u8, pattern: &str) -> usize {
    let mut conn = raw(server, db).await;
    let keys: Vec<String> = redis::cmd("KEYS").arg(pattern).query_async(&mut conn).await.unwrap();
    keys.len()
}

/// What a service does: the admin routes under `/cache`, the exposition at `/metrics`.
async fn app(runtime: &Runtime) -> u16 {
    let prometheus = prometheus().clone();
    let scraped = runtime.clone();
    let app = axum::Router::new()
        .nest("/cache", admin::router_for(runtime.clone()))
        .route("/metrics", axum::routing::get(move || async move { prometheus.render_for(&scraped) }));
    serve(app).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_see_and_steer_the_cache_over_http() {
    prometheus();
    let server = RedisServer::start_with_args(&["--requirepass", PASSWORD]);
    let url = format!("redis://:{PASSWORD}@127.0.0.1:{}", server.port());
    let runtime = support::redis_runtime(&url, |c| c);
    let port = app(&runtime).await;

    // Traffic: `quote` misses twice and hits once; `rate` and `session` fill once each.
    runtime
        .scope(async {
            quote("AAPL").await;
            // Written before the next call, which then looks it up (rather than following the
            // first call's fill while it is still on its way).
            runtime.flush().await.unwrap();
            quote("AAPL").await;
            quote("MSFT").await;
            rate("EURUSD").await;
            session(7).await;
        })
        .await;
    runtime.flush().await.unwrap();
    assert_eq!(QUOTES.load(SeqCst), 2);

    // Status: the server as Redis reports it, and hit rates per prefix and per function.
    let status = get(port, "/cache/status").await;
    assert_eq!(status.status, 200, "{}", status.body);
    assert!(!status.body.contains(PASSWORD), "no password in the status: {}", status.body);
    let status = status.json();
    assert_eq!(status["backend"], "redis");
    assert_eq!(status["breaker_open"], false);
    let version = std::process::Command::new("redis-server").arg("--version").output().unwrap();
    let version = String::from_utf8_lossy(&version.stdout).into_owned();
    let reported = status["server"]["version"].as_str().unwrap();
    assert!(version.contains(&format!("v={reported} ")), "{reported} vs {version}");
    assert!(status["server"]["used_bytes"].as_u64().unwrap() > 0);
    // DB 5: three entries (AAPL, MSFT, EURUSD), plus the generation keys the lookups read.
    let db5 = status["server"]["keys"]["5"].as_u64().unwrap() as usize;
    assert_eq!(db5, keys(&server, 5, "*").await);
    assert_eq!(status["server"]["keys"]["3"].as_u64(), Some(keys(&server, 3, "*").await as u64));
    let quote_stats = status["functions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["function"] == "quote")
        .unwrap_or_else(|| panic!("quote in {status}"));
    assert_eq!((quote_stats["hits"].as_u64(), quote_stats["misses"].as_u64()), (Some(1), Some(2)));
    assert_eq!(quote_stats["hit_rate"].as_f64(), Some(1.0 / 3.0));
    let prefix = status["prefixes"].as_array().unwrap().iter().find(|p| p["prefix"] == "adm_rates").unwrap();
    assert_eq!((prefix["db"].as_u64(), prefix["misses"].as_u64()), (Some(5), Some(1)));

    // The registry.
    let functions = get(port, "/cache/functions").await.json();
    let quote_info = functions.as_array().unwrap().iter().find(|f| f["path"] == "admin::quote").unwrap();
    assert_eq!(quote_info["invalidated_by"], serde_json::json!(["admin::set_quote"]));
    assert_eq!(quote_info["key_pattern"], "adm_quotes:quote:*");

    // The configuration, password redacted.
    let config = get(port, "/cache/config").await;
    assert_eq!(config.status, 200);
    assert!(!config.body.contains(PASSWORD), "{}", config.body);
    assert!(config.json()["address"].as_str().unwrap().contains(&server.port().to_string()));

    // Bad requests: a 4xx with a message, and nothing cleared. Among the keys that must stay, one
    // the service does not own (the IAM team's session).
    let mut iam = raw(&server, 3).await;
    let _: () = redis::cmd("SET").arg("session:u42").arg("token").query_async(&mut iam).await.unwrap();
    let before = (keys(&server, 5, "*").await, keys(&server, 3, "*").await);
    for (body, status, says) in [
        ("{\"db\": 5, \"prefix\": ", 400, "not JSON"),
        ("[5, \"adm_quotes\"]", 400, "JSON object"),
        ("{\"db\": 15, \"prefix\": \"adm_quotes\"}", 400, "reserved for the platform"),
        ("{\"db\": \"reserved\", \"prefix\": \"adm_quotes\"}", 400, "reserved for the platform"),
        ("{\"db\": 16, \"prefix\": \"adm_quotes\"}", 400, "unknown DB 16"),
        ("{\"db\": \"nope\", \"prefix\": \"adm_quotes\"}", 400, "unknown DB \"nope\""),
        ("{\"db\": 5}", 400, "`db` and `prefix` together"),
        ("{}", 400, "`db` and `prefix` together"),
        ("{\"db\": 5, \"prefix\": \"adm:quotes\"}", 400, "bad prefix"),
        ("{\"db\": 5, \"prefix\": \"adm_quotes\", \"function\": \"quote\"}", 400, "not both"),
        ("{\"db\": 5, \"prefix\": \"adm_quotes\", \"all\": true}", 400, "unknown field `all`"),
        ("{\"function\": \"nope\"}", 404, "no cached function is named `nope`"),
        ("{\"function\": 5}", 400, "must be a string"),
        // Prefixes no function or handle of this process uses: a session prefix, and a prefix of
        // this process's in a DB where it does not use it.
        ("{\"db\": \"session\", \"prefix\": \"session\"}", 404, "uses prefix `session` in DB 3"),
        ("{\"db\": 3, \"prefix\": \"adm_rates\"}", 404, "adm_rates in DB 5"),
    ] {
        let reply = post(port, "/cache/clear", body).await;
        assert_eq!(reply.status, status, "{body}: {}", reply.body);
        let error = reply.json()["error"].as_str().unwrap().to_owned();
        assert!(error.contains(says), "{body}: {error}");
    }
    assert_eq!((keys(&server, 5, "*").await, keys(&server, 3, "*").await), before, "a refused clear cleared");
    assert_eq!(keys(&server, 3, "session:*").await, 1);

    // A handle's prefix is this process's too, once the handle is made.
    let tokens = cache_runtime::Cache::<Session, u64>::new("adm_tokens", std::time::Duration::from_secs(60))
        .unwrap()
        .with_runtime(runtime.clone());
    tokens.set("t1", &1).await.unwrap();
    let reply = post(port, "/cache/clear", "{\"db\": 3, \"prefix\": \"adm_tokens\"}").await;
    assert_eq!((reply.status, reply.json()["removed"].as_u64()), (200, Some(1)), "{}", reply.body);
    assert_eq!(tokens.get("t1").await.unwrap(), None);

    // A prefix in one DB: its keys go, the same prefix in another DB and other prefixes stay.
    let reply = post(port, "/cache/clear", "{\"db\": \"market\", \"prefix\": \"adm_quotes\"}").await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let removed = reply.json()["removed"].as_u64().unwrap();
    assert!(removed >= 2, "two entries at least: {removed}");
    assert_eq!(keys(&server, 5, "adm_quotes:*").await, 0);
    assert!(keys(&server, 5, "adm_rates:*").await >= 1);
    assert!(keys(&server, 3, "adm_quotes:*").await >= 1);
    runtime.scope(quote("AAPL")).await;
    assert_eq!(QUOTES.load(SeqCst), 3, "the cleared entry is computed again");
    runtime.flush().await.unwrap();

    // A function by name: its entries are invalidated, the others' are not.
    let reply = post(port, "/cache/clear", "{\"function\": \"quote\"}").await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    assert_eq!(reply.json()["invalidated"], "admin::quote");
    runtime.scope(quote("AAPL")).await;
    assert_eq!(QUOTES.load(SeqCst), 4, "the function-wide invalidation reached the entry");
    let rates_before = runtime.stats().function(5, "adm_rates", "rate").unwrap().hits;
    runtime.scope(rate("EURUSD")).await;
    assert_eq!(runtime.stats().function(5, "adm_rates", "rate").unwrap().hits, rates_before + 1);
    // The fill of the recomputed quote is written behind: it is counted once the server answers.
    runtime.flush().await.unwrap();

    // The scrape: counters by DB, prefix and function, latency histograms, gauges.
    let metrics = get(port, "/metrics").await;
    assert_eq!(metrics.status, 200);
    let text = metrics.body;
    let stats = runtime.stats();
    let quote_now = stats.function(5, "adm_quotes", "quote").unwrap();
    for (name, value) in [("hits", quote_now.hits), ("misses", quote_now.misses), ("fills", quote_now.fills)]
    {
        let line =
            format!("cache_{name}_total{{db=\"5\",prefix=\"adm_quotes\",function=\"quote\"}} {value}\n");
        assert!(text.contains(&line), "{line} in:\n{text}");
    }
    assert!(
        text.contains("cache_invalidations_total{db=\"5\",prefix=\"adm_quotes\",function=\"quote\"} 1\n"),
        "{text}"
    );
    let lookups = "cache_lookup_seconds_count{db=\"5\",prefix=\"adm_quotes\",function=\"quote\"} ";
    let count: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix(lookups))
        .unwrap_or_else(|| panic!("{lookups} in:\n{text}"))
        .parse()
        .unwrap();
    assert_eq!(count, quote_now.hits + quote_now.misses, "one lookup per call");
    assert!(
        text.contains(
            "cache_lookup_seconds_bucket{db=\"5\",prefix=\"adm_quotes\",function=\"quote\",le=\"0.001\"}"
        ),
        "{text}"
    );
    assert!(
        text.contains("cache_compute_seconds_count{db=\"5\",prefix=\"adm_quotes\",function=\"quote\"} 4\n"),
        "{text}"
    );
    assert!(
        text.contains("cache_fill_seconds_count{db=\"5\",prefix=\"adm_quotes\",function=\"quote\"}"),
        "{text}"
    );
    assert!(text.contains("cache_breaker_open{backend=\"redis\"} 0\n"), "{text}");
    assert!(text.contains("cache_write_queue_depth{backend=\"redis\"} 0\n"), "{text}");
    assert!(text.contains("# HELP cache_lookup_seconds"), "{text}");

    // The breaker's gauge follows the server: stopped, the breaker opens after its threshold.
    drop(server);
    runtime
        .scope(async {
            for i in 0..20 {
                rate(&format!("down{i}")).await;
            }
        })
        .await;
    assert!(runtime.breaker_open());
    let text = get(port, "/metrics").await.body;
    assert!(text.contains("cache_breaker_open{backend=\"redis\"} 1\n"), "{text}");
    let status = get(port, "/cache/status").await.json();
    assert_eq!(status["breaker_open"], true);
    assert!(status["server"].is_null() && status["server_error"].is_string(), "{status}");
}

#[cached(db = MarketData, prefix = "adm_traced", ttl = 300)]
async fn traced(x: u32) -> u32 {
    tracing::info!(x, "inside the function");
    x
}

/// Each call's span closes with its outcome; what the function logs is inside it.
#[tokio::test]
async fn each_cached_call_runs_in_a_span_with_its_outcome() {
    use tracing_subscriber::fmt::format::FmtSpan;
    let logs = support::logs::Logs::default();
    let subscriber = tracing_subscriber::fmt()
        .with_env_filter("cache_runtime=debug,admin=info")
        .with_span_events(FmtSpan::CLOSE)
        .with_writer(logs.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);
    let runtime = Runtime::new(cache_runtime::CacheConfig::memory());
    runtime
        .scope(async {
            traced(1).await;
            traced(1).await;
        })
        .await;
    let text = logs.text();
    let span = "cache.call{cache.db=5 cache.prefix=\"adm_traced\" cache.function=\"traced\"";
    let inside: Vec<&str> = text.lines().filter(|l| l.contains("inside the function")).collect();
    assert_eq!(inside.len(), 1, "{text}");
    assert!(inside[0].contains(span), "the function's event is in the call's span: {text}");
    let closed: Vec<&str> = text.lines().filter(|l| l.contains(span) && l.contains("close")).collect();
    assert_eq!(closed.len(), 2, "{text}");
    assert!(closed[0].contains("cache.outcome=\"miss\""), "{text}");
    assert!(closed[1].contains("cache.outcome=\"hit\""), "{text}");
}
