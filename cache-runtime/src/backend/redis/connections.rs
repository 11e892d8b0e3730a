//! How the Redis store reaches its server: [`Connections`], what the store asks of a deployment
//! (a connection for a DB, how a DB's keys are named, how to walk every primary), and [`Server`],
//! the one-server deployment. Cluster lives in `backend/cluster`, Sentinel in
//! `backend/sentinel`: each answers the same questions, and the store, its scripts and its
//! batcher are shared.

use std::borrow::Cow;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use redis::aio::ConnectionLike;

use super::link::Link;

use crate::config::{CacheConfig, RedisTarget};
use crate::error::BackendError;
use crate::near::NearTier;

/// How many keys one `SCAN` step asks for when clearing a prefix.
pub(crate) const SCAN_COUNT: usize = 1000;

/// One Redis deployment, as the store sees it.
pub(crate) trait Connections: Send + Sync + 'static {
    /// A multiplexed connection: cloning it is cheap and shares the socket(s).
    type Conn: ConnectionLike + Clone + Send + Sync + 'static;

    /// `redis`, `cluster`, `sentinel`: for logs and `Runtime::backend_kind`.
    fn kind(&self) -> &'static str;

    /// Where it is, for logs (never a password).
    fn address(&self) -> String;

    /// A connection for `db`. Made lazily: a server that is down is reported by the first
    /// command, not here.
    fn conn(&self, db: u8) -> Result<Self::Conn, BackendError>;

    /// A clone of `conn` that keeps sending on the connection it has now, for a request whose
    /// follow-up must reach the server after it (a lease request and its release). One
    /// server's and Sentinel's connections are [`Link`]s, which may change connections under a
    /// clone: they pin it. Cluster's client routes each command itself, unpinned (README,
    /// "Deployments").
    fn pinned(conn: &Self::Conn) -> Self::Conn {
        conn.clone()
    }

    /// `key`'s value in `db` (the key as the server stores it): one `GET`, which one server's
    /// connections and Sentinel's coalesce with others under load (`reads.rs`).
    fn get<'a>(
        &'a self,
        db: u8,
        key: &'a str,
    ) -> impl Future<Output = Result<Option<Vec<u8>>, BackendError>> + Send + 'a {
        async move {
            let mut conn = self.conn(db)?;
            Ok(redis::cmd("GET").arg(key).query_async(&mut conn).await?)
        }
    }

    /// The key as the server stores it. One server keeps each DB number apart itself; Cluster has
    /// only DB 0, so each DB gets a key namespace of its own there.
    fn key<'k>(&self, db: u8, key: &'k str) -> Cow<'k, str>;

    /// Whether one pipeline may hold commands on keys of different slots (not on Cluster).
    fn pipelines_cross_slots(&self) -> bool {
        true
    }

    /// Whether each request (one command or one pipeline) is bounded by `op_timeout` by the
    /// connection itself, waiting for a reconnection included (one server's [`Link`]): then a
    /// call of one request needs no timer of the store's own.
    fn bounds_each_request(&self) -> bool {
        false
    }

    /// Removes every key matching `pattern` (`SCAN` + `UNLINK` on every primary); how many.
    fn clear(&self, db: u8, pattern: &str) -> impl Future<Output = Result<u64, BackendError>> + Send;

    /// Answers when every primary answers.
    fn ping(&self, db: u8) -> impl Future<Output = Result<(), BackendError>> + Send;

    /// `INFO` of every primary.
    fn info(&self) -> impl Future<Output = Result<Vec<String>, BackendError>> + Send;

    /// Whether writes reach a primary that replicas follow and may replace (Cluster, Sentinel):
    /// then each invalidation is checked again a while after it was acknowledged.
    fn replicated(&self) -> bool {
        false
    }

    /// Told of every failed call (Sentinel asks where the primary is now).
    fn failed(&self, _error: &BackendError) {}

    /// Before an invalidation acknowledged at `since` is checked again: where writes go is asked
    /// again if it can change with no call failing, by an answer asked for after `since`
    /// (Sentinel: a primary the sentinels demote while it is alive takes writes until they
    /// convert it to a replica, several seconds later, and those writes are lost then).
    fn confirm(&self, _since: Instant) -> impl Future<Output = ()> + Send + '_ {
        std::future::ready(())
    }

    /// Starts the near tier's notifications (`tracking.rs`); `false` where they are not built.
    fn track(&self, _near: &Arc<NearTier>, _prefixes: Vec<String>) -> bool {
        false
    }
}

/// `SCAN` + `UNLINK` of `pattern` over one node's keyspace, through `send(command, to_the_node)`
/// (`SCAN` goes to the node; `UNLINK` may be routed by its keys); how many keys were removed.
pub(crate) async fn scan_and_unlink<F, Fut>(pattern: &str, mut send: F) -> Result<u64, BackendError>
where
    F: FnMut(redis::Cmd, bool) -> Fut,
    Fut: Future<Output = redis::RedisResult<redis::Value>>,
{
    let mut cursor: u64 = 0;
    let mut removed = 0;
    loop {
        let mut scan = redis::cmd("SCAN");
        scan.arg(cursor).arg("MATCH").arg(pattern).arg("COUNT").arg(SCAN_COUNT);
        let (next, keys): (u64, Vec<Vec<u8>>) = redis::from_redis_value(send(scan, true).await?)?;
        if !keys.is_empty() {
            let mut unlink = redis::cmd("UNLINK");
            unlink.arg(&keys);
            removed += redis::from_redis_value::<u64>(send(unlink, false).await?)?;
        }
        if next == 0 {
            return Ok(removed);
        }
        cursor = next;
    }
}

/// One server: `pool_size` multiplexed connections per DB number, each a [`Link`] that is made
/// again when lost, the DB selected when the connection is made (so no `SELECT` ever travels
/// with a command).
pub(crate) struct Server {
    target: RedisTarget,
    connect_timeout: Duration,
    op_timeout: Duration,
    pool_size: usize,
    /// Whether reads are coalesced under load (`reads.rs`).
    coalesce_reads: bool,
    namespace: String,
    /// Per DB, `pool_size` multiplexed connections, made on first use.
    dbs: [OnceLock<Pool<Link>>; 16],
}

/// A DB's connections, handed out round robin.
pub(crate) struct Pool<C> {
    conns: Vec<C>,
    next: AtomicUsize,
}

impl<C: Clone> Pool<C> {
    pub(crate) fn new(conns: Vec<C>) -> Self {
        Pool { conns, next: AtomicUsize::new(0) }
    }

    pub(crate) fn pick(&self) -> C {
        self.next().clone()
    }

    /// The next connection, not cloned.
    fn next(&self) -> &C {
        let i = if self.conns.len() == 1 { 0 } else { self.next.fetch_add(1, Relaxed) % self.conns.len() };
        &self.conns[i]
    }
}

impl Server {
    pub(crate) fn new(target: RedisTarget, config: &CacheConfig) -> Self {
        Server {
            target,
            connect_timeout: config.connect_timeout,
            op_timeout: config.op_timeout,
            pool_size: config.pool_size.max(1),
            coalesce_reads: config.coalesce_reads,
            namespace: config.key_namespace.clone(),
            dbs: Default::default(),
        }
    }

    /// `db`'s connections, made on first use.
    fn pool(&self, db: u8) -> Result<&Pool<Link>, BackendError> {
        let cell = &self.dbs[usize::from(db & 0x0f)];
        if let Some(pool) = cell.get() {
            return Ok(pool);
        }
        let clients = (0..self.pool_size).map(|_| self.target.client(db)).collect::<Result<Vec<_>, _>>()?;
        // Links start connecting when made: only the pool that is kept makes them.
        Ok(cell.get_or_init(|| {
            let link =
                |client| Link::new(client, db, self.connect_timeout, self.op_timeout, self.coalesce_reads);
            Pool::new(clients.into_iter().map(link).collect())
        }))
    }
}

/// `{namespace}:{key}`, or `key` itself without a namespace.
pub(crate) fn namespaced<'k>(namespace: &str, key: &'k str) -> Cow<'k, str> {
    if namespace.is_empty() {
        Cow::Borrowed(key)
    } else {
        Cow::Owned(format!("{namespace}:{key}"))
    }
}

impl Connections for Server {
    type Conn = Link;

    fn kind(&self) -> &'static str {
        "redis"
    }

    fn address(&self) -> String {
        self.target.address()
    }

    fn conn(&self, db: u8) -> Result<Link, BackendError> {
        Ok(self.pool(db)?.pick())
    }

    fn get<'a>(
        &'a self,
        db: u8,
        key: &'a str,
    ) -> impl Future<Output = Result<Option<Vec<u8>>, BackendError>> + Send + 'a {
        use futures_util::future::{self, Either, TryFutureExt};
        match self.pool(db) {
            Ok(pool) => Either::Left(pool.next().get(key).err_into()),
            Err(error) => Either::Right(future::ready(Err(error))),
        }
    }

    fn key<'k>(&self, _db: u8, key: &'k str) -> Cow<'k, str> {
        namespaced(&self.namespace, key)
    }

    fn bounds_each_request(&self) -> bool {
        true
    }

    fn pinned(conn: &Link) -> Link {
        conn.pinned()
    }

    fn track(&self, near: &Arc<NearTier>, prefixes: Vec<String>) -> bool {
        let namespace =
            if self.namespace.is_empty() { String::new() } else { format!("{}:", self.namespace) };
        super::tracking::Tracking {
            source: Box::new(self.target.clone()),
            prefixes: prefixes.iter().map(|prefix| format!("{namespace}{prefix}")).collect(),
            strip: super::tracking::Strip { namespace, dbs: false },
            connect_timeout: self.connect_timeout,
            op_timeout: self.op_timeout,
        }
        .start(near);
        true
    }

    async fn clear(&self, db: u8, pattern: &str) -> Result<u64, BackendError> {
        let conn = self.conn(db)?;
        scan_and_unlink(pattern, |cmd, _| {
            let mut conn = conn.clone();
            async move { cmd.query_async(&mut conn).await }
        })
        .await
    }

    async fn ping(&self, db: u8) -> Result<(), BackendError> {
        Ok(redis::cmd("PING").query_async::<()>(&mut self.conn(db)?).await?)
    }

    async fn info(&self) -> Result<Vec<String>, BackendError> {
        Ok(vec![redis::cmd("INFO").query_async::<String>(&mut self.conn(0)?).await?])
    }
}
