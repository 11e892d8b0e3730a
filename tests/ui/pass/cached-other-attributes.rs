//! Other attributes on a cached method stay on it: a `cfg_attr` whose predicate holds, applying
//! `tracing::instrument(skip(self, pool))`, does not land on the companions (which have no
//! `pool`) or on the registration; a `cfg` that holds keeps the companions, one that does not
//! removes them with the method.
use cache_runtime::db::MarketData;
use cache_runtime::{cached, cached_impl, invalidate, CacheConfig, Runtime};

pub struct Pool;

pub struct Repo;

#[cached_impl]
impl Repo {
    #[cfg_attr(all(), tracing::instrument(skip(self, pool)))]
    #[cached(db = MarketData, prefix = "attrs", ttl = 60, skip(self, pool))]
    pub async fn quote(&self, pool: &Pool, symbol: &str) -> u64 {
        let _ = pool;
        symbol.len() as u64
    }

    #[cfg(all())]
    #[cached(db = MarketData, prefix = "attrs", ttl = 60, skip(self))]
    pub async fn gated(&self, symbol: &str) -> u64 {
        symbol.len() as u64 * 2
    }

    #[cfg(any())]
    #[cached(db = MarketData, prefix = "attrs", ttl = 60, skip(self))]
    pub async fn never(&self, symbol: &str) -> u64 {
        symbol.len() as u64 * 3
    }
}

fn main() {
    let runtime = Runtime::new(CacheConfig::memory());
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(runtime.scope(async {
        assert_eq!(Repo.quote(&Pool, "AAPL").await, 4);
        assert_eq!(Repo.gated("AAPL").await, 8);
        invalidate!(Repo::quote("AAPL"), Repo::gated("AAPL")).await;
    }));
}
