use cache_runtime::cached;
use cache_runtime::db::*;

struct Conn;
impl Conn {
    #[cached(db = MarketData, prefix = "market", ttl = 60)]
    async fn f(&self, x: u32) -> u32 { x }
}

fn main() {}
