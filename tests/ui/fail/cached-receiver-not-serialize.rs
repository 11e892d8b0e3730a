use cache_runtime::cached_impl;
use cache_runtime::cached;
use cache_runtime::db::*;

struct Conn;
#[cached_impl]
impl Conn {
    #[cached(db = MarketData, prefix = "market", ttl = 60)]
    async fn f(&self, x: u32) -> u32 { x }
}

fn main() {}
