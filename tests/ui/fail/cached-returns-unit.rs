use cache_runtime::cached;
use cache_runtime::db::MarketData;

#[cached(db = MarketData, prefix = "market", ttl = 60)]
async fn f(x: u32) -> () {
    let _ = x;
}

fn main() {}
