use cache_runtime::cached;
use cache_runtime::db::MarketData;

#[cached(db = MarketData, prefix = "market", ttl = 60, format = Pickle)]
async fn f(x: u32) -> u32 {
    x
}

fn main() {}
