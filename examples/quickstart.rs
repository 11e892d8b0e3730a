//! `cargo run --example quickstart`: a cached function on the embedded default (no server), its
//! miss, its hit, its key and the time each took. Set `REDIS_URL` to run the same on Redis.

use std::time::{Duration, Instant};

use cache_runtime::{cached, db::MarketData, Runtime};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Quote {
    symbol: String,
    price: f64,
}

#[derive(Debug)]
#[allow(dead_code)] // shown in the signature; this feed never fails
struct FeedError(String);

/// Stands in for a slow market-data feed.
#[cached(db = MarketData, prefix = "market", ttl = 300)]
async fn quote(symbol: &str) -> Result<Quote, FeedError> {
    tokio::time::sleep(Duration::from_millis(50)).await;
    Ok(Quote { symbol: symbol.to_owned(), price: 150.25 })
}

#[tokio::main]
async fn main() {
    // A cache failure never reaches the caller (the function runs instead); it is logged. Shown
    // here, so that a `REDIS_URL` the server refuses says so instead of two silent misses.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let runtime = cache_runtime::init_from_env().unwrap_or_else(|e| {
        eprintln!("bad cache configuration: {e}");
        std::process::exit(2);
    });
    println!("backend: {runtime:?}");

    for attempt in ["first call", "second call"] {
        let hits = market_hits();
        let started = Instant::now();
        let q = quote("AAPL").await.expect("the feed never fails here");
        let took = started.elapsed();
        // What the runtime counted, not what was expected: a refused or unreachable server
        // shows two misses here (and its warning above).
        let served = if market_hits() > hits { "hit" } else { "miss" };
        println!("{:<18} {took:>10.3?}  {} = {}", format!("{attempt} ({served})"), q.symbol, q.price);
    }
    println!(
        "key: {}",
        cache_runtime::KeyBuilder::new(module_path!(), "market", "quote")
            .arg("AAPL")
            .finish()
            .unwrap_or_default()
    );
    let stats = Runtime::current().stats();
    let Some(market) = stats.get(5, "market") else {
        return println!("DB 5 / market: no calls counted");
    };
    println!(
        "DB 5 / market: {} hit, {} miss, {} fill, hit rate {:.0} %",
        market.hits,
        market.misses,
        market.fills,
        market.hit_rate().unwrap_or(0.0) * 100.0
    );
}

/// Hits counted so far for DB 5 / `market`.
fn market_hits() -> u64 {
    Runtime::current().stats().get(5, "market").map_or(0, |m| m.hits)
}
