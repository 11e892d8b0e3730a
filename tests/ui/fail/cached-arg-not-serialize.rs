use cache_runtime::cached;
use cache_runtime::db::*;

struct Conn;
#[cached(db = MarketData, prefix = "market", ttl = 60)]
async fn f(conn: &Conn, x: u32) -> u32 { let _ = conn; x }

fn main() {}
