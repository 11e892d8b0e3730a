//! Invalidation: dropping one entry (`quote(symbol)`) or every entry of a function (`quote(..)`),
//! and retrying the ones the backend failed until they succeed or can no longer matter.
//!
//! Nothing accepted is lost: an invalidation whose caller goes away before it is applied (a
//! dropped future) is queued like a failed one, and the queue's worker runs on the cache's own
//! background runtime, so it outlives the runtime that queued it.

pub(crate) mod queue;

use std::time::{Duration, Instant};

use crate::backend::{stamp_life, Store};
use crate::error::BackendError;
use crate::key;
use crate::runtime::{Inner, Runtime};
pub use crate::spec::Target;
use crate::stats::Counters;

const FIRST_RETRY: Duration = Duration::from_millis(50);
const MAX_RETRY: Duration = Duration::from_secs(1);

/// Queues `target` for the retry worker, starting it if it is not running. This process's near
/// copies of what it covers go then, after it is queued: a lookup that checked the queue before
/// keeps its copy before they go (and loses it) or sees them gone when it checks its ticket.
fn queue(runtime: &Runtime, target: Target) {
    let rt = runtime.inner();
    let (key, function) = match &target {
        Target::Key(_, key) => (key.clone(), None),
        Target::All(function) => (None, Some(rt.functions.get(function, &rt.stats))),
    };
    let pushed = runtime.inner().pending.push(target);
    if let Some(key) = key {
        rt.near.forget(&key);
    }
    if let Some(function) = function {
        function.near_epoch.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
    if let Some((function, n)) = pushed.coalesced {
        let spec = function.spec();
        runtime.inner().stats.counters(spec.db, spec.prefix, spec.function).invalidations_coalesced(n as u64);
        tracing::warn!(
            db = spec.db,
            prefix = spec.prefix,
            function = spec.function,
            keys = n,
            "too many invalidations queued for one function: dropping all of its entries instead"
        );
    }
    if pushed.start_worker {
        let runtime = runtime.clone();
        crate::background::spawn(async move { retry_until_done(runtime).await });
    }
}

/// Applies `targets` on the current runtime. Failures are queued and retried in the background;
/// nothing is returned because nothing may fail the caller. If this future is dropped before it
/// finishes, what it had not applied yet is queued all the same.
pub async fn invalidate(targets: &[Target]) {
    let runtime = Runtime::current();
    let mut unapplied = Unapplied { runtime: &runtime, targets: targets.to_vec() };
    while let Some(target) = unapplied.targets.first().cloned() {
        let spec = target.function().spec();
        let counters = runtime.inner().stats.counters(spec.db, spec.prefix, spec.function);
        match apply(runtime.inner(), &target).await {
            Ok(()) => counters.invalidation(),
            Err(error) => {
                count_failure(&counters, &error);
                tracing::debug!(db = spec.db, prefix = spec.prefix, function = spec.function, %error, "invalidation failed; retrying in the background");
                queue(&runtime, target);
            }
        }
        unapplied.targets.remove(0);
    }
}

/// The targets of an `invalidate` call not applied yet; queued for retry if it is dropped.
struct Unapplied<'a> {
    runtime: &'a Runtime,
    targets: Vec<Target>,
}

impl Drop for Unapplied<'_> {
    fn drop(&mut self) {
        for target in self.targets.drain(..) {
            let spec = target.function().spec();
            tracing::debug!(
                db = spec.db,
                prefix = spec.prefix,
                function = spec.function,
                "invalidation interrupted (its future was dropped); queued"
            );
            queue(self.runtime, target);
        }
    }
}

/// A failed attempt: queued for another try (`invalidation_retries`), and counted as a backend
/// error, or as bypassed when the open breaker skipped it.
fn count_failure(counters: &Counters, error: &BackendError) {
    counters.invalidation_retry();
    if error.is_bypassed() {
        counters.bypass();
    } else {
        counters.backend_error();
    }
}

/// One invalidation, against this process's flights and the backend.
async fn apply(rt: &Inner, target: &Target) -> Result<(), BackendError> {
    match target {
        Target::Key(_, None) => Ok(()),
        Target::Key(function, Some(key)) => {
            let db = function.spec().db;
            rt.flights.revoke(db, key);
            let done = rt.backend.invalidate(db, key, stamp_life(rt.lease_ttl)).await;
            // Again once the backend answered: a flight started during the round trip may have
            // read the entry before it was dropped, and a caller arriving after this returns
            // must not follow it.
            rt.flights.revoke(db, key);
            // This process's near copy goes now, applied or not (a lookup then sees the queued
            // invalidation); other processes' go with the server's notification.
            rt.near.forget(key);
            done
        }
        Target::All(function) => {
            let spec = function.spec();
            // Also revokes the flights of a same-named function of another module (same base):
            // they start over, which costs a computation, never a wrong value.
            let base = format!("{}:", key::function_base(spec));
            rt.flights.revoke_prefix(spec.db, &base);
            let state = rt.functions.get(function, &rt.stats);
            let life = key::generation_life(spec.entry_life());
            let known = rt.functions.current(&state);
            let bumped = rt.backend.bump_generation(spec.db, &state.generation_key, life).await;
            let done = match bumped {
                Ok(Some(generation)) => Ok(rt.functions.observe(&state, generation, &known)),
                Ok(None) => Ok(rt.functions.bump_local(&state)),
                Err(error) => Err(error),
            };
            // Again once the new generation is known here: a flight started during the round
            // trip may have read an entry of the old one (see `Target::Key` above).
            rt.flights.revoke_prefix(spec.db, &base);
            // This process's near copies of the function go now, after the new generation is
            // known here (a copy kept on the old one by a lookup in between carries the old
            // epoch), applied or not (a lookup then sees the queued invalidation).
            state.near_epoch.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            done.map(|_| ())
        }
    }
}

async fn retry_until_done(runtime: Runtime) {
    let rt = runtime.inner();
    let mut pause = FIRST_RETRY;
    loop {
        tokio::time::sleep(pause).await;
        let batch: Vec<(Target, Instant, u64)> = rt.pending.snapshot();
        let mut progress = false;
        for (target, give_up_at, seq) in batch {
            let spec = target.function().spec();
            let counters = rt.stats.counters(spec.db, spec.prefix, spec.function);
            match apply(rt, &target).await {
                Ok(()) => {
                    counters.invalidation();
                    tracing::debug!(
                        db = spec.db,
                        prefix = spec.prefix,
                        function = spec.function,
                        "queued invalidation applied"
                    );
                    rt.pending.settle(&target, seq);
                    progress = true;
                }
                Err(_) if Instant::now() >= give_up_at => {
                    counters.invalidation_expired();
                    tracing::info!(
                        db = spec.db,
                        prefix = spec.prefix,
                        function = spec.function,
                        "queued invalidation dropped: every entry it covered has expired"
                    );
                    rt.pending.settle(&target, seq);
                }
                Err(error) => {
                    count_failure(&counters, &error);
                    tracing::debug!(db = spec.db, prefix = spec.prefix, %error, "invalidation retry failed");
                }
            }
        }
        if rt.pending.round_done() {
            return;
        }
        pause = if progress { FIRST_RETRY } else { (pause * 2).min(MAX_RETRY) };
    }
}
