use cache_runtime::cached_impl;
use cache_runtime::db::MarketData;
use cache_runtime::{cached, invalidates};

#[derive(serde::Serialize)]
struct Book;

#[cached_impl]
impl Book {
    #[cached(db = MarketData, prefix = "book", ttl = 60)]
    async fn depth(&self, symbol: &str) -> u32 {
        symbol.len() as u32
    }

    // `depth`'s key holds the instance: `Self::depth(self, symbol)`.
    #[invalidates(Self::depth(symbol))]
    async fn trade(&self, symbol: &str) -> Result<(), String> { let _ = symbol; Ok(()) }
}

fn main() {}
