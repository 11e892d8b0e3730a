use cache_runtime::cached;
use cache_runtime::db::MarketData;

struct Repo;

impl Repo {
    const TTL: u64 = 60;

    #[cached(db = MarketData, prefix = "market", ttl = Self::TTL)]
    async fn listing(symbol: &str) -> usize {
        symbol.len()
    }
}

fn main() {}
