//! The Redis backend: one auto-reconnecting multiplexed connection per DB number, the DB selected
//! when the connection is made (so no `SELECT` ever travels with a command).

use std::sync::OnceLock;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use super::batch::Batcher;
use crate::config::{CacheConfig, RedisTarget};
use crate::error::BackendError;

/// How many keys one `SCAN` step asks for when clearing a prefix.
const SCAN_COUNT: usize = 1000;

/// KEYS: entry, lease. ARGV: token, lease ms, minimum generation. The generation is read from a
/// JSON (`[g,...]`) or MessagePack value (see `value.rs`).
/// A fresh entry: `{1, value}`. Lease taken: `{2}`. Someone else holds it: `{3}`.
const ACQUIRE: &str = r"
local v = redis.call('GET', KEYS[1])
if v then
  local g
  if string.sub(v, 1, 1) == '[' then
    g = tonumber(string.match(v, '^%[(%d+),'))
  else
    local ok, pair = pcall(cmsgpack.unpack, v)
    if ok and type(pair) == 'table' then g = tonumber(pair[1]) end
  end
  if g and g >= tonumber(ARGV[3]) then return {1, v} end
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {2, false} end
return {3, false}
";

/// KEYS: entry, lease. ARGV: token, value, ttl ms. Writes only while the lease is ours.
const FILL: &str = r"
if redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  redis.call('DEL', KEYS[2])
  return 1
end
return 0
";

/// KEYS: generation. ARGV: ttl ms. The new generation is the server's clock in microseconds (or
/// one more than the old one): larger than any generation stamped before, even after the key
/// expired, so entries written before this bump are stale for good.
const BUMP_GENERATION: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
local g = math.max(now, cur + 1)
redis.call('SET', KEYS[1], string.format('%.0f', g), 'PX', ARGV[1])
return g
";

/// KEYS: lease. ARGV: token. Gives the lease up if it is still ours.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

pub(crate) struct Scripts {
    acquire: redis::Script,
    pub(crate) fill: redis::Script,
    release: redis::Script,
    bump_generation: redis::Script,
}

pub(crate) fn scripts() -> &'static Scripts {
    static SCRIPTS: OnceLock<Scripts> = OnceLock::new();
    SCRIPTS.get_or_init(|| Scripts {
        acquire: redis::Script::new(ACQUIRE),
        fill: redis::Script::new(FILL),
        release: redis::Script::new(RELEASE),
        bump_generation: redis::Script::new(BUMP_GENERATION),
    })
}

pub(crate) struct RedisBackend {
    target: RedisTarget,
    connect_timeout: Duration,
    op_timeout: Duration,
    pool_size: usize,
    pub(crate) retry_on_timeout: bool,
    /// Per DB, `pool_size` multiplexed connections, made on first use.
    dbs: [OnceLock<Pool>; 16],
    pub(crate) batcher: Batcher,
}

/// A DB's connections, handed out round robin.
struct Pool {
    conns: Vec<ConnectionManager>,
    next: AtomicUsize,
}

impl RedisBackend {
    pub(crate) fn new(target: RedisTarget, config: &CacheConfig) -> Self {
        RedisBackend {
            target,
            connect_timeout: config.connect_timeout,
            op_timeout: config.op_timeout,
            pool_size: config.pool_size.max(1),
            retry_on_timeout: config.retry_on_timeout,
            dbs: Default::default(),
            batcher: Batcher::new(config),
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

    pub(crate) async fn get_with<T>(
        &self,
        db: u8,
        key: &str,
        decode: impl FnOnce(&[u8]) -> T,
    ) -> Result<Option<T>, BackendError> {
        let mut conn = self.conn(db)?;
        let bytes: Option<Vec<u8>> = redis::cmd("GET").arg(key).query_async(&mut conn).await?;
        Ok(bytes.map(|b| decode(&b)))
    }

    /// GET of the entry and of the function's generation, pipelined in one round trip.
    pub(crate) async fn get_with_generation<T>(
        &self,
        db: u8,
        key: &str,
        generation_key: &str,
        decode: impl FnOnce(&[u8]) -> T,
    ) -> Result<(Option<T>, u64), BackendError> {
        let mut conn = self.conn(db)?;
        let (bytes, generation): (Option<Vec<u8>>, Option<u64>) =
            redis::pipe().cmd("GET").arg(key).cmd("GET").arg(generation_key).query_async(&mut conn).await?;
        Ok((bytes.map(|b| decode(&b)), generation.unwrap_or(0)))
    }

    pub(crate) async fn acquire<T>(
        &self,
        db: u8,
        key: &str,
        ask: super::LeaseAsk,
        decode: impl FnOnce(&[u8]) -> T,
    ) -> Result<super::Acquired<T>, BackendError> {
        let mut conn = self.conn(db)?;
        let (state, value): (u8, Option<Vec<u8>>) = scripts()
            .acquire
            .key(key)
            .key(crate::key::lease_key(key))
            .arg(ask.token)
            .arg(ttl_millis(ask.ttl))
            .arg(ask.min_generation)
            .invoke_async(&mut conn)
            .await?;
        Ok(match (state, value) {
            (1, Some(bytes)) => super::Acquired::Value(decode(&bytes)),
            (2, _) => super::Acquired::Granted,
            _ => super::Acquired::Busy,
        })
    }

    pub(crate) async fn fill(
        &self,
        db: u8,
        key: &str,
        token: u64,
        value: &[u8],
        ttl: Duration,
    ) -> Result<bool, BackendError> {
        fill_on(&mut self.conn(db)?, key, token, value, ttl).await
    }

    pub(crate) async fn release(&self, db: u8, key: &str, token: u64) -> Result<(), BackendError> {
        let mut conn = self.conn(db)?;
        scripts().release.key(crate::key::lease_key(key)).arg(token).invoke_async::<()>(&mut conn).await?;
        Ok(())
    }

    /// Deletes the entry and its lease in one command: a fill holding the old lease is refused.
    pub(crate) async fn invalidate(&self, db: u8, key: &str) -> Result<(), BackendError> {
        let mut conn = self.conn(db)?;
        redis::cmd("UNLINK").arg(key).arg(crate::key::lease_key(key)).query_async::<()>(&mut conn).await?;
        Ok(())
    }

    pub(crate) async fn bump_generation(
        &self,
        db: u8,
        generation_key: &str,
        ttl: Duration,
    ) -> Result<u64, BackendError> {
        let mut conn = self.conn(db)?;
        let generation: u64 = scripts()
            .bump_generation
            .key(generation_key)
            .arg(ttl_millis(ttl))
            .invoke_async(&mut conn)
            .await?;
        Ok(generation)
    }

    pub(crate) async fn set(
        &self,
        db: u8,
        key: &str,
        value: &[u8],
        ttl: Duration,
    ) -> Result<(), BackendError> {
        let mut conn = self.conn(db)?;
        // PX in the same command: no key is ever left without an expiry.
        redis::cmd("SET")
            .arg(key)
            .arg(value)
            .arg("PX")
            .arg(ttl_millis(ttl))
            .query_async::<()>(&mut conn)
            .await?;
        Ok(())
    }

    pub(crate) async fn delete(&self, db: u8, key: &str) -> Result<bool, BackendError> {
        let mut conn = self.conn(db)?;
        let n: u64 = redis::cmd("UNLINK").arg(key).query_async(&mut conn).await?;
        Ok(n > 0)
    }

    /// One `MGET` for all of `keys`.
    pub(crate) async fn get_many_with<T>(
        &self,
        db: u8,
        keys: &[String],
        decode: impl Fn(&[u8]) -> T,
    ) -> Result<Vec<Option<T>>, BackendError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn(db)?;
        let values: Vec<Option<Vec<u8>>> = redis::cmd("MGET").arg(keys).query_async(&mut conn).await?;
        Ok(values.into_iter().map(|v| v.map(|b| decode(&b))).collect())
    }

    /// One pipeline of `SET ... PX` for all of `items`.
    pub(crate) async fn set_many(
        &self,
        db: u8,
        items: &[(String, Vec<u8>)],
        ttl: Duration,
    ) -> Result<(), BackendError> {
        if items.is_empty() {
            return Ok(());
        }
        let mut conn = self.conn(db)?;
        let mut pipe = redis::pipe();
        for (key, value) in items {
            pipe.cmd("SET").arg(key).arg(value).arg("PX").arg(ttl_millis(ttl)).ignore();
        }
        pipe.query_async::<()>(&mut conn).await?;
        Ok(())
    }

    /// One `UNLINK` for all of `keys`; how many existed.
    pub(crate) async fn delete_many(&self, db: u8, keys: &[String]) -> Result<u64, BackendError> {
        if keys.is_empty() {
            return Ok(0);
        }
        let mut conn = self.conn(db)?;
        Ok(redis::cmd("UNLINK").arg(keys).query_async(&mut conn).await?)
    }

    pub(crate) async fn exists(&self, db: u8, key: &str) -> Result<bool, BackendError> {
        let mut conn = self.conn(db)?;
        let n: u64 = redis::cmd("EXISTS").arg(key).query_async(&mut conn).await?;
        Ok(n > 0)
    }

    pub(crate) async fn expire(&self, db: u8, key: &str, ttl: Duration) -> Result<bool, BackendError> {
        let mut conn = self.conn(db)?;
        let n: u64 = redis::cmd("PEXPIRE").arg(key).arg(ttl_millis(ttl)).query_async(&mut conn).await?;
        Ok(n > 0)
    }

    pub(crate) async fn ttl(&self, db: u8, key: &str) -> Result<Option<Duration>, BackendError> {
        let mut conn = self.conn(db)?;
        // -2: no such key; -1: no expiry (never written by this crate).
        let ms: i64 = redis::cmd("PTTL").arg(key).query_async(&mut conn).await?;
        Ok(u64::try_from(ms).ok().map(Duration::from_millis))
    }

    /// SCAN + UNLINK over `prefix:*` only: never `KEYS`, never `FLUSHDB`.
    pub(crate) async fn clear(&self, db: u8, prefix: &str) -> Result<u64, BackendError> {
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
    }

    pub(crate) async fn ping(&self, db: u8) -> Result<(), BackendError> {
        let mut conn = self.conn(db)?;
        redis::cmd("PING").query_async::<()>(&mut conn).await?;
        Ok(())
    }
}

/// The lease-checked fill on `conn`: `true` if written, `false` if its lease was revoked. Loads
/// the script when the server does not have it.
pub(crate) async fn fill_on(
    conn: &mut ConnectionManager,
    key: &str,
    token: u64,
    value: &[u8],
    ttl: Duration,
) -> Result<bool, BackendError> {
    let written: u8 = scripts()
        .fill
        .key(key)
        .key(crate::key::lease_key(key))
        .arg(token)
        .arg(value)
        .arg(ttl_millis(ttl))
        .invoke_async(conn)
        .await?;
    Ok(written == 1)
}

/// Milliseconds for `PX`/`PEXPIRE`, never 0 (Redis rejects 0).
pub(crate) fn ttl_millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}
