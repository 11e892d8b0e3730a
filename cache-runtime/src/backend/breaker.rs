//! A circuit breaker per server: after `threshold` consecutive failures (connection errors,
//! timeouts, authentication failures, a server that is loading or down) it opens, and while it
//! is open every call fails at once with [`BackendError::Bypassed`] (cached functions run
//! uncached, at no network cost). After `cooldown` the next call is let through as the one
//! probe: success closes the breaker, failure opens it for another cool-down.
//!
//! It also owns the failure log: one `warn` when the backend starts failing (the first failure
//! after a success), one `warn` when the breaker opens, one `info` when it closes; the calls in
//! between log at debug level only. A backend that fails on and off (one Cluster node of three
//! down: calls to the others succeed in between) warns at most once per [`LOG_QUIET`], and so
//! does a breaker that opens and closes again and again (its "closed" is logged after an "opened"
//! that was).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering::Relaxed, Ordering::SeqCst};
use std::time::{Duration, Instant};

use crate::error::BackendError;

/// The least time between two "backend failing" warnings.
pub(crate) const LOG_QUIET: Duration = Duration::from_secs(10);

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const PROBING: u8 = 2;

pub(crate) struct Breaker {
    /// Consecutive failures that open it; 0 = never opens.
    threshold: u32,
    cooldown: Duration,
    server: String,
    state: AtomicU8,
    consecutive: AtomicU32,
    /// When it last opened, in nanoseconds since `epoch`.
    opened_at: AtomicU64,
    epoch: Instant,
    /// Whether the last call failed (so the next failure is not logged again).
    failing: AtomicBool,
    /// When "failing" was last logged as a warning (nanoseconds since `epoch`, plus one; 0: never),
    /// and whether its "answers again" is still owed.
    warned_at: AtomicU64,
    announced: AtomicBool,
    /// When a refused request (NOPERM, a script error: the server is up) was last logged as a
    /// warning, the same way.
    refusal_warned_at: AtomicU64,
    /// When "opened" was last logged as a warning, the same way, and whether its "closed" is
    /// still owed.
    opened_warned_at: AtomicU64,
    open_announced: AtomicBool,
    /// Whether it is open now without having said so (an opening within `LOG_QUIET` of the last
    /// one said): a failed probe says so once the quiet time is over.
    open_unsaid: AtomicBool,
}

/// A call the breaker let through; its result must be recorded.
pub(crate) struct Permit<'a> {
    breaker: &'a Breaker,
    probe: bool,
    recorded: bool,
}

impl Breaker {
    pub(crate) fn new(threshold: u32, cooldown: Duration, server: String) -> Self {
        Breaker {
            threshold,
            cooldown,
            server,
            state: AtomicU8::new(CLOSED),
            consecutive: AtomicU32::new(0),
            opened_at: AtomicU64::new(0),
            epoch: Instant::now(),
            failing: AtomicBool::new(false),
            warned_at: AtomicU64::new(0),
            announced: AtomicBool::new(false),
            refusal_warned_at: AtomicU64::new(0),
            opened_warned_at: AtomicU64::new(0),
            open_announced: AtomicBool::new(false),
            open_unsaid: AtomicBool::new(false),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Lets a call through, or refuses it while the breaker is open.
    pub(crate) fn admit(&self) -> Result<Permit<'_>, BackendError> {
        match self.state.load(Relaxed) {
            CLOSED => Ok(Permit { breaker: self, probe: false, recorded: false }),
            OPEN => {
                let cooled = self.now().saturating_sub(self.opened_at.load(SeqCst))
                    >= u64::try_from(self.cooldown.as_nanos()).unwrap_or(u64::MAX);
                if cooled && self.state.compare_exchange(OPEN, PROBING, SeqCst, SeqCst).is_ok() {
                    tracing::debug!(server = %self.server, "cache breaker: probing the backend");
                    return Ok(Permit { breaker: self, probe: true, recorded: false });
                }
                Err(BackendError::Bypassed)
            }
            _ => Err(BackendError::Bypassed),
        }
    }

    /// Whether the breaker is open (or probing): cached calls skip the backend.
    pub(crate) fn is_open(&self) -> bool {
        self.state.load(SeqCst) != CLOSED
    }

    fn open(&self) {
        self.opened_at.store(self.now(), SeqCst);
        self.state.store(OPEN, SeqCst);
    }

    fn succeeded(&self, probe: bool) {
        // Loads first: on the hit path of a healthy server nothing is written, so the callers on
        // every core do not contend for these lines.
        if self.consecutive.load(Relaxed) != 0 {
            self.consecutive.store(0, SeqCst);
        }
        let was_failing = self.failing.load(Relaxed) && self.failing.swap(false, SeqCst);
        if probe || self.state.load(Relaxed) != CLOSED {
            self.state.store(CLOSED, SeqCst);
            self.open_unsaid.store(false, SeqCst);
            if self.open_announced.swap(false, SeqCst) {
                tracing::info!(server = %self.server, "cache backend answers again: breaker closed, caching resumes");
            } else {
                tracing::debug!(server = %self.server, "cache breaker closed");
            }
        } else if was_failing && self.announced.swap(false, SeqCst) {
            tracing::info!(server = %self.server, "cache backend answers again");
        }
    }

    /// Whether a warning stamped `at` (nanoseconds since `epoch`, plus one) may be logged now, and
    /// if so, stamps it.
    fn may_warn(&self, at: &AtomicU64) -> bool {
        let now = self.now().saturating_add(1);
        let last = at.load(SeqCst);
        let quiet =
            last != 0 && now.saturating_sub(last) < u64::try_from(LOG_QUIET.as_nanos()).unwrap_or(u64::MAX);
        !quiet && at.compare_exchange(last, now, SeqCst, SeqCst).is_ok()
    }

    fn refused(&self, error: &BackendError) {
        if self.may_warn(&self.refusal_warned_at) {
            tracing::warn!(server = %self.server, %error, "cache backend refused a request: that call ran uncached (logged at most once per 10 s)");
        } else {
            tracing::debug!(server = %self.server, %error, "cache backend refused a request");
        }
    }

    fn failed(&self, probe: bool, error: &BackendError) {
        let consecutive = self.consecutive.fetch_add(1, SeqCst).saturating_add(1);
        if !self.failing.swap(true, SeqCst) && self.may_warn(&self.warned_at) {
            self.announced.store(true, SeqCst);
            tracing::warn!(server = %self.server, %error, "cache backend failing: cached functions run uncached (logged once until it recovers)");
        } else {
            tracing::debug!(server = %self.server, %error, "cache backend call failed");
        }
        if probe {
            self.open();
            // Open since an opening that went unsaid (the last line logged may say it closed).
            if self.open_unsaid.load(SeqCst) && self.may_warn(&self.opened_warned_at) {
                self.open_unsaid.store(false, SeqCst);
                self.open_announced.store(true, SeqCst);
                tracing::warn!(server = %self.server, %error, "cache breaker still open: calls skip the cache until a probe succeeds (logged at most once per 10 s)");
            }
            return;
        }
        // `opened_at` first: a call that sees the breaker open reads when it opened.
        if self.threshold > 0 && consecutive >= self.threshold && self.state.load(SeqCst) == CLOSED {
            self.opened_at.store(self.now(), SeqCst);
            if self.state.compare_exchange(CLOSED, OPEN, SeqCst, SeqCst).is_ok() {
                if self.may_warn(&self.opened_warned_at) {
                    self.open_announced.store(true, SeqCst);
                    tracing::warn!(
                        server = %self.server,
                        consecutive,
                        cooldown_ms = self.cooldown.as_millis() as u64,
                        "cache breaker opened: calls skip the cache until a probe succeeds (logged at most once per 10 s)"
                    );
                } else {
                    self.open_unsaid.store(true, SeqCst);
                    tracing::debug!(server = %self.server, consecutive, "cache breaker opened");
                }
            }
        }
    }
}

impl Permit<'_> {
    /// Records the call's result: what counts as a failure of the server moves the breaker.
    pub(crate) fn record<T>(mut self, result: &Result<T, BackendError>) {
        self.recorded = true;
        match result {
            Ok(_) => self.breaker.succeeded(self.probe),
            Err(e) if e.is_server_failure() => self.breaker.failed(self.probe, e),
            Err(BackendError::Bypassed) => self.breaker.succeeded(self.probe),
            // An answer about the request (a script error, a command or key the ACL user may
            // not use): the server is up. Logged like a failure: a warning at most once per
            // `LOG_QUIET`, the rest at debug level.
            Err(e) => {
                self.breaker.succeeded(self.probe);
                self.breaker.refused(e);
            }
        }
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        // A probe whose caller went away decided nothing: open for another cool-down.
        if self.probe && !self.recorded {
            self.breaker.open();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeout() -> Result<(), BackendError> {
        Err(BackendError::Timeout(Duration::from_millis(1)))
    }

    #[test]
    fn opens_after_threshold_and_closes_on_a_probe() {
        let b = Breaker::new(3, Duration::from_millis(30), "test".into());
        for _ in 0..2 {
            b.admit().unwrap().record(&timeout());
        }
        assert!(!b.is_open());
        b.admit().unwrap().record(&timeout());
        assert!(b.is_open());
        assert!(matches!(b.admit(), Err(BackendError::Bypassed)));
        std::thread::sleep(Duration::from_millis(40));
        let probe = b.admit().unwrap();
        assert!(matches!(b.admit(), Err(BackendError::Bypassed)), "one probe at a time");
        probe.record(&Ok(()));
        assert!(!b.is_open());
    }

    #[test]
    fn a_failed_or_dropped_probe_reopens() {
        let b = Breaker::new(1, Duration::from_millis(20), "test".into());
        b.admit().unwrap().record(&timeout());
        std::thread::sleep(Duration::from_millis(30));
        b.admit().unwrap().record(&timeout());
        assert!(matches!(b.admit(), Err(BackendError::Bypassed)), "cooling down again");
        std::thread::sleep(Duration::from_millis(30));
        drop(b.admit().unwrap());
        assert!(matches!(b.admit(), Err(BackendError::Bypassed)));
    }

    #[test]
    fn threshold_zero_never_opens() {
        let b = Breaker::new(0, Duration::from_millis(20), "test".into());
        for _ in 0..100 {
            b.admit().unwrap().record(&timeout());
        }
        assert!(!b.is_open());
    }
}
