use cache_runtime::cached;
use cache_runtime::db::*;

#[cached(db = MarketData prefix = "market", ttl = 60)]
async fn f(x: u32) -> u32 { x }

fn main() {}
