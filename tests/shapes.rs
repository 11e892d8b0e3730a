//! Values retire themselves when their type changes: two versions of one cached function, as
//! two releases would compile it, against one server. Release 1's entry, left under the key both
//! releases share, is a miss for release 2, whose `Quote` gained a `#[serde(default)]` field
//! (which old JSON decodes "fine" with the wrong meaning); the same entry is a hit for a release
//! whose `Quote` kept its shape, so the miss is the shape's doing.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use cache_runtime::db::MarketData;
use cache_runtime::{Cache, KeyBuilder};
use support::Fixture;

/// A release whose `Quote` has release 1's shape, answering `price`.
macro_rules! release_with_the_first_shape {
    ($release:ident, $price:expr) => {
        mod $release {
            use super::*;
            use cache_runtime::cached;

            #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
            pub struct Quote {
                pub symbol: String,
                pub price: f64,
            }

            #[cached(db = MarketData, prefix = "shapes", ttl = 300, skip(calls))]
            pub async fn quote(symbol: &str, calls: &AtomicUsize) -> Quote {
                calls.fetch_add(1, SeqCst);
                Quote { symbol: symbol.to_owned(), price: $price }
            }
        }
    };
}

// The release that wrote the entries.
release_with_the_first_shape!(release_1, 100.0);

/// The next release: `Quote` gained a field with a default.
mod release_2 {
    use super::*;
    use cache_runtime::cached;

    #[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
    pub struct Quote {
        pub symbol: String,
        pub price: f64,
        #[serde(default)]
        pub venue: String,
    }

    #[cached(db = MarketData, prefix = "shapes", ttl = 300, skip(calls))]
    pub async fn quote(symbol: &str, calls: &AtomicUsize) -> Quote {
        calls.fetch_add(1, SeqCst);
        Quote { symbol: symbol.to_owned(), price: 101.0, venue: "XNAS".to_owned() }
    }
}

// A release whose `Quote` kept release 1's shape.
release_with_the_first_shape!(release_1b, 102.0);

/// The key of `quote(symbol)` as release `module` computes it, without the `shapes:` prefix.
fn key_of(module: &str, symbol: &str) -> String {
    let key = KeyBuilder::new(&format!("shapes::{module}"), "shapes", "quote").arg(symbol).finish().unwrap();
    key.strip_prefix("shapes:").expect("the prefix").to_owned()
}

/// Copies the stored entry (the JSON `[generation, value, shape]`) of `from` to `to`: what a
/// release's entry is to the next release, which computes the same key. Two releases also share
/// the function's generation; here each version is a function of its own, with a generation of
/// its own, so the copy carries one newer than any (a server clock in µs, in 2096).
async fn copy_entry(fx: &Fixture, from: &str, to: &str) -> serde_json::Value {
    let raw = Cache::<MarketData, serde_json::Value>::new("shapes", Duration::from_secs(300))
        .unwrap()
        .with_runtime(fx.runtime.clone());
    fx.runtime.flush().await.unwrap();
    let mut entry = raw.get(from).await.unwrap().expect("release 1 filled its entry");
    entry[0] = 4_000_000_000_000_000u64.into();
    raw.set(to, &entry).await.unwrap();
    entry
}

async fn a_changed_type_misses_the_previous_release_entries(fx: &mut Fixture) {
    let (calls_1, calls_2, calls_1b) = (AtomicUsize::new(0), AtomicUsize::new(0), AtomicUsize::new(0));
    let written = fx.run(release_1::quote("AAPL", &calls_1)).await;
    let entry = copy_entry(fx, &key_of("release_1", "AAPL"), &key_of("release_2", "AAPL")).await;
    copy_entry(fx, &key_of("release_1", "AAPL"), &key_of("release_1b", "AAPL")).await;

    // The danger: release 1's value decodes as release 2's type, with an empty venue.
    let unchecked: release_2::Quote = serde_json::from_value(entry[1].clone()).unwrap();
    assert_eq!((unchecked.price, unchecked.venue.as_str()), (written.price, ""));

    // Release 2 does not read it: its function runs, and its own value replaces the entry.
    let read = fx.run(release_2::quote("AAPL", &calls_2)).await;
    assert_eq!((read.price, read.venue.as_str(), calls_2.load(SeqCst)), (101.0, "XNAS", 1));
    let again = fx.run(release_2::quote("AAPL", &calls_2)).await;
    assert_eq!((again, calls_2.load(SeqCst)), (read, 1), "release 2's own entry is a hit");

    // The same entry under a release whose type kept its shape is a hit.
    let kept = fx.run(release_1b::quote("AAPL", &calls_1b)).await;
    assert_eq!((kept.price, calls_1b.load(SeqCst)), (written.price, 0));

    let stats = fx.stats().await.get(5, "shapes").cloned().unwrap();
    assert_eq!(stats.decode_failures, 1, "the retired entry is counted once");
}

on_every_backend!(a_changed_type_misses_the_previous_release_entries);
