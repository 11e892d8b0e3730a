use cache_runtime::cached;
use cache_runtime::db::*;

// A trait's default method: no `impl` block to put `#[cached_impl]` on.
trait Repo {
    #[cached(db = MarketData, prefix = "repo", ttl = 60, skip(self))]
    async fn quote(&self, symbol: &str) -> u64 {
        symbol.len() as u64
    }
}

fn main() {}
