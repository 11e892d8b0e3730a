use cache_runtime::cached;
use cache_runtime::db::*;

#[cached(db = MarketData, prefix = "market", ttl = 60, skip(pool))]
async fn f(pol: &str, x: u32) -> u32 { x + pol.len() as u32 }

fn main() {}

pub struct State<T>(pub T);
pub struct Pool;

// `pool` is bound inside a pattern: `skip` cannot name it.
#[cached(db = MarketData, prefix = "market", ttl = 60, skip(pool))]
async fn g(State(pool): State<Pool>, x: u32) -> u32 { let _ = pool; x }
