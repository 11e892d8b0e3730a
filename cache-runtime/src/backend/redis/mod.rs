//! The Redis store, for every deployment: one server, Cluster (`backend/cluster`) and Sentinel
//! (`backend/sentinel`) differ only in their [`Connections`]. Here: the store itself (every call
//! through a circuit breaker, [`super::breaker`], and under `op_timeout`), the protocol scripts
//! (`scripts.rs`), the write-behind batcher (`batch.rs`), the one-server deployment
//! (`connections.rs`) and its connections (`link.rs`).

pub(crate) mod batch;
pub(crate) mod connections;
pub(crate) mod link;
pub(crate) mod reads;
pub(crate) mod scripts;
pub(crate) mod tracking;

use std::borrow::Cow;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use self::batch::Batcher;
pub(crate) use self::connections::{Connections, Server};
use self::scripts::{millis, AcquireReply};
use super::breaker::Breaker;
use super::protocol::{bounded, within, Acquired, BackendInfo, FillOutcome, LeaseAsk, Renewal, Write};
use super::store::Store;
use crate::config::CacheConfig;
use crate::error::BackendError;

/// The Redis store over the deployment `C`. Keys reach it as the runtime names them; `C` says how
/// the server stores them ([`Connections::key`]).
pub(crate) struct RedisStore<C: Connections> {
    links: Arc<C>,
    op_timeout: Duration,
    retry_on_timeout: bool,
    /// How long after an acknowledged invalidation it is checked again (replicated deployments;
    /// zero: never).
    recheck_after: Duration,
    /// Rechecks waiting or running.
    rechecks: Arc<AtomicUsize>,
    /// Whether rechecks are being skipped (past `MAX_RECHECKS`) since it was last said.
    skipping_rechecks: std::sync::atomic::AtomicBool,
    breaker: Arc<Breaker>,
    batcher: Batcher<C>,
}

/// An invalidation to check again: was it lost in a failover?
enum Recheck {
    Key { key: String, stamp_life: Duration },
    Generation { key: String, generation: u64, life: Duration },
}

/// How long a recheck keeps trying (a failover in progress) before it gives up, logged.
const RECHECK_GIVE_UP: Duration = Duration::from_secs(120);
/// The most rechecks waiting at once.
const MAX_RECHECKS: usize = 100_000;

/// Takes one off a count when dropped.
struct Decrement(Arc<AtomicUsize>);

impl Drop for Decrement {
    fn drop(&mut self) {
        self.0.fetch_sub(1, SeqCst);
    }
}

impl<C: Connections> RedisStore<C> {
    pub(crate) fn new(links: C, config: &CacheConfig) -> Self {
        let links = Arc::new(links);
        let breaker =
            Arc::new(Breaker::new(config.breaker_threshold, config.breaker_cooldown, links.address()));
        RedisStore {
            batcher: Batcher::new(config, Arc::clone(&breaker), Arc::clone(&links)),
            breaker,
            links,
            op_timeout: config.op_timeout,
            retry_on_timeout: config.retry_on_timeout,
            recheck_after: config.invalidation_recheck,
            rechecks: Arc::default(),
            skipping_rechecks: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// On a replicated deployment, checks `what` again after `recheck_after`, in the
    /// background: replication is asynchronous, so a primary can acknowledge an invalidation and
    /// die before its replica has it (or, behind Sentinel, be demoted alive and lose it); the
    /// promoted replica would serve the old entry. Where writes go is asked again first
    /// (`Connections::confirm`). Tried until it succeeds (the failover may still be under way)
    /// or `RECHECK_GIVE_UP` has passed.
    fn recheck(&self, db: u8, what: Recheck) {
        if !self.links.replicated() || self.recheck_after.is_zero() {
            return;
        }
        // A key's stamp lives `stamp_life`: checked later than half of that, a missing stamp
        // would no longer tell a lost invalidation from an aged one, so the check is skipped.
        if let Recheck::Key { stamp_life, .. } = &what {
            if self.recheck_after >= *stamp_life / 2 {
                return;
            }
        }
        let Ok(conn) = self.conn(db) else { return };
        // Bounded: past this many checks waiting, new ones are skipped, said once per episode
        // (a `warn`: those invalidations are not protected against a failover).
        if self.rechecks.fetch_add(1, SeqCst) >= MAX_RECHECKS {
            self.rechecks.fetch_sub(1, SeqCst);
            if !self.skipping_rechecks.swap(true, SeqCst) {
                tracing::warn!(
                    limit = MAX_RECHECKS,
                    "too many invalidation rechecks waiting: new ones are skipped until fewer wait (their invalidations are not checked again after a failover)"
                );
            }
            return;
        }
        // Said again once the checks waiting are down to half the bound, not at the first one
        // taken (which, under a steady overload, would alternate with the next skip).
        if self.rechecks.load(SeqCst) <= MAX_RECHECKS / 2 && self.skipping_rechecks.swap(false, SeqCst) {
            tracing::info!("invalidation rechecks are taken again");
        }
        let rechecks = Arc::clone(&self.rechecks);
        let (delay, limit, links, acknowledged) =
            (self.recheck_after, self.op_timeout, Arc::clone(&self.links), Instant::now());
        crate::background::spawn(async move {
            let _done = Decrement(rechecks);
            tokio::time::sleep(delay).await;
            // The server that acknowledged it may have been replaced with no call failing since.
            // Asked within the recheck's own delay (each answer is bounded by `connect_timeout`,
            // which may be as long as a day); past it, the check runs where writes go now.
            let _ = tokio::time::timeout(delay, links.confirm(acknowledged)).await;
            let started = Instant::now();
            let mut pause = Duration::from_millis(50);
            loop {
                let mut conn = conn.clone();
                let attempt = bounded(limit, async {
                    match &what {
                        Recheck::Key { key, stamp_life } => {
                            scripts::recheck_invalidation(&mut conn, key, *stamp_life).await
                        }
                        Recheck::Generation { key, generation, life } => {
                            scripts::recheck_generation(&mut conn, key, *generation, *life).await
                        }
                    }
                })
                .await;
                let key = match &what {
                    Recheck::Key { key, .. } | Recheck::Generation { key, .. } => key,
                };
                match attempt {
                    Ok(true) => {
                        tracing::warn!(key, "an acknowledged invalidation was missing (its primary failed before replicating it): applied again");
                        return;
                    }
                    Ok(false) => return,
                    Err(error) if started.elapsed() >= RECHECK_GIVE_UP => {
                        tracing::warn!(key, %error, "could not check an invalidation again after a failover; its entry may be served until its TTL");
                        return;
                    }
                    Err(_) => {
                        tokio::time::sleep(pause).await;
                        pause = (pause * 2).min(Duration::from_secs(1));
                    }
                }
            }
        });
    }

    /// Hands `write` to `offer` under its stored key; a write given back gets the runtime's key
    /// again (the caller then writes it through `fill` or `set`, which map it themselves). Where
    /// the stored key is the runtime's (one server, no namespace), nothing is copied.
    fn with_stored_key(
        &self,
        db: u8,
        mut write: Write,
        offer: impl FnOnce(Write) -> Result<(), Write>,
    ) -> Result<(), Write> {
        let Cow::Owned(stored) = self.key(db, &write.key) else {
            return offer(write);
        };
        let key = std::mem::replace(&mut write.key, stored);
        offer(write).map_err(|mut write| {
            write.key = key;
            write
        })
    }

    fn conn(&self, db: u8) -> Result<C::Conn, BackendError> {
        self.links.conn(db)
    }

    fn key<'k>(&self, db: u8, key: &'k str) -> Cow<'k, str> {
        self.links.key(db, key)
    }

    /// Runs `op` through the breaker, bounded by `limit`: refused at once while the breaker is
    /// open, and its result moves the breaker.
    ///
    /// Combinators rather than an `async fn`, for the size of the future (see `bounded`). The
    /// breaker is asked, and the bound starts, when the future is made (every caller awaits it
    /// at once): a `lazy(..).then(..)` that asked on the first poll moved the whole call's
    /// future once more per call.
    fn guarded<'a, T: 'a>(
        &'a self,
        limit: Duration,
        op: impl Future<Output = Result<T, BackendError>> + 'a,
    ) -> impl Future<Output = Result<T, BackendError>> + 'a {
        self.guarded_within(Some(limit), op)
    }

    /// [`Self::guarded`] for a call of one request (one command or one pipeline): where the
    /// connection bounds each request by `op_timeout` itself (one server's `Link`), no timer is
    /// added (a timer-wheel entry registered and removed per call: with the change to
    /// `guarded_within`, 8 % less CPU per hit, measured), and its timeout is reported as the
    /// store's own.
    fn guarded_request<'a, T: 'a>(
        &'a self,
        op: impl Future<Output = Result<T, BackendError>> + 'a,
    ) -> impl Future<Output = Result<T, BackendError>> + 'a {
        use futures_util::FutureExt;
        let limit = self.op_timeout;
        let bounded_here = !self.links.bounds_each_request();
        self.guarded_within(bounded_here.then_some(limit), op).map(move |result| {
            result.map_err(|e| if e.is_timeout() { BackendError::Timeout(limit) } else { e })
        })
    }

    fn guarded_within<'a, T: 'a>(
        &'a self,
        limit: Option<Duration>,
        op: impl Future<Output = Result<T, BackendError>> + 'a,
    ) -> impl Future<Output = Result<T, BackendError>> + 'a {
        use futures_util::future::{self, Either, FutureExt};
        match self.breaker.admit() {
            Err(refused) => Either::Left(future::ready(Err(refused))),
            Ok(permit) => Either::Right(within(limit, op).map(move |result| {
                permit.record(&result);
                if let Err(e) = &result {
                    self.links.failed(e);
                }
                result
            })),
        }
    }
}

/// Every call through the breaker and under `op_timeout`, on the DB's connection.
impl<C: Connections> Store for RedisStore<C> {
    fn kind(&self) -> &'static str {
        self.links.kind()
    }

    async fn get_with<T>(
        &self,
        db: u8,
        key: &str,
        decode: impl Fn(&[u8]) -> T,
    ) -> Result<Option<T>, BackendError> {
        let key = self.key(db, key);
        // One server's connections coalesce concurrent reads (`reads.rs`).
        let get = || async { Ok(self.links.get(db, &key).await?.map(|b| decode(&b))) };
        // The first answer is not kept across the retry's await: the future every hit allocates
        // would hold it (160 bytes here) besides the request in flight.
        match self.guarded_request(get()).await {
            Err(e) if self.retry_on_timeout && e.is_timeout() => {}
            result => return result,
        }
        // Boxed: rare, and inline it would double the future every hit allocates.
        Box::pin(self.guarded_request(get())).await
    }

    /// GET and PTTL of the entry in one pipeline (one key, one slot: on a Cluster too), retried
    /// once on a timeout like `get_with`.
    async fn get_with_ttl<T>(
        &self,
        db: u8,
        key: &str,
        decode: impl Fn(&[u8]) -> T,
    ) -> Result<(Option<T>, Option<Duration>), BackendError> {
        let key = self.key(db, key);
        // One key, one slot: a pipeline on a Cluster too.
        let get = || async {
            let mut conn = self.conn(db)?;
            let (bytes, left_ms): (Option<Vec<u8>>, i64) =
                redis::pipe().cmd("GET").arg(&*key).cmd("PTTL").arg(&*key).query_async(&mut conn).await?;
            Ok((bytes.map(|b| decode(&b)), u64::try_from(left_ms).ok().map(Duration::from_millis)))
        };
        match self.guarded_request(get()).await {
            Err(e) if self.retry_on_timeout && e.is_timeout() => {}
            result => return result,
        }
        Box::pin(self.guarded_request(get())).await
    }

    /// GET of the entry and of the function's generation, and the generation key's time to
    /// live, in one round trip: one pipeline on one server; on Cluster, where the two keys live
    /// in different slots, the entry's GET and the generation's pipeline are sent at once. Reads
    /// only, so a lookup is answered while the server pauses writes (`CLIENT PAUSE WRITE`, what
    /// a failover does). When half of the key's life is gone, its life is extended in the
    /// background (it lives as long as the function is read). A missing generation key is
    /// recreated at the server's clock (one more round trip, a write), so that entries older
    /// than a lost key are never trusted.
    async fn get_with_generation<T>(
        &self,
        db: u8,
        key: &str,
        generation_key: &str,
        generation_life: Duration,
        decode: impl Fn(&[u8]) -> T,
    ) -> Result<(Option<T>, Option<u64>), BackendError> {
        let key = self.key(db, key);
        let generation_key = self.key(db, generation_key);
        self.guarded(self.op_timeout, async {
            let conn = self.conn(db)?;
            let (bytes, generation, left_ms): (Option<Vec<u8>>, Option<u64>, i64) =
                if self.links.pipelines_cross_slots() {
                    redis::pipe()
                        .cmd("GET")
                        .arg(&*key)
                        .cmd("GET")
                        .arg(&*generation_key)
                        .cmd("PTTL")
                        .arg(&*generation_key)
                        .query_async(&mut conn.clone())
                        .await?
                } else {
                    let (mut entry_conn, mut generation_conn) = (conn.clone(), conn.clone());
                    let mut get = redis::cmd("GET");
                    get.arg(&*key);
                    let entry = get.query_async::<Option<Vec<u8>>>(&mut entry_conn);
                    let mut generation = redis::pipe();
                    generation.cmd("GET").arg(&*generation_key).cmd("PTTL").arg(&*generation_key);
                    let generation = generation.query_async::<(Option<u64>, i64)>(&mut generation_conn);
                    let (bytes, (generation, left_ms)) = tokio::try_join!(entry, generation)?;
                    (bytes, generation, left_ms)
                };
            let generation = match generation {
                Some(g) => {
                    let life = millis(generation_life);
                    if u64::try_from(left_ms).is_ok_and(|left| left < life / 2) {
                        let (mut conn, key, limit) =
                            (conn.clone(), generation_key.to_string(), self.op_timeout);
                        crate::background::spawn(async move {
                            let mut extend = redis::cmd("PEXPIRE");
                            extend.arg(&key).arg(life);
                            let _ = tokio::time::timeout(limit, extend.query_async::<()>(&mut conn)).await;
                        });
                    }
                    g
                }
                None => scripts::init_generation(&mut conn.clone(), &generation_key, generation_life).await?,
            };
            Ok((bytes.map(|b| decode(&b)), Some(generation)))
        })
        .await
    }

    /// One `MGET` for all of `keys` (on Cluster, the client splits it by slot).
    async fn get_many_with<T>(
        &self,
        db: u8,
        keys: &[String],
        decode: impl Fn(&[u8]) -> T,
    ) -> Result<Vec<Option<T>>, BackendError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut mget = redis::cmd("MGET");
        for key in keys {
            mget.arg(&*self.key(db, key));
        }
        self.guarded(self.op_timeout, async {
            let values: Vec<Option<Vec<u8>>> = mget.query_async(&mut self.conn(db)?).await?;
            Ok(values.into_iter().map(|v| v.map(|b| decode(&b))).collect())
        })
        .await
    }

    async fn set(&self, db: u8, key: &str, value: &[u8], ttl: Duration) -> Result<(), BackendError> {
        // PX in the same command: no key is ever left without an expiry.
        let mut cmd = redis::cmd("SET");
        cmd.arg(&*self.key(db, key)).arg(value).arg("PX").arg(millis(ttl));
        self.guarded(self.op_timeout, async { Ok(cmd.query_async::<()>(&mut self.conn(db)?).await?) }).await
    }

    async fn delete(&self, db: u8, key: &str) -> Result<bool, BackendError> {
        let mut cmd = redis::cmd("UNLINK");
        cmd.arg(&*self.key(db, key));
        self.guarded(self.op_timeout, async { Ok(cmd.query_async::<u64>(&mut self.conn(db)?).await? > 0) })
            .await
    }

    /// `SET ... PX` for all of `items`: one pipeline on one server; on Cluster one pipeline per
    /// slot, all sent at once.
    async fn set_many(&self, db: u8, items: &[(String, Vec<u8>)], ttl: Duration) -> Result<(), BackendError> {
        if items.is_empty() {
            return Ok(());
        }
        let items: Vec<(Cow<'_, str>, &[u8])> =
            items.iter().map(|(key, value)| (self.key(db, key), value.as_slice())).collect();
        let pipes = batch::by_slot(self.links.pipelines_cross_slots(), &items, |pipe, (key, value)| {
            pipe.cmd("SET").arg(&**key).arg(*value).arg("PX").arg(millis(ttl));
        });
        self.guarded(self.op_timeout, async {
            let conn = self.conn(db)?;
            let sends = pipes.iter().map(|(pipe, _)| {
                let mut conn = conn.clone();
                async move { pipe.query_async::<Vec<redis::RedisResult<()>>>(&mut conn).await }
            });
            for replies in futures_util::future::try_join_all(sends).await? {
                replies.into_iter().collect::<Result<Vec<()>, _>>()?;
            }
            Ok(())
        })
        .await
    }

    /// One `UNLINK` for all of `keys` (on Cluster, the client splits it by slot); how many
    /// existed.
    async fn delete_many(&self, db: u8, keys: &[String]) -> Result<u64, BackendError> {
        if keys.is_empty() {
            return Ok(0);
        }
        let mut cmd = redis::cmd("UNLINK");
        for key in keys {
            cmd.arg(&*self.key(db, key));
        }
        self.guarded(self.op_timeout, async { Ok(cmd.query_async(&mut self.conn(db)?).await?) }).await
    }

    async fn exists(&self, db: u8, key: &str) -> Result<bool, BackendError> {
        let mut cmd = redis::cmd("EXISTS");
        cmd.arg(&*self.key(db, key));
        self.guarded(self.op_timeout, async { Ok(cmd.query_async::<u64>(&mut self.conn(db)?).await? > 0) })
            .await
    }

    async fn expire(&self, db: u8, key: &str, ttl: Duration) -> Result<bool, BackendError> {
        let mut cmd = redis::cmd("PEXPIRE");
        cmd.arg(&*self.key(db, key)).arg(millis(ttl));
        self.guarded(self.op_timeout, async { Ok(cmd.query_async::<u64>(&mut self.conn(db)?).await? > 0) })
            .await
    }

    async fn ttl(&self, db: u8, key: &str) -> Result<Option<Duration>, BackendError> {
        let mut cmd = redis::cmd("PTTL");
        cmd.arg(&*self.key(db, key));
        // -2: no such key; -1: no expiry (never written by this crate).
        let ms: i64 =
            self.guarded(self.op_timeout, async { Ok(cmd.query_async(&mut self.conn(db)?).await?) }).await?;
        Ok(u64::try_from(ms).ok().map(Duration::from_millis))
    }

    /// SCAN + UNLINK over `prefix:*` only, on every primary: never `KEYS`, never `FLUSHDB`. A
    /// clear walks the keyspace: it gets 100 op timeouts, not one.
    async fn clear(&self, db: u8, prefix: &str) -> Result<u64, BackendError> {
        let pattern = self.key(db, &format!("{prefix}:*")).into_owned();
        self.guarded(self.op_timeout.saturating_mul(100), self.links.clear(db, &pattern)).await
    }

    async fn ping(&self, db: u8) -> Result<(), BackendError> {
        self.guarded(self.op_timeout, self.links.ping(db)).await
    }

    async fn info(&self) -> Result<BackendInfo, BackendError> {
        let replies = self.guarded(self.op_timeout, self.links.info()).await?;
        Ok(BackendInfo::from_redis_info(replies.iter().map(String::as_str)))
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
        let key = self.key(db, key);
        self.guarded(self.op_timeout, async {
            // Pinned: the release, if owed, follows the request on its connection.
            let next = self.conn(db)?;
            let conn = C::pinned(&next);
            let mut orphan = OrphanGuard {
                conn: Some(conn.clone()),
                next: Some(next),
                key: &key,
                token: ask.token,
                op_timeout: self.op_timeout,
            };
            let reply =
                scripts::acquire(&mut conn.clone(), &key, ask.token, ask.ttl, ask.min_generation).await;
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
        let key = self.key(db, key);
        let renew = async { scripts::renew(&mut self.conn(db)?, &key, token, grant, lease).await };
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
        let key = self.key(db, key);
        let fill = async { scripts::fill(&mut self.conn(db)?, &key, token, grant, value, ttl).await };
        self.guarded(self.op_timeout, fill).await
    }

    async fn release(&self, db: u8, key: &str, token: u64) -> Result<(), BackendError> {
        let key = self.key(db, key);
        // Not through the breaker: giving a lease back is worth a try even while it is open.
        bounded(self.op_timeout, async { scripts::release(&mut self.conn(db)?, &key, token).await }).await
    }

    /// Deletes the entry and its lease and changes its stamp, in one script: a fill holding the
    /// old lease is refused.
    async fn invalidate(&self, db: u8, key: &str, stamp_life: Duration) -> Result<(), BackendError> {
        let key = self.key(db, key);
        let invalidate = async { scripts::invalidate(&mut self.conn(db)?, &key, stamp_life).await };
        self.guarded(self.op_timeout, invalidate).await?;
        self.recheck(db, Recheck::Key { key: key.into_owned(), stamp_life });
        Ok(())
    }

    async fn bump_generation(
        &self,
        db: u8,
        generation_key: &str,
        life: Duration,
    ) -> Result<Option<u64>, BackendError> {
        let generation_key = self.key(db, generation_key);
        let bump = async { scripts::bump_generation(&mut self.conn(db)?, &generation_key, life).await };
        let generation = self.guarded(self.op_timeout, bump).await?;
        self.recheck(db, Recheck::Generation { key: generation_key.into_owned(), generation, life });
        Ok(Some(generation))
    }

    fn writes_behind(&self) -> bool {
        true
    }
    /// The batcher gets the stored key; a write it gives back gets the runtime's key again (the
    /// caller then writes it through `fill` or `set`, which map it themselves).
    fn offer(&self, db: u8, write: Write) -> Result<(), Write> {
        self.with_stored_key(db, write, |write| self.batcher.offer(db, write))
    }
    fn offer_handle_write(&self, db: u8, write: Write) -> Result<(), Write> {
        self.with_stored_key(db, write, |write| self.batcher.offer_handle_write(db, write))
    }
    async fn supersede(&self, limit: Duration, db: u8, key: &str) {
        self.batcher.supersede(limit, db, &self.key(db, key)).await
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
    fn track(&self, near: &Arc<crate::near::NearTier>, prefixes: Vec<String>) -> bool {
        self.links.track(near, prefixes)
    }
}

/// Armed while a lease request is unanswered; dropped armed, it sends the release of its token
/// on the same connection, so the server runs it right after the request if it runs that at all.
/// If that connection is lost (dropped or reset before the request's reply came: not a time-out,
/// where the connection is alive and the release already waits behind the request), the release
/// is sent again on the store's connection as it is then (`next`, made again meanwhile): a lease
/// the request set would otherwise make every caller of the key wait out `lease_ttl`. The release
/// is a compare-and-delete of our token, so sent twice, or before a request the server has yet to
/// run, it takes nothing from anyone (in the last case it does nothing, as if never sent). Each
/// send is bounded by `op_timeout`.
struct OrphanGuard<'a, Conn: redis::aio::ConnectionLike + Send + 'static> {
    conn: Option<Conn>,
    next: Option<Conn>,
    key: &'a str,
    token: u64,
    op_timeout: Duration,
}

impl<Conn: redis::aio::ConnectionLike + Send + 'static> Drop for OrphanGuard<'_, Conn> {
    fn drop(&mut self) {
        let (Some(mut conn), Some(mut next)) = (self.conn.take(), self.next.take()) else { return };
        let (key, token, limit) = (self.key.to_owned(), self.token, self.op_timeout);
        // Written to the connection now, in order after the request; the answer does not matter
        // (the background task only keeps the future alive until it is sent), unless it says the
        // connection is lost.
        crate::background::spawn(async move {
            match bounded(limit, scripts::release(&mut conn, &key, token)).await {
                Err(BackendError::Redis(failure)) if failure.is_connection_lost() => {
                    drop(conn); // one server, Sentinel: nothing holds the lost connection open
                    let _ = bounded(limit, scripts::release(&mut next, &key, token)).await;
                }
                _ => {}
            }
        });
    }
}
