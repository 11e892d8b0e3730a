use cache_runtime::db::MarketData;
use cache_runtime::{cached, invalidates};

#[cached(db = MarketData, prefix = "repo", ttl = 60)]
async fn quote(symbol: &str) -> u64 {
    symbol.len() as u64
}

#[async_trait::async_trait]
trait Writer {
    async fn update(&self, symbol: &str) -> Result<(), String>;
}

struct PgWriter;

// `#[invalidates]` under `#[async_trait]` without `#[cached_impl]` above it: the attribute sees
// the boxed future `#[async_trait]` made, and says what to write.
#[async_trait::async_trait]
impl Writer for PgWriter {
    #[invalidates(quote(symbol))]
    async fn update(&self, symbol: &str) -> Result<(), String> {
        let _ = symbol;
        Ok(())
    }
}

fn main() {}
