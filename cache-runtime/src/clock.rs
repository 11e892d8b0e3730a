//! Time read on hot paths, in nanoseconds of the monotonic clock.
//!
//! A near hit asks whether its copy is still alive, and `Instant::now` was its largest cost of
//! its own after the lookup (tens of ns). On Linux the kernel's coarse clock
//! (`CLOCK_MONOTONIC_COARSE`, the same clock advanced once per tick, a few ns to read) answers
//! while the copy has more than `MARGIN` left; closer to its end, the precise clock does. So a
//! copy never outlives its life unless the coarse clock lags by more than `MARGIN`, where it
//! lagged by at most 5.9 ms here (one tick is 4 ms; see the test). Elsewhere the precise clock
//! always answers.
//!
//! A connection's request (`backend/redis/link.rs`) is timed on the coarse clock alone
//! ([`coarse`]): its time only needs to be known to a few ms.

use std::time::Duration;

/// Far more than the coarse clock lags, and a small share of any copy's life.
#[cfg(target_os = "linux")]
const MARGIN: u64 = 50_000_000;

/// The time `life` from now, or `None` past the clock's range.
pub(crate) fn after(life: Duration) -> Option<u64> {
    u64::try_from(life.as_nanos()).ok()?.checked_add(precise())
}

/// Whether `end` has not come yet.
#[inline]
pub(crate) fn before(end: u64) -> bool {
    #[cfg(target_os = "linux")]
    if coarse().saturating_add(MARGIN) < end {
        return true;
    }
    precise() < end
}

#[cfg(target_os = "linux")]
fn nanos(t: rustix::time::Timespec) -> u64 {
    (t.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(t.tv_nsec as u64)
}

/// The precise clock.
#[cfg(target_os = "linux")]
pub(crate) fn precise() -> u64 {
    nanos(rustix::time::clock_gettime(rustix::time::ClockId::Monotonic))
}

/// The coarse clock: behind the precise one by up to a tick or two (under `MARGIN`).
#[cfg(target_os = "linux")]
#[inline]
pub(crate) fn coarse() -> u64 {
    nanos(rustix::time::clock_gettime(rustix::time::ClockId::MonotonicCoarse))
}

/// Elsewhere, the precise clock.
#[cfg(not(target_os = "linux"))]
pub(crate) fn coarse() -> u64 {
    precise()
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn precise() -> u64 {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    u64::try_from(EPOCH.get_or_init(std::time::Instant::now).elapsed().as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    /// The coarse clock is the precise one's, lagging by less than `MARGIN`. Read between
    /// two precise readings, so that a thread preempted between the reads cannot fail it.
    #[test]
    fn the_coarse_clock_lags_the_precise_one_by_less_than_the_margin() {
        let mut lag = 0;
        for _ in 0..100_000 {
            let earlier = super::precise();
            let coarse = super::coarse();
            let later = super::precise();
            assert!(coarse <= later, "coarse {coarse} ahead of {later}");
            lag = lag.max(earlier.saturating_sub(coarse));
        }
        eprintln!("the coarse clock lagged by at most {lag} ns");
        assert!(lag < super::MARGIN, "the coarse clock lagged by {lag} ns");
    }

    #[test]
    fn a_copy_is_alive_until_its_end_to_the_precise_clock() {
        // 30 ms: under the margin, so the precise clock answers from the start.
        let end = super::after(std::time::Duration::from_millis(30)).unwrap();
        assert!(super::before(end), "near its end, the precise clock answers");
        std::thread::sleep(std::time::Duration::from_millis(40));
        assert!(!super::before(end));
        assert!(super::before(super::after(std::time::Duration::from_secs(1)).unwrap()));
    }
}
