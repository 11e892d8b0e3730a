use cache_runtime::cached;
use cache_runtime::db::MarketData;

#[cached(db = MarketData, prefix = "market", ttl = 60, eager_refresh = "20%")]
async fn early(x: u32) -> u32 {
    x
}

#[cached(db = MarketData, prefix = "market", ttl = 60, eager_refresh = "100%")]
async fn at_expiry(x: u32) -> u32 {
    x
}

#[cached(db = MarketData, prefix = "market", ttl = 60, eager_refresh = 0.8)]
async fn fraction(x: u32) -> u32 {
    x
}

fn main() {}
