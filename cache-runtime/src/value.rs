//! The stored value formats. Each stores the triple `[generation, value, shape]`: the
//! generation its writer saw when it missed, so that a `function(..)` invalidation (which raises
//! the function's generation) makes every older entry a miss without touching it; and the shape
//! of the value's type (`shape.rs`), so that an entry written by a release whose type had other
//! fields is a miss, not a value read with the wrong meaning.
//!
//! - [`Format::Json`] (the default): the JSON array `[generation, value, shape]`, which other
//!   languages read (`json.loads(raw)[1]` in Python).
//! - [`Format::MessagePack`]: the same triple as a MessagePack array, structs as arrays (the
//!   compact form `rmp_serde::to_vec` writes): about half the bytes and a third of the decode time
//!   of JSON.
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
pub(crate) enum CodecError {
    Invalid(String),
    /// It decodes, but was written for a type of another shape (another release's).
    OtherShape,
}

impl CodecError {
    fn invalid(e: impl std::fmt::Display) -> Self {
        CodecError::Invalid(e.to_string())
    }
}

impl std::fmt::Display for CodecError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CodecError::Invalid(e) => f.write_str(e),
            CodecError::OtherShape => {
                f.write_str("written for another shape of the value's type (another release)")
            }
        }
    }
}

/// Encodes `value` written under `generation`, with its type's shape.
pub(crate) fn encode<T: Serialize + DeserializeOwned>(
    format: Format,
    generation: u64,
    value: &T,
) -> Result<Vec<u8>, CodecError> {
    let shape = crate::shape::of::<T>();
    match format {
        Format::Json => {
            let mut out = Vec::with_capacity(128);
            out.push(b'[');
            out.extend_from_slice(generation.to_string().as_bytes());
            out.push(b',');
            serde_json::to_writer(&mut out, value).map_err(CodecError::invalid)?;
            out.push(b',');
            out.extend_from_slice(shape.to_string().as_bytes());
            out.push(b']');
            Ok(out)
        }
        Format::MessagePack => rmp_serde::to_vec(&(generation, value, shape)).map_err(CodecError::invalid),
    }
}

/// Decodes a stored value and the generation it was written under; a value written for another
/// shape of `T` (or before shapes were stored) is an error.
pub(crate) fn decode<T: DeserializeOwned>(format: Format, bytes: &[u8]) -> Result<(u64, T), CodecError> {
    let (generation, value, shape): (u64, T, u64) = match format {
        Format::Json => match json_triple(bytes) {
            // What this crate writes: only the value goes through serde_json.
            Some((generation, value, shape)) => {
                (generation, serde_json::from_slice(value).map_err(CodecError::invalid)?, shape)
            }
            // Anything else (spaces after the commas, as Python's `json.dumps` writes): the
            // whole array through serde_json.
            None => serde_json::from_slice(bytes).map_err(CodecError::invalid)?,
        },
        Format::MessagePack => rmp_serde::from_slice(bytes).map_err(CodecError::invalid)?,
    };
    if shape != crate::shape::of::<T>() {
        return Err(CodecError::OtherShape);
    }
    Ok((generation, value))
}

/// `[generation,value,shape]` as [`encode`] writes it, split without parsing the value: the two
/// numbers and the value's bytes between the first comma and the last. `None` unless both
/// numbers are bare JSON integers that fit a `u64` right inside the brackets and commas (so
/// spaces after the commas, a number JSON does not allow, or fewer than three elements), which
/// the caller then reads whole. A hit decodes this way: serde_json reading the triple spends
/// more on the two 16- to 20-digit numbers than on a small struct's fields. The answer is the
/// whole array's (`the_json_split_reads_what_serde_json_reads`), but for one limit: serde_json
/// refuses JSON nested deeper than 128 levels, and the value read alone may nest one level more
/// than inside the array.
fn json_triple(bytes: &[u8]) -> Option<(u64, &[u8], u64)> {
    let inner = bytes.strip_prefix(b"[")?.strip_suffix(b"]")?;
    let first = inner.iter().position(|b| *b == b',')?;
    let last = inner.iter().rposition(|b| *b == b',')?;
    if last <= first {
        return None;
    }
    Some((json_u64(&inner[..first])?, &inner[first + 1..last], json_u64(&inner[last + 1..])?))
}

/// A JSON unsigned integer that fits a `u64`: digits only, no leading zero.
fn json_u64(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || (digits.len() > 1 && digits[0] == b'0') {
        return None;
    }
    digits.iter().try_fold(0u64, |n, d| {
        let digit = d.checked_sub(b'0').filter(|d| *d <= 9)?;
        n.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

/// The generation of a stored value without decoding the value.
pub(crate) fn generation_of(bytes: &[u8]) -> Option<u64> {
    match bytes.first()? {
        b'[' => {
            let rest = &bytes[1..];
            let end = rest.iter().position(|b| *b == b',')?;
            std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
        }
        // A three-element MessagePack array (two before shapes were stored); its first element
        // is the generation.
        0x92 | 0x93 => {
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
                let bytes = encode(format, generation, &("AAPL".to_owned(), 150.25)).unwrap();
                assert_eq!(generation_of(&bytes), Some(generation), "{format:?}");
                let (g, v): (u64, (String, f64)) = decode(format, &bytes).unwrap();
                assert_eq!((g, v), (generation, ("AAPL".to_owned(), 150.25)));
            }
        }
        let shape = crate::shape::of::<u32>();
        assert_eq!(encode(Format::Json, 5, &1u32).unwrap(), format!("[5,1,{shape}]").as_bytes());
        assert_eq!(generation_of(b"{\"old\":1}"), None);
        assert!(decode::<(String, f64)>(Format::MessagePack, b"[5,1]").is_err());
    }

    /// What [`decode`] answered before the split: the whole array through serde_json, then the
    /// shape; the error's kind kept (`Invalid` or `OtherShape`, which callers log differently).
    fn decoded_whole<T: DeserializeOwned>(bytes: &[u8]) -> Result<(u64, T), &'static str> {
        let (generation, value, shape): (u64, T, u64) =
            serde_json::from_slice(bytes).map_err(|_| "invalid")?;
        if shape != crate::shape::of::<T>() {
            return Err("other shape");
        }
        Ok((generation, value))
    }

    /// `decode` against [`decoded_whole`] on each case, wrapped as `[generation,value,shape]`
    /// with each given generation and shape text.
    fn agree<T: DeserializeOwned + PartialEq + std::fmt::Debug>(values: &[&str], numbers: &[&str]) -> usize {
        let shape = crate::shape::of::<T>().to_string();
        let other = (crate::shape::of::<T>() ^ 1).to_string();
        let mut split = 0;
        for value in values {
            for generation in numbers {
                for shape in numbers.iter().copied().chain([shape.as_str(), other.as_str()]) {
                    for case in [
                        format!("[{generation},{value},{shape}]"),
                        format!("[{generation}, {value}, {shape}]"), // Python's json.dumps
                        format!("[{generation},{value},{shape}] "),
                        format!("[{generation},{value},{shape},1]"),
                        format!("[{generation},{value}]"),
                    ] {
                        let ours = decode::<T>(Format::Json, case.as_bytes()).map_err(|e| match e {
                            CodecError::Invalid(_) => "invalid",
                            CodecError::OtherShape => "other shape",
                        });
                        assert_eq!(ours, decoded_whole::<T>(case.as_bytes()), "{case}");
                        split += usize::from(json_triple(case.as_bytes()).is_some());
                    }
                }
            }
        }
        split
    }

    /// The split that hits take answers as serde_json reading the whole array did, error kinds
    /// included, for values whose text holds commas, brackets, quotes and escapes, and for
    /// numbers JSON allows and does not (leading zeros, signs, exponents, past `u64`).
    #[test]
    fn the_json_split_reads_what_serde_json_reads() {
        let numbers =
            ["0", "17", "18446744073709551615", "18446744073709551616", "017", "-1", "1e3", "+1", "", "1 "];
        let strings =
            [r#""AAPL""#, r#""a,b""#, r#""],5""#, r#""\"],[\"""#, r#""\u002c""#, r#""""#, "5", "[]"];
        let mut split = agree::<String>(&strings, &numbers);
        split +=
            agree::<(String, f64)>(&[r#"["AAPL",150.25]"#, r#"["a,]",1e2]"#, r#"["A",1,2]"#, "[]"], &numbers);
        split += agree::<Vec<Vec<u8>>>(&["[[1,2],[3]]", "[[]]", "[[1,],[2]]", "[[256]]"], &numbers);
        split += agree::<Option<u64>>(&["null", "7", "-7", "[7]"], &numbers);
        split += agree::<()>(&["null", "[]", "0"], &numbers);
        split += agree::<std::collections::BTreeMap<String, u64>>(
            &[r#"{"a,":1,"b":2}"#, "{}", r#"{"a":1,}"#],
            &numbers,
        );
        assert!(split > 0, "the split was taken");
        let shape = crate::shape::of::<(String, f64)>();
        let ours = encode(Format::Json, 17, &("AAPL".to_owned(), 150.25)).unwrap();
        assert_eq!(
            json_triple(&ours),
            Some((17, &br#"["AAPL",150.25]"#[..], shape)),
            "what encode writes is split"
        );
        assert!(json_triple(format!("[17, 1, {shape}]").as_bytes()).is_none(), "spaces are read whole");
    }

    #[test]
    fn another_shape_is_refused() {
        #[derive(serde::Serialize, serde::Deserialize, Debug)]
        struct Old {
            price: f64,
        }
        #[derive(serde::Deserialize, Debug)]
        struct New {
            price: f64,
            #[serde(default)]
            #[allow(dead_code)]
            venue: String,
        }
        for format in [Format::Json, Format::MessagePack] {
            let bytes = encode(format, 3, &Old { price: 1.5 }).unwrap();
            assert_eq!(decode::<Old>(format, &bytes).unwrap().1.price, 1.5);
            assert!(matches!(decode::<New>(format, &bytes), Err(CodecError::OtherShape)), "{format:?}");
        }
        // The same bytes without the shape would have been read as `New`, the danger refused.
        let (_, unchecked, _): (u64, New, u64) =
            serde_json::from_slice(&encode(Format::Json, 3, &Old { price: 1.5 }).unwrap()).unwrap();
        assert_eq!(unchecked.price, 1.5);
        // An entry from before shapes were stored is not read either.
        assert!(matches!(decode::<u32>(Format::Json, b"[5,1]"), Err(CodecError::Invalid(_))));
    }
}
