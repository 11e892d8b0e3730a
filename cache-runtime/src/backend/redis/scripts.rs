//! The lease, fill, invalidation and generation protocols as Lua scripts, each with the one
//! function that invokes it (the NOSCRIPT reload is inside `redis::Script`).
//!
//! Keys of one call share the entry's hash tag (`K`, `K:lease`, `K:inv`), so each script touches
//! one Cluster slot. Times are the server's clock in microseconds (`TIME`), so no two clients'
//! clocks are ever compared.

use std::sync::OnceLock;
use std::time::Duration;

use redis::aio::ConnectionManager;

use crate::backend::{FillOutcome, Renewal};
use crate::error::BackendError;
use crate::key;

/// KEYS: entry, lease. ARGV: token, lease ms, minimum generation. The generation is read from a
/// JSON (`[g,...]`) or MessagePack value (see `value.rs`).
/// A fresh entry: `{1, value}`. Lease taken: `{2, granted_at}`. Someone else holds it: `{3}`.
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
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local t = redis.call('TIME')
  return {2, t[1] * 1000000 + t[2]}
end
return {3}
";

/// KEYS: entry, lease, invalidation stamp. ARGV: token, value, ttl ms, granted_at.
/// 1: written under our lease. 2: our lease aged out (nobody revoked it, nobody holds it now):
/// written. 0: an invalidation of this key came after our grant: refused. 3: our lease aged out
/// and another caller holds the key's lease now: not written (it will fill), the value is not
/// stale.
const FILL: &str = r"
local l = redis.call('GET', KEYS[2])
if l == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  redis.call('DEL', KEYS[2])
  return 1
end
if tonumber(redis.call('GET', KEYS[3]) or '0') >= tonumber(ARGV[4]) then return 0 end
if not l then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 2
end
return 3
";

/// KEYS: lease, invalidation stamp. ARGV: token, lease ms, granted_at.
/// 1: renewed (or taken back after it aged, nobody else having taken it). 0: revoked by an
/// invalidation. 2: aged, and another caller holds it now.
const RENEW: &str = r"
local l = redis.call('GET', KEYS[1])
if l == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if tonumber(redis.call('GET', KEYS[2]) or '0') >= tonumber(ARGV[3]) then return 0 end
if not l then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 2
";

/// KEYS: entry, lease, invalidation stamp. ARGV: stamp ms. Drops the entry, revokes its lease,
/// and stamps the time so that a fill whose lease was granted before it is refused even if that
/// lease had already aged out.
const INVALIDATE: &str = r"
redis.call('UNLINK', KEYS[1], KEYS[2])
local t = redis.call('TIME')
redis.call('SET', KEYS[3], string.format('%.0f', t[1] * 1000000 + t[2]), 'PX', ARGV[1])
return 1
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

/// KEYS: generation. ARGV: ttl ms. A generation key that is missing (never written, evicted,
/// deleted) is recreated as the server's clock: every entry written before is then stale, so a
/// lost key can never let an entry older than the last invalidation be served.
const INIT_GENERATION: &str = r"
local t = redis.call('TIME')
local now = string.format('%.0f', tonumber(t[1]) * 1000000 + tonumber(t[2]))
redis.call('SET', KEYS[1], now, 'NX', 'PX', ARGV[1])
return tonumber(redis.call('GET', KEYS[1]))
";

/// KEYS: lease. ARGV: token. Gives the lease up if it is still ours.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

pub(crate) struct Scripts {
    acquire: redis::Script,
    pub(crate) fill: redis::Script,
    renew: redis::Script,
    invalidate: redis::Script,
    bump_generation: redis::Script,
    init_generation: redis::Script,
}

pub(crate) fn scripts() -> &'static Scripts {
    static SCRIPTS: OnceLock<Scripts> = OnceLock::new();
    SCRIPTS.get_or_init(|| Scripts {
        acquire: redis::Script::new(ACQUIRE),
        fill: redis::Script::new(FILL),
        renew: redis::Script::new(RENEW),
        invalidate: redis::Script::new(INVALIDATE),
        bump_generation: redis::Script::new(BUMP_GENERATION),
        init_generation: redis::Script::new(INIT_GENERATION),
    })
}

/// What the acquire script answered: a value, the lease (granted at this server time), or busy.
pub(crate) enum AcquireReply {
    Value(Vec<u8>),
    Granted(u64),
    Busy,
}

pub(crate) async fn acquire(
    conn: &mut ConnectionManager,
    key: &str,
    token: u64,
    lease: Duration,
    min_generation: u64,
) -> Result<AcquireReply, BackendError> {
    let reply: Vec<redis::Value> = scripts()
        .acquire
        .key(key)
        .key(key::lease_key(key))
        .arg(token)
        .arg(millis(lease))
        .arg(min_generation)
        .invoke_async(conn)
        .await?;
    Ok(match reply.as_slice() {
        [redis::Value::Int(1), redis::Value::BulkString(bytes)] => AcquireReply::Value(bytes.clone()),
        [redis::Value::Int(2), redis::Value::Int(granted_at)] => {
            AcquireReply::Granted(u64::try_from(*granted_at).unwrap_or(0))
        }
        [redis::Value::Int(3)] => AcquireReply::Busy,
        other => {
            return Err(BackendError::from(redis::RedisError::from((
                redis::ErrorKind::UnexpectedReturnType,
                "unexpected reply to the lease request",
                format!("{other:?}"),
            ))))
        }
    })
}

/// The lease-checked fill on `conn` (see [`FILL`]).
pub(crate) async fn fill(
    conn: &mut ConnectionManager,
    key: &str,
    token: u64,
    granted_at: u64,
    value: &[u8],
    ttl: Duration,
) -> Result<FillOutcome, BackendError> {
    let answer: u8 = scripts()
        .fill
        .key(key)
        .key(key::lease_key(key))
        .key(key::invalidation_key(key))
        .arg(token)
        .arg(value)
        .arg(millis(ttl))
        .arg(granted_at)
        .invoke_async(conn)
        .await?;
    Ok(FillOutcome::from_code(answer))
}

/// The same fill as one `EVALSHA` in a pipeline (the batcher reloads the script on NOSCRIPT).
pub(crate) fn pipe_fill(
    pipe: &mut redis::Pipeline,
    key: &str,
    token: u64,
    granted_at: u64,
    value: &[u8],
    ttl: Duration,
) {
    pipe.cmd("EVALSHA")
        .arg(scripts().fill.get_hash())
        .arg(3)
        .arg(key)
        .arg(key::lease_key(key))
        .arg(key::invalidation_key(key))
        .arg(token)
        .arg(value)
        .arg(millis(ttl))
        .arg(granted_at);
}

pub(crate) async fn renew(
    conn: &mut ConnectionManager,
    key: &str,
    token: u64,
    granted_at: u64,
    lease: Duration,
) -> Result<Renewal, BackendError> {
    let answer: u8 = scripts()
        .renew
        .key(key::lease_key(key))
        .key(key::invalidation_key(key))
        .arg(token)
        .arg(millis(lease))
        .arg(granted_at)
        .invoke_async(conn)
        .await?;
    Ok(match answer {
        1 => Renewal::Renewed,
        0 => Renewal::Revoked,
        _ => Renewal::Superseded,
    })
}

pub(crate) async fn invalidate(
    conn: &mut ConnectionManager,
    key: &str,
    stamp_life: Duration,
) -> Result<(), BackendError> {
    scripts()
        .invalidate
        .key(key)
        .key(key::lease_key(key))
        .key(key::invalidation_key(key))
        .arg(millis(stamp_life))
        .invoke_async::<()>(conn)
        .await?;
    Ok(())
}

/// Gives a lease back. Sent as `EVAL` with the script's text, not `EVALSHA`: it is often the
/// first script a connection sends after a timeout (the release of an orphaned lease request),
/// and a NOSCRIPT answer that arrives after the caller stopped waiting would never be retried.
pub(crate) async fn release(conn: &mut ConnectionManager, key: &str, token: u64) -> Result<(), BackendError> {
    redis::cmd("EVAL")
        .arg(RELEASE)
        .arg(1)
        .arg(key::lease_key(key))
        .arg(token)
        .query_async::<()>(conn)
        .await?;
    Ok(())
}

pub(crate) async fn bump_generation(
    conn: &mut ConnectionManager,
    generation_key: &str,
    life: Duration,
) -> Result<u64, BackendError> {
    Ok(scripts().bump_generation.key(generation_key).arg(millis(life)).invoke_async(conn).await?)
}

pub(crate) async fn init_generation(
    conn: &mut ConnectionManager,
    generation_key: &str,
    life: Duration,
) -> Result<u64, BackendError> {
    Ok(scripts().init_generation.key(generation_key).arg(millis(life)).invoke_async(conn).await?)
}

/// Milliseconds for `PX`/`PEXPIRE`, never 0 (Redis rejects 0).
pub(crate) fn millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}
