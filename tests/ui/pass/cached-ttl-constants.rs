//! `ttl` as the teams write it: a named constant, a path to one, arithmetic on constants, any
//! integer type, a `Duration` constant of whole seconds, `Self::TTL` in an `impl` marked
//! `#[cached_impl]`. Checked at compile time (see `cached-ttl-constant-out-of-range.rs`).
use cache_runtime::{cached, cached_impl};
use cache_runtime::db::MarketData;

const TTL_MARKET: u64 = 300;

mod ttl {
    pub const SESSION: u32 = 30 * 60;
}

#[cached(db = MarketData, prefix = "market", ttl = TTL_MARKET)]
async fn quote(symbol: &str) -> u64 {
    symbol.len() as u64
}

#[cached(db = MarketData, prefix = "market", ttl = crate::ttl::SESSION)]
async fn session(id: u32) -> u32 {
    id
}

#[cached(db = MarketData, prefix = "market", ttl = 60 * 60 * 24)]
async fn daily(day: u32) -> u32 {
    day
}

#[cached(db = MarketData, prefix = "market", ttl = 2 * TTL_MARKET)]
async fn slower(symbol: &str) -> usize {
    symbol.len()
}

const TTL_QUOTES: std::time::Duration = std::time::Duration::from_secs(5 * 60);

#[cached(db = MarketData, prefix = "market", ttl = TTL_QUOTES)]
async fn quotes(symbol: &str) -> usize {
    symbol.len()
}

#[cached(db = MarketData, prefix = "market", ttl = std::time::Duration::from_secs(3600))]
async fn hourly(hour: u32) -> u32 {
    hour
}

struct Repo;

#[cached_impl]
impl Repo {
    const TTL: u64 = 90;

    /// A constant of the `impl` itself.
    #[cached(db = MarketData, prefix = "market", ttl = Self::TTL, skip(self))]
    async fn listing(&self, symbol: &str) -> usize {
        symbol.len()
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        assert_eq!(quote("AAPL").await, 4);
        assert_eq!(session(7).await, 7);
        assert_eq!(daily(1).await, 1);
        assert_eq!(slower("AB").await, 2);
        assert_eq!(quotes("ABCDE").await, 5);
        assert_eq!(hourly(9).await, 9);
        assert_eq!(Repo.listing("ABC").await, 3);
    });
}
