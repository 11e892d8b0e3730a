//! `skip(self)`: every instance shares the method's entries, so `Self` need not be Serialize.
use std::sync::atomic::{AtomicU32, Ordering};

use cache_runtime::cached_impl;
use cache_runtime::db::MarketData;
use cache_runtime::{cached, invalidates, CacheConfig, Runtime};

/// A handle with no state that changes results: not Serialize, and it need not be.
struct Pool {
    calls: AtomicU32,
}

#[cached_impl]
impl Pool {
    #[cached(db = MarketData, prefix = "pool", ttl = 60, skip(self))]
    async fn lookup(&self, id: u32) -> u32 {
        self.calls.fetch_add(1, Ordering::SeqCst);
        id * 2
    }

    /// With the receiver skipped, the key companion takes only the key arguments.
    #[invalidates(Self::lookup(id))]
    async fn update(&self, id: u32) -> Result<(), String> {
        let _ = (self, id);
        Ok(())
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(Runtime::new(CacheConfig::memory()).scope(async {
        let a = Pool { calls: AtomicU32::new(0) };
        let b = Pool { calls: AtomicU32::new(0) };
        assert_eq!(a.lookup(1).await, 2);
        // Another instance reads the same entry.
        assert_eq!(b.lookup(1).await, 2);
        assert_eq!(b.calls.load(Ordering::SeqCst), 0);
        b.update(1).await.unwrap();
        assert_eq!(a.lookup(1).await, 2);
        assert_eq!(a.calls.load(Ordering::SeqCst), 2);
    }));
}
