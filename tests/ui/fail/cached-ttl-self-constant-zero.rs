use cache_runtime::{cached, cached_impl};
use cache_runtime::db::MarketData;

struct Repo;

#[cached_impl]
impl Repo {
    const TTL: u64 = 0;

    #[cached(db = MarketData, prefix = "market", ttl = Self::TTL, skip(self))]
    async fn listing(&self, symbol: &str) -> usize {
        symbol.len()
    }
}

fn main() {}
