//! Parameters written as patterns are hashed whole; invalidation passes the whole argument.
use cache_runtime::db::MarketData;
use cache_runtime::{cached, invalidate};

#[derive(serde::Serialize, Clone, Copy)]
struct Point {
    x: i32,
    y: i32,
}

#[cached(db = MarketData, prefix = "geo", ttl = 60)]
async fn distance((a, b): (u32, u32), Point { x, y }: Point) -> u64 {
    u64::from(a.abs_diff(b)) + x.unsigned_abs() as u64 + y.unsigned_abs() as u64
}

#[cached(db = MarketData, prefix = "geo", ttl = 60)]
async fn scaled(&(a, mut b): &(u32, u32)) -> u32 {
    b += 1;
    a * b
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let p = Point { x: -2, y: 3 };
        assert_eq!(distance((1, 4), p).await, 8);
        assert_eq!(distance((1, 4), p).await, 8);
        assert_eq!(distance((4, 4), p).await, 5, "another argument, another entry");
        assert_eq!(scaled(&(2, 3)).await, 8);
        invalidate!(distance((1, 4), p)).await;
        invalidate!(scaled(&(2, 3))).await;
    });
}
