//! What only Cluster has: DB markers as key namespaces, `clear` on every primary, failover and
//! resharding under load, and an invalidation that a failing primary acknowledged but never
//! replicated. The behaviour suites (`on_every_backend!`) run on Cluster as well; this file holds
//! the rest.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cache_runtime::db::{MarketData, Session};
use cache_runtime::{cached, invalidate, Cache, KeyBuilder, Runtime};
use support::cluster::{cli, until_replicated};
use support::load::Load;
use support::near::{tracking_connections, until_distrusted};
use support::{Fixture, RedisCluster};

#[cached(db = MarketData, prefix = "px", ttl = 300, skip(calls))]
async fn price(symbol: u32, calls: &AtomicUsize) -> u64 {
    calls.fetch_add(1, SeqCst);
    u64::from(symbol) * 2
}

mod sessions {
    use super::*;

    /// Same prefix and function name as `price`, in another DB.
    #[cached(db = Session, prefix = "px", ttl = 300, skip(calls))]
    pub async fn price(symbol: u32, calls: &AtomicUsize) -> u64 {
        calls.fetch_add(1, SeqCst);
        u64::from(symbol) * 3
    }
}

fn price_key(symbol: u32) -> String {
    KeyBuilder::new(module_path!(), "px", "price").arg(&symbol).finish().unwrap()
}

/// A cluster that asks for a password, reached with none or a wrong one: every call runs its
/// function, the refusal (on Cluster, a pipeline of `NOAUTH` answers) opens the breaker, and it
/// is logged once, saying where the password goes; given the password, the same calls hit.
#[tokio::test]
async fn a_cluster_that_refuses_the_credentials_says_so_once() {
    let cluster = RedisCluster::start(2000);
    for node in &cluster.nodes {
        assert!(cli(node.port, &["CONFIG", "SET", "masterauth", "cluster-pw"]).contains("OK"));
        assert!(cli(node.port, &["CONFIG", "SET", "requirepass", "cluster-pw"]).contains("OK"));
    }
    let nodes = cluster.addresses().join(",");
    let runtime = |password: Option<&str>| {
        let vars = std::collections::HashMap::from([
            ("REDIS_CLUSTER_NODES", Some(nodes.clone())),
            ("REDIS_PASSWORD", password.map(str::to_owned)),
        ]);
        Runtime::new(
            cache_runtime::CacheConfig::from_lookup(|name| vars.get(name).cloned().flatten())
                .unwrap()
                .with_op_timeout(Duration::from_secs(2)),
        )
    };
    let calls = AtomicUsize::new(0);
    for (given, password) in [("no password", None), ("a wrong password", Some("wrong"))] {
        let rt = runtime(password);
        let (logs, guard) = support::logs::Logs::capture();
        let before = calls.load(SeqCst);
        for _ in 0..30 {
            assert_eq!(rt.scope(price(1, &calls)).await, 2);
        }
        drop(guard);
        assert_eq!(calls.load(SeqCst), before + 30, "{given}: every call ran its function");
        let stats = rt.stats().get(5, "px").cloned().unwrap();
        assert!(stats.bypassed >= 20, "{given}: the breaker did not open ({} bypassed)", stats.bypassed);
        assert_eq!(
            logs.count("WARN", "REDIS_PASSWORD"),
            1,
            "{given}: the refusal was not logged once, saying where the password goes:\n{}",
            logs.text()
        );
    }
    let rt = runtime(Some("cluster-pw"));
    rt.scope(price(1, &calls)).await;
    rt.flush().await.unwrap();
    let before = calls.load(SeqCst);
    assert_eq!(rt.scope(price(1, &calls)).await, 2);
    assert_eq!(calls.load(SeqCst), before, "given the password, a hit");
}

/// `REDIS_CA_CERT` beside plain-TCP cluster nodes leaves them plain: the calls cache. Before
/// this release the CA made redis-rs speak TLS to them, and every call timed out uncached.
#[tokio::test]
async fn a_ca_leaves_plain_cluster_nodes_plain() {
    let cluster = RedisCluster::shared();
    let certs = support::tls::Certificates::generate();
    let vars = std::collections::HashMap::from([
        ("REDIS_CLUSTER_NODES", cluster.addresses().join(",")),
        ("REDIS_CA_CERT", certs.ca().to_str().unwrap().to_owned()),
        ("CACHE_KEY_NAMESPACE", support::unique_namespace()),
    ]);
    let config = cache_runtime::CacheConfig::from_lookup(|name| vars.get(name).cloned())
        .unwrap()
        .with_op_timeout(Duration::from_secs(2));
    let rt = Runtime::new(config);
    let calls = AtomicUsize::new(0);
    for _ in 0..2 {
        assert_eq!(rt.scope(price(2, &calls)).await, 4);
        rt.flush().await.unwrap();
    }
    assert_eq!(calls.load(SeqCst), 1, "the second call was a hit");
    assert_eq!(rt.stats().get(5, "px").unwrap().backend_errors, 0);
}

/// Cluster has only DB 0: each DB marker's keys get a namespace of their own (`db5:`, `db3:`),
/// and entries, `clear` and invalidation of one DB never touch another's.
#[tokio::test]
async fn each_db_is_a_namespace_of_its_own() {
    let fx = Fixture::cluster().await;
    let ns = fx.cluster.as_ref().unwrap().namespace.clone();
    let (a, b) = (AtomicUsize::new(0), AtomicUsize::new(0));
    assert_eq!(fx.run(price(7, &a)).await, 14);
    assert_eq!(fx.run(sessions::price(7, &b)).await, 21);
    let market = fx.raw_keys(5, "px:price:{*").await.unwrap();
    let session = fx.raw_keys(3, "px:price:{*").await.unwrap();
    assert_eq!(market.len(), 1, "{market:?}");
    assert_eq!(session.len(), 1, "{session:?}");
    // As stored: the DB's namespace, then the key as README gives it.
    let stored: Vec<String> = ::redis::cmd("KEYS")
        .arg(format!("{ns}:*px:*"))
        .query_async(&mut fx.cluster.as_ref().unwrap().conn.clone())
        .await
        .unwrap();
    assert!(stored.contains(&format!("{ns}:db5:{}", market[0])), "{stored:?}");
    assert!(stored.contains(&format!("{ns}:db3:{}", session[0])), "{stored:?}");

    // Invalidating one DB's function leaves the other's entry.
    fx.run(invalidate!(price(7))).await;
    fx.run(invalidate!(sessions::price(..))).await;
    assert_eq!(fx.run(price(7, &a)).await, 14);
    assert_eq!(fx.run(sessions::price(7, &b)).await, 21);
    assert_eq!((a.load(SeqCst), b.load(SeqCst)), (2, 2), "each invalidation dropped its own entry only");
    fx.run(invalidate!(sessions::price(7))).await;
    assert_eq!(fx.run(price(7, &a)).await, 14);
    assert_eq!(a.load(SeqCst), 2, "DB 5's entry survived DB 3's invalidation");

    // `clear` of one DB's prefix leaves the same prefix in another DB.
    let market_handle: Cache<MarketData, u64> =
        Cache::new("shared", Duration::from_secs(60)).unwrap().with_runtime(fx.runtime.clone());
    let session_handle: Cache<Session, u64> =
        Cache::new("shared", Duration::from_secs(60)).unwrap().with_runtime(fx.runtime.clone());
    for i in 0..50u64 {
        market_handle.set(&i.to_string(), &i).await.unwrap();
        session_handle.set(&i.to_string(), &(i + 1)).await.unwrap();
    }
    assert_eq!(market_handle.clear().await.unwrap(), 50);
    assert_eq!(market_handle.get("3").await.unwrap(), None);
    assert_eq!(session_handle.get("3").await.unwrap(), Some(4));
    assert_eq!(fx.raw_keys(3, "shared:*").await.unwrap().len(), 50);
}

/// `clear` walks every primary: keys of one prefix spread over all three are all removed.
#[tokio::test]
async fn clear_reaches_every_primary() {
    let fx = Fixture::cluster().await;
    let ns = fx.cluster.as_ref().unwrap().namespace.clone();
    let handle: Cache<MarketData, u64> =
        Cache::new("spread", Duration::from_secs(60)).unwrap().with_runtime(fx.runtime.clone());
    let items: Vec<(String, u64)> = (0..300u64).map(|i| (format!("k{i}"), i)).collect();
    let pairs: Vec<(&str, &u64)> = items.iter().map(|(k, v)| (k.as_str(), v)).collect();
    handle.set_many(&pairs).await.unwrap();
    let cluster = RedisCluster::shared();
    let per_primary = |pattern: String| -> Vec<usize> {
        cluster
            .primaries()
            .iter()
            .map(|&port| {
                cli(port, &["--scan", "--pattern", &pattern]).lines().filter(|l| !l.is_empty()).count()
            })
            .collect()
    };
    let before = per_primary(format!("{ns}:db5:spread:*"));
    assert_eq!(before.len(), 3, "three primaries");
    assert!(before.iter().all(|&n| n > 0), "keys on every primary: {before:?}");
    assert_eq!(before.iter().sum::<usize>(), 300);
    let keys: Vec<&str> = items.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(handle.get_many(&keys).await.unwrap().iter().flatten().count(), 300);
    assert_eq!(handle.clear().await.unwrap(), 300);
    assert_eq!(per_primary(format!("{ns}:db5:spread:*")), vec![0, 0, 0]);
}

/// A primary that is down does not stop `clear`: the others are cleared, and the error is the
/// answer (before, the walk stopped at the first failing primary, in address order).
#[tokio::test]
async fn clear_goes_past_a_primary_that_is_down() {
    let mut cluster = RedisCluster::start(60_000); // no failover while the test runs
    let (config, ns) = cluster.config();
    let rt = Runtime::new(support::relaxed(config));
    let handle: Cache<MarketData, u64> =
        Cache::new("downed", Duration::from_secs(60)).unwrap().with_runtime(rt);
    let items: Vec<(String, u64)> = (0..300u64).map(|i| (format!("k{i}"), i)).collect();
    let pairs: Vec<(&str, &u64)> = items.iter().map(|(k, v)| (k.as_str(), v)).collect();
    handle.set_many(&pairs).await.unwrap();
    let mut primaries = cluster.primaries();
    primaries.sort();
    let pattern = format!("{ns}:db5:downed:*");
    let left =
        |port: u16| cli(port, &["--scan", "--pattern", &pattern]).lines().filter(|l| !l.is_empty()).count();
    assert!(primaries.iter().all(|&port| left(port) > 0), "keys on every primary");
    // The first primary walked (the lowest address) is down.
    cluster.kill(primaries[0]);
    assert!(handle.clear().await.is_err(), "a primary was not reached: the clear is not complete");
    let after: Vec<usize> = primaries[1..].iter().map(|&port| left(port)).collect();
    assert_eq!(after, vec![0, 0], "the primaries that are up were cleared");
}

/// A cluster of one node (a developer's) names itself with no host: `clear` reaches it,
/// `backend_info` answers, and the near tier trusts its tracking connection (before, the first
/// two failed with "Requested connection not found" and the tier was never trusted).
#[tokio::test]
async fn a_cluster_of_one_node_clears_reports_and_tracks() {
    static SOURCE: AtomicU64 = AtomicU64::new(4);
    let cluster = RedisCluster::single();
    assert!(
        cli(cluster.nodes[0].port, &["CLUSTER", "NODES"]).contains(&format!(" :{}@", cluster.nodes[0].port)),
        "the node names itself with no host"
    );
    let (config, _ns) = cluster.config();
    let rt = Runtime::new(support::relaxed(config));
    let handle: Cache<MarketData, u64> =
        Cache::new("solo", Duration::from_secs(60)).unwrap().with_runtime(rt.clone());
    for key in ["a", "b", "c"] {
        handle.set(key, &1).await.unwrap();
    }
    assert_eq!(handle.clear().await.unwrap(), 3);
    assert_eq!(handle.get("a").await.unwrap(), None);
    rt.backend_info().await.expect("the node's INFO");
    assert_eq!(until_near(&rt, 1, &SOURCE, Duration::from_secs(5)).await, 4001);
}

/// Replication is asynchronous: a primary can acknowledge an invalidation and fail before its
/// replica has it. What the promoted replica then holds (the old entry, no stamp) is planted here
/// by hand, right after the invalidation returned: with the recheck, the old entry is dropped
/// again within the recheck delay; without it (the race this guards against), it is served.
#[tokio::test]
async fn an_invalidation_lost_in_a_failover_is_applied_again() {
    for recheck in [Duration::from_millis(300), Duration::ZERO] {
        let fx = Fixture::cluster_with(|c| c.with_invalidation_recheck(recheck)).await;
        let calls = AtomicUsize::new(0);
        assert_eq!(fx.run(price(11, &calls)).await, 22);
        let key = price_key(11);
        let old: Vec<u8> = fx.raw(5, "GET", &key, &[]).await.unwrap();
        fx.run(invalidate!(price(11))).await;
        // The state a replica promoted before it saw the invalidation is in.
        fx.raw::<()>(5, "SET", &key, &[&old, b"EX", b"300"]).await.unwrap();
        fx.raw::<()>(5, "DEL", &format!("{key}:inv"), &[]).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert_eq!(fx.run(price(11, &calls)).await, 22);
        let executions = calls.load(SeqCst);
        if recheck.is_zero() {
            assert_eq!(executions, 1, "without the recheck the lost invalidation's entry is served");
        } else {
            assert_eq!(executions, 2, "the recheck applied the lost invalidation again");
        }
    }
}

/// Whether `price(symbol)` is answered from the cache now (a call that does not run the body).
async fn is_hit(rt: &Runtime, symbol: u32, executions: &AtomicUsize) -> bool {
    let before = executions.load(SeqCst);
    assert_eq!(rt.scope(price(symbol, executions)).await, u64::from(symbol) * 2);
    let ran = executions.load(SeqCst) - before;
    ran == 0 && {
        let again = executions.load(SeqCst);
        rt.scope(price(symbol, executions)).await;
        executions.load(SeqCst) == again
    }
}

/// Kill a primary under load: no caller gets an error or a wrong value, and caching resumes on
/// the promoted replica (the time it takes is printed: README's failover figure).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_killed_under_load() {
    static EXECUTIONS: AtomicUsize = AtomicUsize::new(0);
    let mut cluster = RedisCluster::start(1000);
    let (config, ns) = cluster.config();
    let rt = Runtime::new(config.with_op_timeout(Duration::from_millis(250)));
    // Warm: every symbol cached.
    for symbol in 0..200 {
        rt.scope(price(symbol, &EXECUTIONS)).await;
    }
    rt.flush().await.unwrap();
    let probe = 42;
    let victim = cluster.primary_of(&format!("{ns}:db5:{}", price_key(probe)));
    assert!(is_hit(&rt, probe, &EXECUTIONS).await, "warm before the kill");
    let load = Load::start(8, {
        let rt = rt.clone();
        move |i| {
            let (rt, symbol) = (rt.clone(), i % 200);
            async move { rt.scope(price(symbol, &EXECUTIONS)).await == u64::from(symbol) * 2 }
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;

    let killed = Instant::now();
    cluster.kill(victim);
    let mut unhealthy_seen = false;
    let resumed = loop {
        if Cache::<MarketData, u64>::new("px", Duration::from_secs(1))
            .unwrap()
            .with_runtime(rt.clone())
            .health_check()
            .await
            .is_err()
        {
            unhealthy_seen = true;
        }
        if is_hit(&rt, probe, &EXECUTIONS).await && killed.elapsed() > Duration::from_millis(100) {
            break killed.elapsed();
        }
        assert!(killed.elapsed() < Duration::from_secs(30), "caching never resumed after the failover");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (calls, wrong) = load.stop().await;
    let stats = rt.stats();
    let px = stats.get(5, "px").unwrap();
    println!(
        "cluster failover: caching resumed {:.2} s after the primary was killed (cluster-node-timeout 1000 ms); \
         {calls} calls under load, {wrong} wrong answers, {} backend errors and {} bypassed calls counted, \
         health_check failed during the failover: {unhealthy_seen}",
        resumed.as_secs_f64(),
        px.backend_errors,
        px.bypassed
    );
    assert_eq!(wrong, 0, "every caller got its function's value");
    assert!(calls > 100, "the load ran ({calls} calls)");
    assert!(unhealthy_seen, "health_check pings every primary: it failed while one was down");
    // A fresh key on the failed-over slots is filled and hit again.
    cluster.wait_until_ready(Duration::from_secs(30));
    let health =
        Cache::<MarketData, u64>::new("px", Duration::from_secs(1)).unwrap().with_runtime(rt.clone());
    health.health_check().await.expect("every primary answers after the failover");
}

/// Migrate the slot of a hot key (`MIGRATING`/`IMPORTING`, `MIGRATE` one key at a time,
/// `SETSLOT NODE`), slowly, while callers read it and a writer invalidates it: no wrong value, the
/// breaker never opens, and the key is cached on its new node afterwards. The backend errors
/// counted while the slot was half moved are printed (README's resharding figure).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_migrated_under_load() {
    static EXECUTIONS: AtomicUsize = AtomicUsize::new(0);
    let cluster = RedisCluster::start(2000);
    let (config, ns) = cluster.config();
    let rt = Runtime::new(config);
    let hot = 5;
    let stored = format!("{ns}:db5:{}", price_key(hot));
    let slot: u16 = cli(cluster.nodes[0].port, &["CLUSTER", "KEYSLOT", &stored]).trim().parse().unwrap();
    let source = cluster.owner_of_slot(slot);
    let target = *cluster.primaries().iter().find(|&&p| p != source).unwrap();
    let (source_id, target_id) = (cluster.node_id(source), cluster.node_id(target));
    rt.scope(price(hot, &EXECUTIONS)).await;

    let stop = Arc::new(AtomicBool::new(false));
    let (wrong, calls) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let (rt, stop, wrong, calls) =
            (rt.clone(), Arc::clone(&stop), Arc::clone(&wrong), Arc::clone(&calls));
        tasks.push(tokio::spawn(async move {
            while !stop.load(SeqCst) {
                if rt.scope(price(hot, &EXECUTIONS)).await != u64::from(hot) * 2 {
                    wrong.fetch_add(1, SeqCst);
                }
                calls.fetch_add(1, SeqCst);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }));
    }
    {
        let (rt, stop) = (rt.clone(), Arc::clone(&stop));
        tasks.push(tokio::spawn(async move {
            while !stop.load(SeqCst) {
                rt.scope(invalidate!(price(hot))).await;
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
        }));
    }
    let slot_arg = slot.to_string();
    let step = Duration::from_millis(300);
    tokio::time::sleep(step).await;
    assert!(cli(target, &["CLUSTER", "SETSLOT", &slot_arg, "IMPORTING", &source_id]).contains("OK"));
    assert!(cli(source, &["CLUSTER", "SETSLOT", &slot_arg, "MIGRATING", &target_id]).contains("OK"));
    tokio::time::sleep(step).await; // ASK redirections for keys not moved yet
    loop {
        let keys = cli(source, &["CLUSTER", "GETKEYSINSLOT", &slot_arg, "1"]);
        let Some(key) = keys.lines().find(|l| !l.trim().is_empty()) else { break };
        let moved =
            cli(source, &["MIGRATE", "127.0.0.1", &target.to_string(), "", "0", "5000", "KEYS", key.trim()]);
        assert!(moved.contains("OK") || moved.contains("NOKEY"), "MIGRATE: {moved}");
        tokio::time::sleep(Duration::from_millis(50)).await; // half moved: entry here, stamp there
    }
    tokio::time::sleep(step).await;
    for port in cluster.primaries() {
        assert!(cli(port, &["CLUSTER", "SETSLOT", &slot_arg, "NODE", &target_id]).contains("OK"));
    }
    tokio::time::sleep(step).await; // MOVED for the old owner's clients
    stop.store(true, SeqCst);
    for t in tasks {
        t.await.expect("no caller panicked");
    }
    assert_eq!(cluster.owner_of_slot(slot), target, "the slot moved");
    let stats = rt.stats();
    let px = stats.get(5, "px").unwrap();
    println!(
        "cluster resharding: slot {slot} moved from :{source} to :{target} under load; {} calls, {} wrong, \
         {} backend errors, {} hits, {} invalidations ({} retried)",
        calls.load(SeqCst),
        wrong.load(SeqCst),
        px.backend_errors,
        px.hits,
        px.invalidations,
        px.invalidation_retries
    );
    assert_eq!(wrong.load(SeqCst), 0);
    assert!(calls.load(SeqCst) > 100);
    // While the slot is half moved, a script whose keys are not all on one node is answered
    // TRYAGAIN (the function runs, counted as a backend error); that is the slot's own keys only:
    // the breaker stays closed for the rest of the cluster.
    assert_eq!(px.bypassed, 0, "TRYAGAIN never opens the breaker");
    // Invalidations the half-moved slot answered TRYAGAIN were queued, and are applied again
    // once it moved: nothing accepted is lost. Wait for the queue, so a retry does not land
    // after the fill below.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while rt.pending_invalidations() > 0 {
        assert!(std::time::Instant::now() < deadline, "queued invalidations applied once the slot moved");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The writer's last invalidation may have come after the last fill: fill once, then read.
    rt.scope(price(hot, &EXECUTIONS)).await;
    rt.flush().await.unwrap();
    assert!(is_hit(&rt, hot, &EXECUTIONS).await, "cached on its new node");
    assert_eq!(cluster.primary_of(&stored), target);
}

/// The write-behind batcher on Cluster: 2,000 fills of distinct keys queued at once (so they
/// batch), written as one pipeline per slot: all written, none refused, no error, and each is a
/// hit afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_batcher_writes_one_pipeline_per_slot() {
    static EXECUTIONS: AtomicUsize = AtomicUsize::new(0);
    let fx = Fixture::cluster().await;
    let fill_all = |rt: Runtime| async move {
        let mut tasks = tokio::task::JoinSet::new();
        for symbol in 0..2000u32 {
            let rt = rt.clone();
            tasks.spawn(async move { rt.scope(price(symbol, &EXECUTIONS)).await == u64::from(symbol) * 2 });
        }
        while let Some(ok) = tasks.join_next().await {
            assert!(ok.unwrap());
        }
    };
    fill_all(fx.runtime.clone()).await;
    let stats = fx.stats().await;
    let px = stats.get(5, "px").unwrap();
    assert_eq!((px.fills, px.backend_errors, px.refused_fills), (2000, 0, 0), "{px:?}");
    assert_eq!(EXECUTIONS.load(SeqCst), 2000);
    assert_eq!(fx.raw_keys(5, "px:price:{*").await.unwrap().len(), 2000);
    fill_all(fx.runtime.clone()).await;
    assert_eq!(EXECUTIONS.load(SeqCst), 2000, "every one a hit");
}

/// With write-behind off, and after `shutdown`, the caller writes its fill itself: on Cluster and
/// under a key namespace on one server, it lands on the key as stored (mapped once), where the
/// next call reads it.
#[tokio::test]
async fn direct_fills_land_where_lookups_read() {
    let fx = Fixture::cluster_with(|c| c.with_batching(256, Duration::ZERO, 0)).await;
    let calls = AtomicUsize::new(0);
    for symbol in [3, 3] {
        assert_eq!(fx.run(price(symbol, &calls)).await, 6);
    }
    assert_eq!(calls.load(SeqCst), 1, "written where it is read");
    assert_eq!(fx.raw_keys(5, "px:price:{*").await.unwrap(), vec![price_key(3)]);
    assert!(fx.stats().await.get(5, "px").unwrap().direct_fills >= 1);
    fx.runtime.shutdown().await.unwrap();
    for symbol in [4, 4] {
        assert_eq!(fx.run(price(symbol, &calls)).await, 8);
    }
    assert_eq!(calls.load(SeqCst), 2, "after shutdown too");

    let fx =
        Fixture::redis_with(|c| c.with_key_namespace("blue").unwrap().with_batching(256, Duration::ZERO, 0));
    for symbol in [5, 5] {
        assert_eq!(fx.run(price(symbol, &calls)).await, 10);
    }
    assert_eq!(calls.load(SeqCst), 3);
    let keys: Vec<String> = ::redis::cmd("KEYS")
        .arg("*px:price:{*")
        .query_async(&mut fx.server.as_ref().unwrap().raw(5).await)
        .await
        .unwrap();
    assert_eq!(keys, vec![format!("blue:{}", price_key(5))]);
}

support::near::near_function!("cl_near");

fn near_key(n: u32) -> String {
    KeyBuilder::new(module_path!(), "cl_near", "near_level").arg(&n).finish().unwrap()
}

/// Near copies on Cluster: every node is tracked, so another process's invalidation of a key (on
/// whichever primary holds it), a function-wide invalidation, and a raw `DEL` drop the copies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_copies_on_every_primary_are_dropped_by_another_process() {
    static SOURCE: AtomicU64 = AtomicU64::new(1);
    let (config, ns) = support::cluster_config();
    let (a, b) = (Runtime::new(config.clone()), Runtime::new(config));
    let keys: Vec<u32> = (1..=12).collect();
    let stored = |n: u32| format!("{ns}:db5:{}", near_key(n));
    let owners: std::collections::BTreeSet<u16> =
        keys.iter().map(|&n| RedisCluster::shared().primary_of(&stored(n))).collect();
    assert_eq!(owners.len(), 3, "the keys are spread over the three primaries");
    let within = Duration::from_secs(5);
    let mut slowest = Duration::ZERO;
    for round in 2..=4u64 {
        for &n in &keys {
            assert_eq!(until_near(&a, n, &SOURCE, within).await, (round - 1) * 1000 + u64::from(n));
        }
        SOURCE.store(round, SeqCst);
        match round {
            2 => {
                for &n in &keys {
                    b.scope(invalidate!(near_level(n))).await;
                }
            }
            3 => b.scope(invalidate!(near_level(..))).await,
            _ => {
                let mut raw = Fixture::cluster().await.cluster.unwrap().conn;
                for &n in &keys {
                    let _: () = ::redis::cmd("DEL").arg(stored(n)).query_async(&mut raw).await.unwrap();
                }
            }
        }
        for &n in &keys {
            let took = until_value(&a, n, &SOURCE, round * 1000 + u64::from(n)).await;
            assert!(
                took < Duration::from_secs(1),
                "round {round}: the copy of {n} outlived its change by {took:?}"
            );
            slowest = slowest.max(took);
        }
    }
    println!("cluster near tier: 36 changes in another process (a key, the function, a raw DEL) reached the copies within {slowest:?}");
    assert!(a.near_status().dropped >= 36, "{:?}", a.near_status());
}

/// A primary killed: every copy is dropped when its tracking connection goes, the node set is
/// tracked again once the cluster has flagged the node failed, and another process's
/// invalidation on the promoted replica drops the copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn near_copies_follow_a_cluster_failover() {
    static SOURCE: AtomicU64 = AtomicU64::new(1);
    let mut cluster = RedisCluster::start(1000);
    let (config, ns) = cluster.config();
    let config = config.with_op_timeout(Duration::from_secs(1));
    let (a, b) = (Runtime::new(config.clone()), Runtime::new(config));
    assert_eq!(until_near(&a, 7, &SOURCE, Duration::from_secs(5)).await, 1007);
    let ports: Vec<u16> =
        cluster.addresses().iter().map(|a| a.rsplit_once(':').unwrap().1.parse().unwrap()).collect();
    for &port in &ports {
        until_tracked(port, 1).await;
    }
    let key = format!("{ns}:db5:{}", near_key(7));
    let other = AtomicU64::new(0);
    until_near(&b, 500, &other, Duration::from_secs(5)).await;
    let old = cluster.primary_of(&key);
    let replica = replica_of(old);
    // The replica pushes the entry's write when it applies it, which on a loaded machine can be
    // after the copy was kept (that drops it: README). Once it has caught up, the copy is made
    // again if it had to be, and from then on nothing drops it but what this test does.
    until_replicated(old, replica).await;
    tokio::time::sleep(Duration::from_millis(300)).await; // its push, on its way
    assert_eq!(until_near(&a, 7, &SOURCE, Duration::from_secs(5)).await, 1007);
    let dropped = a.near_status().dropped;

    // A manual failover (`CLUSTER FAILOVER` on the key's replica): both nodes stay up and were
    // tracked before, so the copy keeps answering, and a change on the new primary reaches it.
    assert!(cli(replica, &["CLUSTER", "FAILOVER"]).contains("OK"));
    let started = Instant::now();
    while cluster.primary_of(&key) != replica {
        assert!(started.elapsed() < Duration::from_secs(10), "the replica never took over");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Longer than the nodes' check (with each `PING`, every 500 ms): the set of nodes is the
    // same, so nothing is dropped (tracking the primaries alone, it would change, and be).
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let before = near_hits(&a);
    assert_eq!(a.scope(near_level(7, &SOURCE)).await, 1007);
    assert_eq!(near_hits(&a), before + 1, "the copy was dropped by a manual failover: {:?}", a.near_status());
    assert_eq!(a.near_status().dropped, dropped, "a copy was dropped by a manual failover");
    SOURCE.store(2, SeqCst);
    b.scope(invalidate!(near_level(7))).await;
    let switched = until_value(&a, 7, &SOURCE, 2007).await;
    assert!(
        switched < Duration::from_secs(1),
        "the copy outlived an invalidation on the new primary: {switched:?}"
    );
    assert_eq!(until_near(&a, 7, &SOURCE, Duration::from_secs(5)).await, 2007);

    // A node joins (no slots yet): the next check of the nodes ends the session, every copy is
    // dropped, and the new set (the new node included) is tracked, by A and by B.
    let joined = cluster.add_node();
    until_tracked(joined, 2).await;
    let before = near_hits(&a);
    assert_eq!(a.scope(near_level(7, &SOURCE)).await, 2007);
    assert_eq!(near_hits(&a), before, "a copy kept before the node joined still answered");
    assert_eq!(until_near(&a, 7, &SOURCE, Duration::from_secs(5)).await, 2007);

    // The new primary killed.
    let killed = Instant::now();
    cluster.kill(replica);
    let distrusted = until_distrusted(&a, killed).await;
    let before = near_hits(&a);
    assert_eq!(a.scope(near_level(7, &SOURCE)).await, 2007);
    assert_eq!(near_hits(&a), before, "a copy answered while a node was not tracked");
    // Near hits again once the failed node is left out and the others tracked.
    let value = until_near(&a, 7, &SOURCE, Duration::from_secs(30)).await;
    let resumed = killed.elapsed();
    assert_eq!(value, 2007);
    until_near(&b, 500, &other, Duration::from_secs(30)).await;
    SOURCE.store(3, SeqCst);
    b.scope(invalidate!(near_level(7))).await;
    let took = until_value(&a, 7, &SOURCE, 3007).await;
    println!(
        "cluster near tier: after a manual failover an invalidation on the new primary reached the copy in {switched:?}; \
         copies dropped {:.0} ms after a primary was killed, near hits again {:.2} s after \
         (cluster-node-timeout 1000 ms); an invalidation on the promoted replica reached the other process's copy after {took:?}",
        distrusted.as_secs_f64() * 1000.0,
        resumed.as_secs_f64()
    );
    assert!(took < Duration::from_secs(1), "the copy outlived an invalidation after the failover: {took:?}");
}

/// Waits until the node on `port` has `n` tracking connections (within 10 s).
async fn until_tracked(port: u16, n: usize) {
    let started = Instant::now();
    loop {
        let now = tracking_connections(port);
        if now == n {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            ":{port} has {now} tracking connections, not {n}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The port of the replica of the primary on `port`.
fn replica_of(port: u16) -> u16 {
    let id = cli(port, &["CLUSTER", "MYID"]).trim().to_owned();
    let replicas = cli(port, &["CLUSTER", "REPLICAS", &id]);
    let addr = replicas.split_whitespace().nth(1).expect("the primary has a replica");
    addr.split('@').next().unwrap().rsplit_once(':').unwrap().1.parse().unwrap()
}

#[cached(db = MarketData, prefix = "px_lost", ttl = 300, skip(calls, body))]
async fn lost_reply(symbol: u32, calls: &AtomicUsize, body: Duration) -> u64 {
    calls.fetch_add(1, SeqCst);
    tokio::time::sleep(body).await;
    u64::from(symbol) * 5
}

/// A lease request the server ran whose reply was lost with its connection (replies held back
/// 300 ms by a fault proxy in front of the key's primary, which the cluster announces at the
/// proxy's port; the connection reset once the request has run): Cluster's client sends the request again on a
/// new connection, with the same token, and the lease script grants a lease that holds its own
/// token again. Before, that second run answered "held by someone else", and the caller waited
/// for its own lease until `lease_ttl`. Asserted: the call took far less than `lease_ttl`, the
/// lease request ran twice on the server (the resend, the race itself, happened in this run),
/// and the entry was filled (the other process hits). Then the same with a body that outlives
/// `lease_ttl`: the lease granted again is renewed, and the other process waits for it (it ran
/// its own function after 0.56 s when renewing cut the lease short instead).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_request_sent_again_after_a_lost_reply_is_granted_its_own_lease() {
    const SLOW: Duration = Duration::from_millis(300);
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    let cluster = RedisCluster::start(5000);
    let (config, ns) = cluster.config();
    let lease = Duration::from_secs(3);
    let config = config
        .with_lease_ttl(lease)
        .with_generation_refresh(Duration::from_secs(3600))
        .with_op_timeout(Duration::from_secs(2));
    let key = KeyBuilder::new(module_path!(), "px_lost", "lost_reply").arg(&7u32).finish().unwrap();
    let primary = cluster.primary_of(&format!("{ns}:db5:{key}"));
    let proxy = support::proxy::FaultProxy::start(primary);
    let announced = format!("127.0.0.1:{}@", proxy.port());
    assert!(
        cli(primary, &["CONFIG", "SET", "cluster-announce-port", &proxy.port().to_string()]).contains("OK")
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    // Every node, replicas included: the client may ask any of them for the slots.
    let ports: Vec<u16> = cluster.nodes.iter().map(|n| n.port).collect();
    while !ports.iter().all(|&p| cli(p, &["CLUSTER", "NODES"]).contains(&announced)) {
        assert!(Instant::now() < deadline, "the cluster did not announce the proxy within 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (a, b) = (Runtime::new(config.clone()), Runtime::new(config));
    for rt in [&a, &b] {
        rt.scope(lost_reply(1, &CALLS, Duration::ZERO)).await; // connected, generations read
    }
    // Every command the key's primary runs is logged (the slow log at a threshold of 0), so the
    // lease requests for the key can be counted: `EVALSHA sha 3 key lease stamp token ms min`,
    // told from a fill by its lease time in milliseconds.
    for setting in [["slowlog-log-slower-than", "0"], ["slowlog-max-len", "10000"]] {
        assert!(cli(primary, &["CONFIG", "SET", setting[0], setting[1]]).contains("OK"));
    }
    assert!(cli(primary, &["SLOWLOG", "RESET"]).contains("OK"));
    let lease_ms = lease.as_millis().to_string();
    let lease_requests = |symbol: u32| {
        let key = KeyBuilder::new(module_path!(), "px_lost", "lost_reply").arg(&symbol).finish().unwrap();
        let lease_key = format!("{ns}:db5:{key}:lease");
        let lease_ms = &lease_ms;
        async move {
            let node = redis::Client::open(format!("redis://127.0.0.1:{primary}")).unwrap();
            let mut node = node.get_multiplexed_async_connection().await.unwrap();
            let log: Vec<redis::Value> =
                redis::cmd("SLOWLOG").arg("GET").arg(-1).query_async(&mut node).await.unwrap();
            log.iter()
                .filter(|entry| {
                    let redis::Value::Array(fields) = entry else { return false };
                    let Some(redis::Value::Array(args)) = fields.get(3) else { return false };
                    let text: Vec<String> = args
                        .iter()
                        .map(|a| match a {
                            redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
                            _ => String::new(),
                        })
                        .collect();
                    text.first().is_some_and(|c| c.eq_ignore_ascii_case("evalsha"))
                        && text.get(4) == Some(&lease_key)
                        && text.get(7) == Some(lease_ms)
                })
                .count()
        }
    };

    proxy.set(support::proxy::Fault::Latency(SLOW));
    let before = CALLS.load(SeqCst);
    let started = Instant::now();
    let call = tokio::spawn({
        let a = a.clone();
        async move { a.scope(lost_reply(7, &CALLS, Duration::ZERO)).await }
    });
    // Cut once the request has run (its reply held back by the proxy), not after a fixed time:
    // on a loaded machine it may not have run yet, or its reply may be through already.
    let deadline = Instant::now() + Duration::from_secs(5);
    while lease_requests(7).await == 0 {
        assert!(Instant::now() < deadline, "the lease request never ran");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    proxy.set(support::proxy::Fault::Pass);
    proxy.cut();
    assert_eq!(call.await.unwrap(), 35);
    let took = started.elapsed();
    a.flush().await.unwrap();
    let ran = lease_requests(7).await;
    let hit = {
        let calls = CALLS.load(SeqCst);
        b.scope(lost_reply(7, &CALLS, Duration::ZERO)).await;
        CALLS.load(SeqCst) == calls
    };
    eprintln!(
        "cluster, a lease request whose reply was lost with its connection: the call took {took:?} \
         (lease {lease:?}), {} execution(s), the lease request ran {ran} times on the key's primary, the other process hit: {hit}",
        CALLS.load(SeqCst) - before - usize::from(!hit)
    );
    assert!(took < lease / 3, "the caller did not wait for its own lease ({took:?})");
    assert_eq!(ran, 2, "the lease request ran, and ran again when the client sent it again");
    assert!(hit, "the entry was filled under the lease granted again");

    // The same lost reply, then a body that outlives the lease (by 1 s): the lease granted
    // again is renewed by its token like any other, so the other process waits for it and
    // hits, rather than taking the lease when it would have expired and running its own.
    let body = lease + Duration::from_secs(1);
    proxy.set(support::proxy::Fault::Latency(SLOW));
    let before = CALLS.load(SeqCst);
    let call = tokio::spawn({
        let a = a.clone();
        async move { a.scope(lost_reply(8, &CALLS, body)).await }
    });
    // Cut once the request has run (its reply held back by the proxy), not after a fixed time:
    // on a loaded machine it may not have run yet, or its reply may be through already.
    let deadline = Instant::now() + Duration::from_secs(5);
    while lease_requests(8).await == 0 {
        assert!(Instant::now() < deadline, "the lease request never ran");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    proxy.set(support::proxy::Fault::Pass);
    proxy.cut();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Counted before the other process asks (its waits for the lease are lease requests too).
    let ran = lease_requests(8).await;
    let started = Instant::now();
    let other = b.scope(lost_reply(8, &CALLS, Duration::ZERO)).await;
    let waited = started.elapsed();
    assert_eq!(call.await.unwrap(), 40);
    eprintln!(
        "cluster, the same with a body of {body:?} (lease {lease:?}): the other process waited {waited:?}, \
         {} execution(s), the lease request ran {ran} times",
        CALLS.load(SeqCst) - before
    );
    assert_eq!(other, 40);
    assert_eq!(CALLS.load(SeqCst) - before, 1, "the other process waited for the renewed lease");
    assert!(
        waited > lease - Duration::from_millis(500),
        "it waited past the lease's first life ({waited:?})"
    );
    assert_eq!(ran, 2, "this request also ran twice (the client's resend)");
}
