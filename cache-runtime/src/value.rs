//! The stored value formats. Each stores the pair `[generation, value]`, the generation being the
//! one its writer saw when it missed, so that a `function(..)` invalidation (which raises the
//! function's generation) makes every older entry a miss without touching it.
//!
//! - [`Format::Json`] (the default): the JSON array `[generation, value]`, which other languages
//!   read (`json.loads(raw)[1]` in Python).
//! - [`Format::MessagePack`]: the same pair as a MessagePack array, structs as arrays (the
//!   compact form `rmp_serde::to_vec` writes): about half the bytes and a third of the decode time
//!   of JSON, but fields are matched by position, so a changed struct needs a new `version`.
//!
//! The Lua scripts read the generation of either (`[` starts JSON; anything else is MessagePack,
//! read with Redis's `cmsgpack`).

use serde::de::DeserializeOwned;
use serde::Serialize;

/// How a cached function's values are encoded (`#[cached(..., format = MessagePack)]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Format {
    /// JSON, readable by every other service (the default).
    #[default]
    Json,
    /// MessagePack: smaller and faster to decode; fields by position.
    MessagePack,
}

/// A value that could not be encoded or decoded, whatever the format.
#[derive(Debug)]
pub(crate) struct CodecError(String);

impl std::fmt::Display for CodecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Encodes `value` written under `generation`.
pub(crate) fn encode<T: Serialize + ?Sized>(
    format: Format,
    generation: u64,
    value: &T,
) -> Result<Vec<u8>, CodecError> {
    match format {
        Format::Json => {
            let mut out = Vec::with_capacity(128);
            out.push(b'[');
            out.extend_from_slice(generation.to_string().as_bytes());
            out.push(b',');
            serde_json::to_writer(&mut out, value).map_err(|e| CodecError(e.to_string()))?;
            out.push(b']');
            Ok(out)
        }
        Format::MessagePack => rmp_serde::to_vec(&(generation, value)).map_err(|e| CodecError(e.to_string())),
    }
}

/// Decodes a stored value and the generation it was written under.
pub(crate) fn decode<T: DeserializeOwned>(format: Format, bytes: &[u8]) -> Result<(u64, T), CodecError> {
    match format {
        Format::Json => serde_json::from_slice(bytes).map_err(|e| CodecError(e.to_string())),
        Format::MessagePack => rmp_serde::from_slice(bytes).map_err(|e| CodecError(e.to_string())),
    }
}

/// The generation of a stored value without decoding the value.
pub(crate) fn generation_of(bytes: &[u8]) -> Option<u64> {
    match bytes.first()? {
        b'[' => {
            let rest = &bytes[1..];
            let end = rest.iter().position(|b| *b == b',')?;
            std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
        }
        // A two-element MessagePack array; its first element is the generation.
        0x92 => {
            let mut rest = &bytes[1..];
            rmp::decode::read_int(&mut rest).ok()
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_generation() {
        for format in [Format::Json, Format::MessagePack] {
            for generation in [0, 7, 300, 70_000, 1_700_000_000_123_456] {
                let bytes = encode(format, generation, &("AAPL", 150.25)).unwrap();
                assert_eq!(generation_of(&bytes), Some(generation), "{format:?}");
                let (g, v): (u64, (String, f64)) = decode(format, &bytes).unwrap();
                assert_eq!((g, v), (generation, ("AAPL".to_owned(), 150.25)));
            }
        }
        assert_eq!(encode(Format::Json, 5, &1).unwrap(), b"[5,1]");
        assert_eq!(generation_of(b"{\"old\":1}"), None);
        assert!(decode::<(String, f64)>(Format::MessagePack, b"[5,1]").is_err());
    }
}
