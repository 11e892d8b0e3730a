//! A local Redis Cluster: 3 primaries and 3 replicas (`redis-server --cluster-enabled yes`, then
//! `redis-cli --cluster create ... --cluster-replicas 1 --cluster-yes`), on free loopback ports
//! in a temp dir. [`RedisCluster::shared`] starts one per test binary (each test gets a key
//! namespace of its own on it); [`RedisCluster::start`] one a test owns and may break.

use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::{free_port, signal, INSTALL_HINT};

pub const CLI_HINT: &str = "redis-cli was not found on PATH. The Cluster tests create their cluster with it: \
install it (Debian/Ubuntu: `apt-get install redis-tools`, macOS: `brew install redis`) and run the tests again.";

/// A node runs under a shell that stops it (SIGKILL) when its stdin closes: when the cluster is
/// dropped, and also when the test binary exits without dropping it (a static, a killed run).
pub struct Node {
    pub port: u16,
    /// Its cluster bus port (not `port + 10000`: both are free ports).
    bus: u16,
    alive: bool,
    /// The shell around the node, and its stdin (the lifeline).
    shell: Option<Child>,
    lifeline: Option<ChildStdin>,
    /// The `redis-server`'s own process id.
    pid: u32,
}

pub struct RedisCluster {
    pub nodes: Vec<Node>,
    _dir: tempfile::TempDir,
}

impl RedisCluster {
    /// The cluster of this test binary, started on first use and stopped when the binary exits.
    pub fn shared() -> &'static RedisCluster {
        static SHARED: OnceLock<RedisCluster> = OnceLock::new();
        SHARED.get_or_init(|| RedisCluster::create(true, 2000))
    }

    /// A cluster of one node holding every slot (a developer's): it never learns its own IP, so
    /// `CLUSTER SLOTS` and `CLUSTER NODES` name it with no host.
    #[allow(dead_code)] // not every test binary starts one
    pub fn single() -> RedisCluster {
        let dir = tempfile::tempdir().expect("temp dir for the cluster");
        let node = spawn_node(dir.path(), false, 5000);
        let added = cli(node.port, &["CLUSTER", "ADDSLOTSRANGE", "0", "16383"]);
        assert!(added.contains("OK"), "CLUSTER ADDSLOTSRANGE: {added}");
        let cluster = RedisCluster { nodes: vec![node], _dir: dir };
        cluster.wait_until_ready(Duration::from_secs(30));
        cluster
    }

    /// A cluster of the caller's own, stopped when dropped; `node_timeout_ms` is how soon a
    /// dead primary's replica takes over.
    pub fn start(node_timeout_ms: u64) -> RedisCluster {
        RedisCluster::create(false, node_timeout_ms)
    }

    fn create(shared: bool, node_timeout_ms: u64) -> RedisCluster {
        let dir = tempfile::tempdir().expect("temp dir for the cluster");
        let mut nodes = Vec::new();
        for i in 0..6 {
            let node_dir = dir.path().join(format!("node{i}"));
            std::fs::create_dir_all(&node_dir).unwrap();
            nodes.push(spawn_node(&node_dir, shared, node_timeout_ms));
        }
        let addresses: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        let output = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .unwrap_or_else(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    panic!("{CLI_HINT}");
                }
                panic!("redis-cli --cluster create: {e}")
            });
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let cluster = RedisCluster { nodes, _dir: dir };
        cluster.wait_until_ready(Duration::from_secs(30));
        cluster
    }

    /// Every node says `cluster_state:ok`, and every replica has synced with its primary.
    pub fn wait_until_ready(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let ready = self.nodes.iter().filter(|n| n.alive).all(|n| {
                let info = cli(n.port, &["CLUSTER", "INFO"]);
                let repl = cli(n.port, &["INFO", "replication"]);
                info.contains("cluster_state:ok")
                    && (repl.contains("role:master") || repl.contains("master_link_status:up"))
            });
            if ready {
                return;
            }
            assert!(Instant::now() < deadline, "the cluster was not ready within {limit:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `host:port` of each node.
    pub fn addresses(&self) -> Vec<String> {
        self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect()
    }

    /// Ports of the nodes that are primaries now.
    pub fn primaries(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|n| n.alive)
            .filter(|n| cli(n.port, &["ROLE"]).starts_with("master"))
            .map(|n| n.port)
            .collect()
    }

    /// The port of the primary that serves `key` now.
    pub fn primary_of(&self, key: &str) -> u16 {
        let slot: u16 = cli(self.nodes[0].port, &["CLUSTER", "KEYSLOT", key]).trim().parse().unwrap();
        self.owner_of_slot(slot)
    }

    pub fn owner_of_slot(&self, slot: u16) -> u16 {
        for port in self.primaries() {
            let nodes = cli(port, &["CLUSTER", "NODES"]);
            for line in nodes.lines().filter(|l| l.contains("myself") && l.contains("master")) {
                for range in line.split_whitespace().skip(8) {
                    let (a, b) = range.split_once('-').unwrap_or((range, range));
                    if let (Ok(a), Ok(b)) = (a.parse::<u16>(), b.parse::<u16>()) {
                        if (a..=b).contains(&slot) {
                            return port;
                        }
                    }
                }
            }
        }
        panic!("no primary owns slot {slot}")
    }

    /// A configuration for this cluster in a key namespace of its own (returned with it).
    pub fn config(&self) -> (cache_runtime::CacheConfig, String) {
        let namespace = super::unique_namespace();
        let config = cache_runtime::CacheConfig::cluster(&self.addresses())
            .expect("loopback nodes parse")
            .with_key_namespace(&namespace)
            .expect("a valid namespace");
        (config, namespace)
    }

    /// Starts a node without slots and makes the cluster meet it; its port, once every node
    /// knows it by address.
    pub fn add_node(&mut self) -> u16 {
        let dir = self._dir.path().join(format!("node{}", self.nodes.len()));
        std::fs::create_dir_all(&dir).unwrap();
        let node = spawn_node(&dir, false, 1000);
        let (port, bus) = (node.port, node.bus);
        self.nodes.push(node);
        let met =
            cli(self.nodes[0].port, &["CLUSTER", "MEET", "127.0.0.1", &port.to_string(), &bus.to_string()]);
        assert!(met.contains("OK"), "CLUSTER MEET: {met}");
        let deadline = Instant::now() + Duration::from_secs(30);
        let id = self.node_id(port);
        while !self.nodes.iter().filter(|n| n.alive).all(|n| {
            cli(n.port, &["CLUSTER", "NODES"]).lines().any(|l| l.starts_with(&id) && !l.contains("handshake"))
        }) {
            assert!(
                Instant::now() < deadline,
                "the cluster did not meet the node on port {port} within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        port
    }

    /// Kills a node (SIGKILL): its replica is promoted after the node timeout.
    pub fn kill(&mut self, port: u16) {
        let node = self.nodes.iter_mut().find(|n| n.port == port).expect("a node of this cluster");
        node.alive = false;
        signal(node.pid, "-KILL");
    }

    /// The node ID of the node on `port`.
    pub fn node_id(&self, port: u16) -> String {
        cli(port, &["CLUSTER", "MYID"]).trim().to_owned()
    }

    pub fn pid(&self, port: u16) -> u32 {
        self.nodes.iter().find(|n| n.port == port).expect("a node of this cluster").pid
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.lifeline.take(); // the shell kills the node
            if let Some(mut shell) = node.shell.take() {
                let _ = shell.wait();
            }
        }
    }
}

/// `redis-cli -p port args...`, its output as text (errors included).
pub fn cli(port: u16, args: &[&str]) -> String {
    let output = Command::new("redis-cli")
        .args(["-p", &port.to_string()])
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{CLI_HINT} ({e})"));
    String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr)
}

fn spawn_node(dir: &std::path::Path, shared: bool, node_timeout_ms: u64) -> Node {
    let mut last = String::new();
    for _ in 0..5 {
        let (port, bus) = (free_port(), free_port());
        if port == bus {
            continue;
        }
        let args: Vec<String> = [
            "--port",
            &port.to_string(),
            "--cluster-port",
            &bus.to_string(),
            "--bind",
            "127.0.0.1",
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            &node_timeout_ms.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            dir.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let spawned = Command::new("sh")
            .arg("-c")
            .arg("redis-server \"$@\" >/dev/null 2>&1 & pid=$!; read _; kill -9 $pid 2>/dev/null")
            .arg("sh")
            .args(&args)
            .stdin(Stdio::piped())
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => panic!("spawn sh for a cluster node: {e}"),
        };
        if Command::new("redis-server").arg("--version").output().is_err() {
            let _ = child.kill();
            panic!("{INSTALL_HINT}");
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut up = false;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            if super::ping(port) {
                up = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if !up {
            drop(child.stdin.take());
            let _ = child.wait();
            last = format!("a cluster node on port {port} did not start");
            continue;
        }
        let info = cli(port, &["INFO", "server"]);
        let pid = info
            .lines()
            .find_map(|l| l.strip_prefix("process_id:"))
            .and_then(|p| p.trim().parse().ok())
            .expect("the node's process id");
        let lifeline = child.stdin.take();
        // The shared cluster is a static: never dropped, its shells end with this binary.
        let shell = if shared {
            std::mem::forget(child);
            None
        } else {
            Some(child)
        };
        return Node { port, bus, alive: true, shell, lifeline, pid };
    }
    panic!("could not start a cluster node: {last}");
}

/// Waits until the replica on `replica` has applied everything its primary on `primary` had sent
/// when this was called (its `slave_repl_offset` reached the primary's `master_repl_offset`),
/// within 10 s.
pub async fn until_replicated(primary: u16, replica: u16) {
    let offset = |port: u16, field: &str| -> u64 {
        let info = cli(port, &["INFO", "replication"]);
        let value = info.lines().find_map(|l| l.trim().strip_prefix(field)?.strip_prefix(':'));
        value.and_then(|v| v.trim().parse().ok()).unwrap_or_else(|| panic!("no {field} in {info}"))
    };
    let started = Instant::now();
    let target = offset(primary, "master_repl_offset");
    while offset(replica, "slave_repl_offset") < target {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            ":{replica} did not catch up with :{primary} in 10 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
