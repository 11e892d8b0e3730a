//! The near tier: typed copies in process, dropped when their entry changes anywhere.
//!
//! Embedded backend: every `Clone` value is kept typed, and every change drops its copy at once.
//! Redis: functions with `near` keep copies, and Redis's `CLIENT TRACKING` (broadcast) tells every
//! process of every change, from this toolkit or any other client; a lost tracking connection
//! drops every copy before one answers again.

mod support;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::time::{Duration, Instant};

use cache_runtime::db::MarketData;
use cache_runtime::{cached, invalidate, CacheConfig, Runtime};
use support::{redis_runtime, RedisServer};

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Quote {
    symbol: String,
    version: u64,
}

/// The source of truth: its version, read by every computation.
static VERSION: AtomicU64 = AtomicU64::new(0);
static COMPUTED: AtomicU64 = AtomicU64::new(0);

#[cached(db = MarketData, prefix = "near_embedded", ttl = 60)]
async fn embedded_quote(symbol: &str) -> Quote {
    COMPUTED.fetch_add(1, SeqCst);
    Quote { symbol: symbol.to_owned(), version: VERSION.load(SeqCst) }
}

/// Not `Clone`: read through the store and decoded, as before.
#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Opaque(u64);

#[cached(db = MarketData, prefix = "near_embedded", ttl = 60)]
async fn opaque(n: u64) -> Opaque {
    Opaque(n)
}

fn near_hits(runtime: &Runtime, prefix: &str) -> u64 {
    runtime.stats().get(5, prefix).map_or(0, |s| s.near_hits)
}

#[tokio::test]
async fn embedded_hits_are_typed_copies_that_every_change_drops() {
    let runtime = Runtime::new(CacheConfig::memory());
    let status = runtime.near_status();
    assert!(status.trusted, "the embedded store is its own notification: {status:?}");
    let computed = || COMPUTED.load(SeqCst);
    runtime
        .scope(async {
            let before = computed();
            assert_eq!(embedded_quote("AAPL").await.version, 0); // miss
            assert_eq!(embedded_quote("AAPL").await.version, 0); // hit through the store: kept
            assert_eq!(embedded_quote("AAPL").await.version, 0); // near hit
            assert_eq!(computed() - before, 1);
            assert!(near_hits(&Runtime::current(), "near_embedded") >= 1);

            VERSION.store(1, SeqCst);
            invalidate!(embedded_quote("AAPL")).await;
            assert_eq!(embedded_quote("AAPL").await.version, 1, "an invalidated copy answered");
            assert_eq!(computed() - before, 2);

            VERSION.store(2, SeqCst);
            invalidate!(embedded_quote(..)).await;
            assert_eq!(embedded_quote("AAPL").await.version, 2, "a function-wide invalidation left a copy");

            // A type that is not `Clone` is never kept typed; its hits still count.
            opaque(7).await;
            let near_before = near_hits(&Runtime::current(), "near_embedded");
            assert_eq!(opaque(7).await, Opaque(7));
            assert_eq!(opaque(7).await, Opaque(7));
            assert_eq!(near_hits(&Runtime::current(), "near_embedded"), near_before);
        })
        .await;
    // Turned off, the same calls read the store every time.
    let off = Runtime::new(CacheConfig::memory().with_near(false));
    off.scope(async {
        for _ in 0..3 {
            embedded_quote("MSFT").await;
        }
    })
    .await;
    assert_eq!(near_hits(&off, "near_embedded"), 0);
    assert_eq!(off.stats().get(5, "near_embedded").unwrap().hits, 2);
}

/// Two functions of one name and prefix, in two modules: their entries' keys differ only in the
/// hash (the module is hashed), so their copies must too.
mod twin_a {
    #[cache_runtime::cached(db = cache_runtime::db::MarketData, prefix = "near_twins", ttl = 60)]
    pub async fn twin(n: u64) -> u64 {
        n + 1000
    }
}

mod twin_b {
    #[cache_runtime::cached(db = cache_runtime::db::MarketData, prefix = "near_twins", ttl = 60)]
    pub async fn twin(n: u64) -> u64 {
        n + 2000
    }
}

#[tokio::test]
async fn same_named_functions_in_two_modules_and_two_runtimes_keep_their_copies_apart() {
    for runtime in [Runtime::new(CacheConfig::memory()), Runtime::new(CacheConfig::memory())] {
        runtime
            .scope(async {
                for round in 0..3 {
                    for n in [1, 2] {
                        assert_eq!(twin_a::twin(n).await, n + 1000, "round {round}");
                        assert_eq!(twin_b::twin(n).await, n + 2000, "round {round}");
                    }
                }
                // Each runtime counts its own calls (the second runtime's calls do not reach the
                // first one's state): 4 misses, then 8 hits, 4 of them near hits at least.
                let stats = Runtime::current().stats().get(5, "near_twins").cloned().unwrap();
                assert_eq!((stats.misses, stats.hits), (4, 8), "{stats:?}");
                assert!(stats.near_hits >= 4, "{stats:?}");
                invalidate!(twin_a::twin(1)).await;
                assert_eq!(twin_a::twin(1).await, 1001);
                assert_eq!(twin_b::twin(1).await, 2001);
                let after = Runtime::current().stats().get(5, "near_twins").cloned().unwrap();
                assert_eq!(
                    (after.misses, after.hits),
                    (5, 9),
                    "only the invalidated copy is recomputed: {after:?}"
                );
            })
            .await;
    }
}

/// Each test's own source of truth (tests run at once).
static SHARED_VERSION: AtomicU64 = AtomicU64::new(0);
static OTHER_VERSION: AtomicU64 = AtomicU64::new(0);
static LONG_VERSION: AtomicU64 = AtomicU64::new(0);

#[cached(db = MarketData, prefix = "near_redis", ttl = 300, near = "60s", skip(source))]
async fn shared_quote(symbol: &str, source: &AtomicU64) -> Quote {
    Quote { symbol: symbol.to_owned(), version: source.load(SeqCst) }
}

fn source(symbol: &str) -> &'static AtomicU64 {
    if symbol == "ORCL" {
        &OTHER_VERSION
    } else if symbol.len() > 200 {
        &LONG_VERSION
    } else {
        &SHARED_VERSION
    }
}

/// One call, `call`, in `runtime`: whether a near copy of `prefix` answered it, and what it
/// returned.
async fn answered_near(runtime: &Runtime, prefix: &str, call: impl Future<Output = Quote>) -> (bool, Quote) {
    let before = near_hits(runtime, prefix);
    let quote = runtime.scope(call).await;
    (near_hits(runtime, prefix) > before, quote)
}

/// Calls until `runtime` answers from a near copy of `prefix` (a few tries: the tracking
/// connection starts with the first call).
async fn until_near<F: Future<Output = Quote>>(
    runtime: &Runtime,
    prefix: &str,
    call: impl Fn() -> F,
) -> Quote {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let (true, quote) = answered_near(runtime, prefix, call()).await {
            return quote;
        }
        assert!(Instant::now() < deadline, "no near hit within 5 s: {:?}", runtime.near_status());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Calls `shared_quote(symbol)` until a near copy answers.
async fn warm(runtime: &Runtime, symbol: &str) -> Quote {
    until_near(runtime, "near_redis", || shared_quote(symbol, source(symbol))).await
}

/// Waits until `runtime` answers `version` for `symbol`; how long that took.
async fn until_version(runtime: &Runtime, symbol: &str, version: u64) -> Duration {
    let started = Instant::now();
    loop {
        if runtime.scope(shared_quote(symbol, source(symbol))).await.version == version {
            return started.elapsed();
        }
        assert!(started.elapsed() < Duration::from_secs(10), "the old copy still answers after 10 s");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_in_another_process_or_client_drops_the_copy() {
    let server = RedisServer::start();
    let a = redis_runtime(&server.url(), |c| c);
    let b = redis_runtime(&server.url(), |c| c);
    SHARED_VERSION.store(10, SeqCst);
    assert_eq!(warm(&a, "IBM").await.version, 10);
    assert!(a.near_status().trusted);

    // Another process's invalidation.
    SHARED_VERSION.store(11, SeqCst);
    b.scope(invalidate!(shared_quote("IBM"))).await;
    let took = until_version(&a, "IBM", 11).await;
    eprintln!("a key invalidated in process B stopped answering in A after {took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}: the copy lives 60 s without the notification");

    // Another process's function-wide invalidation (its generation key).
    assert_eq!(warm(&a, "IBM").await.version, 11);
    SHARED_VERSION.store(12, SeqCst);
    b.scope(invalidate!(shared_quote(..))).await;
    let took = until_version(&a, "IBM", 12).await;
    assert!(took < Duration::from_secs(1), "function-wide: {took:?}");

    // A client that is not this toolkit at all: `DEL` of the key.
    assert_eq!(warm(&a, "IBM").await.version, 12);
    SHARED_VERSION.store(13, SeqCst);
    let mut raw = server.raw(5).await;
    let keys: Vec<String> =
        redis::cmd("KEYS").arg("near_redis:shared_quote:{*}").query_async(&mut raw).await.unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let _: () = redis::cmd("DEL").arg(&keys[0]).query_async(&mut raw).await.unwrap();
    let took = until_version(&a, "IBM", 13).await;
    assert!(took < Duration::from_secs(1), "raw DEL: {took:?}");
    assert!(a.near_status().dropped >= 3, "{:?}", a.near_status());
}

/// A call whose key outgrows the key hasher's 192-byte buffer (here a 300-byte argument) has its
/// copy kept by its hash rather than by its bytes (`near.rs`); another process's invalidation
/// drops it all the same, through the generated code on both sides.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_kept_by_its_hash_is_dropped_by_another_process_too() {
    let server = RedisServer::start();
    let a = redis_runtime(&server.url(), |c| c);
    let b = redis_runtime(&server.url(), |c| c);
    let long = "L".repeat(300);
    LONG_VERSION.store(20, SeqCst);
    assert_eq!(warm(&a, &long).await.version, 20);
    LONG_VERSION.store(21, SeqCst);
    b.scope(invalidate!(shared_quote(&long))).await;
    let took = until_version(&a, &long, 21).await;
    eprintln!("a copy kept by hash, invalidated in process B, stopped answering in A after {took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}: the copy lives 60 s without the notification");
    assert!(a.near_status().dropped >= 1, "{:?}", a.near_status());
}

static EXTENDED_VERSION: AtomicU64 = AtomicU64::new(0);

#[cached(db = MarketData, prefix = "near_extend", ttl = 300, near = "60s")]
async fn extended_quote(symbol: &str) -> Quote {
    Quote { symbol: symbol.to_owned(), version: EXTENDED_VERSION.load(SeqCst) }
}

/// The runtime extends a function's generation key (`PEXPIRE`) about once per TTL, and Redis
/// notifies that like any change of the key. Such a notification makes the next lookup read the
/// generation again; when it is unchanged, the function's other copies answer again instead of
/// every one being read from Redis once more. A real function-wide invalidation from another
/// process still ends them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generation_key_whose_life_is_extended_keeps_the_functions_copies() {
    let server = RedisServer::start();
    let a = redis_runtime(&server.url(), |c| c);
    let b = redis_runtime(&server.url(), |c| c);
    EXTENDED_VERSION.store(1, SeqCst);
    for symbol in ["E1", "E2", "E3"] {
        assert_eq!(until_near(&a, "near_extend", || extended_quote(symbol)).await.version, 1);
    }
    let mut raw = server.raw(5).await;
    let generations: Vec<String> =
        redis::cmd("KEYS").arg("near_extend:extended_quote:gen:*").query_async(&mut raw).await.unwrap();
    assert_eq!(generations.len(), 1, "{generations:?}");

    // What the runtime does to a generation key about once per TTL: extend its life.
    let _: () = redis::cmd("PEXPIRE").arg(&generations[0]).arg(600_000).query_async(&mut raw).await.unwrap();
    // Notifications reach `a` in order on one connection: once a later one (process B's
    // invalidation of E3) has dropped E3's copy, the extension's has been handled too.
    let dropped = a.near_status().dropped;
    b.scope(invalidate!(extended_quote("E3"))).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while a.near_status().dropped == dropped {
        assert!(
            Instant::now() < deadline,
            "no copy dropped 5 s after B's invalidation: {:?}",
            a.near_status()
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    // The first call after it reads the generation again, so E1's copy does not answer; finding
    // the generation unchanged, the function's other copies answer again.
    let (e1_near, e1) = answered_near(&a, "near_extend", extended_quote("E1")).await;
    let (e2_near, e2) = answered_near(&a, "near_extend", extended_quote("E2")).await;
    assert_eq!((e1.version, e2.version), (1, 1));
    assert!(!e1_near, "E1's copy answered before the generation was read again");
    assert!(e2_near, "E2's copy did not answer after a generation read that found no change: a life extension cost every copy");

    // A real function-wide invalidation from another process: no copy of the old generation
    // answers once the new generation is read here.
    EXTENDED_VERSION.store(2, SeqCst);
    b.scope(invalidate!(extended_quote(..))).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while a.scope(extended_quote("E1")).await.version != 2 {
        assert!(Instant::now() < deadline, "E1 still answers the old generation after 5 s");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(a.scope(extended_quote("E2")).await.version, 2, "E2's copy of the old generation answered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_tracking_connection_drops_every_copy_before_one_answers() {
    let server = RedisServer::start();
    let a = redis_runtime(&server.url(), |c| c);
    OTHER_VERSION.store(20, SeqCst);
    assert_eq!(warm(&a, "ORCL").await.version, 20);
    let mut raw = server.raw(5).await;
    let keys: Vec<String> =
        redis::cmd("KEYS").arg("near_redis:shared_quote:{*}").query_async(&mut raw).await.unwrap();
    let list: String = redis::cmd("CLIENT").arg("LIST").query_async(&mut raw).await.unwrap();
    let ids: Vec<String> = list
        .lines()
        .filter(|l| l.contains("name=cache-runtime-near"))
        .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")).map(str::to_owned))
        .collect();
    assert_eq!(ids.len(), 1, "one tracking connection: {list}");
    // Killed, then the entry deleted by the same connection, in that order on the server: the
    // delete reaches no tracking connection, so only the flush on disconnect drops A's copy.
    OTHER_VERSION.store(21, SeqCst);
    let mut pipe = redis::pipe();
    pipe.cmd("CLIENT").arg("KILL").arg("ID").arg(&ids[0]).ignore();
    for key in &keys {
        pipe.cmd("DEL").arg(key).ignore();
    }
    let _: () = pipe.query_async(&mut raw).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        a.scope(shared_quote("ORCL", &OTHER_VERSION)).await.version,
        21,
        "a copy answered after its notifications were lost"
    );

    // It tracks again, and changes drop copies again.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !a.near_status().trusted {
        assert!(Instant::now() < deadline, "not tracking again after 5 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(warm(&a, "ORCL").await.version, 21);
    OTHER_VERSION.store(22, SeqCst);
    let b = redis_runtime(&server.url(), |c| c);
    b.scope(invalidate!(shared_quote("ORCL"))).await;
    assert!(until_version(&a, "ORCL", 22).await < Duration::from_secs(1));
}

#[tokio::test]
async fn without_tracking_the_option_reads_through() {
    // The disk backend has no notifications: `near` functions read it like the others.
    let dir = tempfile::tempdir().unwrap();
    let runtime = Runtime::new(CacheConfig::disk(dir.path()));
    runtime
        .scope(async {
            for _ in 0..3 {
                shared_quote("SAP", &SHARED_VERSION).await;
            }
        })
        .await;
    assert_eq!(near_hits(&runtime, "near_redis"), 0);
    assert_eq!(runtime.stats().get(5, "near_redis").unwrap().hits, 2);
    assert!(!runtime.near_status().trusted);
}

/// Per key, the source's version; per key, the newest version whose invalidation returned.
struct Race {
    version: [AtomicU64; 4],
    floor: [AtomicU64; 4],
}

#[cached(db = MarketData, prefix = "near_race", ttl = 300, near = "60s", skip(race))]
async fn raced(key: u32, race: &Race) -> u64 {
    let v = race.version[key as usize].load(SeqCst);
    tokio::task::yield_now().await; // a read of the source, slow enough to race a write
    v
}

/// Readers on both workers while a writer bumps versions and invalidates (one key, or the
/// whole function, in turn): no read that starts after an invalidation returned may answer an
/// older version. Returns (reads, stale reads, near hits).
async fn race_in_one_process(runtime: Runtime) -> (u64, u64, u64) {
    let race = std::sync::Arc::new(Race { version: Default::default(), floor: Default::default() });
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (reads, stale) = (std::sync::Arc::new(AtomicU64::new(0)), std::sync::Arc::new(AtomicU64::new(0)));
    let mut readers = tokio::task::JoinSet::new();
    for r in 0..6u32 {
        let (race, stop, reads, stale, runtime) =
            (race.clone(), stop.clone(), reads.clone(), stale.clone(), runtime.clone());
        readers.spawn(async move {
            let mut n = r;
            while !stop.load(SeqCst) {
                let key = n % 4;
                n += 1;
                let floor = race.floor[key as usize].load(SeqCst);
                let got = runtime.scope(raced(key, &race)).await;
                reads.fetch_add(1, SeqCst);
                if got < floor {
                    stale.fetch_add(1, SeqCst);
                }
            }
        });
    }
    for n in 0..600u32 {
        let key = n % 4;
        let version = race.version[key as usize].fetch_add(1, SeqCst) + 1;
        if n % 3 == 0 {
            runtime.scope(invalidate!(raced(..))).await;
        } else {
            runtime.scope(invalidate!(raced(key))).await;
        }
        race.floor[key as usize].fetch_max(version, SeqCst);
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    stop.store(true, SeqCst);
    while readers.join_next().await.transpose().unwrap().is_some() {}
    let near = runtime.stats().get(5, "near_race").map_or(0, |s| s.near_hits);
    (reads.load(SeqCst), stale.load(SeqCst), near)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_one_process_no_copy_outlives_an_invalidation_that_returned() {
    let server = RedisServer::start();
    for (name, runtime) in
        [("memory", Runtime::new(CacheConfig::memory())), ("redis", redis_runtime(&server.url(), |c| c))]
    {
        let (reads, stale, near) = race_in_one_process(runtime).await;
        eprintln!(
            "{name}: {reads} reads racing 600 invalidations, {stale} stale, {near} answered by a near copy"
        );
        assert_eq!(
            stale, 0,
            "{name}: a read answered a version older than an invalidation that had returned"
        );
        assert!(near > 0, "{name}: no near copy answered, so this proves nothing");
    }
}

/// No `near` option: kept only through the runtime's default.
#[cached(db = MarketData, prefix = "near_default", ttl = 60)]
async fn defaulted(symbol: &str) -> Quote {
    Quote { symbol: symbol.to_owned(), version: 1 }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_default_of_duration_max_keeps_copies_without_overflow() {
    let server = RedisServer::start();
    // The default is bounded where it is set (a day), and each copy by the entry's TTL.
    let config = CacheConfig::redis(&server.url()).unwrap().with_near_default(Duration::MAX);
    assert_eq!(config.near().1, Some(cache_runtime::MAX_SETTING));
    let runtime = Runtime::new(support::relaxed(config));
    let deadline = Instant::now() + Duration::from_secs(5);
    while runtime.stats().get(5, "near_default").map_or(0, |s| s.near_hits) == 0 {
        assert!(Instant::now() < deadline, "no near hit within 5 s: {:?}", runtime.near_status());
        assert_eq!(runtime.scope(defaulted("SAP")).await.version, 1);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Without the default, the same function reads Redis every time.
    let plain = redis_runtime(&server.url(), |c| c);
    for _ in 0..3 {
        plain.scope(defaulted("SAP")).await;
    }
    assert_eq!(plain.stats().get(5, "near_default").map_or(0, |s| s.near_hits), 0);
}

static VERSIONED: AtomicU64 = AtomicU64::new(0);

#[cached(db = MarketData, prefix = "near_versioned", ttl = 300, near = "60s", version = 3)]
async fn versioned_quote(symbol: &str) -> Quote {
    Quote { symbol: symbol.to_owned(), version: VERSIONED.load(SeqCst) }
}

/// A copy is kept under the function's base and the key's hash, and a key named by Redis is split
/// back into them: a versioned function's key (`...:v3:{hash}`), under a key namespace (which the
/// notification carries and the tier strips), written by a client that is not this toolkit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_versioned_function_under_a_key_namespace_has_its_copy_dropped_by_a_raw_delete() {
    let server = RedisServer::start();
    let a = redis_runtime(&server.url(), |c| c.with_key_namespace("tenant7").expect("a valid namespace"));
    VERSIONED.store(1, SeqCst);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let before = near_hits(&a, "near_versioned");
        assert_eq!(a.scope(versioned_quote("SAP")).await.version, 1);
        if near_hits(&a, "near_versioned") > before {
            break;
        }
        assert!(Instant::now() < deadline, "no near hit within 5 s: {:?}", a.near_status());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The copy answers, not the store: a change of the source alone changes nothing.
    VERSIONED.store(2, SeqCst);
    assert_eq!(a.scope(versioned_quote("SAP")).await.version, 1);

    let mut raw = server.raw(5).await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("tenant7:near_versioned:versioned_quote:v3:{*}")
        .query_async(&mut raw)
        .await
        .unwrap();
    assert_eq!(keys.len(), 1, "{keys:?}");
    let _: () = redis::cmd("DEL").arg(&keys[0]).query_async(&mut raw).await.unwrap();
    let started = Instant::now();
    while a.scope(versioned_quote("SAP")).await.version != 2 {
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "the copy outlived a raw DEL: {:?}",
            a.near_status()
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert!(a.near_status().dropped >= 1, "{:?}", a.near_status());
}
