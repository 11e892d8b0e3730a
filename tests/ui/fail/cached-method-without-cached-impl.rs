//! `#[cached]` in a trait impl (native `async fn` in traits and `#[async_trait]`) and in an
//! inherent impl, without `#[cached_impl]` on the block: the error says to add it, on `self`
//! (or on the name, for a function that names `Self`).
use cache_runtime::cached;
use cache_runtime::db::MarketData;

pub struct PgRepo;

pub trait Repo {
    async fn quote(&self, symbol: &str) -> Option<u64>;
}

impl Repo for PgRepo {
    #[cached(db = MarketData, prefix = "repo", ttl = 60, skip(self))]
    async fn quote(&self, symbol: &str) -> Option<u64> {
        Some(symbol.len() as u64)
    }
}

#[async_trait::async_trait]
pub trait Listings {
    async fn listing(&self, symbol: &str) -> Option<u64>;
}

#[async_trait::async_trait]
impl Listings for PgRepo {
    #[cached(db = MarketData, prefix = "repo", ttl = 60, skip(self))]
    async fn listing(&self, symbol: &str) -> Option<u64> {
        Some(symbol.len() as u64)
    }
}

impl PgRepo {
    #[cached(db = MarketData, prefix = "repo", ttl = 60, skip(self))]
    async fn by_symbol(&self, symbol: &str) -> Option<u64> {
        Some(symbol.len() as u64)
    }

    /// Names `Self`, so it is a method too.
    #[cached(db = MarketData, prefix = "repo", ttl = 60)]
    async fn make(symbol: &str) -> Option<Self> {
        symbol.is_empty().then_some(PgRepo)
    }

    /// Neither takes `self` nor names `Self`: taken for a free function, whose companions
    /// cannot go in an `impl`; rustc says so.
    #[cached(db = MarketData, prefix = "repo", ttl = 60)]
    async fn by_name(symbol: &str) -> Option<u64> {
        Some(symbol.len() as u64)
    }
}

fn main() {}
