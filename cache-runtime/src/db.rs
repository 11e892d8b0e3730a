//! The DB allocation standard, as types.
//!
//! Every cached function and every [`Cache`](crate::Cache) handle names its Redis database by a
//! marker type, never by a number: the standard forbids hard-coded DB numbers, and DB 15 is kept
//! for the platform. The table below is the platform's (see README):
//!
//! | type | DB | use |
//! |---|---|---|
//! | [`User`] | 0 | user auth |
//! | [`Grpc`] | 1 | gRPC response cache |
//! | [`RateLimit`] | 2 | rate limiting |
//! | [`Session`] | 3 | sessions |
//! | [`DslBytecode`] | 4 | DSL bytecode |
//! | [`MarketData`] | 5 | market data |
//! | [`Backtest`] | 6 | backtests |
//! | [`Indicator`] | 7 | indicators |
//! | [`Strategy`] | 8 | strategies |
//! | [`Notification`] | 9 | notification queue |
//! | [`CeleryBroker`] | 10 | Celery broker |
//! | [`CeleryResult`] | 11 | Celery results |
//! | [`MlModel`] | 12 | ML models |
//! | [`GenAi`] | 13 | GenAI responses |
//! | [`Subscription`] | 14 | subscriptions |
//! | [`Reserved`] | 15 | reserved for the platform: naming it does not compile |
//!
//! A service may declare its own marker with [`cache_db!`](crate::cache_db):
//!
//! ```
//! cache_runtime::cache_db!(
//!     /// Payment lookups (shares DB 8's number only if your team owns it).
//!     pub Payments = 8, "payments"
//! );
//! use cache_runtime::db::CacheDb;
//! assert_eq!(Payments::INDEX, 8);
//! ```
//!
//! A marker that claims DB 15 or more does not compile:
//!
//! ```compile_fail
//! cache_runtime::cache_db!(pub Platform = 15, "platform");
//! ```

/// Number of the DB the platform keeps for itself; no cache may use it.
pub const RESERVED_DB: u8 = 15;

/// A Redis logical database of the allocation standard.
///
/// Implement it with [`cache_db!`](crate::cache_db), which checks the index where you write it.
/// A hand-written impl is checked too, where it is used: every `#[cached]` function and every
/// [`Cache`](crate::Cache) handle evaluates [`CacheDb::CHECKED_INDEX`], which fails to compile for
/// 15 and above.
pub trait CacheDb: Send + Sync + 'static {
    /// The DB number, 0 to 14.
    const INDEX: u8;
    /// A short name used in logs and stats.
    const NAME: &'static str;
    /// [`Self::INDEX`], or a compile error when it is the reserved DB 15 or out of range.
    const CHECKED_INDEX: u8 = check_index(Self::INDEX);
}

/// The compile-time rule behind [`CacheDb::CHECKED_INDEX`].
#[doc(hidden)]
pub const fn check_index(index: u8) -> u8 {
    if index == RESERVED_DB {
        panic!("DB 15 is reserved for the platform: use one of the DB types 0-14 in cache_runtime::db, or declare your own with cache_db! at an index your team owns");
    }
    if index > RESERVED_DB {
        panic!("Redis has DBs 0-15 and DB 15 is reserved for the platform: a cache DB index must be 0-14");
    }
    index
}

/// Declares a DB marker type for the allocation standard.
///
/// `cache_db!(pub Name = INDEX, "name");` — the index is checked where the macro is written:
/// 15 (reserved for the platform) or more does not compile.
#[macro_export]
macro_rules! cache_db {
    ($(#[$attr:meta])* $vis:vis $name:ident = $index:literal, $label:literal) => {
        $(#[$attr])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
        $vis struct $name;

        impl $crate::db::CacheDb for $name {
            const INDEX: u8 = $index;
            const NAME: &'static str = $label;
        }

        const _: u8 = <$name as $crate::db::CacheDb>::CHECKED_INDEX;
    };
}

macro_rules! standard_dbs {
    ($($(#[$attr:meta])* $name:ident = $index:literal, $label:literal;)*) => {
        $(
            $(#[$attr])*
            #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
            pub struct $name;

            impl CacheDb for $name {
                const INDEX: u8 = $index;
                const NAME: &'static str = $label;
            }
        )*

        /// Every standard DB: (index, name).
        pub const STANDARD: &[(u8, &str)] = &[$(($index, $label)),*];
    };
}

standard_dbs! {
    /// DB 0: user auth (IAM). Keys like `user:{user_id}`, TTL about 300 s.
    User = 0, "user";
    /// DB 1: gRPC response cache (every service). TTL about 3600 s.
    Grpc = 1, "grpc";
    /// DB 2: rate limiting (gateway). TTL 60-3600 s.
    RateLimit = 2, "ratelimit";
    /// DB 3: sessions (IAM). TTL about 86400 s.
    Session = 3, "session";
    /// DB 4: DSL bytecode (Strategy). TTL 3600-86400 s.
    DslBytecode = 4, "dsl";
    /// DB 5: market data (Market Data). TTL 300-3600 s.
    MarketData = 5, "market";
    /// DB 6: backtests (Backtest). TTL 3600-86400 s.
    Backtest = 6, "backtest";
    /// DB 7: indicators (Indicator). TTL 1800-7200 s.
    Indicator = 7, "indicator";
    /// DB 8: strategies (Strategy). TTL 600-3600 s.
    Strategy = 8, "strategy";
    /// DB 9: notification queue (Notification). TTL 300-1800 s.
    Notification = 9, "notification";
    /// DB 10: Celery broker (Backtest).
    CeleryBroker = 10, "celery-broker";
    /// DB 11: Celery results (Backtest).
    CeleryResult = 11, "celery-result";
    /// DB 12: ML models (ML). TTL 3600-86400 s.
    MlModel = 12, "ml";
    /// DB 13: GenAI responses (GenAI). TTL 1800-7200 s.
    GenAi = 13, "genai";
    /// DB 14: subscriptions (Subscription). TTL about 3600 s.
    Subscription = 14, "subscription";
    /// DB 15: reserved for the platform. It exists so that naming it is a compile error
    /// (`#[cached(db = Reserved, ...)]`, `Cache::<Reserved, _>`), not so that it can be used.
    Reserved = 15, "reserved";
}
