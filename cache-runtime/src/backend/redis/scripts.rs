//! The lease, fill, invalidation and generation protocols as Lua scripts, each with the one
//! function that invokes it (the NOSCRIPT reload is inside `redis::Script`).
//!
//! Keys of one call share the entry's hash tag (`K`, `K:lease`, `K:inv`), so each script touches
//! one Cluster slot. Times are the server's clock in microseconds (`TIME`), so no two clients'
//! clocks are ever compared.

use std::sync::OnceLock;
use std::time::Duration;

use redis::aio::ConnectionLike;

use crate::backend::protocol::{FillOutcome, Renewal};
use crate::error::BackendError;
use crate::key;

/// KEYS: entry, lease, invalidation stamp. ARGV: token, lease ms, minimum generation, a fresh
/// grant stamp, stamp ms. The generation is read from the head of a JSON (`[g,...]`) or
/// MessagePack value (`0x93` then an integer; see `value.rs`) without decoding the rest.
/// A fresh entry: `{1, value}`. Lease taken: `{2, stamp}`, the key's stamp at the grant; a key
/// without one is given the fresh grant stamp first (for the stamp's life), so that no grant is
/// made under "no stamp" (see `protocol::grant_stamp`). Someone else holds it: `{3}`. Held with
/// our token already: this request ran before and its reply was lost (Cluster's client sends it
/// again after a lost connection), so it is ours: granted again, with its life renewed and the
/// stamp as it is now. No invalidation came since the first grant (it would have removed the
/// lease).
const ACQUIRE: &str = r"
local function granted()
  local s = redis.call('GET', KEYS[3])
  if not s then
    s = ARGV[4]
    redis.call('SET', KEYS[3], s, 'PX', ARGV[5])
  end
  return {2, s}
end
local v = redis.call('GET', KEYS[1])
if v then
  local g
  local b = string.byte(v, 1)
  if b == 91 then
    g = tonumber(string.match(v, '^%[(%d+),'))
  elseif b == 0x92 or b == 0x93 then
    local t = string.byte(v, 2)
    if t and t < 0x80 then
      g = t
    else
      local width = ({[0xcc] = 1, [0xcd] = 2, [0xce] = 4, [0xcf] = 8})[t]
      if width and #v >= 2 + width then
        g = 0
        for i = 3, 2 + width do g = g * 256 + string.byte(v, i) end
      end
    end
  end
  if g and g >= tonumber(ARGV[3]) then return {1, v} end
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return granted()
end
if redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
  return granted()
end
return {3}
";

/// KEYS: entry, lease, invalidation stamp. ARGV: token, value, ttl ms, stamp at the grant.
/// 1: written under our lease (and the stamp our grant set, if it is still there, removed: it
/// was there for the lease; a grant's stamp is even, an invalidation's odd). A holder granted
/// under that stamp after our lease aged is then refused: its value is older than ours. 2: our lease aged out, nobody holds it now and the key's stamp is
/// the one we were granted under (no invalidation since): written. 0: the stamp changed (an
/// invalidation came after our grant): refused. 3: our lease aged out and another caller holds
/// the key's lease now: not written (it will fill), the value is not stale.
/// Stamps are compared for equality, never as times, so no clock is trusted.
const FILL: &str = r"
local l = redis.call('GET', KEYS[2])
if l == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  redis.call('DEL', KEYS[2])
  local s = redis.call('GET', KEYS[3])
  if s == ARGV[4] and tonumber(string.sub(s, -1)) % 2 == 0 then redis.call('DEL', KEYS[3]) end
  return 1
end
if (redis.call('GET', KEYS[3]) or '0') ~= ARGV[4] then return 0 end
if not l then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 2
end
return 3
";

/// KEYS: lease, invalidation stamp. ARGV: token, lease ms, stamp at the grant, stamp ms.
/// 1: renewed, and a stamp the grant set with it (even; no invalidation came since the grant:
/// it would have removed the lease), so that it outlives the lease as at the grant. An
/// invalidation's stamp (odd) is left to expire: kept alive, it would hide a later invalidation
/// lost in a failover from `RECHECK_INVALIDATION`. 0: revoked by an
/// invalidation. 2: gone (aged out, or consumed by our own fill) or held by another caller: not
/// taken back, so a renewal that lands after the fill never recreates a lease nobody holds.
const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  local even = tonumber(string.sub(ARGV[3], -1)) % 2 == 0
  if ARGV[3] ~= '0' and even and (redis.call('GET', KEYS[2]) or ARGV[3]) == ARGV[3] then
    redis.call('SET', KEYS[2], ARGV[3], 'PX', ARGV[4])
  end
  return 1
end
if (redis.call('GET', KEYS[2]) or '0') ~= ARGV[3] then return 0 end
return 2
";

/// KEYS: entry, lease, invalidation stamp. ARGV: stamp ms, a fresh random stamp. Drops the
/// entry, revokes its lease, and changes the key's stamp so that a fill granted before it is
/// refused even if its lease had already aged out.
const INVALIDATE: &str = r"
redis.call('UNLINK', KEYS[1], KEYS[2])
redis.call('SET', KEYS[3], ARGV[2], 'PX', ARGV[1])
return 1
";

/// KEYS: entry, lease, invalidation stamp. ARGV: stamp ms, a fresh invalidation stamp. Run a
/// while after an invalidation on a replicated deployment: an invalidation's stamp (ours, or a
/// newer one's; odd, see `protocol::invalidation_stamp`) means the invalidation survived; none,
/// or a lease grant's (even), means it was lost (a primary that acknowledged it died before its
/// replica had it) or has aged out: it is applied again. 1: applied again.
const RECHECK_INVALIDATION: &str = r"
local s = redis.call('GET', KEYS[3])
if s and tonumber(string.sub(s, -1)) % 2 == 1 then return 0 end
redis.call('UNLINK', KEYS[1], KEYS[2])
redis.call('SET', KEYS[3], ARGV[2], 'PX', ARGV[1])
return 1
";

/// KEYS: generation. ARGV: the generation a bump returned, ttl ms. The same check for a
/// function-wide invalidation: a generation below the bumped one is raised to it. 1: raised.
const RECHECK_GENERATION: &str = r"
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if cur >= tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
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
    recheck_invalidation: redis::Script,
    recheck_generation: redis::Script,
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
        recheck_invalidation: redis::Script::new(RECHECK_INVALIDATION),
        recheck_generation: redis::Script::new(RECHECK_GENERATION),
    })
}

/// What the acquire script answered: a value, the lease (granted under this stamp), or busy.
pub(crate) enum AcquireReply {
    Value(Vec<u8>),
    Granted(u64),
    Busy,
}

pub(crate) async fn acquire(
    conn: &mut (impl ConnectionLike + Send),
    key: &str,
    token: u64,
    lease: Duration,
    min_generation: u64,
) -> Result<AcquireReply, BackendError> {
    let reply: Vec<redis::Value> = scripts()
        .acquire
        .key(key)
        .key(key::lease_key(key))
        .key(key::invalidation_key(key))
        .arg(token)
        .arg(millis(lease))
        .arg(min_generation)
        .arg(crate::backend::protocol::grant_stamp())
        .arg(millis(crate::backend::protocol::stamp_life(lease)))
        .invoke_async(conn)
        .await?;
    Ok(match reply.as_slice() {
        [redis::Value::Int(1), redis::Value::BulkString(bytes)] => AcquireReply::Value(bytes.clone()),
        [redis::Value::Int(2), redis::Value::BulkString(stamp)] => AcquireReply::Granted(
            std::str::from_utf8(stamp).ok().and_then(|s| s.parse().ok()).unwrap_or(u64::MAX),
        ),
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
    conn: &mut (impl ConnectionLike + Send),
    key: &str,
    token: u64,
    grant: u64,
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
        .arg(grant)
        .invoke_async(conn)
        .await?;
    Ok(FillOutcome::from_code(answer))
}

/// The same fill as one `EVALSHA` in a pipeline (the batcher reloads the script on NOSCRIPT).
pub(crate) fn pipe_fill(
    pipe: &mut redis::Pipeline,
    key: &str,
    token: u64,
    grant: u64,
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
        .arg(grant);
}

pub(crate) async fn renew(
    conn: &mut (impl ConnectionLike + Send),
    key: &str,
    token: u64,
    grant: u64,
    lease: Duration,
) -> Result<Renewal, BackendError> {
    let answer: u8 = scripts()
        .renew
        .key(key::lease_key(key))
        .key(key::invalidation_key(key))
        .arg(token)
        .arg(millis(lease))
        .arg(grant)
        .arg(millis(crate::backend::protocol::stamp_life(lease)))
        .invoke_async(conn)
        .await?;
    Ok(match answer {
        1 => Renewal::Renewed,
        0 => Renewal::Revoked,
        _ => Renewal::Lost,
    })
}

pub(crate) async fn invalidate(
    conn: &mut (impl ConnectionLike + Send),
    key: &str,
    stamp_life: Duration,
) -> Result<(), BackendError> {
    scripts()
        .invalidate
        .key(key)
        .key(key::lease_key(key))
        .key(key::invalidation_key(key))
        .arg(millis(stamp_life))
        .arg(crate::backend::protocol::invalidation_stamp())
        .invoke_async::<()>(conn)
        .await?;
    Ok(())
}

/// Gives a lease back. Sent as `EVAL` with the script's text, not `EVALSHA`: it is often the
/// first script a connection sends after a timeout (the release of an orphaned lease request),
/// and a NOSCRIPT answer that arrives after the caller stopped waiting would never be retried.
pub(crate) async fn release(
    conn: &mut (impl ConnectionLike + Send),
    key: &str,
    token: u64,
) -> Result<(), BackendError> {
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
    conn: &mut (impl ConnectionLike + Send),
    generation_key: &str,
    life: Duration,
) -> Result<u64, BackendError> {
    Ok(scripts().bump_generation.key(generation_key).arg(millis(life)).invoke_async(conn).await?)
}

pub(crate) async fn init_generation(
    conn: &mut (impl ConnectionLike + Send),
    generation_key: &str,
    life: Duration,
) -> Result<u64, BackendError> {
    Ok(scripts().init_generation.key(generation_key).arg(millis(life)).invoke_async(conn).await?)
}

/// Applies an invalidation again if it was lost; whether it was.
pub(crate) async fn recheck_invalidation(
    conn: &mut (impl ConnectionLike + Send),
    key: &str,
    stamp_life: Duration,
) -> Result<bool, BackendError> {
    let again: u8 = scripts()
        .recheck_invalidation
        .key(key)
        .key(key::lease_key(key))
        .key(key::invalidation_key(key))
        .arg(millis(stamp_life))
        .arg(crate::backend::protocol::invalidation_stamp())
        .invoke_async(conn)
        .await?;
    Ok(again == 1)
}

/// Raises a generation to `generation` if a failover lost the bump; whether it did.
pub(crate) async fn recheck_generation(
    conn: &mut (impl ConnectionLike + Send),
    generation_key: &str,
    generation: u64,
    life: Duration,
) -> Result<bool, BackendError> {
    let again: u8 = scripts()
        .recheck_generation
        .key(generation_key)
        .arg(generation)
        .arg(millis(life))
        .invoke_async(conn)
        .await?;
    Ok(again == 1)
}

/// Milliseconds for `PX`/`PEXPIRE`, never 0 (Redis rejects 0).
pub(crate) fn millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}
