use cache_runtime::cached_impl;

#[cached_impl]
async fn quote(symbol: &str) -> u64 {
    symbol.len() as u64
}

#[cached_impl(strict)]
impl Feed {}

struct Feed;

fn main() {}
