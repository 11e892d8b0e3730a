//! A cached call, step by step: lookup; on a miss, one computation per key in this process
//! (single flight) and one across processes (fill lease, renewed while the function runs, so a
//! function slower than `lease_ttl` still computes once); the fill goes to the write-behind
//! batcher, and a fill that an invalidation revoked is refused. No cache failure reaches the
//! caller.
//!
//! Counting: a call is a *hit* when it returns a value it did not compute (from the backend, from
//! another caller's flight, or after waiting for another process's lease), a *miss* when it ran
//! the function.

use std::future::Future;
use std::pin::pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backend::{Acquired, FillOutcome, LeaseAsk, Renewal, Store, Write};
use crate::error::BackendError;
use crate::flight::{self, Flights, Join, Leader, Outcome};
use crate::functions::Function;
use crate::key::{self, ArgsRef, CallKey, KeyHasher};
use crate::near::{Keeper, NearKey, NearRef};
use crate::policy::Policy;
use crate::runtime::{Inner, Runtime};
use crate::spec::{CachedFn, Spec};
use crate::stats::Counters;
use crate::telemetry;
use crate::value;

/// What the first lookup decided.
enum Lookup<T> {
    /// A value to return; `refresh` when it is due for an eager refresh (the generation it was
    /// read under, to fill the refreshed value with).
    Hit { value: T, refresh: Option<u64> },
    /// A value past its TTL, kept for `stale_if_error`: run the function, answer with this value
    /// if it fails.
    Stale { value: T, generation: u64 },
    /// Run the read-through protocol, knowing this generation; `overwrite` when the stored value
    /// must not be returned (it does not decode, or an unapplied invalidation covers it).
    Miss { generation: u64, overwrite: bool },
    /// The backend failed: run the function, touch nothing.
    Unavailable,
}

/// One miss being served.
struct Miss<'a> {
    runtime: &'a Runtime,
    cached: &'a CachedFn,
    spec: &'static Spec,
    key: &'a str,
    generation: u64,
    counters: &'a Arc<Counters>,
}

/// Whether a call of `cached` may be answered by a near copy here: it can be kept (`keeper`) and
/// the runtime serving the call keeps copies of it. Asked first, so that only such calls spend
/// tokio's budget (`__private::budget`).
pub(crate) fn near_on<T>(cached: &CachedFn, keeper: &Option<Keeper<T>>) -> bool {
    keeper.is_some() && Runtime::with_current(|runtime| runtime.inner().near_life(cached.spec()).is_some())
}

/// Asked by a cached function next, synchronously, with its key's hasher and what [`near_on`]
/// said: the value if a typed copy in this process answers (`near.rs`; no I/O, no decoding, the
/// value cloned into the slot it is returned from), else the key for [`call`], with what a copy
/// is kept under when the function keeps them here. Synchronous so that a hit costs no future of
/// its own and nothing is held across an `.await`.
pub(crate) fn near_first<T>(
    cached: &CachedFn,
    hasher: &mut KeyHasher,
    keeper: Option<Keeper<T>>,
    near: bool,
) -> Result<T, Option<CallKey>> {
    if let (true, Some(keeper)) = (near, keeper) {
        let mut hit = None;
        if let Some(args) = hasher.args() {
            Runtime::with_current(|runtime| near_hit(runtime.inner(), cached, args, keeper, &mut hit));
        }
        if let Some(value) = hit {
            let span = call_span(cached.spec());
            if !span.is_disabled() {
                span.record("cache.outcome", "hit");
            }
            return Ok(value);
        }
    }
    Err(hasher.call_key(near))
}

pub(crate) async fn call<P, R, B, F>(
    cached: CachedFn,
    key: Option<CallKey>,
    keeper: Option<Keeper<P::Stored>>,
    body: B,
) -> R
where
    P: Policy<R>,
    B: FnOnce() -> F,
    F: Future<Output = R>,
{
    let span = call_span(cached.spec());
    // Everything boxed, and the function's future made only there: a cached function's future
    // stays a few words (and a near hit, answered before, never makes this one).
    if span.is_disabled() {
        Box::pin(serve::<P, R, F>(cached, key, keeper, body)).await
    } else {
        Box::pin(tracing::Instrument::instrument(serve::<P, R, F>(cached, key, keeper, body), span)).await
    }
}

/// The span of one cached call; its outcome is recorded where it is known.
fn call_span(spec: &Spec) -> tracing::Span {
    tracing::debug_span!(
        "cache.call",
        cache.db = spec.db,
        cache.prefix = spec.prefix,
        cache.function = spec.function,
        cache.outcome = tracing::field::Empty,
    )
}

/// Writes the near copy of `args` into `slot`, if one is live (the function keeps copies here).
fn near_hit<T>(rt: &Inner, cached: &CachedFn, args: ArgsRef<'_>, keeper: Keeper<T>, slot: &mut Option<T>) {
    let spec = cached.spec();
    rt.functions.with(cached, &rt.stats, |function| {
        let key = NearRef::new(function.near_base, args);
        let generation = rt.functions.confirmed_generation(function);
        rt.near.get_into(spec.db, key, &function.near_epoch, generation, keeper, slot);
        if slot.is_some() {
            function.counters.near_hit(); // also reported as a hit
        }
    })
}

async fn serve<P, R, F>(
    cached: CachedFn,
    key: Option<CallKey>,
    keeper: Option<Keeper<P::Stored>>,
    body: impl FnOnce() -> F,
) -> R
where
    P: Policy<R>,
    F: Future<Output = R>,
{
    // This future and the lookup's are allocated for every call that reaches them, hits
    // included, so both are kept small: the function's future and every path past the lookup
    // are made, and boxed, only where they run. Boxes under a kilobyte are served by the
    // allocator's per-thread cache; one of both (1.5 KB, and 5 KB before the paths past the
    // lookup were boxed) took the allocator's shared lock, contended at 64 callers.
    let runtime = Runtime::current_ref();
    let rt = runtime.inner();
    let function = rt.functions.hold(&cached, &rt.stats);
    if rt.backend.is_none() {
        // Caching is off: the call is counted as one that skipped the cache.
        function.counters.miss();
        telemetry::outcome("uncached");
        return Box::pin(body()).await;
    }
    let spec = cached.spec();
    let counters = &function.counters;
    let Some(key) = key else {
        counters.key_failure();
        counters.miss();
        telemetry::outcome("uncached");
        if function.first_key_failure() {
            tracing::warn!(
                prefix = spec.prefix,
                function = spec.function,
                "an argument failed to serialize into the cache key; calling uncached (logged once per function, counted as key_failures)"
            );
        }
        return Box::pin(body()).await;
    };
    // Where a lookup keeps a near copy of what it reads (`call` asked the copies already).
    let mut key = key;
    let near = keeper.and_then(|keeper| {
        let life = rt.near_life(spec)?;
        let args = key.take_args()?;
        Some(NearPlace { keeper, life, key: NearKey::new(function.near_base, args), hash: key.hash() })
    });
    let key = key.text();
    // A flight already under way for this key (its fill may still be queued): follow it rather
    // than read what it has not written yet. One atomic load when no flight is running.
    let mut lookup_first = true;
    if rt.flights.any_running() {
        lookup_first = !rt.flights.is_running(spec.db, &key);
    }
    let (generation, overwrite) = if lookup_first {
        match Box::pin(lookup::<P::Stored>(rt, &cached, &key, &function, near)).await {
            Lookup::Hit { value, refresh: Some(generation) } => {
                let miss = Miss { runtime: &runtime, cached: &cached, spec, key: &key, generation, counters };
                return Box::pin(refresh_eagerly::<P, R, F>(miss, value, body())).await;
            }
            Lookup::Stale { value, generation } => {
                let miss = Miss { runtime: &runtime, cached: &cached, spec, key: &key, generation, counters };
                return match Box::pin(serve_stale::<P, R, F>(miss, value, body(), &function)).await {
                    Ok(output) => output,
                    // The entry went while waiting for its holder: a miss like any other, one
                    // computation per key here and across processes.
                    Err((body, waited)) => {
                        let miss = Miss {
                            runtime: &runtime,
                            cached: &cached,
                            spec,
                            key: &key,
                            generation,
                            counters,
                        };
                        Box::pin(follow_or_lead::<P, R, F>(miss, false, waited, move || body)).await
                    }
                };
            }
            Lookup::Hit { value, refresh: None } => {
                counters.hit();
                telemetry::outcome("hit");
                if rt.backend.is_in_process() {
                    // An embedded hit never waits on I/O, so it never yields: spend tokio's
                    // cooperative budget so that a loop of hits cannot starve other tasks.
                    tokio::task::coop::consume_budget().await;
                }
                return P::restore(value);
            }
            Lookup::Miss { generation, overwrite } => (generation, overwrite),
            Lookup::Unavailable => {
                counters.miss();
                return Box::pin(body()).await;
            }
        }
    } else {
        // Following a running flight: the generation this process knows is enough.
        (rt.functions.current(&function).generation, false)
    };
    let miss = Miss { runtime: &runtime, cached: &cached, spec, key: &key, generation, counters };
    Box::pin(follow_or_lead::<P, R, F>(miss, overwrite, false, body)).await
}

/// A miss in this process: follows the key's flight if one is running (its value, once filled,
/// is the answer), else leads one (`lead`: the fill lease, the computation, the fill). `waited`:
/// the call has already waited for a lease (and counted it).
async fn follow_or_lead<P, R, F>(miss: Miss<'_>, overwrite: bool, waited: bool, body: impl FnOnce() -> F) -> R
where
    P: Policy<R>,
    F: Future<Output = R>,
{
    let Miss { runtime, cached, spec, key, generation, counters } = miss;
    let rt = runtime.inner();
    let mut body = Some(body);
    loop {
        let joined_at = Instant::now();
        match Flights::join(&rt.flights, spec.db, key) {
            Join::Leader(leader) => {
                let body = body.take().expect("a caller leads at most once");
                let miss = Miss { runtime, cached, spec, key, generation, counters };
                return Box::pin(lead::<P, R, F>(miss, overwrite, waited, body(), leader)).await;
            }
            Join::Follower(rx) => {
                let shared = match flight::wait(rx).await {
                    Outcome::Value(bytes) => bytes,
                    Outcome::Unverified(bytes, computed_from) if joined_at <= computed_from => bytes,
                    Outcome::Uncached => break,
                    Outcome::Refused | Outcome::Abandoned | Outcome::Unverified(..) => continue,
                };
                if let Ok((_, value)) = value::decode::<P::Stored>(spec.format, &shared) {
                    counters.hit();
                    telemetry::outcome("hit");
                    tracing::debug!(db = spec.db, prefix = spec.prefix, function = spec.function, %key, "cache hit (shared flight)");
                    return P::restore(value);
                }
                break;
            }
        }
    }
    counters.miss();
    telemetry::outcome("miss");
    Box::pin(body.take().expect("a follower still holds its function")()).await
}

/// Counts a failed backend call: `bypassed` when the breaker refused it (no network), else a
/// backend error. The breaker logs the failure once per episode; here it is debug only.
fn count_failure(counters: &Counters, spec: &Spec, key: &str, error: &BackendError, what: &str) {
    if error.is_bypassed() {
        counters.bypass();
        telemetry::outcome("bypassed");
    } else {
        counters.backend_error();
        telemetry::outcome("unavailable");
        tracing::debug!(db = spec.db, prefix = spec.prefix, function = spec.function, %key, %error, "cache {what} failed; calling the function");
    }
}

/// A lookup's read when it needs more than the entry: the function's generation (read again
/// every `generation_refresh`) or the entry's time left (eager refresh, fail-safe, near copies).
/// A failure of either read fails the lookup.
async fn read_more<V>(
    rt: &Inner,
    spec: &Spec,
    key: &str,
    function: &Function,
    generation: bool,
    reads_ttl: bool,
    decode: impl Fn(&[u8]) -> V,
) -> (Result<(Option<V>, Option<u64>), BackendError>, Option<Duration>) {
    if !generation {
        return match rt.backend.get_with_ttl(spec.db, key, decode).await {
            Ok((found, left)) => (Ok((found, None)), left),
            Err(error) => (Err(error), None),
        };
    }
    let life = key::generation_life(spec.entry_life());
    // Boxed: read once per `generation_refresh`, and inline it would put this future (allocated
    // on every lookup of a function that reads the time left) past a kilobyte.
    let found =
        Box::pin(rt.backend.get_with_generation(spec.db, key, &function.generation_key, life, decode)).await;
    // A read that also reads the generation does not learn the entry's time left: ask for it
    // (one more round trip), so that an entry past its TTL does not pass for a fresh one, and a
    // due refresh is not missed by callers sparser than the period.
    if reads_ttl && matches!(found, Ok((Some(_), _))) {
        return match rt.backend.ttl(spec.db, key).await {
            Ok(left) => (found, left),
            Err(error) => (Err(error), None),
        };
    }
    (found, None)
}

/// Where a lookup keeps a near copy of what it reads: how to copy it, for how long at most,
/// under which key, and its entry's hash.
struct NearPlace<T> {
    keeper: Keeper<T>,
    life: Duration,
    key: NearKey,
    hash: [u8; 16],
}

/// An `async move` block rather than an `async fn`: an `async fn` keeps a copy of each argument
/// beside the one its body uses (here 100 bytes more, on a future allocated per call).
#[allow(clippy::manual_async_fn)]
fn lookup<'a, T: serde::de::DeserializeOwned + 'a>(
    rt: &'a Inner,
    cached: &'a CachedFn,
    key: &'a str,
    function: &'a Function,
    near: Option<NearPlace<T>>,
) -> impl Future<Output = Lookup<T>> + 'a {
    async move {
        let spec = cached.spec();
        let counters = &function.counters;
        // Taken before the read: a change notified from here on keeps the copy from being kept.
        let ticket = near
            .as_ref()
            .and_then(|n| rt.near.ticket(spec.db, function.near_base, n.hash, &function.near_epoch));
        let known = rt.functions.current(function);
        let refresh = known.stale;
        let decode = |bytes: &[u8]| (bytes.len(), value::decode::<T>(spec.format, bytes));
        let started = Instant::now();
        // What the entry has left, when the function refreshes eagerly, keeps stale entries or keeps
        // a near copy (which must not outlive the entry's fresh life).
        let reads_ttl = spec.reads_ttl() || ticket.is_some();
        let (found, left) = if refresh || reads_ttl {
            // Boxed: their futures would make every lookup's larger (allocated per call; see
            // `serve`), and only functions that read the time left (eager refresh, fail-safe, near
            // copies) take this path on every lookup; the others once per `generation_refresh`.
            Box::pin(read_more(rt, spec, key, function, refresh, reads_ttl, decode)).await
        } else {
            (rt.backend.get_with(spec.db, key, decode).await.map(|v| (v, None)), None)
        };
        counters.lookup_took(started.elapsed());
        let (found, read) = match found {
            Ok(found) => found,
            Err(error) => {
                count_failure(counters, spec, key, &error, "lookup");
                return Lookup::Unavailable;
            }
        };
        let generation = read.map_or(known.generation, |g| rt.functions.observe(function, g, &known));
        // An invalidation of this key that has not reached the backend yet: the stored value, if any,
        // is the one it drops, so do not return it (here, or from the lease step).
        let distrusted = rt.pending.covers(cached, key);
        let overwrite = match found {
            Some((size, Ok((written, value)))) if written >= generation && !distrusted => {
                tracing::debug!(db = spec.db, prefix = spec.prefix, function = spec.function, %key, "cache hit");
                let fresh_left = match left {
                    Some(left) => spec.fresh_left(left),
                    None => None,
                };
                if !spec.stale_if_error.is_zero() && fresh_left.is_none() {
                    if left.is_none() {
                        // Deleted between the read and its time left (an invalidation): a miss.
                        tracing::debug!(db = spec.db, prefix = spec.prefix, function = spec.function, %key, "cache miss");
                        return Lookup::Miss { generation, overwrite: false };
                    }
                    // Past its TTL: only an answer if the function fails.
                    return Lookup::Stale { value, generation };
                }
                let refresh = fresh_left.is_some_and(|left| spec.refresh_due(left)).then_some(generation);
                // Kept with the generation its entry was written under: it answers while that
                // is not older than the generation confirmed here (`near_hit`).
                if let (Some(ticket), Some(near), None) = (ticket, near, refresh) {
                    // Counted from before the read, as the server measured it: the reply's trip
                    // and this task's wait are not added to the copy's life. An entry whose time
                    // left is unknown (gone between the read and its time left) is not kept.
                    let life = match left {
                        Some(_) => {
                            let fresh = fresh_left.unwrap_or_default().saturating_sub(started.elapsed());
                            spec.near_copy_life(near.life, fresh)
                        }
                        None => Duration::ZERO,
                    };
                    if !life.is_zero() {
                        let copy = (near.keeper.keep)(&value);
                        rt.near.keep(
                            ticket,
                            near.key,
                            near.hash,
                            &function.near_epoch,
                            written,
                            copy,
                            size,
                            life,
                        );
                    }
                }
                return Lookup::Hit { value, refresh };
            }
            Some((_, Ok(_))) => distrusted,
            Some((_, Err(error))) => {
                counters.decode_failure();
                match error {
                    // Expected after a release changed the type: one per key, so not a warning.
                    value::CodecError::OtherShape => {
                        tracing::debug!(db = spec.db, prefix = spec.prefix, function = spec.function, %key, "cached value was written for another shape of the type; recomputing");
                    }
                    value::CodecError::Invalid(error) => {
                        tracing::warn!(db = spec.db, prefix = spec.prefix, function = spec.function, %key, %error, "cached value no longer decodes; recomputing");
                    }
                }
                true
            }
            None => distrusted,
        };
        tracing::debug!(db = spec.db, prefix = spec.prefix, function = spec.function, %key, "cache miss");
        Lookup::Miss { generation, overwrite }
    }
}

/// A granted fill lease. Given back when the value is not filled (an `Err`, a `None`, a panic, a
/// cancelled caller) so that the next caller need not wait for it to expire.
struct LeaseHeld {
    armed: bool,
    runtime: Runtime,
    db: u8,
    key: String,
    token: u64,
}

impl LeaseHeld {
    /// The guard of a lease just granted to `token`: taken before anything else is awaited, so
    /// that a caller dropped at any `.await` gives the lease back.
    fn new(runtime: &Runtime, db: u8, key: &str, token: u64) -> Self {
        LeaseHeld { armed: true, runtime: runtime.clone(), db, key: key.to_owned(), token }
    }
}

/// Asks for `key`'s fill lease over whatever value is stored (a generation no entry has): granted
/// unless another caller holds it.
async fn acquire_over(rt: &Inner, db: u8, key: &str, token: u64) -> Result<Acquired<()>, BackendError> {
    let ask = LeaseAsk { token, ttl: rt.lease_ttl, min_generation: u64::MAX };
    rt.backend.acquire(db, key, ask, |_: &[u8]| ()).await
}

impl Drop for LeaseHeld {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (runtime, db, key, token) =
            (self.runtime.clone(), self.db, std::mem::take(&mut self.key), self.token);
        crate::background::spawn(async move {
            let rt = runtime.inner();
            if let Err(error) = rt.backend.release(db, &key, token).await {
                tracing::debug!(db, %key, %error, "lease release failed; it expires by itself");
            }
        });
    }
}

/// Runs `body` while renewing the lease every third of `lease_ttl`, in the caller's own task (a
/// holder that hangs or dies stops renewing, and loses the lease after `lease_ttl`). Returns the
/// output and what the last renewal found: `Renewed` while the lease is ours.
async fn compute_renewing<R>(
    rt: &Inner,
    db: u8,
    key: &str,
    lease: (u64, u64),
    counters: &Counters,
    body: impl Future<Output = R>,
) -> (R, Renewal) {
    let (token, grant) = lease;
    let period = (rt.lease_ttl / 3).max(Duration::from_millis(1));
    let renewing = async {
        loop {
            tokio::time::sleep(period).await;
            match rt.backend.renew(db, key, token, grant, rt.lease_ttl).await {
                Ok(Renewal::Renewed) => counters.renewal(),
                Ok(ended) => return ended,
                // Unreachable backend: try again next period; the fill script decides whether the
                // value may still be written.
                Err(_) => {}
            }
        }
    };
    let mut body = pin!(body);
    tokio::select! {
        biased;
        output = &mut body => (output, Renewal::Renewed),
        ended = renewing => (body.await, ended),
    }
}

/// The leader of this process's flight: takes the fill lease (or waits for whoever holds it),
/// computes, hands the fill to the batcher, and (through the fill's result) tells the followers.
async fn lead<P, R, F>(miss: Miss<'_>, mut overwrite: bool, mut waited: bool, body: F, leader: Leader) -> R
where
    P: Policy<R>,
    F: Future<Output = R>,
{
    let Miss { runtime, cached, spec, key, mut generation, counters } = miss;
    let rt = runtime.inner();
    let token = crate::backend::unique();
    let mut pause = Duration::from_millis(2);
    loop {
        // The generation this process knows now, not only the one the lookup knew: a
        // function-wide invalidation that returned since (its flights revoked, so callers
        // arriving after it may follow this one) makes entries of the older one stale, for the
        // stored value this asks for and for the value it fills.
        generation =
            generation.max(rt.functions.with(cached, &rt.stats, |f| rt.functions.current(f).generation));
        // A stored value that must not be returned (it does not decode, or an invalidation of it
        // is still queued, checked on every turn): ask for a generation none has.
        let distrusted = overwrite || rt.pending.covers(cached, key);
        let min_generation = if distrusted { u64::MAX } else { generation };
        let decode =
            |bytes: &[u8]| (Arc::<[u8]>::from(bytes), value::decode::<P::Stored>(spec.format, bytes));
        let ask = LeaseAsk { token, ttl: rt.lease_ttl, min_generation };
        let acquired = rt.backend.acquire(spec.db, key, ask, decode).await;
        match acquired {
            Ok(Acquired::Value((bytes, Ok((_, value))))) => {
                counters.hit();
                telemetry::outcome("hit");
                leader.finish(Outcome::Value(bytes));
                return P::restore(value);
            }
            Ok(Acquired::Value((_, Err(_)))) => overwrite = true,
            Ok(Acquired::Granted(grant)) => {
                let held = LeaseHeld::new(runtime, spec.db, key, token);
                counters.miss();
                telemetry::outcome("miss");
                let miss = Miss { runtime, cached, spec, key, generation, counters };
                return compute_and_fill::<P, R, F>(miss, held, grant, body, leader).await;
            }
            Ok(Acquired::Busy) => {
                // Another caller holds the lease and renews it while it computes: wait for its
                // value, or for the lease to go (its holder died, hung, or gave it back).
                if !waited {
                    waited = true;
                    counters.lease_wait();
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            Err(error) => {
                count_failure(counters, spec, key, &error, "fill lease");
                // No lease: compute without filling, and share the value with the followers,
                // who joined before we started computing.
                counters.miss();
                let computed_from = Instant::now();
                let output = body.await;
                counters.compute_took(computed_from.elapsed());
                let outcome = match P::stored(&output).map(|v| value::encode(spec.format, generation, v)) {
                    Some(Ok(bytes)) => Outcome::Unverified(bytes.into(), computed_from),
                    _ => Outcome::Uncached,
                };
                leader.finish(outcome);
                return output;
            }
        }
    }
}

/// Computes under a granted fill lease (renewing it; `held` gives it back if nothing is filled),
/// then fills, sharing the outcome with the flight's followers. The caller has counted the miss.
async fn compute_and_fill<P, R, F>(
    miss: Miss<'_>,
    mut held: LeaseHeld,
    grant: u64,
    body: F,
    leader: Leader,
) -> R
where
    P: Policy<R>,
    F: Future<Output = R>,
{
    let Miss { runtime, cached, spec, key, generation, counters } = miss;
    let rt = runtime.inner();
    // Filled under the generation this process knows now, not only the one its caller read: a
    // function-wide invalidation may have returned since (while a stale read waited for the
    // lease, or between an eager refresh's lookup and its grant). The computation starts after
    // this read, so its value is not older than that generation.
    let generation =
        generation.max(rt.functions.with(cached, &rt.stats, |f| rt.functions.current(f).generation));
    let token = held.token;
    let computed_from = Instant::now();
    let (output, lease) = compute_renewing(rt, spec.db, key, (token, grant), counters, body).await;
    counters.compute_took(computed_from.elapsed());
    let encoded = P::stored(&output).map(|v| value::encode(spec.format, generation, v));
    match encoded {
        Some(Ok(_)) if lease == Renewal::Revoked => {
            // An invalidation came while it computed: the value may predate the
            // write, so it is neither filled nor shared.
            held.armed = false;
            counters.refused_fill();
            leader.finish(Outcome::Refused);
        }
        Some(Ok(bytes)) => {
            let write = Write {
                key: key.to_owned(),
                value: bytes.into(),
                ttl: spec.fill_ttl(),
                lease: Some((token, grant)),
                done: None,
            };
            // The fill script consumes the lease; `held` gives it back if the fill fails.
            let flight = Flight { leader, computed_from, held };
            fill(rt, spec, write, flight, Arc::clone(counters)).await;
        }
        Some(Err(error)) => {
            counters.encode_failure();
            tracing::warn!(db = spec.db, prefix = spec.prefix, function = spec.function, %key, %error, "value does not encode; not cached");
            leader.finish(Outcome::Uncached);
        }
        None => leader.finish(Outcome::Uncached),
    }
    output
}

/// A hit past the function's `eager_refresh` share of its TTL: this caller refreshes the entry
/// if it gets the key's fill lease at once (one refresh per key across processes), and returns
/// the value it read otherwise (another caller is refreshing, or the backend failed): callers
/// other than the refresher never wait. Not a flight of this process: callers that arrive
/// meanwhile read the current entry, not the refresher's result. A refresh that fails (`Err`,
/// panic) returns the value it read: the option never turns a hit into a failure.
async fn refresh_eagerly<P, R, F>(miss: Miss<'_>, current: P::Stored, body: F) -> R
where
    P: Policy<R>,
    F: Future<Output = R>,
{
    use futures_util::FutureExt;
    let rt = miss.runtime.inner();
    let (spec, key, counters) = (miss.spec, miss.key, miss.counters);
    let token = crate::backend::unique();
    let grant = match acquire_over(rt, spec.db, key, token).await {
        Ok(Acquired::Granted(grant)) => grant,
        Ok(Acquired::Busy | Acquired::Value(())) => {
            counters.hit();
            telemetry::outcome("hit");
            return P::restore(current);
        }
        Err(error) => {
            count_failure(counters, spec, key, &error, "eager refresh");
            counters.hit();
            telemetry::outcome("hit");
            return P::restore(current);
        }
    };
    let held = LeaseHeld::new(miss.runtime, spec.db, key, token);
    // Another process may have refreshed between our lookup and the grant (its fill consumed its
    // lease): read the entry's time left again before computing.
    let decode = |bytes: &[u8]| value::decode::<P::Stored>(spec.format, bytes);
    if let Ok((Some(Ok((written, value))), Some(left))) = rt.backend.get_with_ttl(spec.db, key, decode).await
    {
        if written >= miss.generation && spec.fresh_left(left).is_some_and(|left| !spec.refresh_due(left)) {
            drop(held);
            counters.hit();
            telemetry::outcome("hit");
            return P::restore(value);
        }
    }
    counters.eager_refresh();
    counters.miss();
    telemetry::outcome("refresh");
    tracing::debug!(db = spec.db, prefix = spec.prefix, function = spec.function, %key, "eager refresh");
    let leader = Flights::detached(&rt.flights, spec.db, key);
    let refresh = compute_and_fill::<P, R, F>(miss, held, grant, body, leader);
    match std::panic::AssertUnwindSafe(refresh).catch_unwind().await {
        Ok(output) if !P::failed(&output) => output,
        // The lease went back on the way out (an `Err` is not filled; a panic dropped its guard).
        _ => P::restore(current),
    }
}

/// A read of an entry past its TTL, kept for `stale_if_error` (fail-safe). The caller that gets
/// the key's fill lease runs the function and fills; if it returns `Err` or panics, and the entry
/// is still stored under the function's current generation (no invalidation came meanwhile), the
/// stale value answers instead. Callers that find the lease held poll for its holder (as a miss
/// from another process does): a fresh entry is a hit; a failure seen by this process less than
/// `Spec::stale_throttle` ago is answered with the stale value without running the function; else,
/// once they get the lease, they read the entry again (its holder may have filled it since their
/// last read) and compute as above if it is still stale. So a failing dependency sees about one
/// attempt per key per process per throttle, not one per caller.
///
/// `Err((body, waited))` when the entry is gone (invalidated or expired) while waiting: the stale
/// value is no answer, and the caller serves the call as any other miss (`waited`: it has waited
/// for the lease, and counted it).
async fn serve_stale<P, R, F>(
    miss: Miss<'_>,
    stale: P::Stored,
    body: F,
    function: &Function,
) -> Result<R, (F, bool)>
where
    P: Policy<R>,
    F: Future<Output = R>,
{
    use futures_util::FutureExt;
    let rt = miss.runtime.inner();
    let (spec, key, counters, generation) = (miss.spec, miss.key, miss.counters, miss.generation);
    let fail_safe = FailSafe { rt, cached: miss.cached, spec, key, function, counters, generation };
    if function.throttled(key) {
        // It failed on this key moments ago: answer without trying it again yet.
        counters.hit();
        return Ok(fail_safe.answer_stale::<P, R>(stale));
    }
    let token = crate::backend::unique();
    let mut pause = Duration::from_millis(2);
    let mut waited = false;
    let decode = |bytes: &[u8]| value::decode::<P::Stored>(spec.format, bytes);
    let grant = loop {
        match acquire_over(rt, spec.db, key, token).await {
            Ok(Acquired::Granted(grant)) => break grant,
            Ok(Acquired::Busy | Acquired::Value(())) => {
                if !waited {
                    waited = true;
                    counters.lease_wait();
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(50));
                match rt.backend.get_with_ttl(spec.db, key, decode).await {
                    Ok((Some(Ok((written, value))), Some(left)))
                        if written >= generation && spec.fresh_left(left).is_some() =>
                    {
                        counters.hit();
                        telemetry::outcome("hit");
                        return Ok(P::restore(value));
                    }
                    // Gone: invalidated (or expired) meanwhile, so the stale value is no answer.
                    Ok((None, _)) => return Err((body, waited)),
                    Ok((Some(_), _)) if function.throttled(key) => {
                        counters.hit();
                        return Ok(fail_safe.answer_stale::<P, R>(stale));
                    }
                    // Still stale: its holder is computing (or just gave up); ask again.
                    Ok((Some(_), _)) => {}
                    Err(error) => {
                        count_failure(counters, spec, key, &error, "lookup");
                        counters.miss();
                        return Ok(fail_safe.unfilled::<P, R, F>(body, stale).await);
                    }
                }
            }
            Err(error) => {
                count_failure(counters, spec, key, &error, "fill lease");
                counters.miss();
                return Ok(fail_safe.unfilled::<P, R, F>(body, stale).await);
            }
        }
    };
    let held = LeaseHeld::new(miss.runtime, spec.db, key, token);
    // The lease's last holder (another caller, maybe in another process) may have filled between
    // this caller's last read and the grant (its fill gave the lease back): read again before
    // computing, so that its value answers rather than a second computation.
    let gone = match rt.backend.get_with_ttl(spec.db, key, decode).await {
        Ok((Some(Ok((written, value))), Some(left)))
            if written >= generation && spec.fresh_left(left).is_some() =>
        {
            drop(held);
            counters.hit();
            telemetry::outcome("hit");
            return Ok(P::restore(value));
        }
        Ok((None, _)) => true,
        // Still stale, and its last holder, in this process, failed on the key just before the
        // grant: answered as the other waiters are.
        Ok((Some(_), _)) if function.throttled(key) => {
            drop(held);
            counters.hit();
            return Ok(fail_safe.answer_stale::<P, R>(stale));
        }
        Ok(_) => false,
        Err(error) => {
            count_failure(counters, spec, key, &error, "lookup");
            false
        }
    };
    if gone {
        // Invalidated (or expired) since the last poll: a plain miss, which this caller leads in
        // its process under the lease it holds (the callers arriving meanwhile follow it).
        let Join::Leader(leader) = Flights::join(&rt.flights, spec.db, key) else {
            // Another caller of this process leads one (waiting for this lease): follow it.
            drop(held);
            return Err((body, waited));
        };
        counters.miss();
        telemetry::outcome("miss");
        return Ok(compute_and_fill::<P, R, F>(miss, held, grant, body, leader).await);
    }
    counters.miss();
    telemetry::outcome("miss");
    let leader = Flights::detached(&rt.flights, spec.db, key);
    let filled = leader.subscribe();
    let computed = std::panic::AssertUnwindSafe(compute_and_fill::<P, R, F>(miss, held, grant, body, leader))
        .catch_unwind()
        .await;
    Ok(match computed {
        Ok(output) if !P::failed(&output) => {
            fail_safe.succeeded();
            // Until the fill lands, this process's next callers would still read the stale entry
            // and run the function again: wait for the backend's answer (one round trip, bounded
            // by the op timeout), as no flight is shared.
            let _ = tokio::time::timeout(rt.op_timeout * 2, flight::wait(filled)).await;
            output
        }
        // The lease went back on the way out (an `Err` is not filled; a panic dropped its guard).
        failed => fail_safe.failed::<P, R>(failed, stale).await,
    })
}

/// What a stale read needs to decide whether its stale value may answer.
struct FailSafe<'a> {
    rt: &'a Inner,
    cached: &'a CachedFn,
    spec: &'static Spec,
    key: &'a str,
    function: &'a Function,
    counters: &'a Counters,
    /// The generation the stale entry was read under.
    generation: u64,
}

impl FailSafe<'_> {
    /// Answers with the stale value (the function failed now, or moments ago): counted, and
    /// logged when the function starts answering stale.
    fn answer_stale<P: Policy<R>, R>(&self, stale: P::Stored) -> R {
        let spec = self.spec;
        self.counters.stale();
        telemetry::outcome("stale");
        if self.function.stale_served() {
            tracing::warn!(db = spec.db, prefix = spec.prefix, function = spec.function, key = self.key, "the function failed; answering with entries past their TTL (stale_if_error) until it succeeds again (logged once, counted as stale_served)");
        }
        P::restore(stale)
    }

    fn succeeded(&self) {
        self.function.succeeded(self.key);
        if self.function.recovered() {
            let spec = self.spec;
            tracing::info!(
                db = spec.db,
                prefix = spec.prefix,
                function = spec.function,
                "the function succeeds again; stale answers (stale_if_error) ended"
            );
        }
    }

    /// The function failed (an `Err`, or a panic): the stale value answers if no invalidation
    /// came since it was read (the entry is still stored under the function's current generation,
    /// and none is queued here); else the failure is the answer.
    async fn failed<P: Policy<R>, R>(&self, computed: std::thread::Result<R>, stale: P::Stored) -> R {
        // Throttled before the check's round trip, so that this process's waiters (the lease is
        // already going back) do not try again meanwhile. Harmless if the entry was invalidated:
        // the throttle only answers reads that still find a stale entry.
        self.function.failed(self.key, self.spec.stale_throttle());
        if self.still_valid().await {
            return self.answer_stale::<P, R>(stale);
        }
        match computed {
            Ok(output) => output,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// The backend failed during a stale read: runs the function without filling; a failure gets
    /// the stale answer unless an invalidation of the key is queued here (the backend cannot be
    /// asked).
    async fn unfilled<P: Policy<R>, R, F: Future<Output = R>>(&self, body: F, stale: P::Stored) -> R {
        use futures_util::FutureExt;
        match std::panic::AssertUnwindSafe(body).catch_unwind().await {
            Ok(output) if !P::failed(&output) => output,
            _ if !self.rt.pending.covers(self.cached, self.key) => {
                self.function.failed(self.key, self.spec.stale_throttle());
                self.answer_stale::<P, R>(stale)
            }
            Ok(output) => output,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// Whether the stale entry is still stored under the function's current generation (read
    /// again from the backend), still past its TTL (a fresh one means it was invalidated, or its
    /// lease lost, and filled again meanwhile: the stale value is not what is stored), with no
    /// invalidation of it queued here.
    async fn still_valid(&self) -> bool {
        let (rt, spec) = (self.rt, self.spec);
        if rt.pending.covers(self.cached, self.key) {
            return false;
        }
        let life = key::generation_life(spec.entry_life());
        let read = rt
            .backend
            .get_with_generation(spec.db, self.key, &self.function.generation_key, life, value::generation_of)
            .await;
        match read {
            Ok((Some(Some(written)), read)) => {
                let known = rt.functions.current(self.function);
                let current =
                    read.map_or(known.generation, |g| rt.functions.observe(self.function, g, &known));
                if written < current.max(self.generation) {
                    return false;
                }
                matches!(rt.backend.ttl(spec.db, self.key).await, Ok(Some(left)) if spec.fresh_left(left).is_none())
            }
            _ => false,
        }
    }
}

/// What a fill finishes: the flight its followers wait on, when the value's computation started,
/// and the lease, given back if the fill fails.
struct Flight {
    leader: Leader,
    computed_from: Instant,
    held: LeaseHeld,
}

/// Writes a lease-checked fill: through the batcher when it takes it (the caller returns at
/// once; the flight ends when the server answers), directly otherwise. The flight's followers
/// learn whether the fill was accepted, and start over if it was refused.
async fn fill(rt: &Inner, spec: &'static Spec, mut write: Write, flight: Flight, counters: Arc<Counters>) {
    let value = Arc::clone(&write.value);
    let direct = Arc::clone(&counters);
    let db = spec.db;
    let Flight { leader, computed_from, mut held } = flight;
    let offered = Instant::now();
    let finish = move |result: Result<FillOutcome, BackendError>| {
        if result.is_ok() {
            counters.fill_took(offered.elapsed());
        }
        // Answered: the script consumed or judged the lease. Failed: `held` releases it on drop.
        held.armed = result.is_err();
        drop(held);
        let outcome = match result {
            Ok(FillOutcome::Written) => {
                counters.fill();
                Outcome::Value(value)
            }
            // Not stale: another caller fills; the followers may take this value.
            Ok(FillOutcome::Superseded) => Outcome::Value(value),
            Ok(FillOutcome::Revoked) => {
                counters.refused_fill();
                tracing::debug!(db, "fill refused: invalidated while computing, or its lease aged out");
                Outcome::Refused
            }
            Err(error) => {
                if error.is_bypassed() {
                    counters.bypass();
                } else {
                    counters.backend_error();
                    tracing::debug!(db, %error, "cache fill failed");
                }
                // The lease protocol could not check it: only followers that joined before the
                // computation started may take it.
                Outcome::Unverified(value, computed_from)
            }
        };
        leader.finish(outcome);
    };
    write.done = Some(Box::new(finish));
    match rt.backend.offer(db, write) {
        Ok(()) => {}
        Err(mut write) => {
            if rt.backend.writes_behind() {
                direct.direct_fill(); // its queue was full or shut down
            }
            let done = write.done.take().expect("the write carries its completion");
            let lease = write.lease.expect("fills are lease-checked");
            let result = rt.backend.fill(db, &write.key, lease, &write.value, write.ttl).await;
            done(result);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::CacheConfig;
    use crate::policy::OkOnly;

    /// A value like the benchmark's: four `String`s and six numbers (144 bytes).
    #[derive(serde::Serialize, serde::Deserialize)]
    struct Quote {
        text: [String; 4],
        numbers: [u64; 6],
    }

    static SPEC: Spec = Spec::EXAMPLE;

    /// Every Redis hit allocates the call's future and the lookup's. glibc serves an allocation
    /// from a cache of its thread when that holds one of its size; otherwise from the shared
    /// arena, under its lock, and a request of 1,024 bytes or more first consolidates the arena
    /// (`malloc_consolidate`). At 64 callers on two workers the lookup's future at 1,280 bytes
    /// cost a futex call per hit (0.99-1.04, against 0.43-0.56 at 872 bytes) and about 1.2 µs
    /// of CPU per hit (`BENCH_ALONE=ours` under `perf stat`). Layouts are a 64-bit target's.
    #[cfg(target_pointer_width = "64")]
    #[tokio::test]
    async fn the_futures_a_redis_hit_allocates_stay_under_a_kilobyte() {
        // Debug builds lay these futures out 50-110 bytes smaller than release builds (measured
        // with `-Zprint-type-sizes`: the lookup's 800 against 872 bytes).
        const LIMIT: usize = if cfg!(debug_assertions) { 900 } else { 1000 };
        assert_eq!(std::mem::size_of::<Quote>(), 144);
        static F: CachedFn = CachedFn::free(&SPEC);
        let runtime = Runtime::new(CacheConfig::redis("redis://127.0.0.1:9").unwrap());
        let rt = runtime.inner();
        let function = rt.functions.get(&F, &rt.stats);
        let body = || async { Ok::<Quote, String>(Quote { text: Default::default(), numbers: [0; 6] }) };
        let sizes = [
            ("the call's", std::mem::size_of_val(&serve::<OkOnly, _, _>(F, None, None, body))),
            ("the lookup's", std::mem::size_of_val(&lookup::<Quote>(rt, &F, "k", &function, None))),
            (
                "a lookup reading more's",
                std::mem::size_of_val(&read_more(rt, &SPEC, "k", &function, true, true, |_: &[u8]| {
                    None::<Quote>
                })),
            ),
        ];
        for (which, size) in sizes {
            assert!(size <= LIMIT, "{which} future is {size} bytes, over {LIMIT}: {sizes:?}");
        }
    }
}
