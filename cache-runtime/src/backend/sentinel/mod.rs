//! A primary behind Redis Sentinel, as the Redis store's [`Connections`]: the sentinels are
//! asked where the primary is on first use, and again after any call that times out, finds the
//! connection gone or the server read-only (a failover happened), so caching follows the primary
//! to whichever replica the sentinels promote ([`Shared::discover`]). All of them are asked at
//! once and the newest answer is taken if a majority answered ([`Shared::newest_primary`]), so
//! that one sentinel that never answers costs as long again as the majority took plus
//! `MAJORITY_GRACE`, not the whole `connect_timeout`; with fewer answers, or a server that does
//! not say it is a primary, the `redis` crate's `SentinelClient` asks them (up to three at once)
//! and takes the first, in the order given, that names a primary. Unless
//! `with_sentinel_announcements(false)`, each sentinel's `+switch-master` announcements are
//! listened to (`announcements.rs`): one for this master starts a round of
//! questions ([`Shared::confirm`]), so a process that only reads follows a failover too. Before an
//! invalidation is checked again (`backend/redis/mod.rs`), every sentinel is asked too
//! ([`Shared::confirm`]): a primary demoted while alive answers as one until it is converted.
//!
//! The sentinels are asked with their own user and password, and over TLS, when the target says
//! so (`CacheConfig::with_sentinel_credentials`, `with_sentinel_tls`): the primary's credentials
//! and TLS are its own. A sentinel that refuses the credentials it was given says so in the
//! error, naming the setting (`sentinel_error`).
//!
//! Each DB's connection to the primary is a [`Link`], as one server's are
//! (`backend/redis/link.rs`); one key's reads (`GET`) on it are coalesced under load as on one
//! server (`backend/redis/reads.rs`): each batch is one `MGET` on that primary's connection.
//!
//! The near tier's tracking connection (`backend/redis/tracking.rs`) goes to the primary the
//! connections use, and follows them: the moment they are handed a primary at another address,
//! every near copy is dropped and none answers until the tracking connection tracks there.

mod announcements;

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use futures_util::future::{BoxFuture, FutureExt, Shared as SharedFuture};
use futures_util::StreamExt;
use redis::aio::ConnectionLike;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{Cmd, ConnectionAddr, RedisFuture, Value};

use super::redis::connections::{namespaced, scan_and_unlink, Connections};
use super::redis::link::Link;
use super::redis::reads::{Reads, Sender};
use super::redis::tracking::{Boxed, Source, Strip, Tracking};
use crate::config::targets::{tls_provider, CaCert};
use crate::config::{CacheConfig, SentinelTarget};
use crate::error::BackendError;
use crate::near::NearTier;

/// Once a majority of the sentinels has answered `newest_primary`'s question, how long the others are
/// waited for beyond as long again as the majority took.
const MAJORITY_GRACE: Duration = Duration::from_millis(50);

pub(crate) struct SentinelPrimary {
    shared: Arc<Shared>,
    namespace: String,
    /// Held by the store and each of its connections ([`Users`]).
    users: Users,
}

/// Never sent: dropped with the last of the store and its connections (`SentinelConn`: the
/// batcher's, writing fills still queued when the runtime was dropped), which ends the store's
/// tasks at once (a question to the sentinels, the subscriptions to their announcements).
/// Not held by `Shared`: those tasks hold it, and would keep it, and themselves, alive for up to
/// a question's `connect_timeout`s after nothing can use them.
type Users = Arc<tokio::sync::watch::Sender<()>>;

struct Shared {
    target: SentinelTarget,
    connect_timeout: Duration,
    op_timeout: Duration,
    /// Whether reads are coalesced (`CacheConfig::with_read_coalescing`).
    coalesce_reads: bool,
    /// The `redis` crate's `SentinelClient` (`discover`'s fallback); its lock keeps `discover` to
    /// one at a time.
    sentinels: tokio::sync::Mutex<Option<SentinelClient>>,
    /// The last question to the sentinels for the primary (`primary`), finished or not.
    discovering: Mutex<Option<Discovery>>,
    /// The last round of questions to every sentinel (`confirm`).
    confirmed: tokio::sync::Mutex<Confirmed>,
    /// The primary as last answered, with its connections; `None` until asked, and again once
    /// a call finds it gone.
    /// Read on every call (a hit's included): a load, no lock.
    current: ArcSwapOption<Primary>,
    /// The last primary handed the connections, the newest config epoch taken, and how many
    /// primaries were handed them.
    last: Mutex<Last>,
    /// How many times the connections were handed a primary at another address.
    moves: AtomicU64,
    /// Told of each move, and of each time the primary is forgotten, for the tracking
    /// connection.
    moving: tokio::sync::Notify,
    /// The near tier, once its tracking started: distrusted at each move.
    near: OnceLock<Weak<NearTier>>,
    /// Whether the sentinels' announcements are listened to (`announcements.rs`), and whether
    /// that has started (on the first primary found).
    announcements: bool,
    listening: std::sync::atomic::AtomicBool,
    /// Told when the store and its connections are all dropped ([`Users`]).
    dropped: tokio::sync::watch::Receiver<()>,
}

/// The last primary handed the connections.
#[derive(Default)]
struct Last {
    /// Its settings (kept while `current` is `None`): its address tells a move, and `confirm`
    /// installs it again if a failed call forgot it.
    info: Option<redis::ConnectionInfo>,
    /// The newest config epoch taken from a majority of the sentinels: an older answer never
    /// moves the connections by itself (`confirm`, `discover`).
    epoch: u64,
    /// How many primaries were handed the connections: a question's answer is not taken if
    /// another was handed them while it was asked.
    installs: u64,
}

/// A question to the sentinels for the primary, shared by the calls that wait for it.
type Discovery = SharedFuture<BoxFuture<'static, Result<Arc<Primary>, Unfound>>>;

/// Why a question found no primary, as its waiters are each given it.
#[derive(Clone)]
struct Unfound {
    timeout: Option<Duration>,
    /// A refusal of the credentials, kept as it was: a sentinel's ([`sentinel_error`]), or the
    /// primary's (through the `SentinelClient` fallback).
    refusal: Option<redis::RedisError>,
    /// The failure's own text (a `redis` error's, without [`BackendError`]'s `redis: `, which
    /// the waiter's error adds again).
    text: String,
}

impl From<&BackendError> for Unfound {
    fn from(error: &BackendError) -> Self {
        let timeout = match error {
            BackendError::Timeout(bound) => Some(*bound),
            _ => None,
        };
        let (refusal, text) = match error {
            BackendError::Redis(failure) if failure.is_authentication_failure() => {
                (Some(failure.as_redis().clone()), String::new())
            }
            BackendError::Redis(failure) => (None, failure.to_string()),
            other => (None, other.to_string()),
        };
        Unfound { timeout, refusal, text }
    }
}

impl From<Unfound> for BackendError {
    fn from(unfound: Unfound) -> Self {
        match (unfound.timeout, unfound.refusal) {
            (Some(bound), _) => BackendError::Timeout(bound),
            (None, Some(refusal)) => refusal.into(),
            // Counted as a connection failure, as the sentinels' own were.
            (None, None) => {
                redis::RedisError::from(std::io::Error::new(std::io::ErrorKind::NotConnected, unfound.text))
                    .into()
            }
        }
    }
}

/// What [`Shared::confirm`] last found.
#[derive(Default)]
struct Confirmed {
    /// When its last round of questions began: the checks of invalidations acknowledged
    /// before that take its outcome.
    asked: Option<Instant>,
    /// Whether its last round had too few answers (logged once until enough come).
    failing: bool,
}

struct Primary {
    info: redis::ConnectionInfo,
    /// Each DB's connection, as one server's are (`Link`: made again when lost, each command
    /// bounded by `op_timeout`, reads coalesced).
    dbs: [OnceLock<Link>; 16],
}

impl SentinelPrimary {
    pub(crate) fn new(target: SentinelTarget, config: &CacheConfig) -> Self {
        let (dropped, told) = tokio::sync::watch::channel(());
        SentinelPrimary {
            shared: Arc::new(Shared {
                target,
                connect_timeout: config.connect_timeout,
                op_timeout: config.op_timeout,
                coalesce_reads: config.coalesce_reads,
                sentinels: tokio::sync::Mutex::new(None),
                discovering: Mutex::new(None),
                confirmed: tokio::sync::Mutex::new(Confirmed::default()),
                current: ArcSwapOption::empty(),
                last: Mutex::new(Last::default()),
                moves: AtomicU64::new(0),
                moving: tokio::sync::Notify::new(),
                near: OnceLock::new(),
                announcements: config.sentinel_announcements,
                listening: std::sync::atomic::AtomicBool::new(false),
                dropped: told,
            }),
            namespace: config.key_namespace.clone(),
            users: Arc::new(dropped),
        }
    }
}

impl Shared {
    fn current(&self) -> Option<Arc<Primary>> {
        self.current.load_full()
    }

    fn client(&self) -> redis::RedisResult<SentinelClient> {
        let target = &self.target;
        let addrs = target.sentinels.iter().map(|sentinel| sentinel_address(sentinel, target.sentinel_tls));
        let mut builder = SentinelClientBuilder::new(addrs, &target.master, SentinelServerType::Master)?;
        if let Some(username) = &target.username {
            builder = builder.set_client_to_redis_username(username);
        }
        if let Some(password) = &target.password {
            builder = builder.set_client_to_redis_password(password);
        }
        if let Some(username) = &target.sentinel_username {
            builder = builder.set_client_to_sentinel_username(username);
        }
        if let Some(password) = &target.sentinel_password {
            builder = builder.set_client_to_sentinel_password(password);
        }
        // The CA is given only where TLS is spoken: the `redis` crate refuses certificates for
        // sentinels at plain TCP addresses (and has no use for them on a plain-TCP primary).
        if target.tls {
            tls_provider();
            builder = builder.set_client_to_redis_tls_mode(redis::TlsMode::Secure);
            if let Some(certs) = CaCert::certificates(&target.ca) {
                builder = builder.set_client_to_redis_certificates(certs);
            }
        }
        if target.sentinel_tls {
            tls_provider();
            builder = builder.set_client_to_sentinel_tls_mode(redis::TlsMode::Secure);
            if let Some(certs) = CaCert::certificates(&target.ca) {
                builder = builder.set_client_to_sentinel_certificates(certs);
            }
        }
        builder.build()
    }

    /// The primary, asking the sentinels if it is not known. The question runs as a task of its
    /// own, shared by the calls that wait for it (`discover`): a call cut by its `op_timeout`
    /// leaves it to finish, and a later call finds the primary it found.
    async fn primary(self: &Arc<Self>) -> Result<Arc<Primary>, BackendError> {
        if let Some(primary) = self.current() {
            return Ok(primary);
        }
        let discovery = {
            let mut running = self.discovering.lock().unwrap_or_else(|e| e.into_inner());
            match running.as_ref() {
                // Polled here, not peeked: a question whose waiters were all cut never shows its
                // outcome to `peek`, and a later call must ask again, not take that outcome.
                Some(discovery) if discovery.clone().now_or_never().is_none() => discovery.clone(),
                _ => {
                    let (done, outcome) = tokio::sync::oneshot::channel();
                    let shared = Arc::clone(self);
                    let mut dropped = self.dropped.clone();
                    // On the cache's own runtime: a caller's runtime may never run it again.
                    crate::background::spawn(async move {
                        tokio::select! {
                            // Never sent: the store and its connections are gone, and nobody is
                            // left to answer.
                            _ = dropped.changed() => {}
                            found = shared.discover() => {
                                let _ = done.send(found.map_err(|e| Unfound::from(&e)));
                            }
                        }
                    });
                    let discovery: Discovery = async move {
                        outcome.await.unwrap_or(Err(Unfound {
                            timeout: None,
                            refusal: None,
                            text: "the question to the sentinels ended unanswered (its store dropped, or the tokio runtime that ran it ended)"
                                .into(),
                        }))
                    }
                    .boxed()
                    .shared();
                    *running = Some(discovery.clone());
                    discovery
                }
            }
        };
        discovery.await.map_err(BackendError::from)
    }

    /// Asks the sentinels where the primary is, and hands the connections what they answer.
    /// First every sentinel at once: the newest of the answers, if a majority answered
    /// (`newest_primary`, within `connect_timeout`), if the server it names says it is a primary
    /// (within `connect_timeout` more). An answer older than the last one taken (sentinels that
    /// lag behind the one that answered then) is never taken: the last primary is, if it still
    /// says it is a primary. Otherwise the first sentinel, in the order given, that names a
    /// server saying it is a primary (the `redis` crate's `SentinelClient`, within
    /// `connect_timeout` more). The first primary found starts listening to the sentinels'
    /// announcements (if they are listened to).
    async fn discover(self: &Arc<Self>) -> Result<Arc<Primary>, BackendError> {
        let mut sentinels = self.sentinels.lock().await;
        if let Some(primary) = self.current() {
            return Ok(primary); // another question found it meanwhile
        }
        let (seen, known) = {
            let last = self.last();
            (last.installs, last.info.clone().map(|info| (last.epoch, info)))
        };
        let failure = match self.newest_primary().await {
            Ok((epoch, host, port)) => {
                let answered = self.info_at(host, port)?;
                let (epoch, info) = match known {
                    Some((newer, known)) if epoch < newer => (newer, known),
                    _ => (epoch, answered),
                };
                let asked = tokio::time::timeout(self.connect_timeout, self.answers_as_primary(&info)).await;
                if asked.is_ok_and(|primary| primary) {
                    return Ok(self.found(info, Some(epoch), seen));
                }
                BackendError::from(redis::RedisError::from((
                    redis::ErrorKind::Client,
                    "the server the sentinels name does not say it is a primary",
                )))
            }
            Err(error) => error,
        };
        tracing::debug!(sentinels = %self.target.address(), error = %failure, "asking every sentinel found no primary; asking them in order");
        let client = match sentinels.as_mut() {
            Some(client) => client,
            None => sentinels.insert(self.client()?),
        };
        let ask = tokio::time::timeout(self.connect_timeout, client.async_get_client());
        let found = match ask.await.map_err(|_| BackendError::Timeout(self.connect_timeout))? {
            Ok(found) => found,
            // A sentinel that refused the question's credentials refuses the fallback's too:
            // that is the error to report (the fallback's could be the primary's own refusal,
            // or name no sentinel).
            Err(_) if refused(&failure) => return Err(failure),
            Err(error) => return Err(error.into()),
        };
        Ok(self.found(found.get_connection_info().clone(), None, seen))
    }

    /// Hands the connections the primary at `info` (answered at config `epoch`, if known),
    /// unless another was handed them since the question began (`seen` installs): then that one
    /// (again, if a failed call forgot it since).
    fn found(self: &Arc<Self>, info: redis::ConnectionInfo, epoch: Option<u64>, seen: u64) -> Arc<Primary> {
        let primary = {
            let mut last = self.last();
            match self.current() {
                Some(current) if last.installs != seen => current,
                _ => {
                    let info = match last.info.clone() {
                        Some(newer) if last.installs != seen => newer,
                        _ => {
                            if let Some(epoch) = epoch {
                                last.epoch = last.epoch.max(epoch);
                            }
                            info
                        }
                    };
                    let primary = Arc::new(Primary { info, dbs: Default::default() });
                    self.install(&mut last, &primary);
                    primary
                }
            }
        };
        if self.announcements && !self.listening.swap(true, SeqCst) {
            announcements::listen(self);
        }
        primary
    }

    /// The primary's connection settings at `host:port`: this target's user, password and TLS
    /// (its CA is added where the client is made, `client_for`).
    fn info_at(&self, host: String, port: u16) -> Result<redis::ConnectionInfo, BackendError> {
        let target = &self.target;
        let addr = if target.tls {
            ConnectionAddr::TcpTls { host, port, insecure: false, tls_params: None }
        } else {
            ConnectionAddr::Tcp(host, port)
        };
        connection_info(addr, &target.username, &target.password)
    }

    /// A client for the sentinel at `sentinel` (`host:port`): over TLS if the target says so,
    /// with the sentinels' own user and password.
    fn sentinel_client(&self, sentinel: &str) -> Result<redis::Client, BackendError> {
        let target = &self.target;
        let addr = sentinel_address(sentinel, target.sentinel_tls);
        self.client_for(connection_info(addr, &target.sentinel_username, &target.sentinel_password)?)
    }

    /// The settings of a connection made to ask one question: `connect_timeout` to connect and
    /// to answer (the `redis` crate's own defaults, 1 s and 500 ms, would cut it shorter).
    fn asking(&self) -> redis::AsyncConnectionConfig {
        redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.connect_timeout))
            .set_response_timeout(Some(self.connect_timeout))
    }

    /// Whether the server at `info` says it is a primary: `ROLE`, or `INFO replication` for a
    /// user not allowed `ROLE` (an `@admin` command).
    async fn answers_as_primary(&self, info: &redis::ConnectionInfo) -> bool {
        let ask = async {
            let client = self.client_for(info.clone())?;
            let mut conn = client.get_multiplexed_async_connection_with_config(&self.asking()).await?;
            match redis::cmd("ROLE").query_async::<redis::Role>(&mut conn).await {
                Ok(role) => Ok(matches!(role, redis::Role::Primary { .. })),
                Err(error) if error.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoPerm) => {
                    let info: String = redis::cmd("INFO").arg("replication").query_async(&mut conn).await?;
                    Ok(info.lines().any(|line| line.trim() == "role:master"))
                }
                Err(error) => Err(BackendError::from(error)),
            }
        };
        ask.await.unwrap_or(false)
    }

    /// Every sentinel asked where the primary is (before an invalidation's recheck, at an
    /// announcement, once a subscription to them is made), unless that was asked after `since`
    /// already (one round of questions serves every check waiting on it, answered or not). The
    /// newest answer by config epoch wins, if a majority answered: right after a failover a
    /// sentinel may still name the old primary, which answers `ROLE` as a primary until the
    /// sentinels convert it (so the `redis` crate's `SentinelClient`, which takes the first
    /// sentinel's answer and checks the server's role, can name it). At another address than
    /// the last primary, the connections move there (`install`). Nothing changes if fewer than
    /// a majority answer (logged once until they do), if the answer is older than one already
    /// taken, or before any primary was known (the first call asks; the answer's epoch is still
    /// recorded). Only one round at a time;
    /// calls that ask the sentinels themselves do not wait for it.
    async fn confirm(&self, since: Instant) {
        let mut confirmed = self.confirmed.lock().await;
        if confirmed.asked.is_some_and(|asked| asked >= since) {
            return;
        }
        let asked = Instant::now();
        let newest = self.newest_primary().await;
        confirmed.asked = Some(asked);
        let (epoch, host, port) = match newest {
            Ok(newest) => {
                if std::mem::take(&mut confirmed.failing) {
                    tracing::warn!(sentinels = %self.target.address(), "the sentinels answer again");
                }
                newest
            }
            Err(error) => {
                if !std::mem::replace(&mut confirmed.failing, true) {
                    tracing::warn!(sentinels = %self.target.address(), %error, "a majority of the sentinels did not answer where the primary is; the primary in use is kept, and invalidations are checked again there (logged once until they do)");
                }
                return;
            }
        };
        let mut last = self.last();
        if epoch < last.epoch {
            return;
        }
        last.epoch = epoch;
        let Some(known) = last.info.clone() else { return };
        // The target's settings at the answered address, as `discover` makes them.
        let Ok(answered) = self.info_at(host, port) else { return };
        if known.addr().to_string() == answered.addr().to_string() {
            if self.current().is_none() {
                // Forgotten after a failed call: the next call would ask the sentinels.
                self.install(&mut last, &Arc::new(Primary { info: known, dbs: Default::default() }));
            }
            return;
        }
        tracing::warn!(from = %known.addr(), to = %answered.addr(), "the sentinels name another primary than the one last used; moving there");
        self.install(&mut last, &Arc::new(Primary { info: answered, dbs: Default::default() }));
    }

    /// The newest of the sentinels' answers (highest config epoch), if a majority answered:
    /// its epoch and the primary's address. Each sentinel is asked
    /// `SENTINEL GET-MASTER-ADDR-BY-NAME` (during a failover, the promoted replica already, where
    /// `SENTINEL MASTER` still names the old primary) and `SENTINEL MASTER` (for the epoch), all
    /// at once on new connections, each within `connect_timeout`; once a majority has answered,
    /// the others only within as long again as the majority took, plus `MAJORITY_GRACE`.
    async fn newest_primary(&self) -> Result<(u64, String, u16), BackendError> {
        let asks = self.target.sentinels.iter().map(|sentinel| async move {
            let client = self.sentinel_client(sentinel)?;
            let ask = async {
                let mut conn = client.get_multiplexed_async_connection_with_config(&self.asking()).await?;
                redis::pipe()
                    .cmd("SENTINEL")
                    .arg("GET-MASTER-ADDR-BY-NAME")
                    .arg(&self.target.master)
                    .cmd("SENTINEL")
                    .arg("MASTER")
                    .arg(&self.target.master)
                    .query_async::<((String, u16), HashMap<String, String>)>(&mut conn)
                    .await
            };
            let ((host, port), fields) = tokio::time::timeout(self.connect_timeout, ask)
                .await
                .map_err(|_| BackendError::Timeout(self.connect_timeout))?
                .map_err(|error| sentinel_error(sentinel, error))?;
            match fields.get("config-epoch").and_then(|e| e.parse::<u64>().ok()) {
                Some(epoch) => Ok((epoch, host, port)),
                None => Err(BackendError::from(redis::RedisError::from((
                    redis::ErrorKind::Parse,
                    "SENTINEL MASTER named no config-epoch",
                )))),
            }
        });
        // Answers taken as they come; once a majority has answered, the others are waited for
        // only as long again as the majority took (and `MAJORITY_GRACE` more): a sentinel that
        // stopped answering (frozen, a dropped route) would otherwise hold every round for the
        // whole `connect_timeout`, past the recheck that waits on it.
        let majority = self.target.sentinels.len() / 2 + 1;
        let started = tokio::time::Instant::now();
        let mut asks: futures_util::stream::FuturesUnordered<_> = asks.collect();
        let mut newest: Option<(u64, String, u16)> = None;
        let (mut answered, mut failure, mut cut) = (0, None, None);
        loop {
            let next = match cut {
                None => asks.next().await,
                Some(cut) => match tokio::time::timeout_at(cut, asks.next()).await {
                    Ok(next) => next,
                    Err(_) => break,
                },
            };
            let Some(answer) = next else { break };
            match answer {
                Ok(found) => {
                    answered += 1;
                    if newest.as_ref().is_none_or(|(epoch, ..)| found.0 > *epoch) {
                        newest = Some(found);
                    }
                    if answered == majority {
                        cut = Some(tokio::time::Instant::now() + started.elapsed() + MAJORITY_GRACE);
                    }
                }
                // A sentinel's refusal of its credentials is kept over a later failure (a
                // time-out): it is the one that says what to do.
                Err(error) => {
                    if !failure.as_ref().is_some_and(refused) {
                        failure = Some(error);
                    }
                }
            }
        }
        match newest {
            Some(newest) if answered >= majority => Ok(newest),
            _ => Err(failure.unwrap_or_else(|| {
                let few = format!("{answered} of {} sentinels answered", self.target.sentinels.len());
                redis::RedisError::from((redis::ErrorKind::Client, "too few sentinels answered", few)).into()
            })),
        }
    }

    /// Hands the connections `primary`. At another address than the last one, near copies read
    /// from the last one are no longer told of changes (its tracking connection hears the old
    /// server), so the tier is distrusted before any call can read the new one, and the tracking
    /// connection is told to move.
    fn install(&self, last: &mut Last, primary: &Arc<Primary>) {
        let address = primary.info.addr().to_string();
        if last.info.as_ref().is_some_and(|last| last.addr().to_string() != address) {
            self.moves.fetch_add(1, SeqCst);
            if let Some(tier) = self.near.get().and_then(Weak::upgrade) {
                tier.distrust();
            }
            self.moving.notify_one();
        }
        last.info = Some(primary.info.clone());
        last.installs += 1;
        self.current.store(Some(Arc::clone(primary)));
    }

    fn last(&self) -> std::sync::MutexGuard<'_, Last> {
        self.last.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A client for `info` (a primary's or a sentinel's address and credentials), trusting this
    /// target's CA if it is reached over TLS.
    fn client_for(&self, info: redis::ConnectionInfo) -> Result<redis::Client, BackendError> {
        CaCert::client(info, &self.target.ca)
    }

    /// `db`'s connection to `primary`, made on first use.
    fn conn(&self, primary: &Primary, db: u8) -> Result<Link, BackendError> {
        let cell = &primary.dbs[usize::from(db & 0x0f)];
        if let Some(link) = cell.get() {
            return Ok(link.clone());
        }
        let settings = primary.info.redis_settings().clone().set_db(i64::from(db));
        let client = self.client_for(primary.info.clone().set_redis_settings(settings))?;
        Ok(cell
            .get_or_init(|| Link::new(client, db, self.connect_timeout, self.op_timeout, self.coalesce_reads))
            .clone())
    }

    /// After a call: a connection that failed, or a server that no longer takes writes (its
    /// error reply, which the connection hands over as a value: the caller extracts it), means
    /// the primary may have moved; the next call asks the sentinels again.
    fn check<V: TellsOfAMove>(&self, primary: &Arc<Primary>, result: &redis::RedisResult<V>) {
        let moved = match result {
            Err(e) => {
                e.is_io_error()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal()
                    || e.is_timeout()
                    || e.code().is_some_and(demoted)
            }
            Ok(reply) => reply.tells_of_a_move(),
        };
        if moved {
            self.forget(Some(primary));
        }
    }

    /// The primary (`primary`, or whichever is known) may have moved: the next call asks the
    /// sentinels, and so does the near tier's tracking connection at once (a process whose
    /// lookups are all answered by copies would otherwise never ask).
    fn forget(&self, primary: Option<&Arc<Primary>>) {
        let forgotten = match primary {
            None => {
                self.current.store(None);
                true
            }
            // Only if it is still the one known: a primary installed since stays.
            Some(primary) => {
                let was = self.current.compare_and_swap(Arc::as_ptr(primary), None);
                was.as_ref().is_some_and(|was| Arc::ptr_eq(was, primary))
            }
        };
        if forgotten {
            self.moving.notify_one();
        }
    }
}

/// A sentinel's `host:port` as an address, TLS or not (26379 where no port parses).
fn sentinel_address(sentinel: &str, tls: bool) -> ConnectionAddr {
    let (host, port) = sentinel.rsplit_once(':').unwrap_or((sentinel, "26379"));
    let (host, port) = (host.to_owned(), port.parse().unwrap_or(26379));
    if tls {
        ConnectionAddr::TcpTls { host, port, insecure: false, tls_params: None }
    } else {
        ConnectionAddr::Tcp(host, port)
    }
}

/// The error of the sentinel at `sentinel`, saying what to do when it refused the credentials it
/// was given (none, or wrong ones): a `NOAUTH` or `WRONGPASS` reply (a pipeline's included), or
/// a failed `AUTH`. Such an error is an authentication failure ([`refused`]).
fn sentinel_error(sentinel: &str, error: redis::RedisError) -> BackendError {
    if !crate::error::refuses_credentials(&error) {
        return error.into();
    }
    let what = format!("sentinel {sentinel}: {error}");
    redis::RedisError::from((redis::ErrorKind::AuthenticationFailed, crate::error::SENTINEL_REFUSAL, what))
        .into()
}

/// Whether `error` is a sentinel's refusal of the credentials it was given ([`sentinel_error`]).
fn refused(error: &BackendError) -> bool {
    matches!(error, BackendError::Redis(failure) if failure.is_authentication_failure())
}

/// `addr` with a user and password (either may be absent).
fn connection_info(
    addr: ConnectionAddr,
    username: &Option<String>,
    password: &Option<String>,
) -> Result<redis::ConnectionInfo, BackendError> {
    let mut settings = redis::RedisConnectionInfo::default();
    if let Some(username) = username {
        settings = settings.set_username(username);
    }
    if let Some(password) = password {
        settings = settings.set_password(password);
    }
    Ok(redis::IntoConnectionInfo::into_connection_info(addr)?.set_redis_settings(settings))
}

/// The error codes of a server that is no longer (or not yet) a primary that takes writes.
fn demoted(code: &str) -> bool {
    matches!(code, "READONLY" | "MASTERDOWN" | "LOADING")
}

/// A reply (or a pipeline's replies) that holds such an error.
trait TellsOfAMove {
    fn tells_of_a_move(&self) -> bool;
}

impl TellsOfAMove for Value {
    fn tells_of_a_move(&self) -> bool {
        match self {
            Value::ServerError(e) => demoted(e.code()),
            Value::Array(replies) => replies.tells_of_a_move(),
            _ => false,
        }
    }
}

impl TellsOfAMove for Vec<Value> {
    fn tells_of_a_move(&self) -> bool {
        self.iter().any(|reply| matches!(reply, Value::ServerError(e) if demoted(e.code())))
    }
}

/// The near tier's tracking connection goes to the primary the connections use now.
struct Tracked(Arc<Shared>);

impl Source for Tracked {
    fn address(&self) -> String {
        format!("sentinel {}", self.0.target.address())
    }

    fn locate(&self) -> Boxed<'_, Result<(Vec<redis::Client>, u64), BackendError>> {
        Box::pin(async move {
            let mark = self.mark();
            let primary = self.0.primary().await?;
            let settings = primary.info.redis_settings().clone().set_protocol(redis::ProtocolVersion::RESP3);
            Ok((vec![self.0.client_for(primary.info.clone().set_redis_settings(settings))?], mark))
        })
    }

    fn mark(&self) -> u64 {
        self.0.moves.load(SeqCst)
    }

    /// After a move, or once the primary was forgotten.
    fn moving(&self) -> Boxed<'_, ()> {
        Box::pin(self.0.moving.notified())
    }

    /// Asks the sentinels if the primary was forgotten (a move, if they name another server).
    fn settle(&self) -> Boxed<'_, ()> {
        Box::pin(async move {
            if self.0.current().is_none() {
                let _ = self.0.primary().await;
            }
        })
    }

    /// A primary the tracking connection could not reach (not one that refused tracking) may
    /// have gone, in a failover the connections have not run into yet: if they still use it,
    /// the next call asks the sentinels.
    fn failed(&self, address: &str, error: &BackendError) {
        let unreachable = match error {
            BackendError::Redis(failure) => failure.is_connection_failure() || error.is_timeout(),
            other => other.is_timeout(),
        };
        let current = self.0.current();
        if let Some(primary) = current.filter(|p| unreachable && p.info.addr().to_string() == address) {
            self.0.forget(Some(&primary));
        }
    }
}

/// A connection to the current primary's DB: it finds the primary on first use and after the
/// primary moves.
#[derive(Clone)]
pub(crate) struct SentinelConn {
    shared: Arc<Shared>,
    _users: Users,
    db: u8,
    /// For a pinned clone (`Connections::pinned`): the primary known when it was made, and a
    /// pinned clone of its connection, which every command goes to.
    pinned: Option<(Arc<Primary>, Link)>,
}

impl SentinelConn {
    /// The primary and its connection: the pinned ones, or the current ones.
    async fn target(&self) -> redis::RedisResult<(Arc<Primary>, Link)> {
        if let Some(pinned) = &self.pinned {
            return Ok(pinned.clone());
        }
        let primary = self.shared.primary().await.map_err(into_redis)?;
        let link = self.shared.conn(&primary, self.db).map_err(into_redis)?;
        Ok((primary, link))
    }
}

impl ConnectionLike for SentinelConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let (primary, mut conn) = self.target().await?;
            let result = conn.req_packed_command(cmd).await;
            self.shared.check(&primary, &result);
            result
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let (primary, mut conn) = self.target().await?;
            let result = conn.req_packed_commands(pipeline, offset, count).await;
            self.shared.check(&primary, &result);
            result
        })
    }

    fn get_db(&self) -> i64 {
        i64::from(self.db)
    }
}

/// What one primary's DB's reads are sent through (`reads.rs`): its connection, each reply's
/// failure checked for a move as any other command's.
#[derive(Clone)]
struct Reader {
    shared: Arc<Shared>,
    primary: Arc<Primary>,
    link: Link,
}

impl Sender for Reader {
    fn send(&self, cmd: Cmd) -> RedisFuture<'_, Value> {
        Box::pin(async move {
            let result = Sender::send(&self.link, cmd).await;
            self.shared.check(&self.primary, &result);
            result
        })
    }

    fn op_timeout(&self) -> Duration {
        self.shared.op_timeout
    }

    fn reads(&self) -> &Reads {
        Sender::reads(&self.link)
    }
}

/// A failure to find the primary, as the `redis` error the connection reports.
fn into_redis(e: BackendError) -> redis::RedisError {
    match e {
        BackendError::Redis(failure) => failure.into_inner(),
        other => redis::RedisError::from((
            redis::ErrorKind::Io,
            "no primary from the sentinels",
            other.to_string(),
        )),
    }
}

impl Connections for SentinelPrimary {
    type Conn = SentinelConn;

    fn kind(&self) -> &'static str {
        "sentinel"
    }

    fn address(&self) -> String {
        format!("sentinel {}", self.shared.target.address())
    }

    fn conn(&self, db: u8) -> Result<SentinelConn, BackendError> {
        Ok(SentinelConn {
            shared: Arc::clone(&self.shared),
            _users: Arc::clone(&self.users),
            db,
            pinned: None,
        })
    }

    /// Pinned to the primary known now and to the connection its link has now, so that a lease
    /// request's release follows the request on its connection as on one server. While no
    /// primary is known (before the first call, after a failed one), unpinned: the request waits
    /// for the sentinels' answer, and its release may reach another connection first.
    fn pinned(conn: &SentinelConn) -> SentinelConn {
        let pinned = conn.pinned.clone().or_else(|| {
            let primary = conn.shared.current()?;
            let link = conn.shared.conn(&primary, conn.db).ok()?.pinned();
            Some((primary, link))
        });
        SentinelConn { pinned, ..conn.clone() }
    }

    /// Coalesced with the other reads on the primary's DB (`reads.rs`). Boxed: inline, its type nested the hit path's future past the compiler's recursion limit
    /// in callers' code (an axum handler, a test's `async` block). The lookup allocated its
    /// request's future before too (a `SentinelConn` command is boxed).
    fn get<'a>(
        &'a self,
        db: u8,
        key: &'a str,
    ) -> impl std::future::Future<Output = Result<Option<Vec<u8>>, BackendError>> + Send + 'a {
        use futures_util::FutureExt;
        async move {
            let primary = self.shared.primary().await?;
            let link = self.shared.conn(&primary, db)?;
            let reader = Reader { shared: Arc::clone(&self.shared), link, primary };
            Ok(reader.reads().get(key, &reader).await?)
        }
        .boxed()
    }

    fn replicated(&self) -> bool {
        true
    }

    /// The sentinels asked again: a primary demoted while alive answers as before until they
    /// convert it (`SENTINEL FAILOVER`: 8 s or more after the replica was promoted).
    fn confirm(&self, since: Instant) -> impl std::future::Future<Output = ()> + Send + '_ {
        self.shared.confirm(since)
    }

    fn key<'k>(&self, _db: u8, key: &'k str) -> Cow<'k, str> {
        namespaced(&self.namespace, key)
    }

    /// A call the store's bound ended before the connection answered (so `Shared::check` never
    /// saw it): the primary may have moved, so the next call asks the sentinels. Every answered
    /// failure was already checked on the connection.
    fn failed(&self, error: &BackendError) {
        if error.is_timeout() {
            self.shared.forget(None);
        }
    }

    fn track(&self, near: &Arc<NearTier>, prefixes: Vec<String>) -> bool {
        let _ = self.shared.near.set(Arc::downgrade(near));
        let namespace =
            if self.namespace.is_empty() { String::new() } else { format!("{}:", self.namespace) };
        Tracking {
            source: Box::new(Tracked(Arc::clone(&self.shared))),
            prefixes: prefixes.iter().map(|prefix| format!("{namespace}{prefix}")).collect(),
            strip: Strip { namespace, dbs: false },
            connect_timeout: self.shared.connect_timeout,
            op_timeout: self.shared.op_timeout,
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

#[cfg(test)]
mod tests {
    use super::TellsOfAMove;

    fn reply(wire: &[u8]) -> redis::Value {
        redis::parse_redis_value(wire).unwrap()
    }

    /// A demoted server's error reply, alone, in a pipeline's replies or in an array, tells of a
    /// move; any other reply does not.
    #[test]
    fn a_read_only_or_loading_servers_reply_tells_of_a_move() {
        let readonly = reply(b"-READONLY You can't write against a read only replica.\r\n");
        assert!(readonly.tells_of_a_move());
        assert!(reply(b"-LOADING Redis is loading the dataset in memory\r\n").tells_of_a_move());
        assert!(reply(b"-MASTERDOWN Link with MASTER is down\r\n").tells_of_a_move());
        assert!(vec![reply(b"+OK\r\n"), readonly.clone()].tells_of_a_move());
        assert!(reply(b"*2\r\n$1\r\na\r\n-READONLY You can't write\r\n").tells_of_a_move());
        assert!(!reply(b"-ERR unknown command\r\n").tells_of_a_move());
        assert!(!reply(b"-NOSCRIPT No matching script\r\n").tells_of_a_move());
        assert!(!reply(b"$5\r\nvalue\r\n").tells_of_a_move());
        assert!(!vec![reply(b"+OK\r\n"), reply(b"$-1\r\n")].tells_of_a_move());
    }
}
