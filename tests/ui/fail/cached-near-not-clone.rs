use cache_runtime::cached;
use cache_runtime::db::MarketData;

#[derive(serde::Serialize, serde::Deserialize)]
struct Quote {
    price: f64,
}

// `near` keeps typed copies: the cached type must be `Clone`.
#[cached(db = MarketData, prefix = "market", ttl = 60, near = "30s")]
async fn quote(x: u32) -> Result<Quote, String> {
    Ok(Quote { price: f64::from(x) })
}

fn main() {}
