//! Each instantiation of a generic function has its own entries: type arguments and const
//! arguments are part of the key.
use std::sync::atomic::{AtomicU32, Ordering};

use cache_runtime::db::MarketData;
use cache_runtime::{cached, invalidate, invalidates, CacheConfig, Runtime};

trait Unit {
    fn from_celsius(c: f64) -> f64;
}

struct Celsius;
struct Fahrenheit;

impl Unit for Celsius {
    fn from_celsius(c: f64) -> f64 {
        c
    }
}

impl Unit for Fahrenheit {
    fn from_celsius(c: f64) -> f64 {
        c * 9.0 / 5.0 + 32.0
    }
}

static READS: AtomicU32 = AtomicU32::new(0);

#[cached(db = MarketData, prefix = "weather", ttl = 60)]
async fn temperature<U: Unit>(station: u32) -> f64 {
    READS.fetch_add(1, Ordering::SeqCst);
    U::from_celsius(f64::from(station) * 10.0)
}

/// Lifetimes are not part of the key; const parameters are.
#[cached(db = MarketData, prefix = "weather", ttl = 60)]
async fn reading<'a, U: Unit, const DIGITS: usize>(label: &'a str, station: u32) -> String {
    format!("{label}: {:.*}", DIGITS, U::from_celsius(f64::from(station)))
}

#[invalidates(temperature::<Celsius>(station), reading::<Fahrenheit, 1>("a", station), reading(..))]
async fn recalibrate(station: u32) -> Result<(), String> {
    let _ = station;
    Ok(())
}

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(Runtime::new(CacheConfig::memory()).scope(async {
        assert_eq!(temperature::<Celsius>(1).await, 10.0);
        assert_eq!(temperature::<Fahrenheit>(1).await, 50.0);
        assert_eq!(temperature::<Celsius>(1).await, 10.0);
        assert_eq!(READS.load(Ordering::SeqCst), 2);
        assert_eq!(reading::<Celsius, 1>("a", 2).await, "a: 2.0");
        assert_eq!(reading::<Celsius, 2>("a", 2).await, "a: 2.00");

        recalibrate(1).await.unwrap();
        assert_eq!(temperature::<Celsius>(1).await, 10.0);
        assert_eq!(temperature::<Fahrenheit>(1).await, 50.0);
        assert_eq!(READS.load(Ordering::SeqCst), 3);

        invalidate!(temperature(..), temperature::<Fahrenheit>(1)).await;
        assert_eq!(temperature::<Fahrenheit>(1).await, 50.0);
        assert_eq!(READS.load(Ordering::SeqCst), 4);
    }));
}
