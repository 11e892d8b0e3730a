use cache_runtime::cached;
use cache_runtime::db::MarketData;

const NONE: u64 = 0;
const NEGATIVE: i64 = -5;
const TOO_LONG: u64 = 400 * 24 * 3600;

#[cached(db = MarketData, prefix = "market", ttl = NONE)]
async fn zero(x: u32) -> u32 {
    x
}

#[cached(db = MarketData, prefix = "market", ttl = NEGATIVE)]
async fn negative(x: u32) -> u32 {
    x
}

#[cached(db = MarketData, prefix = "market", ttl = TOO_LONG)]
async fn too_long(x: u32) -> u32 {
    x
}

fn main() {}
