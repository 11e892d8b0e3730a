//! Redis Cluster, as the Redis store's [`Connections`]: one multiplexed cluster connection (the
//! `redis` crate's async cluster client, which follows `MOVED`/`ASK` and a failover's new
//! topology), each DB marker in a key namespace of its own (`db{N}:`; Cluster has only DB 0),
//! pipelines kept within one slot, and `clear`/`health_check` on every primary. The near tier's
//! tracking connections, one to every node, are in `tracking.rs`.

mod tracking;

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use redis::cluster::{ClusterClientBuilder, ClusterConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo, SingleNodeRoutingInfo};

use super::redis::connections::{scan_and_unlink, Connections};
use super::redis::tracking::{Strip, Tracking};
use crate::config::targets::{tls_provider, CaCert};
use crate::config::{CacheConfig, ClusterTarget};
use crate::error::BackendError;
use crate::near::NearTier;

pub(crate) struct ClusterNodes {
    target: ClusterTarget,
    connect_timeout: Duration,
    op_timeout: Duration,
    /// What each DB's stored keys start with: `[{namespace}:]db{N}:`.
    prefixes: [String; 16],
    /// `{namespace}:`, or empty.
    namespace: String,
    conn: OnceLock<ClusterConnection>,
}

impl ClusterNodes {
    pub(crate) fn new(target: ClusterTarget, config: &CacheConfig) -> Self {
        ClusterNodes {
            target,
            connect_timeout: config.connect_timeout,
            op_timeout: config.op_timeout,
            prefixes: std::array::from_fn(|db| match config.key_namespace.as_str() {
                "" => format!("db{db}:"),
                namespace => format!("{namespace}:db{db}:"),
            }),
            namespace: match config.key_namespace.as_str() {
                "" => String::new(),
                namespace => format!("{namespace}:"),
            },
            conn: OnceLock::new(),
        }
    }

    fn connect(&self) -> Result<ClusterConnection, BackendError> {
        let target = &self.target;
        let mut builder = ClusterClientBuilder::new(target.nodes.clone())
            .connection_timeout(self.connect_timeout)
            .response_timeout(self.op_timeout)
            // Redirections (MOVED, ASK) are followed at once; TRYAGAIN (a slot half moved) and a
            // failover's CLUSTERDOWN are retried 4 times over about 75 ms, then reported: the
            // function runs, and the call stays well inside `op_timeout`.
            .retries(4)
            .min_retry_wait(5)
            .max_retry_wait(40);
        if let Some(username) = &target.username {
            builder = builder.username(username);
        }
        if let Some(password) = &target.password {
            builder = builder.password(password);
        }
        if target.tls {
            tls_provider();
            builder = builder.tls(redis::TlsMode::Secure);
            // For TLS only: given to plain-TCP nodes, redis-rs would speak TLS to them.
            if let Some(certs) = CaCert::certificates(&target.ca) {
                builder = builder.certs(certs);
            }
        }
        let client = builder.build()?;
        let config = ClusterConfig::new()
            .set_connection_timeout(self.connect_timeout)
            .set_response_timeout(self.op_timeout);
        Ok(client.get_pending_async_connection_with_config(config))
    }

    /// Each primary's `host:port`, from `CLUSTER SLOTS` asked of any node.
    async fn primaries(&self, conn: &mut ClusterConnection) -> Result<Vec<(String, u16)>, BackendError> {
        let slots = conn
            .route_command(
                redis::cmd("CLUSTER").arg("SLOTS").clone(),
                RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
            )
            .await?;
        // [[start, end, [host, port, id, ...], replicas...], ...]
        let ranges: Vec<Vec<redis::Value>> = redis::from_redis_value(slots)?;
        let mut primaries = BTreeSet::new();
        for range in ranges {
            if let Some(node) = range.get(2) {
                let node: Vec<redis::Value> = redis::from_redis_value(node.clone())?;
                if let (Some(host), Some(port)) = (node.first(), node.get(1)) {
                    let host: Option<String> = redis::from_redis_value(host.clone())?;
                    let port: u16 = redis::from_redis_value(port.clone())?;
                    // (`?`, a node whose address is unknown, stays: a walk of it fails, and says so.)
                    let host = match host.filter(|h| !h.is_empty()) {
                        Some(host) => Some(host),
                        None => self.target.host_of_unnamed(port),
                    };
                    if let Some(host) = host {
                        primaries.insert((host, port));
                    }
                }
            }
        }
        Ok(primaries.into_iter().collect())
    }
}

impl Connections for ClusterNodes {
    type Conn = ClusterConnection;

    fn kind(&self) -> &'static str {
        "cluster"
    }

    fn address(&self) -> String {
        format!("cluster {}", self.target.address())
    }

    fn conn(&self, _db: u8) -> Result<ClusterConnection, BackendError> {
        if let Some(conn) = self.conn.get() {
            return Ok(conn.clone());
        }
        let conn = self.connect()?;
        Ok(self.conn.get_or_init(|| conn).clone())
    }

    /// `[{namespace}:]db{N}:{key}`: the entry's hash tag (`{...}`) stays the key's first braces,
    /// so an entry, its lease and its stamp still share a slot.
    fn key<'k>(&self, db: u8, key: &'k str) -> Cow<'k, str> {
        let prefix = &self.prefixes[usize::from(db & 0x0f)];
        let mut stored = String::with_capacity(prefix.len() + key.len());
        stored.push_str(prefix);
        stored.push_str(key);
        Cow::Owned(stored)
    }

    fn pipelines_cross_slots(&self) -> bool {
        false
    }

    fn replicated(&self) -> bool {
        true
    }

    /// Tracking connections to every node (`tracking.rs`), over the prefixes in every DB's
    /// namespace.
    fn track(&self, near: &Arc<NearTier>, prefixes: Vec<String>) -> bool {
        let Ok(conn) = self.conn(0) else { return false };
        let tracked =
            self.prefixes.iter().flat_map(|db| prefixes.iter().map(move |prefix| format!("{db}{prefix}")));
        Tracking {
            source: Box::new(tracking::Nodes::new(conn, self.target.clone())),
            prefixes: tracked.collect(),
            strip: Strip { namespace: self.namespace.clone(), dbs: true },
            connect_timeout: self.connect_timeout,
            op_timeout: self.op_timeout,
        }
        .start(near);
        true
    }

    /// `SCAN` on each primary; each page's keys removed by one `UNLINK` that the client splits
    /// by slot. A primary that fails does not stop the walk: every other one is cleared, and the
    /// first failure is the answer.
    async fn clear(&self, db: u8, pattern: &str) -> Result<u64, BackendError> {
        let mut conn = self.conn(db)?;
        let mut removed = 0;
        let mut failed = None;
        for (host, port) in self.primaries(&mut conn).await? {
            let node = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host, port });
            let walked = scan_and_unlink(pattern, |cmd, by_node| {
                let (mut conn, node) = (conn.clone(), node.clone());
                async move {
                    if by_node {
                        conn.route_command(cmd, node).await
                    } else {
                        cmd.query_async(&mut conn).await
                    }
                }
            })
            .await;
            match walked {
                Ok(count) => removed += count,
                Err(error) => {
                    failed.get_or_insert(error);
                }
            }
        }
        match failed {
            None => Ok(removed),
            Some(error) => Err(error),
        }
    }

    async fn info(&self) -> Result<Vec<String>, BackendError> {
        let mut conn = self.conn(0)?;
        let mut replies = Vec::new();
        for (host, port) in self.primaries(&mut conn).await? {
            let node = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host, port });
            let reply = conn.route_command(redis::cmd("INFO").clone(), node).await?;
            replies.push(redis::from_redis_value(reply)?);
        }
        Ok(replies)
    }

    async fn ping(&self, db: u8) -> Result<(), BackendError> {
        let every_primary =
            RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, Some(ResponsePolicy::AllSucceeded)));
        self.conn(db)?.route_command(redis::cmd("PING").clone(), every_primary).await?;
        Ok(())
    }
}
