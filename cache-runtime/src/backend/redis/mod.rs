//! The Redis backend: `pool_size` auto-reconnecting multiplexed connections per DB number, the DB
//! selected when the connection is made (so no `SELECT` ever travels with a command), a circuit
//! breaker in front of them ([`super::breaker`]), the protocol scripts (`scripts.rs`) and the
//! write-behind batcher (`batch.rs`).

pub(crate) mod batch;
pub(crate) mod scripts;

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use self::batch::Batcher;
use self::scripts::{millis, AcquireReply};
use super::breaker::Breaker;
use super::protocol::{bounded, Acquired, FillOutcome, LeaseAsk, Renewal, Write};
use super::store::Store;
use crate::config::{CacheConfig, RedisTarget};
use crate::error::BackendError;

/// How many keys one `SCAN` step asks for when clearing a prefix.
const SCAN_COUNT: usize = 1000;

pub(crate) struct RedisBackend {
    target: RedisTarget,
    connect_timeout: Duration,
    op_timeout: Duration,
    pool_size: usize,
    retry_on_timeout: bool,
    breaker: Arc<Breaker>,
    /// Per DB, `pool_size` multiplexed connections, made on first use.
    dbs: [OnceLock<Pool>; 16],
    batcher: Batcher,
}

/// A DB's connections, handed out round robin.
struct Pool {
    conns: Vec<ConnectionManager>,
    next: AtomicUsize,
}

impl RedisBackend {
    pub(crate) fn new(target: RedisTarget, config: &CacheConfig) -> Self {
        let breaker =
            Arc::new(Breaker::new(config.breaker_threshold, config.breaker_cooldown, target.address()));
        RedisBackend {
            batcher: Batcher::new(config, Arc::clone(&breaker)),
            breaker,
            target,
            connect_timeout: config.connect_timeout,
            op_timeout: config.op_timeout,
            pool_size: config.pool_size.max(1),
            retry_on_timeout: config.retry_on_timeout,
            dbs: Default::default(),
        }
    }

    /// A connection for `db`, round robin over the DB's pool. `ConnectionManager` connects lazily
    /// and reconnects by itself after the server comes back, so a server that is down at start-up
    /// is not an error here: the first command reports it. No connection is opened per call.
    pub(crate) fn conn(&self, db: u8) -> Result<ConnectionManager, BackendError> {
        let cell = &self.dbs[usize::from(db & 0x0f)];
        let pool = match cell.get() {
            Some(pool) => pool,
            None => {
                let conns = (0..self.pool_size).map(|_| self.connect(db)).collect::<Result<_, _>>()?;
                cell.get_or_init(|| Pool { conns, next: AtomicUsize::new(0) })
            }
        };
        let i = if pool.conns.len() == 1 { 0 } else { pool.next.fetch_add(1, Relaxed) % pool.conns.len() };
        Ok(pool.conns[i].clone())
    }

    fn connect(&self, db: u8) -> Result<ConnectionManager, BackendError> {
        let client = redis::Client::open(self.target.for_db(db))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(self.op_timeout))
            // Reconnect attempts are cheap and bounded; the caller's own timeout bounds the wait,
            // and the next command starts a fresh attempt.
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(Duration::from_millis(100));
        Ok(ConnectionManager::new_lazy_with_config(client, config)?)
    }

    /// Runs `op` through the breaker, bounded by `limit`: refused at once while the breaker is
    /// open, and its result moves the breaker.
    async fn guarded<T>(
        &self,
        limit: Duration,
        op: impl Future<Output = Result<T, BackendError>>,
    ) -> Result<T, BackendError> {
        let permit = self.breaker.admit()?;
        let result = bounded(limit, op).await;
        permit.record(&result);
        result
    }
}

/// Every call through the breaker and under `op_timeout`, on the DB's connection.
impl Store for RedisBackend {
    fn kind(&self) -> &'static str {
        "redis"
    }

    async fn get_with<T>(
        &self,
        db: u8,
        key: &str,
        decode: impl Fn(&[u8]) -> T,
    ) -> Result<Option<T>, BackendError> {
        let get = || async {
            let bytes: Option<Vec<u8>> = redis::cmd("GET").arg(key).query_async(&mut self.conn(db)?).await?;
            Ok(bytes.map(|b| decode(&b)))
        };
        match self.guarded(self.op_timeout, get()).await {
            Err(e) if self.retry_on_timeout && e.is_timeout() => self.guarded(self.op_timeout, get()).await,
            result => result,
        }
    }

    /// GET of the entry and of the function's generation, and the generation key's time to
    /// live, pipelined in one round trip: reads only, so a lookup is answered while the server
    /// pauses writes (`CLIENT PAUSE WRITE`, what a failover does). When half of the key's life is
    /// gone, its life is extended in the background (it lives as long as the function is read).
    /// A missing generation key is recreated at the server's clock (one more round trip, a
    /// write), so that entries older than a lost key are never trusted.
    async fn get_with_generation<T>(
        &self,
        db: u8,
        key: &str,
        generation_key: &str,
        generation_life: Duration,
        decode: impl Fn(&[u8]) -> T,
    ) -> Result<(Option<T>, Option<u64>), BackendError> {
        self.guarded(self.op_timeout, async {
            let mut conn = self.conn(db)?;
            let (bytes, generation, left_ms): (Option<Vec<u8>>, Option<u64>, i64) = redis::pipe()
                .cmd("GET")
                .arg(key)
                .cmd("GET")
                .arg(generation_key)
                .cmd("PTTL")
                .arg(generation_key)
                .query_async(&mut conn)
                .await?;
            let generation = match generation {
                Some(g) => {
                    let life = millis(generation_life);
                    if u64::try_from(left_ms).is_ok_and(|left| left < life / 2) {
                        let (mut conn, key, limit) =
                            (conn.clone(), generation_key.to_owned(), self.op_timeout);
                        crate::background::spawn(async move {
                            let mut extend = redis::cmd("PEXPIRE");
                            extend.arg(&key).arg(life);
                            let _ = tokio::time::timeout(limit, extend.query_async::<()>(&mut conn)).await;
                        });
                    }
                    g
                }
                None => scripts::init_generation(&mut conn, generation_key, generation_life).await?,
            };
            Ok((bytes.map(|b| decode(&b)), Some(generation)))
        })
        .await
    }

    /// One `MGET` for all of `keys`.
    async fn get_many_with<T>(
        &self,
        db: u8,
        keys: &[String],
        decode: impl Fn(&[u8]) -> T,
    ) -> Result<Vec<Option<T>>, BackendError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        self.guarded(self.op_timeout, async {
            let values: Vec<Option<Vec<u8>>> =
                redis::cmd("MGET").arg(keys).query_async(&mut self.conn(db)?).await?;
            Ok(values.into_iter().map(|v| v.map(|b| decode(&b))).collect())
        })
        .await
    }

    async fn set(&self, db: u8, key: &str, value: &[u8], ttl: Duration) -> Result<(), BackendError> {
        // PX in the same command: no key is ever left without an expiry.
        let mut cmd = redis::cmd("SET");
        cmd.arg(key).arg(value).arg("PX").arg(millis(ttl));
        self.guarded(self.op_timeout, async { Ok(cmd.query_async::<()>(&mut self.conn(db)?).await?) }).await
    }

    async fn delete(&self, db: u8, key: &str) -> Result<bool, BackendError> {
        let mut cmd = redis::cmd("UNLINK");
        cmd.arg(key);
        self.guarded(self.op_timeout, async { Ok(cmd.query_async::<u64>(&mut self.conn(db)?).await? > 0) })
            .await
    }

    /// One pipeline of `SET ... PX` for all of `items`.
    async fn set_many(&self, db: u8, items: &[(String, Vec<u8>)], ttl: Duration) -> Result<(), BackendError> {
        if items.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for (key, value) in items {
            pipe.cmd("SET").arg(key).arg(value).arg("PX").arg(millis(ttl)).ignore();
        }
        self.guarded(self.op_timeout, async { Ok(pipe.query_async::<()>(&mut self.conn(db)?).await?) }).await
    }

    /// One `UNLINK` for all of `keys`; how many existed.
    async fn delete_many(&self, db: u8, keys: &[String]) -> Result<u64, BackendError> {
        if keys.is_empty() {
            return Ok(0);
        }
        let mut cmd = redis::cmd("UNLINK");
        cmd.arg(keys);
        self.guarded(self.op_timeout, async { Ok(cmd.query_async(&mut self.conn(db)?).await?) }).await
    }

    async fn exists(&self, db: u8, key: &str) -> Result<bool, BackendError> {
        let mut cmd = redis::cmd("EXISTS");
        cmd.arg(key);
        self.guarded(self.op_timeout, async { Ok(cmd.query_async::<u64>(&mut self.conn(db)?).await? > 0) })
            .await
    }

    async fn expire(&self, db: u8, key: &str, ttl: Duration) -> Result<bool, BackendError> {
        let mut cmd = redis::cmd("PEXPIRE");
        cmd.arg(key).arg(millis(ttl));
        self.guarded(self.op_timeout, async { Ok(cmd.query_async::<u64>(&mut self.conn(db)?).await? > 0) })
            .await
    }

    async fn ttl(&self, db: u8, key: &str) -> Result<Option<Duration>, BackendError> {
        let mut cmd = redis::cmd("PTTL");
        cmd.arg(key);
        // -2: no such key; -1: no expiry (never written by this crate).
        let ms: i64 =
            self.guarded(self.op_timeout, async { Ok(cmd.query_async(&mut self.conn(db)?).await?) }).await?;
        Ok(u64::try_from(ms).ok().map(Duration::from_millis))
    }

    /// SCAN + UNLINK over `prefix:*` only: never `KEYS`, never `FLUSHDB`. A clear walks the
    /// keyspace: it gets 100 op timeouts, not one.
    async fn clear(&self, db: u8, prefix: &str) -> Result<u64, BackendError> {
        let walk = async {
            let mut conn = self.conn(db)?;
            let pattern = format!("{prefix}:*");
            let mut cursor: u64 = 0;
            let mut removed = 0;
            loop {
                let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(SCAN_COUNT)
                    .query_async(&mut conn)
                    .await?;
                if !keys.is_empty() {
                    let n: u64 = redis::cmd("UNLINK").arg(&keys).query_async(&mut conn).await?;
                    removed += n;
                }
                if next == 0 {
                    return Ok(removed);
                }
                cursor = next;
            }
        };
        self.guarded(self.op_timeout.saturating_mul(100), walk).await
    }

    async fn ping(&self, db: u8) -> Result<(), BackendError> {
        self.guarded(self.op_timeout, async {
            Ok(redis::cmd("PING").query_async::<()>(&mut self.conn(db)?).await?)
        })
        .await
    }

    /// Asks for the fill lease. If the reply never arrives (the call timed out, or the caller
    /// went away), the server may still run the request later and set a lease nobody holds: a
    /// release of our token then follows it on the same connection, so such a lease lives only
    /// until the server reaches the release.
    async fn acquire<T>(
        &self,
        db: u8,
        key: &str,
        ask: LeaseAsk,
        decode: impl FnOnce(&[u8]) -> T,
    ) -> Result<Acquired<T>, BackendError> {
        self.guarded(self.op_timeout, async {
            let conn = self.conn(db)?;
            let mut orphan = OrphanGuard { conn: Some(conn.clone()), key, token: ask.token };
            let reply =
                scripts::acquire(&mut conn.clone(), key, ask.token, ask.ttl, ask.min_generation).await;
            if reply.is_ok() {
                orphan.conn = None; // answered: whatever we got, we know it
            }
            Ok(match reply? {
                AcquireReply::Value(bytes) => Acquired::Value(decode(&bytes)),
                AcquireReply::Granted(grant) => Acquired::Granted(grant),
                AcquireReply::Busy => Acquired::Busy,
            })
        })
        .await
    }

    async fn renew(
        &self,
        db: u8,
        key: &str,
        token: u64,
        grant: u64,
        lease: Duration,
    ) -> Result<Renewal, BackendError> {
        let renew = async { scripts::renew(&mut self.conn(db)?, key, token, grant, lease).await };
        self.guarded(self.op_timeout, renew).await
    }

    async fn fill(
        &self,
        db: u8,
        key: &str,
        (token, grant): (u64, u64),
        value: &[u8],
        ttl: Duration,
    ) -> Result<FillOutcome, BackendError> {
        let fill = async { scripts::fill(&mut self.conn(db)?, key, token, grant, value, ttl).await };
        self.guarded(self.op_timeout, fill).await
    }

    async fn release(&self, db: u8, key: &str, token: u64) -> Result<(), BackendError> {
        // Not through the breaker: giving a lease back is worth a try even while it is open.
        bounded(self.op_timeout, async { scripts::release(&mut self.conn(db)?, key, token).await }).await
    }

    /// Deletes the entry and its lease and changes its stamp, in one script: a fill holding the
    /// old lease is refused.
    async fn invalidate(&self, db: u8, key: &str, stamp_life: Duration) -> Result<(), BackendError> {
        let invalidate = async { scripts::invalidate(&mut self.conn(db)?, key, stamp_life).await };
        self.guarded(self.op_timeout, invalidate).await
    }

    async fn bump_generation(
        &self,
        db: u8,
        generation_key: &str,
        life: Duration,
    ) -> Result<Option<u64>, BackendError> {
        let bump = async { scripts::bump_generation(&mut self.conn(db)?, generation_key, life).await };
        self.guarded(self.op_timeout, bump).await.map(Some)
    }

    fn writes_behind(&self) -> bool {
        true
    }
    fn offer(&self, db: u8, write: Write) -> Result<(), Write> {
        self.batcher.offer(db, write, || self.conn(db).ok())
    }
    fn offer_handle_write(&self, db: u8, write: Write) -> Result<(), Write> {
        self.batcher.offer_handle_write(db, write, || self.conn(db).ok())
    }
    async fn supersede(&self, limit: Duration, db: u8, key: &str) {
        self.batcher.supersede(limit, db, key).await
    }
    async fn flush(&self, limit: Duration) -> usize {
        self.batcher.flush(limit).await
    }
    async fn shutdown(&self, limit: Duration) -> usize {
        self.batcher.shutdown(limit).await
    }
    fn queued(&self) -> usize {
        self.batcher.queued()
    }
    fn breaker_open(&self) -> bool {
        self.breaker.is_open()
    }
}

/// Armed while a lease request is unanswered; dropped armed, it sends the release of its token
/// on the same connection, so the server runs it right after the request if it runs that at all.
struct OrphanGuard<'a> {
    conn: Option<ConnectionManager>,
    key: &'a str,
    token: u64,
}

impl Drop for OrphanGuard<'_> {
    fn drop(&mut self) {
        let Some(mut conn) = self.conn.take() else { return };
        let (key, token) = (self.key.to_owned(), self.token);
        // Written to the connection now, in order after the request; the answer does not matter
        // (the background task only keeps the future alive until it is sent).
        crate::background::spawn(async move {
            let _ = scripts::release(&mut conn, &key, token).await;
        });
    }
}
