use cache_runtime::{cached, cached_impl};
use cache_runtime::db::MarketData;

trait Repo {
    async fn quote(&self, symbol: &str) -> u64;
}

struct PgRepo;

#[cached_impl]
impl Repo for &PgRepo {
    #[cached(db = MarketData, prefix = "repo", ttl = 60, skip(self))]
    async fn quote(&self, symbol: &str) -> u64 {
        symbol.len() as u64
    }
}

trait Source<T> {
    async fn load(&self, id: u32) -> u32;
}

#[cached_impl]
impl<T> Source<T> for PgRepo {
    #[cached(db = MarketData, prefix = "repo", ttl = 60, skip(self))]
    async fn load(&self, id: u32) -> u32 {
        id
    }
}

fn main() {}
