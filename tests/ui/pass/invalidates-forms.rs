//! Every accepted form of invalidation compiles and runs.
use cache_runtime::cached_impl;
use cache_runtime::db::MarketData;
use cache_runtime::{cached, invalidate, invalidates, CacheConfig, Runtime};

mod market {
    use super::*;

    #[cached(db = MarketData, prefix = "market", ttl = 60, skip(pool))]
    pub async fn quote(symbol: &str, pool: &()) -> Result<u64, String> {
        let _ = pool;
        Ok(symbol.len() as u64)
    }

    #[cached(db = MarketData, prefix = "market", ttl = 60)]
    pub async fn top_movers(limit: u32) -> Vec<u32> {
        (0..limit).collect()
    }
}

// Imported by name: the companions come along with the function.
use market::top_movers;

pub struct Order {
    symbol: String,
}

#[invalidates(market::quote(&order.symbol), top_movers(..), crate::market::quote("SPY"))]
async fn place(order: &Order) -> Result<(), String> {
    let _ = &order.symbol;
    Ok(())
}

/// A non-Result write path always invalidates.
#[invalidates(top_movers(limit))]
async fn reset(limit: u32) {
    let _ = limit;
}

#[derive(serde::Serialize)]
struct Book;

#[cached_impl]
impl Book {
    #[cached(db = MarketData, prefix = "book", ttl = 60)]
    async fn depth(&self, symbol: &str) -> u32 {
        symbol.len() as u32
    }

    // The receiver is part of `depth`'s key: the instance comes first.
    #[invalidates(Self::depth(self, symbol), Book::depth(&Book, "X"))]
    async fn trade(&self, symbol: &str) -> Result<u32, String> {
        Ok(self.depth(symbol).await)
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(Runtime::new(CacheConfig::memory()).scope(async {
        place(&Order { symbol: "AAPL".into() }).await.unwrap();
        reset(3).await;
        assert_eq!(Book.trade("AB").await, Ok(2));
        let symbol = String::from("MSFT");
        invalidate!(market::quote(&symbol), top_movers(..)).await;
        let pending = invalidate!(top_movers(4));
        pending.await;
    }));
}
