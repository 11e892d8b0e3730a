//! Every accepted form compiles, keeps its docs and attributes, and runs.
use std::sync::atomic::{AtomicU32, Ordering};

use cache_runtime::cached_impl;
use cache_runtime::db::{GenAi, MarketData};
use cache_runtime::{cache_db, cached, CacheConfig, Runtime};

cache_db!(
    /// A team's own DB marker.
    pub Payments = 14, "payments"
);

/// Free function with a duration literal, a version, and a skipped handle.
#[cached(db = MarketData, prefix = "market", ttl = "1h30m", version = 3, skip(calls))]
#[inline(never)]
pub async fn quote(symbol: &str, calls: &AtomicU32) -> Result<f64, std::io::Error> {
    calls.fetch_add(1, Ordering::SeqCst);
    if symbol.is_empty() {
        return Err(std::io::Error::other("empty symbol"));
    }
    let price: f64 = "150.25".parse().map_err(std::io::Error::other)?;
    Ok(price)
}

/// Near copies: a duration literal or whole seconds; in a generic function the type parameter
/// says it is `Clone + Send + Sync + 'static`.
#[cached(db = MarketData, prefix = "market", ttl = 60, near = "30s")]
async fn near_quote(symbol: &str) -> Option<String> {
    Some(symbol.to_owned())
}

#[cached(db = MarketData, prefix = "market", ttl = 60, near = 5)]
async fn near_echo<T: serde::Serialize + serde::de::DeserializeOwned + Clone + Send + Sync + 'static>(value: T) -> T {
    value
}

/// Generic functions work: there is no per-function static.
#[cached(db = GenAi, prefix = "genai", ttl = 60)]
async fn echo<T: serde::Serialize + serde::de::DeserializeOwned + Send + Clone>(value: T) -> Vec<T> {
    vec![value.clone(), value]
}

#[cached(db = Payments, prefix = "payments", ttl = 10)]
async fn balance(account: u64) -> Option<i64> {
    (account > 0).then_some(100)
}

struct Service {
    factor: u32,
}

#[cached_impl]
impl Service {
    #[cached(db = MarketData, prefix = "svc", ttl = 60)]
    async fn scaled(&self, x: u32) -> u32 {
        x * self.factor
    }

    #[cached(db = MarketData, prefix = "svc", ttl = 60)]
    async fn associated(x: u32) -> Self {
        Service { factor: x }
    }
}

impl serde::Serialize for Service {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u32(self.factor)
    }
}

impl<'de> serde::Deserialize<'de> for Service {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        u32::deserialize(d).map(|factor| Service { factor })
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(Runtime::new(CacheConfig::memory()).scope(async {
        let calls = AtomicU32::new(0);
        assert_eq!(quote("AAPL", &calls).await.unwrap(), 150.25);
        assert_eq!(quote("AAPL", &calls).await.unwrap(), 150.25);
        assert!(quote("", &calls).await.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        for _ in 0..3 {
            assert_eq!(near_quote("AAPL").await.as_deref(), Some("AAPL"));
            assert_eq!(near_echo(7u64).await, 7);
        }
        assert_eq!(echo(1u8).await, vec![1, 1]);
        assert_eq!(echo("a".to_string()).await, vec!["a", "a"]);
        assert_eq!(balance(1).await, Some(100));
        assert_eq!(Service { factor: 3 }.scaled(2).await, 6);
        assert_eq!(Service::associated(4).await.factor, 4);
    }));
}
