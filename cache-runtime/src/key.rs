//! The key format, in one place.
//!
//! A cached call's key is `{prefix}:{function}[:v{version}]:{{hash}}`, where `hash` is the first
//! 16 bytes (32 lowercase hex digits) of blake3 over the arguments that are part of the key, in
//! the order the function declares them, each encoded with postcard (a stable, documented binary
//! serde format) straight into the hasher. Example: `market:quote:v2:{6f0c...}`. The braces are
//! a Redis Cluster hash tag, so the entry and any key derived from it for the same call share a
//! slot.
//!
//! Because the encoding is serde's data model, `&str` and `String` (or `&[T]` and `Vec<T>`) hash
//! alike. Types whose serialization is not deterministic (a `HashMap`'s iteration order) give
//! different keys for equal values: use `BTreeMap` in arguments.

use serde::Serialize;

use crate::__private::Spec;

/// The key a `#[cached]` function uses for given arguments, built by hand: for logs, tools, and
/// code that reads the cache without calling the function.
///
/// ```
/// use cache_runtime::KeyBuilder;
///
/// // #[cached(db = MarketData, prefix = "market", ttl = 300)] async fn quote(symbol: &str) ...
/// let key = KeyBuilder::new("market", "quote").arg("AAPL").finish();
/// assert_eq!(key.as_deref(), Some("market:quote:{63b04ab902239bc406df619d1ca6f940}"));
/// ```
#[derive(Default)]
pub struct KeyBuilder {
    prefix: String,
    function: String,
    version: Option<u32>,
    hasher: KeyHasher,
}

impl KeyBuilder {
    /// Starts the key of `function` under `prefix`.
    pub fn new(prefix: &str, function: &str) -> Self {
        KeyBuilder {
            prefix: prefix.to_owned(),
            function: function.to_owned(),
            version: None,
            hasher: KeyHasher::new(),
        }
    }

    /// The `version` option of the function.
    pub fn version(mut self, version: u32) -> Self {
        self.version = Some(version);
        self
    }

    /// The next argument that is part of the key (skipped ones are left out).
    pub fn arg<T: Serialize + ?Sized>(mut self, value: &T) -> Self {
        self.hasher.arg(value);
        self
    }

    /// The key, or `None` if an argument failed to serialize.
    pub fn finish(self) -> Option<String> {
        self.hasher.finish_parts(&self.prefix, &self.function, self.version)
    }
}

/// Streams the key arguments of one call into blake3. Postcard writes many small pieces; they
/// go through a small buffer, and the (large) incremental hasher is only made when the arguments
/// outgrow it: short keys, nearly all of them, are one `blake3::hash` call. Same bytes, same hash.
#[doc(hidden)]
pub struct KeyHasher {
    hasher: Option<Box<blake3::Hasher>>,
    buffer: Buffer,
    failed: bool,
}

/// Up to 128 bytes of pending input, handed to blake3 when full and at the end.
struct Buffer {
    bytes: [u8; 128],
    len: usize,
}

impl Default for KeyHasher {
    fn default() -> Self {
        Self::new()
    }
}

impl KeyHasher {
    pub fn new() -> Self {
        KeyHasher { hasher: None, buffer: Buffer { bytes: [0; 128], len: 0 }, failed: false }
    }

    /// Adds one argument. An argument whose `Serialize` impl fails makes the whole key unusable
    /// (the call then runs uncached) rather than silently colliding with another key.
    pub fn arg<T: Serialize + ?Sized>(&mut self, value: &T) {
        if postcard::to_io(value, &mut *self).is_err() {
            self.failed = true;
        }
    }

    /// The key for `spec`, or `None` when an argument failed to serialize.
    pub fn finish(self, spec: &Spec) -> Option<String> {
        self.finish_parts(spec.prefix, spec.function, spec.version)
    }

    fn finish_parts(mut self, prefix: &str, function: &str, version: Option<u32>) -> Option<String> {
        if self.failed {
            return None;
        }
        let pending = &self.buffer.bytes[..self.buffer.len];
        let digest = match &mut self.hasher {
            Some(hasher) => hasher.update(pending).finalize(),
            None => blake3::hash(pending),
        };
        Some(format_key(prefix, function, version, &digest.as_bytes()[..16]))
    }
}

impl std::io::Write for KeyHasher {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let Buffer { bytes, len } = &mut self.buffer;
        if *len + data.len() > bytes.len() {
            let hasher = self.hasher.get_or_insert_with(Default::default);
            hasher.update(&bytes[..*len]);
            *len = 0;
            if data.len() > bytes.len() {
                hasher.update(data);
                return Ok(data.len());
            }
        }
        bytes[*len..*len + data.len()].copy_from_slice(data);
        *len += data.len();
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The lease companion of an entry: same hash tag, so the same Cluster slot.
pub(crate) fn lease_key(entry: &str) -> String {
    format!("{entry}:lease")
}

/// `{prefix}:{function}[:v{version}]`: what every key of one function starts with.
pub(crate) fn function_base(spec: &Spec) -> String {
    match spec.version {
        Some(v) => format!("{}:{}:v{v}", spec.prefix, spec.function),
        None => format!("{}:{}", spec.prefix, spec.function),
    }
}

/// The key holding a function's generation, bumped by `function(..)` invalidations.
pub(crate) fn generation_key(spec: &Spec) -> String {
    format!("{}:gen", function_base(spec))
}

fn format_key(prefix: &str, function: &str, version: Option<u32>, hash: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut key = String::with_capacity(prefix.len() + function.len() + 50);
    key.push_str(prefix);
    key.push(':');
    key.push_str(function);
    if let Some(v) = version {
        key.push_str(":v");
        key.push_str(&v.to_string());
    }
    key.push_str(":{");
    for byte in hash {
        key.push(char::from(HEX[usize::from(byte >> 4)]));
        key.push(char::from(HEX[usize::from(byte & 0x0f)]));
    }
    key.push('}');
    key
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const SPEC: Spec = Spec {
        format: crate::value::Format::Json,
        db: 5,
        prefix: "market",
        function: "quote",
        ttl: Duration::from_secs(300),
        version: Some(2),
    };

    #[test]
    fn str_and_string_give_the_same_key() {
        let mut a = KeyHasher::new();
        a.arg("AAPL");
        let mut b = KeyHasher::new();
        b.arg(&String::from("AAPL"));
        assert_eq!(a.finish(&SPEC), b.finish(&SPEC));
    }

    #[test]
    fn long_arguments_hash_as_one_stream() {
        // Crosses the 128-byte buffer several times, in pieces of every size.
        let long: Vec<String> = (0..40).map(|i| "x".repeat(i)).collect();
        let mut streamed = KeyHasher::new();
        streamed.arg(&long);
        let one_shot = blake3::hash(&postcard::to_allocvec(&long).unwrap());
        let expected = format_key("market", "quote", Some(2), &one_shot.as_bytes()[..16]);
        assert_eq!(streamed.finish(&SPEC), Some(expected));
    }

    #[test]
    fn argument_order_matters() {
        let mut a = KeyHasher::new();
        a.arg(&1u32);
        a.arg(&2u32);
        let mut b = KeyHasher::new();
        b.arg(&2u32);
        b.arg(&1u32);
        assert_ne!(a.finish(&SPEC), b.finish(&SPEC));
    }
}
