use cache_runtime::cached;
use cache_runtime::db::MarketData;

#[cached(db = MarketData, prefix = "market", ttl = 60, stale_if_error = 0)]
async fn none(x: u32) -> Result<u32, String> {
    Ok(x)
}

#[cached(db = MarketData, prefix = "market", ttl = 60, stale_if_error = "400d")]
async fn too_long(x: u32) -> Result<u32, String> {
    Ok(x)
}

#[cached(db = MarketData, prefix = "market", ttl = 60, stale_if_error = "an hour")]
async fn words(x: u32) -> Result<u32, String> {
    Ok(x)
}

fn main() {}
