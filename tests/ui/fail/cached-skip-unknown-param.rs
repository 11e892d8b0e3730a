use cache_runtime::cached;
use cache_runtime::db::*;

#[cached(db = MarketData, prefix = "market", ttl = 60, skip(pool))]
async fn f(pol: &str, x: u32) -> u32 { x + pol.len() as u32 }

fn main() {}
