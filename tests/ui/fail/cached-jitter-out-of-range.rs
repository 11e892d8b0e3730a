use cache_runtime::cached;
use cache_runtime::db::MarketData;

#[cached(db = MarketData, prefix = "market", ttl = 60, jitter = "0%")]
async fn none(x: u32) -> u32 {
    x
}

#[cached(db = MarketData, prefix = "market", ttl = 60, jitter = "75%")]
async fn most(x: u32) -> u32 {
    x
}

#[cached(db = MarketData, prefix = "market", ttl = 60, jitter = 10)]
async fn bare(x: u32) -> u32 {
    x
}

#[cached(db = MarketData, prefix = "market", ttl = 60, jitter = "10s")]
async fn seconds(x: u32) -> u32 {
    x
}

fn main() {}
