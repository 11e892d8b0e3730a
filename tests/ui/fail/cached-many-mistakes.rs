use cache_runtime::cached;
use cache_runtime::db::*;

#[cached(db = 15, prefix = "Bad:Prefix", ttl = 0, skip(nope), colour = "red")]
fn f(x: u32) -> u32 { x }

fn main() {}
