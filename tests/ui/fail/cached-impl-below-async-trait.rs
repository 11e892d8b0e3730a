use cache_runtime::{cached, cached_impl};
use cache_runtime::db::MarketData;

#[async_trait::async_trait]
trait Repo {
    async fn quote(&self, symbol: &str) -> u64;
}

struct PgRepo;

#[async_trait::async_trait]
#[cached_impl]
impl Repo for PgRepo {
    #[cached(db = MarketData, prefix = "repo", ttl = 60, skip(self))]
    async fn quote(&self, symbol: &str) -> u64 {
        symbol.len() as u64
    }
}

fn main() {}
