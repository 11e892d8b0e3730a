use cache_runtime::db::MarketData;
use cache_runtime::{cached, invalidates};

#[cached(db = MarketData, prefix = "market", ttl = 60, skip(pool))]
async fn quote(symbol: &str, pool: &()) -> Result<u64, String> {
    let _ = pool;
    Ok(symbol.len() as u64)
}

#[invalidates(quote(symbol, ..))]
async fn update(symbol: &str) -> Result<(), String> { Ok(()) }

fn main() {}
