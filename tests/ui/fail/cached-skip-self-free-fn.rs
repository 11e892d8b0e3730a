use cache_runtime::cached;
use cache_runtime::db::*;

#[cached(db = MarketData, prefix = "market", ttl = 60, skip(self))]
async fn f(x: u32) -> u32 { x }

fn main() {}
