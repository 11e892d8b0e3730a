//! `Duration` constants are checked like integer ones: zero, sub-second, too long; and a
//! constant of another type is refused on the expression.
use std::time::Duration;

use cache_runtime::cached;
use cache_runtime::db::MarketData;

const NONE: Duration = Duration::ZERO;
const HALF_SECOND: Duration = Duration::from_millis(1500);
const TOO_LONG: Duration = Duration::from_secs(400 * 24 * 3600);
const RATE: f64 = 60.0;

#[cached(db = MarketData, prefix = "market", ttl = NONE)]
async fn zero(x: u32) -> u32 {
    x
}

#[cached(db = MarketData, prefix = "market", ttl = HALF_SECOND)]
async fn fractional(x: u32) -> u32 {
    x
}

#[cached(db = MarketData, prefix = "market", ttl = TOO_LONG)]
async fn too_long(x: u32) -> u32 {
    x
}

#[cached(db = MarketData, prefix = "market", ttl = RATE)]
async fn float(x: u32) -> u32 {
    x
}

fn main() {}
