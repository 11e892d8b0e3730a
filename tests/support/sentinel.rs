//! Sentinel for the tests: a primary, a replica and three `redis-sentinel` processes watching
//! them (quorum 2, `down-after-milliseconds` 1000), on free loopback ports, stopped when dropped;
//! or [`OneSentinel`], one sentinel naming a server of the caller's, for the behaviour tests that
//! run on every backend.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::cluster::cli;
use super::tls::Certificates;
use super::{free_port, RedisServer};

pub const SENTINEL_HINT: &str = "redis-sentinel was not found on PATH. The Sentinel tests start three sentinels: \
install it (Debian/Ubuntu: `apt-get install redis-sentinel`, macOS: `brew install redis`) and run the tests again.";

pub struct SentinelSet {
    /// The name the sentinels know the primary by: `cache-{port}`, one per set, so that the
    /// sets the tests run side by side never take each other's announcements for their own.
    pub master: String,
    pub primary: RedisServer,
    pub replica: RedisServer,
    sentinels: Vec<Child>,
    pub ports: Vec<u16>,
    _dir: tempfile::TempDir,
}

impl SentinelSet {
    pub fn start() -> SentinelSet {
        let primary = RedisServer::start();
        let replica =
            RedisServer::start_with_args(&["--replicaof", "127.0.0.1", &primary.port().to_string()]);
        wait_for("the replica to sync", || {
            cli(replica.port(), &["INFO", "replication"]).contains("master_link_status:up")
        });
        let master = format!("cache-{}", primary.port());
        let dir = tempfile::tempdir().unwrap();
        let mut sentinels = Vec::new();
        let mut ports = Vec::new();
        for i in 0..3 {
            let conf = dir.path().join(format!("sentinel{i}.conf"));
            let (port, child) = start_sentinel(&conf, &master, primary.port(), "", None);
            sentinels.push(child);
            ports.push(port);
        }
        let set = SentinelSet { master, primary, replica, sentinels, ports, _dir: dir };
        // Each sentinel knows the replica and the two other sentinels: a failover can be agreed.
        for &port in &set.ports {
            let seen = std::cell::RefCell::new(String::new());
            wait_for_or_show("the sentinels to find each other and the replica", &seen, || {
                let sentinels = cli(port, &["SENTINEL", "SENTINELS", &set.master]);
                let replicas = cli(port, &["SENTINEL", "REPLICAS", &set.master]);
                let found = sentinels.matches("runid").count() == 2
                    && replicas.contains(&set.replica.port().to_string());
                *seen.borrow_mut() = format!(
                    "sentinel :{port} knows these sentinels:\n{sentinels}\nand these replicas (expected :{}):\n{replicas}",
                    set.replica.port()
                );
                found
            });
        }
        set
    }

    /// `redis+sentinel://127.0.0.1:a,127.0.0.1:b,127.0.0.1:c/cache`
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        format!("redis+sentinel://{}/{}", hosts.join(","), self.master)
    }

    /// Freezes sentinel `i` (SIGSTOP): it takes connections and never answers. It is killed
    /// with the set.
    pub fn freeze_sentinel(&self, i: usize) {
        super::signal(self.sentinels[i].id(), "-STOP");
    }

    /// Lets sentinel `i`, frozen by [`Self::freeze_sentinel`], run again (SIGCONT): it answers
    /// what was sent to it meanwhile.
    pub fn thaw_sentinel(&self, i: usize) {
        super::signal(self.sentinels[i].id(), "-CONT");
    }

    /// The port the sentinels name as the primary now.
    pub fn primary_port(&self) -> u16 {
        let reply = cli(self.ports[0], &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", &self.master]);
        reply.lines().nth(1).and_then(|p| p.trim().parse().ok()).unwrap_or(0)
    }
}

/// One sentinel watching a server of the caller's, with no replica: it names that server as the
/// primary, which is all a runtime behind Sentinel needs to serve (`Fixture::sentinel`).
/// Stopped when dropped.
pub struct OneSentinel {
    pub master: String,
    pub port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl OneSentinel {
    pub fn watching(primary: &RedisServer) -> OneSentinel {
        Self::configured(primary.port(), "", None)
    }

    /// One sentinel watching the server on `primary`, with `extra` lines in its configuration
    /// (`requirepass`, `sentinel auth-pass`...); given `tls`, it speaks TLS only (`port 0`), to
    /// its clients and to the server it watches.
    pub fn configured(primary: u16, extra: &str, tls: Option<&Certificates>) -> OneSentinel {
        Self::named(&format!("cache-{primary}"), primary, extra, tls)
    }

    /// [`Self::configured`], the master named `master` (sentinels that disagree on where one
    /// master's primary is, each configured alone).
    pub fn named(master: &str, primary: u16, extra: &str, tls: Option<&Certificates>) -> OneSentinel {
        let master = master.to_owned();
        let dir = tempfile::tempdir().unwrap();
        let (port, child) = start_sentinel(&dir.path().join("sentinel.conf"), &master, primary, extra, tls);
        OneSentinel { master, port, child, _dir: dir }
    }

    /// Freezes it (SIGSTOP): it takes connections and never answers. Killed when dropped.
    pub fn freeze(&self) {
        super::signal(self.child.id(), "-STOP");
    }

    /// Lets it run again after [`Self::freeze`] (SIGCONT): it answers what was sent meanwhile.
    pub fn thaw(&self) {
        super::signal(self.child.id(), "-CONT");
    }

    /// `redis+sentinel://127.0.0.1:port/master`
    pub fn url(&self) -> String {
        format!("redis+sentinel://127.0.0.1:{}/{}", self.port, self.master)
    }
}

impl Drop for OneSentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for SentinelSet {
    fn drop(&mut self) {
        for child in &mut self.sentinels {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A sentinel watching `master` at `primary`, configured in `conf` (with `extra` lines), on a
/// free port, answering there as itself (a port taken by another test's process in the meantime
/// is given up for another); TLS only with `tls`.
fn start_sentinel(
    conf: &std::path::Path,
    master: &str,
    primary: u16,
    extra: &str,
    tls: Option<&Certificates>,
) -> (u16, Child) {
    let mut last = String::new();
    for _ in 0..5 {
        let port = free_port();
        let dir = conf.parent().expect("the set's directory");
        let listen = match tls {
            None => format!("port {port}\n"),
            Some(certs) => format!("port 0\ntls-port {port}\ntls-replication yes\n{}", certs.config_lines()),
        };
        std::fs::write(
            conf,
            format!(
                "{listen}bind 127.0.0.1\ndir {}\nsentinel monitor {master} 127.0.0.1 {primary} 2\n\
                 sentinel down-after-milliseconds {master} 1000\nsentinel failover-timeout {master} 5000\n\
                 sentinel parallel-syncs {master} 1\n{extra}\n",
                dir.display(),
            ),
        )
        .unwrap();
        let child = Command::new("redis-sentinel")
            .arg(conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    panic!("{SENTINEL_HINT}");
                }
                panic!("spawn redis-sentinel: {e}")
            });
        let up = match tls {
            None => super::answering("redis-sentinel", port, child),
            Some(_) => super::tls::listening("redis-sentinel", port, child),
        };
        match up {
            Ok(child) => return (port, child),
            Err(e) => last = e,
        }
    }
    panic!("could not start redis-sentinel: {last}");
}

fn wait_for(what: &str, ready: impl Fn() -> bool) {
    wait_for_or_show(what, &std::cell::RefCell::new(String::new()), ready);
}

/// `wait_for`, showing what `seen` holds last if it times out.
fn wait_for_or_show(what: &str, seen: &std::cell::RefCell<String>, ready: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}; last seen: {}", seen.borrow());
        std::thread::sleep(Duration::from_millis(50));
    }
}
