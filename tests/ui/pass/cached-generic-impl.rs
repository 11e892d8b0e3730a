//! Methods of a generic `impl`: `Self` (with its type arguments) is part of the key.
use std::marker::PhantomData;

use cache_runtime::cached_impl;
use cache_runtime::db::MarketData;
use cache_runtime::{cached, invalidate, invalidates, CacheConfig, Runtime};

struct Store<T> {
    shard: u8,
    _value: PhantomData<T>,
}

#[cached_impl]
impl<T: serde::Serialize + serde::de::DeserializeOwned + Default> Store<T> {
    fn new(shard: u8) -> Self {
        Store { shard, _value: PhantomData }
    }

    #[cached(db = MarketData, prefix = "store", ttl = 60)]
    async fn get(&self, id: u32) -> Option<T> {
        let _ = (self.shard, id);
        Some(T::default())
    }

    /// An associated function that names `Self`: also told apart by `Self`.
    #[cached(db = MarketData, prefix = "store", ttl = 60)]
    async fn open(shard: u8) -> Option<Self> {
        Some(Store::new(shard))
    }

    #[invalidates(Self::get(self, id), Self::open(self.shard))]
    async fn put(&self, id: u32, value: T) -> Result<(), String> {
        let _ = (id, value);
        Ok(())
    }
}

impl<T> serde::Serialize for Store<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u8(self.shard)
    }
}

impl<'de, T> serde::Deserialize<'de> for Store<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        <u8 as serde::Deserialize>::deserialize(d).map(|shard| Store { shard, _value: PhantomData })
    }
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(Runtime::new(CacheConfig::memory()).scope(async {
        let numbers = Store::<u8>::new(1);
        let names = Store::<String>::new(1);
        assert_eq!(numbers.get(1).await, Some(0));
        assert_eq!(names.get(1).await, Some(String::new()));
        numbers.put(1, 5).await.unwrap();
        assert_eq!(Store::<u8>::open(2).await.map(|s| s.shard), Some(2));
        // From outside the `impl`, the type is named with its arguments.
        invalidate!(Store::<String>::get(&names, 1), Store::<String>::get(..), Store::<u8>::open(2)).await;
    }));
}
