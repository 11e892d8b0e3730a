use cache_runtime::cached;
use cache_runtime::db::*;

struct Platform;
impl CacheDb for Platform {
    const INDEX: u8 = 15;
    const NAME: &'static str = "platform";
}
#[cached(db = Platform, prefix = "platform", ttl = 60)]
async fn f(x: u32) -> u32 { x }

fn main() {}
