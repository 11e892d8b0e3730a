//! `#[cached_impl]` on the shapes services are built of: a repository trait implemented with
//! native `async fn`, another with `#[async_trait]`, and associated functions without `self`;
//! each cached, shared between instances or not as declared, and invalidated through the type's
//! name, on every backend.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

use cache_runtime::db::MarketData;
use cache_runtime::{cached, cached_impl, invalidate, invalidates};
use support::Fixture;

static QUOTES: AtomicUsize = AtomicUsize::new(0);
static DEPTHS: AtomicUsize = AtomicUsize::new(0);
static LOOKUPS: AtomicUsize = AtomicUsize::new(0);
static SPREADS: AtomicUsize = AtomicUsize::new(0);

#[allow(async_fn_in_trait)]
pub trait Repo {
    async fn quote(&self, symbol: &str) -> Result<u64, String>;
}

#[async_trait::async_trait]
pub trait Book {
    async fn depth(&self, symbol: &str, levels: u8) -> Vec<u64>;
    async fn spread(&self, symbol: &str) -> u64;
    async fn reprice(&self, symbol: &str) -> Result<(), String>;
}

/// A trait whose method takes its associated type.
#[allow(async_fn_in_trait)]
pub trait Catalog {
    type Id;
    async fn title(&self, id: Self::Id) -> String;
}

static TITLES: AtomicUsize = AtomicUsize::new(0);

#[derive(serde::Serialize)]
pub struct PgRepo {
    venue: String,
}

#[cached_impl]
impl Repo for PgRepo {
    #[cached(db = MarketData, prefix = "impls", ttl = 60)]
    async fn quote(&self, symbol: &str) -> Result<u64, String> {
        QUOTES.fetch_add(1, SeqCst);
        Ok((self.venue.len() * 1000 + symbol.len()) as u64)
    }
}

#[cached_impl]
#[async_trait::async_trait]
impl Book for PgRepo {
    #[cached(db = MarketData, prefix = "impls", ttl = 60, skip(self))]
    async fn depth(&self, symbol: &str, levels: u8) -> Vec<u64> {
        DEPTHS.fetch_add(1, SeqCst);
        (0..u64::from(levels)).map(|l| l + symbol.len() as u64).collect()
    }

    /// The receiver is part of this one's key, through `#[async_trait]`.
    #[cached(db = MarketData, prefix = "impls", ttl = 60)]
    async fn spread(&self, symbol: &str) -> u64 {
        SPREADS.fetch_add(1, SeqCst);
        (self.venue.len() + symbol.len()) as u64
    }

    /// A write path of an `#[async_trait]` impl: `#[cached_impl]` expands it first.
    #[invalidates(Self::spread(self, symbol))]
    async fn reprice(&self, symbol: &str) -> Result<(), String> {
        let _ = symbol;
        Ok(())
    }
}

#[cached_impl]
impl Catalog for PgRepo {
    type Id = u32;

    #[cached(db = MarketData, prefix = "impls", ttl = 60, skip(self))]
    async fn title(&self, id: Self::Id) -> String {
        TITLES.fetch_add(1, SeqCst);
        format!("title {id}")
    }
}

/// Invalidation of a trait impl's method from another module.
mod elsewhere {
    use super::*;

    #[invalidates(crate::PgRepo::quote(repo, symbol), crate::PgRepo::spread(repo, symbol))]
    pub async fn relist(repo: &PgRepo, symbol: &str) -> Result<(), String> {
        let _ = (repo, symbol);
        Ok(())
    }
}

#[cached_impl]
impl PgRepo {
    #[cached(db = MarketData, prefix = "impls", ttl = 60)]
    pub async fn by_symbol(symbol: &str) -> Option<u64> {
        LOOKUPS.fetch_add(1, SeqCst);
        Some(symbol.len() as u64)
    }

    #[invalidates(PgRepo::quote(self, symbol), Self::depth(symbol, 2), Self::by_symbol(symbol))]
    pub async fn trade(&self, symbol: &str) -> Result<(), String> {
        let _ = symbol;
        Ok(())
    }
}

async fn trait_impls_and_associated_functions(fx: &mut Fixture) {
    let (q, d, l) = (QUOTES.load(SeqCst), DEPTHS.load(SeqCst), LOOKUPS.load(SeqCst));
    let (xnas, xnys) = (PgRepo { venue: "XNAS".into() }, PgRepo { venue: "XNYSX".into() });
    fx.run(async {
        for _ in 0..2 {
            assert_eq!(xnas.quote("AAPL").await, Ok(4004));
            assert_eq!(xnys.quote("AAPL").await, Ok(5004), "the receiver is part of the key");
            assert_eq!(xnas.depth("AAPL", 2).await, vec![4, 5]);
            assert_eq!(xnys.depth("AAPL", 2).await, vec![4, 5], "skip(self): instances share it");
            assert_eq!(PgRepo::by_symbol("AAPL").await, Some(4));
        }
    })
    .await;
    let delta = |c: &AtomicUsize, from: usize| c.load(SeqCst) - from;
    assert_eq!((delta(&QUOTES, q), delta(&DEPTHS, d), delta(&LOOKUPS, l)), (2, 1, 1), "the second round hit");
    fx.run(xnas.trade("AAPL")).await.unwrap();
    fx.run(async {
        assert_eq!(xnas.quote("AAPL").await, Ok(4004));
        assert_eq!(xnys.quote("AAPL").await, Ok(5004));
        assert_eq!(xnas.depth("AAPL", 2).await, vec![4, 5]);
        assert_eq!(PgRepo::by_symbol("AAPL").await, Some(4));
    })
    .await;
    assert_eq!(
        (delta(&QUOTES, q), delta(&DEPTHS, d), delta(&LOOKUPS, l)),
        (3, 2, 2),
        "trade dropped XNAS's quote (not XNYS's), the shared depth and the lookup"
    );
    fx.run(invalidate!(PgRepo::by_symbol(..))).await;
    fx.run(PgRepo::by_symbol("AAPL")).await;
    assert_eq!(delta(&LOOKUPS, l), 3, "function-wide invalidation by the type's name");

    let s = SPREADS.load(SeqCst);
    fx.run(async {
        for _ in 0..2 {
            assert_eq!(xnas.spread("AB").await, 6);
            assert_eq!(xnys.spread("AB").await, 7, "through #[async_trait], the receiver is in the key");
        }
    })
    .await;
    assert_eq!(delta(&SPREADS, s), 2);
    fx.run(elsewhere::relist(&xnas, "AB")).await.unwrap();
    fx.run(async {
        assert_eq!(xnas.spread("AB").await, 6);
        assert_eq!(xnys.spread("AB").await, 7);
        assert_eq!(xnas.quote("AB").await, Ok(4002));
    })
    .await;
    assert_eq!(delta(&SPREADS, s), 3, "another module invalidated XNAS's entry only");

    // A parameter of the trait's associated type (`Self::Id`).
    let t = TITLES.load(SeqCst);
    for _ in 0..2 {
        assert_eq!(fx.run(xnas.title(7)).await, "title 7");
    }
    assert_eq!(delta(&TITLES, t), 1);
    fx.run(invalidate!(PgRepo::title(7))).await;
    assert_eq!(fx.run(xnas.title(7)).await, "title 7");
    assert_eq!(delta(&TITLES, t), 2, "invalidated through the type's name");
    fx.run(xnas.reprice("AB")).await.unwrap();
    fx.run(async {
        assert_eq!(xnas.spread("AB").await, 6);
        assert_eq!(xnys.spread("AB").await, 7);
    })
    .await;
    assert_eq!(delta(&SPREADS, s), 4, "the #[async_trait] write path dropped XNAS's entry only");
}

/// One backend after the other (the counters are shared statics).
#[tokio::test]
async fn on_every_backend_in_turn() {
    trait_impls_and_associated_functions(&mut Fixture::memory()).await;
    trait_impls_and_associated_functions(&mut Fixture::redis()).await;
    trait_impls_and_associated_functions(&mut Fixture::cluster().await).await;
}
