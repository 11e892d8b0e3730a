//! What the runtime and the stores say to each other, whatever the store: the lease protocol's
//! questions and answers, a write made behind the caller's back, and the bound on every call.
//! Each store imports this; it imports no store.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::error::BackendError;

/// What an operator sees of the store behind the cache (the admin status route).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct BackendInfo {
    /// The server's version (`redis_version` of `INFO`; the SQLite library's on disk); `None` for
    /// the in-process backend.
    pub version: Option<String>,
    /// Bytes the store uses: `used_memory` summed over the primaries on Redis, the entries'
    /// bytes in process, the file's size on disk.
    pub used_bytes: Option<u64>,
    /// Keys per DB number as the store counts them. Redis Cluster has DB 0 only (each DB marker
    /// is a key namespace there), so its count is under 0, summed over the primaries.
    pub keys: std::collections::BTreeMap<u8, u64>,
}

impl BackendInfo {
    /// Reads `INFO` replies (one per primary) into one summary.
    pub(crate) fn from_redis_info<'a>(replies: impl IntoIterator<Item = &'a str>) -> BackendInfo {
        let mut info = BackendInfo::default();
        for reply in replies {
            for line in reply.lines() {
                let Some((name, value)) = line.trim().split_once(':') else { continue };
                if name == "redis_version" && info.version.is_none() {
                    info.version = Some(value.to_owned());
                } else if name == "used_memory" {
                    let used = value.parse::<u64>().unwrap_or(0);
                    info.used_bytes = Some(info.used_bytes.unwrap_or(0) + used);
                } else if let Some(db) = name.strip_prefix("db").and_then(|d| d.parse::<u8>().ok()) {
                    let keys =
                        value.split(',').find_map(|kv| kv.strip_prefix("keys=")).and_then(|k| k.parse().ok());
                    *info.keys.entry(db).or_default() += keys.unwrap_or(0);
                }
            }
        }
        info
    }
}

/// A miss asking for the fill lease of a key.
#[derive(Clone, Copy)]
pub(crate) struct LeaseAsk {
    /// Ours alone; the fill must carry it.
    pub(crate) token: u64,
    /// How long the lease lives if its holder never fills.
    pub(crate) ttl: Duration,
    /// A stored value older than this generation does not count as "filled meanwhile".
    pub(crate) min_generation: u64,
}

/// What a miss finds when it asks for the fill lease.
pub(crate) enum Acquired<T> {
    /// Someone filled the entry meanwhile (at the generation asked for or later).
    Value(T),
    /// The lease is ours, granted while the key's invalidation stamp was this (0: none): compute,
    /// renew while computing, and fill with our token and this stamp.
    Granted(u64),
    /// Another caller (maybe in another process) holds the lease: wait for its value.
    Busy,
}

/// What a lease-checked fill did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FillOutcome {
    /// Written (under our lease, or after it aged out with no invalidation since it was granted).
    Written,
    /// Refused: an invalidation of the key came after the lease was granted. The value may be
    /// older than a write that has been acknowledged: it must not be served.
    Revoked,
    /// Not written: our lease aged out and another caller holds the key's lease now (it fills).
    /// No invalidation came since ours was granted, so the value itself is not stale.
    Superseded,
}

impl FillOutcome {
    pub(crate) fn from_code(code: u8) -> Self {
        match code {
            1 | 2 => FillOutcome::Written,
            3 => FillOutcome::Superseded,
            _ => FillOutcome::Revoked,
        }
    }
}

/// What renewing a lease found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Renewal {
    /// Ours for another `lease_ttl`.
    Renewed,
    /// An invalidation revoked it: the value being computed must not be filled.
    Revoked,
    /// It aged out (and may be held by another caller now); not revoked. Renewal stops; the fill
    /// decides whether the value is still written.
    Lost,
}

/// A number no other caller will draw: a per-process random start, then a counter (lease tokens
/// and invalidation stamps). Never 0, which means "no stamp".
pub(crate) fn unique() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(NEXT.fetch_add(1, Relaxed));
    h.finish().max(1)
}

/// A fresh invalidation stamp: odd (its last decimal digit is odd), so that a stamp a lease
/// grant made ([`grant_stamp`]) is told from one an invalidation made (`RECHECK_INVALIDATION`).
pub(crate) fn invalidation_stamp() -> u64 {
    unique() | 1
}

/// A fresh stamp a lease grant sets on a key that has none: even, never 0. The grant is then
/// made under a stamp of its own, so that if a later invalidation's stamp is forgotten (it
/// expired, or was evicted) before an aged holder fills, the key's stamp (none) differs from the
/// grant's and the fill is refused; under "no stamp" both would read alike and it would write.
pub(crate) fn grant_stamp() -> u64 {
    (unique() & !1).max(2)
}

/// Called with the write's result: written, refused (its lease was revoked) or superseded, or
/// the backend failed.
pub(crate) type Done = Box<dyn FnOnce(Result<FillOutcome, BackendError>) + Send>;

/// One write, as the caller would have sent it.
pub(crate) struct Write {
    pub(crate) key: String,
    pub(crate) value: Arc<[u8]>,
    pub(crate) ttl: Duration,
    /// `Some((token, grant))`: the lease-checked fill script; `None`: a plain `SET ... PX`.
    pub(crate) lease: Option<(u64, u64)>,
    pub(crate) done: Option<Done>,
}

/// How long an invalidation stamp lives: fills whose lease aged out before the invalidation came
/// are refused for this long after it (their holders, renewing every third of `lease_ttl`, learn
/// of the revocation well before).
pub(crate) fn stamp_life(lease_ttl: Duration) -> Duration {
    lease_ttl.saturating_mul(4).max(Duration::from_secs(1))
}

/// [`bounded`] by `limit` if there is one, `op` as it is otherwise (a call the connection
/// bounds itself). The bounded form is boxed: inline, its timer would make the future of every
/// call larger, the connection-bounded hit included (allocated per call, see
/// `read_through::serve`), while only calls that need it pay the box.
pub(crate) fn within<'a, T: 'a>(
    limit: Option<Duration>,
    op: impl Future<Output = Result<T, BackendError>> + 'a,
) -> impl Future<Output = Result<T, BackendError>> + 'a {
    use futures_util::future::Either;
    match limit {
        Some(limit) => Either::Left(Box::pin(bounded(limit, op))),
        None => Either::Right(op),
    }
}

/// Runs `op` with the runtime's bound on backend calls (counted from this call).
///
/// A combinator, not an `async fn`: an `async fn` keeps its future argument beside the future it
/// awaits, so every such layer would double the size of the hit path's future (allocated per
/// call, and past the allocator's per-thread cache once it is over a kilobyte).
pub(crate) fn bounded<T>(
    limit: Duration,
    op: impl Future<Output = Result<T, BackendError>>,
) -> impl Future<Output = Result<T, BackendError>> {
    use futures_util::FutureExt;
    tokio::time::timeout(limit, op)
        .map(move |result| result.unwrap_or_else(|_| Err(BackendError::Timeout(limit))))
}
