use cache_runtime::cached;
use cache_runtime::db::MarketData;

#[cached(db = MarketData, prefix = "market", ttl = 60, near = "0s")]
async fn none(x: u32) -> u32 {
    x
}

#[cached(db = MarketData, prefix = "market", ttl = 60, near = "400d")]
async fn forever(x: u32) -> u32 {
    x
}

#[cached(db = MarketData, prefix = "market", ttl = 60, near = "30%")]
async fn percent(x: u32) -> u32 {
    x
}

#[cached(db = MarketData, prefix = "market", ttl = 60, near = true)]
async fn flag(x: u32) -> u32 {
    x
}

fn main() {}
