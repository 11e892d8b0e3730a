use cache_runtime::cached;
use cache_runtime::db::*;

#[derive(serde::Serialize)]
struct Quote { price: f64 }
#[cached(db = MarketData, prefix = "market", ttl = 60)]
async fn f(x: u32) -> Result<Quote, String> { Ok(Quote { price: f64::from(x) }) }

fn main() {}
