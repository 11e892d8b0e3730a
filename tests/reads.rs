//! Lookups on one Redis server, coalesced under load into `MGET`s (`backend/redis/reads.rs`),
//! against a real server: every caller gets its own key's value, the server sees fewer commands
//! than lookups (and none coalesced with the option off), and a stalled server still bounds each
//! call by `op_timeout`.

mod support;

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant};

use cache_runtime::db::Grpc;
use cache_runtime::{cached, CacheConfig, KeyBuilder, Runtime};
use support::{read_all, RedisServer};
use tokio::task::JoinSet;

static CALLS: AtomicUsize = AtomicUsize::new(0);
static STALLED_CALLS: AtomicUsize = AtomicUsize::new(0);

#[cached(db = Grpc, prefix = "reads", ttl = 600)]
async fn page(id: u32) -> String {
    CALLS.fetch_add(1, SeqCst);
    format!("page {id}")
}

/// The same, for the stalled-server test (its own count of calls).
#[cached(db = Grpc, prefix = "reads", ttl = 600)]
async fn stalled(id: u32) -> String {
    STALLED_CALLS.fetch_add(1, SeqCst);
    format!("page {id}")
}

static PATIENT_CALLS: AtomicUsize = AtomicUsize::new(0);

/// The same, for the longest-`op_timeout` test (its own count of calls).
#[cached(db = Grpc, prefix = "reads", ttl = 600)]
async fn patient(id: u32) -> String {
    PATIENT_CALLS.fetch_add(1, SeqCst);
    format!("page {id}")
}

static WRONG_CALLS: AtomicUsize = AtomicUsize::new(0);

/// The same, for the wrong-type test (its own count of calls).
#[cached(db = Grpc, prefix = "reads", ttl = 600)]
async fn wrong(id: u32) -> String {
    WRONG_CALLS.fetch_add(1, SeqCst);
    format!("page {id}")
}

const IDS: u32 = 512;
const ROUNDS: usize = 20;

/// 512 concurrent lookups of 512 warm keys, twenty times: with coalescing (the default) the
/// server answers them with fewer than half as many commands as lookups, some of them `MGET`s;
/// with it off, with one `GET` each. Either way each caller gets its own value and the function never runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_lookups_share_mgets_and_each_gets_its_own_value() {
    let mut seen = Vec::new();
    for coalesce in [true, false] {
        let server = RedisServer::start();
        let runtime = support::redis_runtime(&server.url(), |c| c.with_read_coalescing(coalesce));
        read_all(&runtime, page, IDS, 1).await;
        runtime.flush().await.unwrap();
        let filled = CALLS.load(SeqCst);
        server.reset_stats().await;
        read_all(&runtime, page, IDS, ROUNDS).await;
        assert_eq!(CALLS.load(SeqCst), filled, "every lookup a hit");
        let (gets, mgets) = (server.calls_of("get").await, server.calls_of("mget").await);
        eprintln!(
            "coalescing {coalesce}: {} lookups as {gets} GETs and {mgets} MGETs",
            IDS as usize * ROUNDS
        );
        seen.push((coalesce, gets, mgets));
    }
    let lookups = u64::from(IDS) * ROUNDS as u64;
    let (_, gets, mgets) = seen[0];
    assert!(mgets > 0 && gets + mgets < lookups / 2, "coalesced: {seen:?}");
    // Off: a GET per lookup (and, for the lookups that read the function's generation again,
    // one more in their pipeline).
    let (_, gets, mgets) = seen[1];
    assert!(mgets == 0 && gets >= lookups, "one GET per lookup: {seen:?}");
}

/// A server stopped (`SIGSTOP`) under 64 concurrent lookups: each call still returns (the
/// function runs) within `op_timeout` and a little, whether it was sent alone or in an `MGET`;
/// after that, lookups are hits again, nothing left waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_server_bounds_coalesced_lookups_by_the_op_timeout() {
    let server = RedisServer::start();
    let op_timeout = Duration::from_millis(300);
    // The generation is read once a minute here, so that the stalled lookups are the entry's
    // `GET`s (a lookup due to read it again is a pipeline of its own, never coalesced).
    let config = CacheConfig::redis(&server.url())
        .unwrap()
        .with_op_timeout(op_timeout)
        .with_generation_refresh(Duration::from_secs(60));
    let runtime = Runtime::new(config.with_breaker(1_000, Duration::from_millis(100)));
    read_all(&runtime, stalled, 64, 1).await;
    runtime.flush().await.unwrap();
    server.reset_stats().await;
    server.freeze();
    let mut set = JoinSet::new();
    for id in 0..64 {
        let rt = runtime.clone();
        set.spawn(async move {
            let start = Instant::now();
            assert_eq!(rt.scope(stalled(id)).await, format!("page {id}"));
            start.elapsed()
        });
    }
    let mut slowest = Duration::ZERO;
    while let Some(took) = set.join_next().await {
        slowest = slowest.max(took.unwrap());
    }
    server.thaw();
    eprintln!("64 lookups on a stopped server: slowest {slowest:?} at an op_timeout of {op_timeout:?}");
    // A read that waited for another's reply before its own was sent would take twice this.
    assert!(slowest < op_timeout * 3 / 2, "slowest {slowest:?}, op_timeout {op_timeout:?}");
    // The requests sent during the stall reach the server once it resumes. How many went as
    // `MGET`s depends on the scheduler (a batch's task that an idle worker picks up at once
    // gathers no one), so it is reported, not asserted; the unit tests in `reads.rs` bound a
    // batch on its own.
    tokio::time::sleep(Duration::from_millis(100)).await;
    eprintln!("of which {} went as MGETs", server.calls_of("mget").await);
    // Once the breaker's cool-down is over and the connection answers, a whole round is hits.
    let start = Instant::now();
    loop {
        let before = STALLED_CALLS.load(SeqCst);
        read_all(&runtime, stalled, 64, 1).await;
        if STALLED_CALLS.load(SeqCst) == before {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(3), "no round of hits 3 s after the stall");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A key that holds another type (a hash, written by something else) where an entry should be:
/// read alone (a `GET`, which answers `WRONGTYPE`) or in a batch (an `MGET`, which answers nil),
/// the call runs its function and returns its value, uncached, and the hash is left as it was;
/// the other lookups in its batches are hits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_of_another_type_runs_the_function_alone_or_in_a_batch() {
    let server = RedisServer::start();
    let runtime = support::redis_runtime(&server.url(), |c| c);
    let key = KeyBuilder::new("reads", "reads", "wrong").arg(&300u32).finish().unwrap();
    let mut raw = server.raw(1).await;
    let _: () = redis::cmd("HSET").arg(&key).arg("field").arg("kept").query_async(&mut raw).await.unwrap();
    // Alone: nothing else in flight. Then in batches: its lookup is made in the middle of each
    // burst, when more than eight are in flight.
    assert_eq!(runtime.scope(wrong(300)).await, "page 300");
    assert_eq!(WRONG_CALLS.load(SeqCst), 1);
    read_all(&runtime, wrong, 512, 1).await;
    runtime.flush().await.unwrap();
    server.reset_stats().await;
    let before = WRONG_CALLS.load(SeqCst);
    read_all(&runtime, wrong, 512, 5).await;
    assert!(server.calls_of("mget").await > 0, "some lookups went as MGETs");
    assert_eq!(WRONG_CALLS.load(SeqCst) - before, 5, "only the wrong-type key's calls ran the function");
    let kind: String = redis::cmd("TYPE").arg(&key).query_async(&mut raw).await.unwrap();
    assert_eq!(kind, "hash", "the other type's value is left as it was");
}

/// A caller's `Duration::MAX` as `op_timeout` (bounded when set): lookups are still coalesced,
/// a batch's timer (what is left of its oldest lookup's bound) overflows nothing, and each caller
/// gets its own value from the cache. A batch whose task failed would answer its lookups with an
/// error, and their calls would run the function.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookups_at_the_longest_op_timeout_are_coalesced_and_each_gets_its_own_value() {
    let server = RedisServer::start();
    let runtime = Runtime::new(CacheConfig::redis(&server.url()).unwrap().with_op_timeout(Duration::MAX));
    read_all(&runtime, patient, IDS, 1).await;
    runtime.flush().await.unwrap();
    let filled = PATIENT_CALLS.load(SeqCst);
    assert_eq!(filled, IDS as usize, "each key filled once");
    server.reset_stats().await;
    read_all(&runtime, patient, IDS, 5).await;
    let mgets = server.calls_of("mget").await;
    eprintln!("op_timeout Duration::MAX: {} lookups, {mgets} MGETs", IDS * 5);
    assert_eq!(PATIENT_CALLS.load(SeqCst), filled, "every lookup a hit");
    assert!(mgets > 0, "some lookups went as MGETs");
}

/// A lookup opens a batch on a current-thread runtime, which then stops running tasks (between
/// two `block_on` calls) while eight lookups are in flight on a slow server (a proxy holds each
/// reply 300 ms): a lookup from another runtime joins that batch, and is answered within its
/// `op_timeout`.
#[test]
fn a_lookup_joined_to_a_batch_opened_on_a_current_thread_runtime_is_answered() {
    let server = RedisServer::start();
    let proxy = support::proxy::FaultProxy::start(server.port());
    let cache = support::redis_runtime(&proxy.url(), |c| c.with_op_timeout(Duration::from_millis(1000)));
    let main = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let stalled = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let pages: cache_runtime::Cache<Grpc, u32> =
        cache_runtime::Cache::new("joined", Duration::from_secs(60)).unwrap().with_runtime(cache.clone());
    main.block_on(pages.set("k", &7)).unwrap();
    proxy.set(support::proxy::Fault::Latency(Duration::from_millis(300)));
    let in_flight: Vec<_> = (0..8)
        .map(|_| {
            let pages = pages.clone();
            main.spawn(async move { pages.get("k").await })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(50)); // the eight are sent, each alone
    stalled.block_on(async {
        let mut opener = std::pin::pin!(pages.get("k"));
        // Polled once: the batch is open, its task spawned; then this runtime stops.
        let polled = std::future::poll_fn(|cx| std::task::Poll::Ready(opener.as_mut().poll(cx))).await;
        assert!(polled.is_pending());
    });
    let started = Instant::now();
    let joined = main.block_on(async { tokio::time::timeout(Duration::from_secs(5), pages.get("k")).await });
    let took = started.elapsed();
    assert!(matches!(joined, Ok(Ok(Some(7)))), "{joined:?} after {took:?}");
    assert!(took < Duration::from_millis(1000), "answered within its op_timeout: {took:?}");
    for read in in_flight {
        assert_eq!(main.block_on(read).unwrap().unwrap(), Some(7));
    }
}
