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
    let runtime = cache_runtime::init_from_env().unwrap_or_else(|e| {
        eprintln!("bad cache configuration: {e}");
        std::process::exit(2);
    });
    println!("backend: {runtime:?}");

    for attempt in ["first call (miss)", "second call (hit)"] {
        let started = Instant::now();
        let q = quote("AAPL").await.expect("the feed never fails here");
        println!("{attempt:<18} {:>10.3?}  {} = {}", started.elapsed(), q.symbol, q.price);
    }
    println!(
        "key: {}",
        cache_runtime::KeyBuilder::new(module_path!(), "market", "quote")
            .arg("AAPL")
            .finish()
            .unwrap_or_default()
    );
    let stats = Runtime::current().stats();
    let market = stats.get(5, "market").expect("the calls were counted");
    println!(
        "DB 5 / market: {} hit, {} miss, {} fill, hit rate {:.0} %",
        market.hits,
        market.misses,
        market.fills,
        market.hit_rate().unwrap_or(0.0) * 100.0
    );
}
