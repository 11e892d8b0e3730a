use cache_runtime::db::MarketData;
use cache_runtime::{cached, invalidates};

#[cached(db = MarketData, prefix = "market", ttl = 60, skip(pool))]
async fn quote(symbol: &str, pool: &()) -> Result<u64, String> {
    let _ = pool;
    Ok(symbol.len() as u64)
}

#[invalidates(quote(id))]
async fn update(id: u64) -> Result<(), String> { Ok(()) }

fn main() {}
