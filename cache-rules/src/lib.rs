//! Rules that both the compile-time checks (`cache-macros`) and the run-time checks
//! (`cache-runtime`) apply, written once.

/// Why `prefix` breaks the naming rule, or `None` when it follows it: lowercase ASCII letters,
/// digits, `_` and `-`, not empty. (`:` is the runtime's separator.)
///
/// ```
/// assert_eq!(cache_rules::prefix_problem("market-eu_2"), None);
/// assert!(cache_rules::prefix_problem("Market").is_some());
/// assert!(cache_rules::prefix_problem("market:quote").is_some());
/// assert!(cache_rules::prefix_problem("").is_some());
/// ```
pub fn prefix_problem(prefix: &str) -> Option<&'static str> {
    if prefix.is_empty() {
        return Some("a prefix may not be empty: every key needs a namespace");
    }
    if prefix.contains(':') {
        return Some("a prefix may not contain `:`: the runtime adds the separators (`prefix:function:...`)");
    }
    if !prefix.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-') {
        return Some("a prefix may hold only lowercase letters, digits, `_` and `-`");
    }
    None
}

/// The longest TTL an entry may have, in seconds: 365 days. `#[cached(ttl = ...)]` rejects a
/// longer one at compile time, and the runtime's `Cache` handle applies the same bound, so every
/// TTL that reaches the backend (and any arithmetic on it) is bounded where it comes in.
///
/// ```
/// assert_eq!(cache_rules::MAX_TTL_SECONDS, 31_536_000);
/// ```
pub const MAX_TTL_SECONDS: u64 = 365 * 24 * 3600;
