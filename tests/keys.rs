//! Entries of different computations never share a key: generic instantiations, same-named
//! functions of two modules, methods of two types, instances with different state. Each test
//! runs on both backends; the exact keys of several argument shapes are pinned.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

use cache_runtime::db::MarketData;
use cache_runtime::{cached, cached_impl, invalidate, KeyBuilder};
use serde::{Deserialize, Serialize};
use support::Fixture;

pub trait Reading: Serialize + for<'de> Deserialize<'de> + Send + 'static {
    fn from_celsius(c: f64) -> Self;
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub struct Celsius(f64);
#[derive(Debug, PartialEq, Serialize, Deserialize)]
pub struct Fahrenheit(f64);

impl Reading for Celsius {
    fn from_celsius(c: f64) -> Self {
        Celsius(c)
    }
}
impl Reading for Fahrenheit {
    fn from_celsius(c: f64) -> Self {
        Fahrenheit(c * 9.0 / 5.0 + 32.0)
    }
}

#[cached(db = MarketData, prefix = "weather", ttl = 300, skip(calls))]
async fn temperature<T: Reading>(station: u32, calls: &AtomicUsize) -> T {
    calls.fetch_add(1, SeqCst);
    T::from_celsius(f64::from(station) * 10.0)
}

/// A database executor: the pool and a transaction read the same rows, so its type is
/// `skip`ped with it, and stays out of the key.
pub trait Executor: Send {
    fn base(&self) -> u64;
}
pub struct Pool;
pub struct Transaction;
impl Executor for Pool {
    fn base(&self) -> u64 {
        1000
    }
}
impl Executor for Transaction {
    fn base(&self) -> u64 {
        1000
    }
}

#[cached(db = MarketData, prefix = "executor", ttl = 300, skip(db, calls))]
async fn balance<'e, E: Executor + 'e>(db: E, account: u32, calls: &AtomicUsize) -> u64 {
    calls.fetch_add(1, SeqCst);
    db.base() + u64::from(account)
}

#[cached(db = MarketData, prefix = "executor", ttl = 300, skip(db, calls))]
async fn limit<E>(db: E, account: u32, calls: &AtomicUsize) -> u64
where
    E: Executor,
{
    calls.fetch_add(1, SeqCst);
    db.base() * 2 + u64::from(account)
}

/// A raw identifier: its key names `type`, as `KeyBuilder` and README's formula do.
#[cached(db = MarketData, prefix = "raw", ttl = 300)]
async fn r#type(id: u32) -> u32 {
    id
}

/// Invalidation names the key argument alone: the executor's type is not asked for.
#[cache_runtime::invalidates(balance(account), limit(account))]
async fn deposit(account: u32) -> Result<(), String> {
    let _ = account;
    Ok(())
}

mod eu {
    #[cache_runtime::cached(db = cache_runtime::db::MarketData, prefix = "fees", ttl = 300)]
    pub async fn fee(symbol: &str) -> u64 {
        symbol.len() as u64
    }
}

mod us {
    #[cache_runtime::cached(db = cache_runtime::db::MarketData, prefix = "fees", ttl = 300)]
    pub async fn fee(symbol: &str) -> u64 {
        symbol.len() as u64 * 100
    }
}

#[derive(Serialize)]
pub struct Feed {
    venue: &'static str,
}

#[cached_impl]
impl Feed {
    /// The receiver is part of the key: XNAS and XNYS have their own entries.
    #[cached(db = MarketData, prefix = "feed", ttl = 300)]
    async fn last(&self, symbol: &str) -> String {
        format!("{}:{symbol}", self.venue)
    }

    /// `skip(self)`: every instance shares these entries, said in the attribute.
    #[cached(db = MarketData, prefix = "feed", ttl = 300, skip(self))]
    async fn listed(&self, symbol: &str) -> String {
        format!("{}:{symbol}", self.venue)
    }
}

pub struct Other;

#[cached_impl]
impl Other {
    /// Same prefix and name as `Feed::last`, another type.
    #[cached(db = MarketData, prefix = "feed", ttl = 300, skip(self))]
    async fn last(&self, symbol: &str) -> String {
        format!("other:{symbol}")
    }
}

async fn generic_instantiations_have_their_own_entries(fx: &mut Fixture) {
    let calls = AtomicUsize::new(0);
    let c: Celsius = fx.run(temperature::<Celsius>(1, &calls)).await;
    let f: Fahrenheit = fx.run(temperature::<Fahrenheit>(1, &calls)).await;
    assert_eq!((c, f), (Celsius(10.0), Fahrenheit(50.0)), "Fahrenheit must not read the Celsius entry");
    let again: Fahrenheit = fx.run(temperature::<Fahrenheit>(1, &calls)).await;
    assert_eq!(again, Fahrenheit(50.0));
    assert_eq!(calls.load(SeqCst), 2, "one execution per instantiation, then a hit");
    // One function-wide invalidation covers every instantiation.
    fx.run(invalidate!(temperature::<Celsius>(..))).await;
    let _: Celsius = fx.run(temperature::<Celsius>(1, &calls)).await;
    let _: Fahrenheit = fx.run(temperature::<Fahrenheit>(1, &calls)).await;
    assert_eq!(calls.load(SeqCst), 4, "both instantiations recomputed after temperature(..)");
}

async fn an_executor_type_stays_out_of_the_key_and_of_its_invalidation(fx: &mut Fixture) {
    let calls = AtomicUsize::new(0);
    assert_eq!(fx.run(balance(Pool, 7, &calls)).await, 1007);
    assert_eq!(fx.run(balance(Transaction, 7, &calls)).await, 1007, "a hit, whichever executor");
    assert_eq!(fx.run(limit(Pool, 7, &calls)).await, 2007);
    assert_eq!(fx.run(limit(Transaction, 7, &calls)).await, 2007);
    assert_eq!(calls.load(SeqCst), 2);
    fx.run(deposit(7)).await.unwrap();
    fx.run(balance(Transaction, 7, &calls)).await;
    fx.run(limit(Transaction, 7, &calls)).await;
    assert_eq!(calls.load(SeqCst), 4, "deposit(7) dropped both entries");
}

async fn same_name_in_two_modules_do_not_share(fx: &mut Fixture) {
    assert_eq!(fx.run(eu::fee("X")).await, 1);
    assert_eq!(fx.run(us::fee("X")).await, 100, "us::fee must not read eu::fee's entry");
    assert_eq!(fx.run(eu::fee("X")).await, 1);
    // Function-wide invalidation of one leaves the other's entries alone.
    fx.run(invalidate!(eu::fee(..))).await;
    assert_eq!(fx.run(us::fee("X")).await, 100);
    let stats = fx.stats().await;
    assert_eq!(stats.get(5, "fees").unwrap().hits, 2, "eu's second read and us's read after eu(..)");
}

/// `helper` written in the bodies of two functions of one module, same prefix and name:
/// `module_path!()` names neither function.
async fn first_body(fx: &mut Fixture, x: u32) -> u32 {
    #[cached(db = MarketData, prefix = "nested", ttl = 300)]
    async fn helper(x: u32) -> u32 {
        x
    }
    fx.run(helper(x)).await
}

async fn second_body(fx: &mut Fixture, x: u32) -> u32 {
    #[cached(db = MarketData, prefix = "nested", ttl = 300)]
    async fn helper(x: u32) -> u32 {
        x * 100
    }
    fx.run(helper(x)).await
}

async fn same_name_in_two_function_bodies_do_not_share(fx: &mut Fixture) {
    assert_eq!(first_body(fx, 7).await, 7);
    assert_eq!(second_body(fx, 7).await, 700, "the second helper must not read the first one's entry");
    assert_eq!(first_body(fx, 7).await, 7);
    assert_eq!(fx.stats().await.get(5, "nested").unwrap().hits, 1, "the first helper's second call");
    // The registry tells them apart too.
    let paths: Vec<String> = cache_runtime::registry::functions()
        .into_iter()
        .filter(|f| f.prefix == "nested")
        .map(|f| f.path)
        .collect();
    assert_eq!(paths, ["keys::first_body::helper", "keys::second_body::helper"]);
}

async fn instances_and_types_do_not_share(fx: &mut Fixture) {
    let (xnas, xnys) = (Feed { venue: "XNAS" }, Feed { venue: "XNYS" });
    assert_eq!(fx.run(xnas.last("AAPL")).await, "XNAS:AAPL");
    assert_eq!(fx.run(xnys.last("AAPL")).await, "XNYS:AAPL", "another instance, another entry");
    assert_eq!(fx.run(Other.last("AAPL")).await, "other:AAPL", "another type, another entry");
    // skip(self): shared, as declared.
    assert_eq!(fx.run(xnas.listed("AAPL")).await, "XNAS:AAPL");
    assert_eq!(fx.run(xnys.listed("AAPL")).await, "XNAS:AAPL", "skip(self) shares entries");
    // Invalidation names the instance.
    fx.run(invalidate!(Feed::last(&xnas, "AAPL"))).await;
    assert_eq!(fx.run(xnys.last("AAPL")).await, "XNYS:AAPL");
}

#[derive(Serialize)]
struct Order {
    symbol: &'static str,
    qty: u32,
}

#[derive(Serialize)]
enum Side {
    Buy,
    #[allow(dead_code)]
    Sell,
}

/// Exact keys: if one of these changes, every deployed cache is cold and every other language
/// reading these keys breaks. Change them only on purpose (README: the format is stable).
#[test]
fn keys_are_pinned() {
    let m = "keys";
    let shapes = [
        (
            KeyBuilder::new(m, "market", "quote").arg("AAPL").finish(),
            "market:quote:{c87fbfd41a8f226cfecb3889e8c332c3}",
        ),
        (
            KeyBuilder::new(m, "market", "pair").arg("AAPL").arg(&7u32).finish(),
            "market:pair:{013fbb430fd3228bbff6a8b21ad5c12f}",
        ),
        (
            KeyBuilder::new(m, "orders", "book").arg(&Order { symbol: "AAPL", qty: 10 }).finish(),
            "orders:book:{a7fc0281382c8337efc151bfe7777e1b}",
        ),
        (
            KeyBuilder::new(m, "orders", "side").arg(&Side::Buy).finish(),
            "orders:side:{946753d8d7fcadd45de4ed96e374926f}",
        ),
        (
            KeyBuilder::new(m, "market", "depth").version(2).arg("AAPL").finish(),
            "market:depth:v2:{c87fbfd41a8f226cfecb3889e8c332c3}",
        ),
        (
            KeyBuilder::new(m, "weather", "temperature")
                .type_arg(std::any::type_name::<Celsius>())
                .arg(&1u32)
                .finish(),
            "weather:temperature:{c05e0a1f73100f196d7204e08efa049c}",
        ),
        (
            KeyBuilder::new(m, "feed", "last")
                .owner(std::any::type_name::<Feed>())
                .arg(&Feed { venue: "XNAS" })
                .arg("AAPL")
                .finish(),
            "feed:last:{71968e922994979f3163413b3d35104c}",
        ),
    ];
    let mut wrong = Vec::new();
    for (got, want) in &shapes {
        if got.as_deref() != Some(*want) {
            wrong.push(format!("{got:?} != {want}"));
        }
    }
    assert!(wrong.is_empty(), "pinned keys changed:\n{}", wrong.join("\n"));
}

/// The pinned builder keys are the keys the functions write.
async fn functions_write_the_builder_keys(fx: &mut Fixture) {
    let _: Celsius = fx.run(temperature::<Celsius>(2, &AtomicUsize::new(0))).await;
    let key = KeyBuilder::new("keys", "weather", "temperature")
        .type_arg(std::any::type_name::<Celsius>())
        .arg(&2u32)
        .finish()
        .unwrap();
    assert!(fx.ttl::<MarketData>(&key).await.is_some(), "temperature::<Celsius>(2) wrote {key}");
    let xnas = Feed { venue: "XNAS" };
    fx.run(xnas.last("MSFT")).await;
    let key = KeyBuilder::new("keys", "feed", "last")
        .owner(std::any::type_name::<Feed>())
        .arg(&xnas)
        .arg("MSFT")
        .finish()
        .unwrap();
    assert!(fx.ttl::<MarketData>(&key).await.is_some(), "Feed::last wrote {key}");
    fx.run(r#type(3)).await;
    let key = KeyBuilder::new("keys", "raw", "type").arg(&3u32).finish().unwrap();
    assert!(fx.ttl::<MarketData>(&key).await.is_some(), "r#type(3) wrote {key}");
}

on_every_backend!(
    generic_instantiations_have_their_own_entries,
    an_executor_type_stays_out_of_the_key_and_of_its_invalidation,
    same_name_in_two_modules_do_not_share,
    same_name_in_two_function_bodies_do_not_share,
    instances_and_types_do_not_share,
    functions_write_the_builder_keys,
);
