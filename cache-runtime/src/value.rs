//! The stored value format: the JSON array `[generation, value]`.
//!
//! JSON so that other languages read it (`json.loads(raw)[1]` in Python); the generation is the
//! one the writer saw when it missed, so a `function(..)` invalidation (which raises the
//! function's generation) makes every older entry a miss without touching it.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Encodes `value` written under `generation`.
pub(crate) fn encode<T: Serialize + ?Sized>(
    generation: u64,
    value: &T,
) -> serde_json::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(128);
    out.push(b'[');
    out.extend_from_slice(generation.to_string().as_bytes());
    out.push(b',');
    serde_json::to_writer(&mut out, value)?;
    out.push(b']');
    Ok(out)
}

/// Decodes a stored value and the generation it was written under.
pub(crate) fn decode<T: DeserializeOwned>(bytes: &[u8]) -> serde_json::Result<(u64, T)> {
    serde_json::from_slice(bytes)
}

/// The generation of a stored value without decoding the value (the Lua scripts do the same with
/// `^%[(%d+),`).
pub(crate) fn generation_of(bytes: &[u8]) -> Option<u64> {
    let rest = bytes.strip_prefix(b"[")?;
    let end = rest.iter().position(|b| *b == b',')?;
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_generation() {
        let bytes = encode(1_700_000_000_123_456, &("AAPL", 150.25)).unwrap();
        assert_eq!(bytes, br#"[1700000000123456,["AAPL",150.25]]"#);
        assert_eq!(generation_of(&bytes), Some(1_700_000_000_123_456));
        let (g, v): (u64, (String, f64)) = decode(&bytes).unwrap();
        assert_eq!((g, v), (1_700_000_000_123_456, ("AAPL".to_owned(), 150.25)));
        assert_eq!(generation_of(b"{\"old\":1}"), None);
    }
}
