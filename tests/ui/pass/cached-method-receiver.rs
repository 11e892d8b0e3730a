//! A method's receiver is part of its key: instances with different state have different
//! entries, and invalidation names the instance first.
use std::sync::atomic::{AtomicU32, Ordering};

use cache_runtime::cached_impl;
use cache_runtime::db::MarketData;
use cache_runtime::{cached, invalidate, invalidates, CacheConfig, Runtime};

#[derive(serde::Serialize)]
struct Feed {
    venue: String,
    /// Not state that changes results: left out of the receiver's key.
    #[serde(skip)]
    calls: AtomicU32,
}

#[cached_impl]
impl Feed {
    fn new(venue: &str) -> Feed {
        Feed { venue: venue.to_owned(), calls: AtomicU32::new(0) }
    }

    #[cached(db = MarketData, prefix = "feed", ttl = 60)]
    async fn quote(&self, symbol: &str) -> u64 {
        self.calls.fetch_add(1, Ordering::SeqCst);
        (self.venue.len() * 100 + symbol.len()) as u64
    }

    /// By value, `&mut self` and typed receivers are hashed too.
    #[cached(db = MarketData, prefix = "feed", ttl = 60)]
    async fn depth(self: std::sync::Arc<Self>, levels: u8) -> Vec<u8> {
        (0..levels).collect()
    }

    #[cached(db = MarketData, prefix = "feed", ttl = 60)]
    async fn reset(&mut self, symbol: &str) -> usize {
        symbol.len()
    }

    #[invalidates(Self::quote(self, symbol), Self::depth(self, 3), Self::reset(self, symbol))]
    async fn trade(&self, symbol: &str) -> Result<(), String> {
        let _ = symbol;
        Ok(())
    }
}

/// From outside the `impl`, the instance is an ordinary first argument.
#[invalidates(Feed::quote(&feed, symbol), Feed::reset(&feed, "X"))]
async fn delist(feed: Feed, symbol: &str) -> Result<Feed, String> {
    let _ = symbol;
    Ok(feed)
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(Runtime::new(CacheConfig::memory()).scope(async {
        let nasdaq = Feed::new("XNAS");
        let london = Feed::new("XLONDON");
        assert_eq!(nasdaq.quote("AB").await, 402);
        assert_eq!(london.quote("AB").await, 702);
        assert_eq!(nasdaq.quote("AB").await, 402);
        assert_eq!(nasdaq.calls.load(Ordering::SeqCst), 1);

        nasdaq.trade("AB").await.unwrap();
        assert_eq!(nasdaq.quote("AB").await, 402);
        assert_eq!(nasdaq.calls.load(Ordering::SeqCst), 2);

        let nasdaq = delist(nasdaq, "AB").await.unwrap();
        assert_eq!(nasdaq.quote("AB").await, 402);
        assert_eq!(nasdaq.calls.load(Ordering::SeqCst), 3);

        invalidate!(Feed::quote(&london, "AB"), Feed::quote(..)).await;
        let mut london = london;
        assert_eq!(london.reset("AB").await, 2);
        assert_eq!(std::sync::Arc::new(Feed::new("XNAS")).depth(2).await, vec![0, 1]);
    }));
}
