//! The near tier's notifications on Cluster: the tracking session (`backend/redis/tracking.rs`)
//! keeps a tracking connection to every node the cluster names, primaries and replicas alike.
//! Each node pushes the keys written on it, and a replica those its primary sends it, so a
//! replica promoted in a failover was already heard before the cluster client reads from it.
//! The nodes are asked again (`CLUSTER NODES`, through the store's cluster connection) with each
//! `PING` of the tracking connections: a node that joins or leaves ends the session, the tier
//! distrusted until every node of the new set tracks. A node flagged failed (`fail`), or not yet
//! known by address (`handshake`, `noaddr`), is not tracked.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};

use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::ConnectionAddr;

use super::super::redis::tracking::{Boxed, Source};
use crate::config::targets::CaCert;
use crate::config::ClusterTarget;
use crate::error::BackendError;

/// The nodes of one cluster, as the tracking session's [`Source`].
pub(crate) struct Nodes {
    conn: ClusterConnection,
    target: ClusterTarget,
    /// A fingerprint of the nodes last seen (their addresses, sorted).
    seen: AtomicU64,
}

impl Nodes {
    pub(crate) fn new(conn: ClusterConnection, target: ClusterTarget) -> Self {
        Nodes { conn, target, seen: AtomicU64::new(0) }
    }

    /// The addresses of the nodes to track, sorted; their fingerprint recorded as seen.
    async fn ask(&self) -> Result<Vec<(String, u16)>, BackendError> {
        let reply = self
            .conn
            .clone()
            .route_command(
                redis::cmd("CLUSTER").arg("NODES").clone(),
                RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
            )
            .await?;
        let text: String = redis::from_redis_value(reply)?;
        let nodes = trackable(&text, |port| self.target.host_of_unnamed(port));
        let mut hasher = DefaultHasher::new();
        nodes.hash(&mut hasher);
        self.seen.store(hasher.finish(), SeqCst);
        Ok(nodes)
    }

    /// A RESP3 client for the node at `host:port`, with the cluster's credentials and TLS.
    fn client(&self, host: String, port: u16) -> Result<redis::Client, BackendError> {
        let template = self.target.nodes.first().cloned().ok_or_else(|| {
            BackendError::from(redis::RedisError::from((
                redis::ErrorKind::Client,
                "no cluster node configured",
            )))
        })?;
        let addr = match template.addr() {
            ConnectionAddr::TcpTls { insecure, tls_params, .. } => {
                ConnectionAddr::TcpTls { host, port, insecure: *insecure, tls_params: tls_params.clone() }
            }
            _ if self.target.tls => ConnectionAddr::TcpTls { host, port, insecure: false, tls_params: None },
            _ => ConnectionAddr::Tcp(host, port),
        };
        let mut settings = template.redis_settings().clone().set_protocol(redis::ProtocolVersion::RESP3);
        if let Some(username) = &self.target.username {
            settings = settings.set_username(username);
        }
        if let Some(password) = &self.target.password {
            settings = settings.set_password(password);
        }
        CaCert::client(template.set_addr(addr).set_redis_settings(settings), &self.target.ca)
    }
}

impl Source for Nodes {
    fn address(&self) -> String {
        format!("cluster {}", self.target.address())
    }

    fn locate(&self) -> Boxed<'_, Result<(Vec<redis::Client>, u64), BackendError>> {
        Box::pin(async move {
            let nodes = self.ask().await?;
            if nodes.is_empty() {
                let none = redis::RedisError::from((
                    redis::ErrorKind::Client,
                    "CLUSTER NODES named no node to track",
                ));
                return Err(none.into());
            }
            let mark = self.mark();
            let clients = nodes.into_iter().map(|(host, port)| self.client(host, port));
            Ok((clients.collect::<Result<_, _>>()?, mark))
        })
    }

    fn mark(&self) -> u64 {
        self.seen.load(SeqCst)
    }

    /// The nodes asked again; if the cluster does not answer, the last answer stands (the
    /// tracking connections' own `PING`s tell whether the nodes are there).
    fn settle(&self) -> Boxed<'_, ()> {
        Box::pin(async move {
            let _ = self.ask().await;
        })
    }
}

/// The nodes of a `CLUSTER NODES` reply to track: each line is `id ip:port@cport[,hostname]
/// flags master ping-sent pong-recv epoch link-state slot...`; those flagged `handshake` or
/// `noaddr` are left out, and those flagged `fail` unless they still own slots. (A primary that
/// comes back before a replica took its slots keeps its `fail` flag for twice the node timeout
/// while clients read its keys from it again: untracked, its copies would never be dropped. While
/// it is down, no session starts, and no copy is answered: the safe side.) A node named with no
/// host (`:7000@17000`: it has never learnt its IP, as in a cluster of one) gets `unnamed`'s.
fn trackable(reply: &str, unnamed: impl Fn(u16) -> Option<String>) -> Vec<(String, u16)> {
    let mut nodes = Vec::new();
    for line in reply.lines() {
        let mut fields = line.split_whitespace();
        let (Some(_id), Some(addr), Some(flags)) = (fields.next(), fields.next(), fields.next()) else {
            continue;
        };
        let owns_slots = fields.nth(5).is_some();
        let mut flags = flags.split(',');
        if flags.any(|flag| matches!(flag, "handshake" | "noaddr") || (flag == "fail" && !owns_slots)) {
            continue;
        }
        let addr = addr.split(['@', ',']).next().unwrap_or(addr);
        let Some((host, port)) = addr.rsplit_once(':') else { continue };
        let (host, Ok(port)) = (host.trim_start_matches('[').trim_end_matches(']'), port.parse::<u16>())
        else {
            continue;
        };
        if port == 0 {
            continue;
        }
        let host = match host {
            "?" => continue,
            "" => match unnamed(port) {
                Some(host) => host,
                None => continue,
            },
            host => host.to_owned(),
        };
        nodes.push((host, port));
    }
    nodes.sort();
    nodes.dedup();
    nodes
}

#[cfg(test)]
mod tests {
    use super::trackable;

    #[test]
    fn every_node_but_unknown_ones_and_failed_ones_without_slots_is_tracked() {
        let reply = "\
07c3 127.0.0.1:30004@40004 slave e7d1 0 1426238317239 4 connected
67ed 127.0.0.1:30002@40002,node-b.example master - 0 1426238316232 2 connected 5461-10922
292f 127.0.0.1:30003@40003 master,fail - 1426238318243 1426238318243 3 disconnected
b3c9 127.0.0.1:30007@40007 master,fail - 1426238318243 1426238318243 7 connected 10923-16383
6ec2 127.0.0.1:30005@40005 master,fail? - 0 1426238316232 5 connected
824f :0@0 master,noaddr - 0 0 0 disconnected
e7d1 127.0.0.1:30001@40001 myself,master - 0 0 1 connected 0-5460
9a1b [::1]:30006@40006 handshake - 0 0 0 connected
";
        assert_eq!(
            trackable(reply, |_| None),
            vec![
                ("127.0.0.1".to_owned(), 30001),
                ("127.0.0.1".to_owned(), 30002),
                ("127.0.0.1".to_owned(), 30004),
                ("127.0.0.1".to_owned(), 30005),
                ("127.0.0.1".to_owned(), 30007),
            ]
        );
    }

    #[test]
    fn a_node_named_without_a_host_is_tracked_at_the_configured_one() {
        // A cluster of one: the node has never learnt its IP.
        let reply = "b52f :7451@17451 myself,master - 0 0 0 connected 0-16383\n";
        assert_eq!(trackable(reply, |port| Some(format!("h{port}"))), vec![("h7451".to_owned(), 7451)]);
        assert!(trackable(reply, |_| None).is_empty());
    }
}
