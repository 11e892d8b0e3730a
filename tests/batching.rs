//! The write-behind batcher and the connection pool, against a real Redis: nothing accepted is
//! lost (queue overflow, shutdown, a guard's drop), a queued fill never overtakes an invalidation,
//! and the pool really spreads over its connections. Speed is measured in `bench/examples/bench.rs`.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::{Duration, Instant};

use cache_runtime::db::{Backtest, Grpc};
use cache_runtime::{cached, invalidate, Cache, CacheConfig, KeyBuilder, Runtime};
use support::proxy::{Fault, FaultProxy};
use support::{Fixture, RedisServer};
use tokio::task::JoinSet;

#[cached(db = Grpc, prefix = "batch", ttl = 600, skip(calls))]
async fn render(id: u32, calls: &AtomicUsize) -> String {
    calls.fetch_add(1, SeqCst);
    format!("page {id}")
}

fn key_of(id: u32) -> String {
    KeyBuilder::new("batching", "batch", "render").arg(&id).finish().unwrap()
}

/// How many of `ids` exist in DB 1, read by a fresh client (not the runtime's connections).
async fn present(server: &RedisServer, ids: impl Iterator<Item = u32>) -> usize {
    let keys: Vec<String> = ids.map(key_of).collect();
    let mut raw = server.raw(1).await;
    let mut found = 0;
    for chunk in keys.chunks(1000) {
        let values: Vec<Option<Vec<u8>>> =
            ::redis::cmd("MGET").arg(chunk).query_async(&mut raw).await.unwrap();
        found += values.iter().filter(|v| v.is_some()).count();
    }
    found
}

/// Misses `ids` concurrently (each a fill) on `runtime`.
async fn fill_all(runtime: &Runtime, ids: std::ops::Range<u32>, calls: &'static AtomicUsize) {
    let mut set = JoinSet::new();
    for id in ids {
        let rt = runtime.clone();
        set.spawn(async move { rt.scope(render(id, calls)).await });
    }
    while let Some(r) = set.join_next().await {
        r.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_flushes_every_accepted_fill() {
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    let server = RedisServer::start();
    let rt = support::redis_runtime(&server.url(), |c| c);
    fill_all(&rt, 0..10_000, &CALLS).await;
    let queued_before = rt.queued_writes();
    rt.shutdown().await.unwrap();
    eprintln!(
        "10,000 fills: {queued_before} still queued when the callers had returned; after shutdown: {}",
        rt.queued_writes()
    );
    assert_eq!(rt.queued_writes(), 0);
    assert_eq!(present(&server, 0..10_000).await, 10_000, "every fill reached the server");
    let s = rt.stats().get(1, "batch").cloned().unwrap();
    assert_eq!((s.fills, s.backend_errors), (10_000, 0), "{s:?}");
    // After shutdown, fills are written before the call returns.
    fill_all(&rt, 10_000..10_010, &CALLS).await;
    assert_eq!(present(&server, 10_000..10_010).await, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tiny_queue_falls_back_to_direct_writes_and_loses_nothing() {
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    let server = RedisServer::start();
    let config = support::relaxed(CacheConfig::redis(&server.url()).unwrap()).with_batching(
        8,
        Duration::from_millis(5),
        4,
    );
    let rt = Runtime::new(config);
    fill_all(&rt, 0..2_000, &CALLS).await;
    rt.flush().await.unwrap();
    let s = rt.stats().get(1, "batch").cloned().unwrap();
    eprintln!("queue of 4: {} fills, {} of them written directly", s.fills, s.direct_fills);
    assert!(s.direct_fills > 0, "a queue of 4 must overflow under 2,000 concurrent fills");
    assert_eq!(s.fills, 2_000);
    assert_eq!(present(&server, 0..2_000).await, 2_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_guard_flushes() {
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    let server = RedisServer::start();
    let rt = Runtime::new(support::relaxed(CacheConfig::redis(&server.url()).unwrap()).with_batching(
        256,
        Duration::from_millis(200),
        16_384,
    ));
    {
        let _guard = rt.shutdown_guard();
        fill_all(&rt, 0..500, &CALLS).await;
        assert!(rt.queued_writes() > 0, "a 200 ms batch delay keeps the fills queued here");
    }
    assert_eq!(rt.queued_writes(), 0);
    assert_eq!(present(&server, 0..500).await, 500);
}

/// Invalidations are direct; fills are queued. A queued fill that an invalidation overtakes is
/// refused by its revoked lease instead of bringing the old value back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_fill_never_overtakes_an_invalidation() {
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    let server = RedisServer::start();
    let rt = Runtime::new(support::relaxed(CacheConfig::redis(&server.url()).unwrap()).with_batching(
        1024,
        Duration::from_millis(300),
        16_384,
    ));
    fill_all(&rt, 0..200, &CALLS).await;
    assert!(rt.queued_writes() > 0, "the fills are still queued");
    for id in 0..200u32 {
        rt.scope(invalidate!(render(id))).await;
    }
    rt.flush().await.unwrap();
    assert_eq!(present(&server, 0..200).await, 0, "no invalidated entry came back");
    assert_eq!(rt.stats().get(1, "batch").unwrap().refused_fills, 200);
}

#[tokio::test]
async fn the_pool_spreads_over_its_connections() {
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    let server = RedisServer::start();
    let rt = support::redis_runtime(&server.url(), |c| c.with_pool_size(3));
    for id in 0..30 {
        rt.scope(render(id, &CALLS)).await;
    }
    let clients: String =
        ::redis::cmd("CLIENT").arg("LIST").query_async(&mut server.raw(0).await).await.unwrap();
    let on_db1 = clients.lines().filter(|l| l.contains(" db=1 ")).count();
    assert_eq!(on_db1, 3, "three connections to DB 1, no more (none opened per call):\n{clients}");
}

async fn batch_api(fx: &mut Fixture) {
    let jobs: Cache<Backtest, u32> =
        Cache::new("jobs", Duration::from_secs(60)).unwrap().with_runtime(fx.runtime.clone());
    let items: Vec<(String, u32)> = (0..100).map(|i| (format!("j{i}"), i)).collect();
    let refs: Vec<(&str, &u32)> = items.iter().map(|(k, v)| (k.as_str(), v)).collect();
    jobs.set_many(&refs).await.unwrap();
    let keys: Vec<&str> = vec!["j0", "missing", "j99", "j50"];
    assert_eq!(jobs.get_many(&keys).await.unwrap(), vec![Some(0), None, Some(99), Some(50)]);
    let ttl = jobs.ttl("j42").await.unwrap().unwrap();
    assert!(
        ttl > Duration::from_secs(55) && ttl <= Duration::from_secs(60),
        "set_many sets the TTL: {ttl:?}"
    );
    assert_eq!(jobs.delete_many(&["j0", "j1", "missing"]).await.unwrap(), 2);
    assert_eq!(jobs.get_many(&["j0", "j1", "j2"]).await.unwrap(), vec![None, None, Some(2)]);
    assert_eq!(jobs.get_many(&[]).await.unwrap(), Vec::<Option<u32>>::new());
}

on_every_backend!(batch_api);

/// After the server restarts (empty, without the fill script), the batcher's connection comes
/// back, loads the script again and writes every fill accepted after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_batcher_reconnects_and_reloads_its_script() {
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    let mut server = RedisServer::start();
    let rt = support::redis_runtime(&server.url(), |c| c);
    fill_all(&rt, 0..100, &CALLS).await;
    rt.flush().await.unwrap();
    assert_eq!(present(&server, 0..100).await, 100);
    server.restart();
    // Let the connections notice; the first calls may fail over while they do.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        fill_all(&rt, 1_000..1_001, &CALLS).await;
        rt.flush().await.unwrap();
        if present(&server, 1_000..1_001).await == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "fills never reached the restarted server");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    fill_all(&rt, 2_000..2_500, &CALLS).await;
    rt.flush().await.unwrap();
    assert_eq!(present(&server, 2_000..2_500).await, 500, "every fill after the restart was written");
}

/// Many `set_behind`s of one key, round after round: the last one wins, and none fails. (Each
/// cancels the one still queued, so few are sent: the order of writes already sent is proved by
/// `later_operations_wait_for_a_set_behind_already_sent`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_keep_their_order() {
    let server = RedisServer::start();
    let rt = support::redis_runtime(&server.url(), |c| c.with_batching(16, Duration::from_millis(1), 16_384));
    let counter: Cache<Backtest, u32> =
        Cache::new("order", Duration::from_secs(60)).unwrap().with_runtime(rt.clone());
    for round in 0..20u32 {
        for value in 0..=round * 50 {
            counter.set_behind("n", &value).await.unwrap();
        }
        rt.flush().await.unwrap();
        assert_eq!(counter.get("n").await.unwrap(), Some(round * 50), "round {round}");
    }
    assert_eq!(rt.stats().get(6, "order").unwrap().backend_errors, 0);
}

/// `flush` waits for the writes accepted before it, not for those other tasks keep adding: under
/// a steady stream of `set_behind`s it returns `Ok` once its own writes have landed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flush_under_load_waits_for_the_writes_before_it() {
    let server = RedisServer::start();
    let rt =
        support::redis_runtime(&server.url(), |c| c.with_batching(256, Duration::from_millis(20), 16_384));
    let jobs: Cache<Backtest, u32> =
        Cache::new("under_load", Duration::from_secs(60)).unwrap().with_runtime(rt.clone());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let (jobs, stop) = (jobs.clone(), stop.clone());
        tokio::spawn(async move {
            let mut i = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                jobs.set_behind(&format!("load{}", i % 500), &i).await.unwrap();
                i += 1;
                if i.is_multiple_of(50) {
                    tokio::task::yield_now().await;
                }
            }
            i
        })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    let mut refused = Vec::new();
    for round in 0..20u32 {
        jobs.set_behind("mine", &round).await.unwrap();
        match rt.flush().await {
            Ok(()) => assert_eq!(jobs.get("mine").await.unwrap(), Some(round), "flushed, so written"),
            Err(unflushed) => refused.push(unflushed.writes),
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let written = load.await.unwrap();
    assert!(written > 1_000, "the load kept writing: {written}");
    assert!(refused.is_empty(), "flush reported later writes as unflushed: {refused:?}");
}

/// `set_behind(k, v)` then `delete(k)` or `set(k, w)`: the later operation wins, though the
/// earlier write sits in the queue (a 150 ms batch delay keeps it there). The same sequence with
/// the delete sent around the handle (a raw client) loses: the race exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_set_or_delete_wins_over_a_queued_set_behind() {
    let server = RedisServer::start();
    let rt =
        support::redis_runtime(&server.url(), |c| c.with_batching(256, Duration::from_millis(150), 1024));
    let jobs: Cache<Backtest, u32> =
        Cache::new("jobs", Duration::from_secs(60)).unwrap().with_runtime(rt.clone());
    jobs.set_behind("deleted", &1).await.unwrap();
    assert!(
        !jobs.delete("deleted").await.unwrap(),
        "nothing was written yet: the queued write was cancelled"
    );
    jobs.set_behind("replaced", &1).await.unwrap();
    jobs.set("replaced", &2).await.unwrap();
    jobs.set_behind("raced", &1).await.unwrap();
    ::redis::cmd("DEL").arg("jobs:raced").query_async::<()>(&mut server.raw(6).await).await.unwrap();
    rt.flush().await.unwrap();
    assert_eq!(jobs.get("deleted").await.unwrap(), None, "delete wins");
    assert_eq!(jobs.get("replaced").await.unwrap(), Some(2), "set wins");
    assert_eq!(jobs.get("raced").await.unwrap(), Some(1), "around the handle, the queued write lands last");
    // Counted as written: `replaced`'s set and `raced`'s set_behind; not the two cancelled ones.
    let counted = rt.stats().get(6, "jobs").unwrap().clone();
    assert_eq!((counted.fills, counted.backend_errors), (2, 0), "{counted:?}");
    // A queue of one, held by a long delay: the second set_behind is written directly, and
    // counted so.
    let full = support::redis_runtime(&server.url(), |c| c.with_batching(256, Duration::from_secs(5), 1));
    let jobs_full: Cache<Backtest, u32> =
        Cache::new("full", Duration::from_secs(60)).unwrap().with_runtime(full.clone());
    jobs_full.set_behind("a", &1).await.unwrap();
    jobs_full.set_behind("b", &2).await.unwrap();
    assert_eq!(jobs_full.get("b").await.unwrap(), Some(2), "written before set_behind returned");
    let counted = full.stats().get(6, "full").unwrap().clone();
    assert_eq!((counted.direct_fills, counted.fills), (1, 1), "{counted:?}");
    // A burst on one connection: each delete lands after its set_behind, whether it found it
    // queued (cancelled) or sent. (On one connection the server keeps the order anyway: the
    // wait for a sent write is proved in `later_operations_wait_for_a_set_behind_already_sent`.)
    let slow = support::redis_runtime(&server.url(), |c| c);
    let jobs: Cache<Backtest, u32> =
        Cache::new("jobs", Duration::from_secs(60)).unwrap().with_runtime(slow.clone());
    for i in 0..200 {
        jobs.set_behind(&format!("burst{i}"), &i).await.unwrap();
        assert!(jobs.delete(&format!("burst{i}")).await.is_ok());
    }
    slow.flush().await.unwrap();
    let left: Vec<Option<u32>> = jobs
        .get_many(
            &(0..200)
                .map(|i| format!("burst{i}"))
                .collect::<Vec<_>>()
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        )
        .await
        .unwrap();
    assert!(left.iter().all(Option::is_none), "every delete landed after its set_behind");
}

/// The value of the writes the proxy holds: a request carrying it waits [`HOLD`] on its way to
/// the server.
const HELD: u32 = 424_242;
const HOLD: Duration = Duration::from_millis(400);

/// `set_behind(key, HELD)` for both keys: sent in one pipeline after the 20 ms batch delay, and
/// held by the proxy when this returns.
async fn held(cache: &Cache<Backtest, u32>, keys: [&str; 2]) {
    for key in keys {
        cache.set_behind(key, &HELD).await.unwrap();
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
}

async fn both(cache: &Cache<Backtest, u32>, keys: [&str; 2]) -> [Option<u32>; 2] {
    [cache.get(keys[0]).await.unwrap(), cache.get(keys[1]).await.unwrap()]
}

/// `set_behind`s already sent (held on their way to the server by a proxy that holds requests
/// carrying [`HELD`]) when a later operation on their key comes, with a pool of two connections:
/// a `delete`; a `delete` after a `set_behind` of the key cancelled in between; a `set_behind`
/// written directly because the queue is full. Each waits for the held write and lands after
/// it. Each is made on two keys, one after the other, so that one of the two goes on the
/// connection the proxy does not hold (round robin). The same `DEL` sent around the handle lands first and
/// loses: the race exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn later_operations_wait_for_a_set_behind_already_sent() {
    let server = RedisServer::start();
    let proxy = FaultProxy::start(server.port());
    let queue_of = |queue| {
        support::redis_runtime(&proxy.url(), move |c| {
            c.with_pool_size(2).with_batching(256, Duration::from_millis(20), queue)
        })
    };
    let (rt, small) = (queue_of(1024), queue_of(2));
    let jobs: Cache<Backtest, u32> =
        Cache::new("sent", Duration::from_secs(60)).unwrap().with_runtime(rt.clone());
    let full: Cache<Backtest, u32> =
        Cache::new("full", Duration::from_secs(60)).unwrap().with_runtime(small.clone());
    for (cache, runtime) in [(&jobs, &rt), (&full, &small)] {
        cache.set_behind("warm", &0).await.unwrap(); // the batcher runs, its script loaded
        runtime.flush().await.unwrap();
    }
    proxy.set(Fault::HoldRequestsWith("424242", HOLD));
    held(&jobs, ["deleted-a", "deleted-b"]).await;
    let started = Instant::now();
    jobs.delete("deleted-a").await.unwrap();
    let waited = started.elapsed();
    jobs.delete("deleted-b").await.unwrap();

    held(&jobs, ["cancelled-a", "cancelled-b"]).await;
    for (key, value) in [("cancelled-a", 1), ("cancelled-b", 1), ("cancelled-a", 2), ("cancelled-b", 2)] {
        jobs.set_behind(key, &value).await.unwrap(); // queued behind the held pipeline; 1 cancelled by 2
    }
    let started = Instant::now();
    jobs.delete("cancelled-a").await.unwrap();
    let waited_past_cancelled = started.elapsed();
    jobs.delete("cancelled-b").await.unwrap();

    for key in ["direct-a", "direct-b"] {
        held(&full, [key, "filler"]).await;
        for (key, value) in [(key, 1), ("filler", 1), (key, 2)] {
            full.set_behind(key, &value).await.unwrap(); // two fill the queue; `key, 2` is written directly
        }
        small.flush().await.unwrap(); // the queue empty again
    }

    held(&jobs, ["raced", "raced-too"]).await;
    ::redis::cmd("DEL").arg("sent:raced").query_async::<()>(&mut server.raw(6).await).await.unwrap();

    rt.flush().await.unwrap();
    small.flush().await.unwrap();
    assert_eq!(both(&jobs, ["deleted-a", "deleted-b"]).await, [None, None], "the deletes landed last");
    assert!(waited >= HOLD / 2, "the first delete waited for the held write ({waited:?})");
    assert_eq!(
        both(&jobs, ["cancelled-a", "cancelled-b"]).await,
        [None, None],
        "a set_behind cancelled in between does not lose what it waited for"
    );
    assert!(
        waited_past_cancelled >= HOLD / 2,
        "that delete waited for the held write ({waited_past_cancelled:?})"
    );
    assert_eq!(
        both(&full, ["direct-a", "direct-b"]).await,
        [Some(2), Some(2)],
        "the direct writes landed last"
    );
    let counted = small.stats().get(6, "full").unwrap().clone();
    assert_eq!(counted.direct_fills, 2, "the queue of two was full: {counted:?}");
    assert_eq!(jobs.get("raced").await.unwrap(), Some(HELD), "around the handle, the held write lands last");
}

/// A `set_behind` whose pipeline timed out, held by the proxy past `op_timeout` and run by the
/// server when it arrives (1.5 s after it was sent, 1 s `op_timeout`): a later `delete` of its key waits until a read sent after it on its
/// connection is answered, so it lands after the late write. Two keys, one after the other, so
/// that one of the two deletes goes on the connection the proxy does not hold. The same `DEL`
/// sent around the handle lands first and loses: the race exists.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_waits_for_a_set_behind_that_timed_out() {
    const OP_TIMEOUT: Duration = Duration::from_secs(1);
    let server = RedisServer::start();
    let proxy = FaultProxy::start(server.port());
    let rt = support::redis_runtime(&proxy.url(), |c| {
        c.with_pool_size(2).with_batching(256, Duration::from_millis(20), 1024).with_op_timeout(OP_TIMEOUT)
    });
    let jobs: Cache<Backtest, u32> =
        Cache::new("late", Duration::from_secs(60)).unwrap().with_runtime(rt.clone());
    jobs.set_behind("warm", &0).await.unwrap(); // the batcher runs, its script loaded
    rt.flush().await.unwrap();
    // Held 1.5 s: past the write's 1 s op_timeout, within the 1 s its confirm then has.
    proxy.set(Fault::HoldRequestsWith("424242", Duration::from_millis(1500)));
    let sent = Instant::now();
    for key in ["deleted-a", "deleted-b", "raced"] {
        jobs.set_behind(key, &HELD).await.unwrap();
    }
    // Timed out (counted failed) at about 1 s; run by the server at about 1.5 s.
    let failed = || rt.stats().get(6, "late").map_or(0, |s| s.backend_errors);
    while failed() < 3 {
        assert!(sent.elapsed() < Duration::from_secs(5), "the held writes never timed out");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    ::redis::cmd("DEL").arg("late:raced").query_async::<()>(&mut server.raw(6).await).await.unwrap();
    let started = Instant::now();
    jobs.delete("deleted-a").await.unwrap();
    let waited = started.elapsed();
    jobs.delete("deleted-b").await.unwrap();
    while sent.elapsed() < Duration::from_millis(2000) {
        tokio::time::sleep(Duration::from_millis(50)).await; // the held writes have landed
    }
    assert_eq!(both(&jobs, ["deleted-a", "deleted-b"]).await, [None, None], "the deletes landed last");
    assert!(waited >= Duration::from_millis(200), "the first delete waited for the late write ({waited:?})");
    assert_eq!(jobs.get("raced").await.unwrap(), Some(HELD), "around the handle, the late write lands last");
    assert_eq!(failed(), 3, "the timed-out writes count as failed");
}
