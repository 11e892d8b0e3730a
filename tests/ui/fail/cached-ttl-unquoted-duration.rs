use cache_runtime::cached;
use cache_runtime::db::*;

// Rust reads `5m` as the number 5 with a suffix: refused, not taken as 5 seconds.
#[cached(db = MarketData, prefix = "market", ttl = 5m)]
async fn quote(symbol: String) -> u32 { symbol.len() as u32 }

#[cached(db = MarketData, prefix = "market", ttl = 60, stale_if_error = 1h, near = 30s)]
async fn price(symbol: String) -> u32 { symbol.len() as u32 }

// An integer type is a suffix like any other number's: accepted.
#[cached(db = MarketData, prefix = "market", ttl = 300u64)]
async fn volume(symbol: String) -> u32 { symbol.len() as u32 }

fn main() {}
