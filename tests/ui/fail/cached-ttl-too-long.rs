use cache_runtime::cached;
use cache_runtime::db::*;

#[cached(db = MarketData, prefix = "market", ttl = 18446744073709551615)]
async fn f(x: u32) -> u32 { x }

#[cached(db = MarketData, prefix = "market", ttl = "400d")]
async fn g(x: u32) -> u32 { x }

fn main() {}
