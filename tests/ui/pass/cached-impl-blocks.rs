//! `#[cached_impl]`: `#[cached]` in a trait impl (native `async fn` in traits, and
//! `#[async_trait]` written below it) and on associated functions without `self`, each
//! invalidated through the type's name.
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};

use cache_runtime::db::MarketData;
use cache_runtime::{cached, cached_impl, invalidate, invalidates, CacheConfig, Runtime};

static CALLS: AtomicU32 = AtomicU32::new(0);

trait Repo {
    async fn quote(&self, symbol: &str) -> u64;
}

#[async_trait::async_trait]
trait Venue {
    async fn depth(&self, symbol: &str) -> Result<u64, String>;
}

struct PgRepo;

#[cached_impl]
impl Repo for PgRepo {
    #[cached(db = MarketData, prefix = "repo", ttl = 60, skip(self))]
    async fn quote(&self, symbol: &str) -> u64 {
        CALLS.fetch_add(1, SeqCst);
        symbol.len() as u64
    }
}

#[cached_impl]
#[async_trait::async_trait]
impl Venue for PgRepo {
    #[cached(db = MarketData, prefix = "repo", ttl = 60, skip(self))]
    async fn depth(&self, symbol: &str) -> Result<u64, String> {
        CALLS.fetch_add(1, SeqCst);
        Ok(symbol.len() as u64 * 10)
    }
}

#[cached_impl]
impl PgRepo {
    #[cached(db = MarketData, prefix = "repo", ttl = 60)]
    async fn by_symbol(symbol: &str) -> u64 {
        CALLS.fetch_add(1, SeqCst);
        symbol.len() as u64 * 100
    }

    #[invalidates(PgRepo::quote(symbol), Self::depth(symbol), Self::by_symbol(symbol))]
    async fn update(symbol: &str) -> Result<(), String> {
        let _ = symbol;
        Ok(())
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(Runtime::new(CacheConfig::memory()).scope(async {
        let repo = PgRepo;
        for _ in 0..2 {
            assert_eq!(repo.quote("AB").await, 2);
            assert_eq!(repo.depth("AB").await, Ok(20));
            assert_eq!(PgRepo::by_symbol("AB").await, 200);
        }
        assert_eq!(CALLS.load(SeqCst), 3, "the second round was all hits");
        PgRepo::update("AB").await.unwrap();
        invalidate!(PgRepo::quote("XY")).await;
        assert_eq!(repo.quote("AB").await, 2);
        assert_eq!(repo.depth("AB").await, Ok(20));
        assert_eq!(PgRepo::by_symbol("AB").await, 200);
        assert_eq!(CALLS.load(SeqCst), 6, "each was invalidated");
    }));
}
