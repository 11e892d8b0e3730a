use std::time::Duration;
use cache_runtime::{db::Reserved, Cache};

fn main() {
    let _ = Cache::<Reserved, u32>::new("platform", Duration::from_secs(1));
}
