//! The key format, in one place. Stable from release 0.1 on: a key changes only when the
//! function's prefix, name, version, module or arguments do.
//!
//! A cached call's key is `{prefix}:{function}[:v{version}]:{{hash}}`, where `hash` is the first
//! 16 bytes (32 lowercase hex digits) of blake3 over, in this order and each encoded with
//! postcard (a stable, documented binary serde format) straight into the hasher:
//!
//! 1. the module path where the function is written (`module_path!()`), so two same-named
//!    functions with one prefix in two modules never share entries;
//! 2. for methods, the `Self` type's name (`std::any::type_name`, generic arguments included),
//!    for free functions the empty string, or, for one written in another function's body, its
//!    companion type's `type_name` (which names that function; see `CachedFn::free_in`);
//! 3. for generic functions, each type argument's `type_name` and each const argument's value;
//! 4. the receiver, unless the function says `skip(self)`;
//! 5. the arguments that are part of the key, in the order the function declares them.
//!
//! Example: `market:quote:v2:{6f0c...}`. The braces are a Redis Cluster hash tag, so the entry and
//! any key derived from it for the same call share a slot.
//!
//! Because the encoding is serde's data model, `&str` and `String` (or `&[T]` and `Vec<T>`) hash
//! alike as values (a generic or `impl Trait` parameter's type name is hashed too, item 3). Types whose serialization is not deterministic (a `HashMap`'s iteration order) give
//! different keys for equal values: use `BTreeMap` in arguments. `type_name`'s text is chosen by
//! the compiler: a Rust release that spells a type differently gives methods and generic
//! functions new keys (misses, never another function's entry).

use serde::Serialize;

use crate::spec::{CachedFn, Spec};

/// The key a `#[cached]` function uses for given arguments, built by hand: for logs, tools, and
/// code that reads the cache without calling the function.
///
/// ```
/// use cache_runtime::KeyBuilder;
///
/// // mod market { #[cached(db = MarketData, prefix = "market", ttl = 300)] async fn quote(symbol: &str) ... }
/// // in the crate `my_service`:
/// let key = KeyBuilder::new("my_service::market", "market", "quote").arg("AAPL").finish();
/// assert_eq!(key.as_deref(), Some("market:quote:{88c1b1604f9e2487dbe3c8094ac4588a}"));
/// ```
pub struct KeyBuilder {
    prefix: String,
    function: String,
    version: Option<u32>,
    module: String,
    owner: Option<String>,
    pending: Vec<KeyPart>,
}

enum KeyPart {
    TypeArg(String),
    Arg(Result<Vec<u8>, ()>),
}

impl KeyBuilder {
    /// Starts the key of `function` under `prefix`, written in the module `module` (the function's
    /// `module_path!()`, e.g. `my_service::market`).
    pub fn new(module: &str, prefix: &str, function: &str) -> Self {
        KeyBuilder {
            prefix: prefix.to_owned(),
            function: function.to_owned(),
            version: None,
            module: module.to_owned(),
            owner: None,
            pending: Vec::new(),
        }
    }

    /// The `version` option of the function.
    pub fn version(mut self, version: u32) -> Self {
        self.version = Some(version);
        self
    }

    /// For a method: the `Self` type's `std::any::type_name`.
    pub fn owner(mut self, type_name: &str) -> Self {
        self.owner = Some(type_name.to_owned());
        self
    }

    /// For a generic function: the next type argument's `std::any::type_name`.
    pub fn type_arg(mut self, type_name: &str) -> Self {
        self.pending.push(KeyPart::TypeArg(type_name.to_owned()));
        self
    }

    /// The next argument that is part of the key (the receiver first, for a method that does not
    /// skip it; skipped ones are left out).
    pub fn arg<T: Serialize + ?Sized>(mut self, value: &T) -> Self {
        self.pending.push(KeyPart::Arg(postcard::to_allocvec(value).map_err(|_| ())));
        self
    }

    /// The key, or `None` if an argument failed to serialize.
    pub fn finish(self) -> Option<String> {
        let mut hasher = KeyHasher::start(&self.module, self.owner.as_deref().unwrap_or(""));
        for part in &self.pending {
            match part {
                KeyPart::TypeArg(name) => hasher.arg(name.as_str()),
                KeyPart::Arg(Ok(bytes)) => hasher.extend(bytes),
                KeyPart::Arg(Err(())) => return None,
            }
        }
        hasher.finish_parts(&self.prefix, &self.function, self.version)
    }
}

/// What a method's receiver must be to enter its key; the macro reports a receiver that is not
/// with the advice to write `skip(self)`.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not `Serialize`, so this method's receiver cannot be part of its cache key",
    label = "the receiver is hashed into the cache key unless the method says `skip(self)`",
    note = "write `skip(self)` in `#[cached(...)]` if every instance may share entries, or derive `Serialize` for `{Self}` so each instance's state enters the key"
)]
pub trait KeyReceiver {
    #[doc(hidden)]
    fn hash_into(&self, hasher: &mut KeyHasher);
}

impl<T: Serialize + ?Sized> KeyReceiver for T {
    fn hash_into(&self, hasher: &mut KeyHasher) {
        hasher.arg(self)
    }
}

/// Streams the key parts of one call into blake3. Postcard writes many small pieces; they go
/// through a small buffer, and the (large) incremental hasher is only made when the parts outgrow
/// it: short keys, nearly all of them, are one `blake3::hash` call. Same bytes, same hash.
#[doc(hidden)]
pub struct KeyHasher {
    spec: Option<&'static Spec>,
    hasher: Option<Box<blake3::Hasher>>,
    buffer: Buffer,
    failed: bool,
}

/// Up to 192 bytes of pending input, handed to blake3 when full and at the end.
struct Buffer {
    bytes: [u8; 192],
    len: usize,
}

impl KeyHasher {
    /// Starts the key of one call of `function`: its module and owner come first.
    pub fn new(function: &CachedFn) -> Self {
        let mut hasher = Self::fresh(function);
        hasher.begin(function);
        hasher
    }

    /// [`KeyHasher::new`] in two steps, for generated code: the hasher, empty, then
    /// [`KeyHasher::begin`] writes its first parts. Apart, so that the hasher is written where it
    /// lives rather than built and moved there (a copy of its buffer on every call).
    #[inline(always)]
    pub fn fresh(function: &CachedFn) -> Self {
        KeyHasher { spec: Some(function.spec()), ..Self::empty() }
    }

    /// Writes what comes first in the key of a call of `function`: its module and owner. Called
    /// once, right after [`KeyHasher::fresh`].
    #[inline]
    pub fn begin(&mut self, function: &CachedFn) {
        self.text(function.spec().module);
        self.text(function.owner());
    }

    /// Writes `text` as postcard writes a `str` (its length as a LEB128 varint, then its bytes),
    /// without postcard: the parts every call writes (module, owner) cost a byte pushed and one
    /// copy. The unit test `text_is_written_as_postcard_writes_a_str` holds the two together.
    #[inline]
    fn text(&mut self, text: &str) {
        if text.len() < 0x80 {
            self.push(text.len() as u8);
        } else {
            self.long_length(text.len());
        }
        if !text.is_empty() {
            self.extend(text.as_bytes());
        }
    }

    /// A length of 128 or more, as a LEB128 varint (see [`KeyHasher::text`]).
    #[cold]
    fn long_length(&mut self, mut len: usize) {
        let mut varint = [0u8; 10];
        let mut used = 0;
        while len >= 0x80 {
            varint[used] = (len as u8) | 0x80;
            len >>= 7;
            used += 1;
        }
        varint[used] = len as u8;
        self.extend(&varint[..=used]);
    }

    /// Appends one byte (see [`KeyHasher::extend`]).
    #[inline(always)]
    fn push(&mut self, byte: u8) {
        let Buffer { bytes, len } = &mut self.buffer;
        match bytes.get_mut(*len) {
            Some(free) => {
                *free = byte;
                *len += 1;
            }
            None => self.spill(&[byte]),
        }
    }

    #[inline(always)]
    fn empty() -> Self {
        KeyHasher { spec: None, hasher: None, buffer: Buffer { bytes: [0; 192], len: 0 }, failed: false }
    }

    fn start(module: &str, owner: &str) -> Self {
        let mut hasher = Self::empty();
        hasher.text(module);
        hasher.text(owner);
        hasher
    }

    /// A generic type argument's name (`std::any::type_name::<T>()`).
    pub fn type_arg(&mut self, name: &'static str) {
        self.text(name)
    }

    /// Adds one argument. An argument whose `Serialize` impl fails makes the whole key unusable
    /// (the call then runs uncached, counted as `key_failures`) rather than silently colliding
    /// with another key.
    pub fn arg<T: Serialize + ?Sized>(&mut self, value: &T) {
        if postcard::serialize_with_flavor(value, Append(self)).is_err() {
            self.failed = true;
        }
    }

    /// The key, or `None` when an argument failed to serialize.
    pub fn finish(mut self) -> Option<String> {
        self.call_key(false).map(|key| key.text())
    }

    /// What the key is taken over, for a near lookup: the bytes, or, when they outgrew the
    /// buffer, the hash. `None` when an argument failed to serialize.
    #[inline]
    pub(crate) fn args(&mut self) -> Option<ArgsRef<'_>> {
        if self.failed {
            return None;
        }
        Some(match self.hasher {
            None => ArgsRef::Encoded(&self.buffer.bytes[..self.buffer.len]),
            Some(_) => ArgsRef::Hashed(self.hash16()),
        })
    }

    /// The key of a call, hashed, with what a near copy is kept under if `near`. `None` when an
    /// argument failed to serialize.
    pub(crate) fn call_key(&mut self, near: bool) -> Option<CallKey> {
        let spec = self.spec.expect("KeyHasher::new names the function");
        let args = if near { Some(self.args()?.to_owned()) } else { None };
        if self.failed {
            return None;
        }
        // A key kept by its hash has just been hashed: not again.
        let hash = match &args {
            Some(Args::Hashed(hash)) => *hash,
            _ => self.hash16(),
        };
        Some(CallKey { spec, hash, args })
    }

    fn hash16(&mut self) -> [u8; 16] {
        let mut hash = [0; 16];
        hash.copy_from_slice(&self.digest_in_place().as_bytes()[..16]);
        hash
    }

    fn finish_parts(self, prefix: &str, function: &str, version: Option<u32>) -> Option<String> {
        if self.failed {
            return None;
        }
        Some(format_key(prefix, function, version, &self.digest().as_bytes()[..16]))
    }

    fn digest(mut self) -> blake3::Hash {
        self.digest_in_place()
    }

    fn digest_in_place(&mut self) -> blake3::Hash {
        let pending = &self.buffer.bytes[..self.buffer.len];
        match &mut self.hasher {
            // Emptied, so that a second digest hashes the same bytes.
            Some(hasher) => {
                hasher.update(pending);
                self.buffer.len = 0;
                hasher.finalize()
            }
            None => blake3::hash(pending),
        }
    }
}

/// What a call's key is taken over, borrowed: its bytes, or, for bytes that outgrew the hasher's
/// buffer, already its hash. What the near tier finds a copy by.
#[derive(Clone, Copy)]
pub(crate) enum ArgsRef<'a> {
    /// The key's bytes, before hashing.
    Encoded(&'a [u8]),
    /// The key's hash.
    Hashed([u8; 16]),
}

/// [`ArgsRef`], owned: what the near tier keeps a copy under (its bytes shared with the tier's
/// index of them, not copied).
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum Args {
    Encoded(std::sync::Arc<[u8]>),
    Hashed([u8; 16]),
}

impl ArgsRef<'_> {
    pub(crate) fn to_owned(self) -> Args {
        match self {
            ArgsRef::Encoded(bytes) => Args::Encoded(bytes.into()),
            ArgsRef::Hashed(hash) => Args::Hashed(hash),
        }
    }
}

impl Args {
    pub(crate) fn borrowed(&self) -> ArgsRef<'_> {
        match self {
            Args::Encoded(bytes) => ArgsRef::Encoded(bytes),
            Args::Hashed(hash) => ArgsRef::Hashed(*hash),
        }
    }
}

/// One call's key, with the function it belongs to, as its hash (formatted by
/// [`CallKey::text`] only where the backend is asked), and, for a call whose function keeps near
/// copies, what a copy of it is kept under.
#[doc(hidden)]
pub struct CallKey {
    spec: &'static Spec,
    hash: [u8; 16],
    args: Option<Args>,
}

impl CallKey {
    /// The 16 bytes of blake3 the key's braces hold.
    pub(crate) fn hash(&self) -> [u8; 16] {
        self.hash
    }

    /// What a near copy of this call is kept under, if its function keeps them (taken once).
    pub(crate) fn take_args(&mut self) -> Option<Args> {
        self.args.take()
    }

    /// The key as the backend stores it (see the module's documentation).
    pub(crate) fn text(&self) -> String {
        format_key(self.spec.prefix, self.spec.function, self.spec.version, &self.hash)
    }
}

/// The parts of an entry's key: `{prefix}:{function}[:vN]` (see [`function_base`]) and its hash;
/// `None` for any other key (a lease, a stamp, a generation, a key the toolkit did not make).
pub(crate) fn split_entry(key: &str) -> Option<(&str, [u8; 16])> {
    let (base, rest) = key.rsplit_once(":{")?;
    let hex = rest.strip_suffix('}')?.as_bytes();
    if hex.len() != 32 {
        return None;
    }
    let mut hash = [0; 16];
    // Lowercase only, as `push_hex` writes them: any other text is not an entry's key.
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    for (byte, pair) in hash.iter_mut().zip(hex.chunks_exact(2)) {
        *byte = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some((base, hash))
}

impl KeyHasher {
    /// Appends `data` to what the key is taken over: kept in the buffer while it fits, else
    /// hashed (the buffer first).
    #[inline(always)]
    fn extend(&mut self, data: &[u8]) {
        let Buffer { bytes, len } = &mut self.buffer;
        match bytes.get_mut(*len..*len + data.len()) {
            Some(free) => {
                free.copy_from_slice(data);
                *len += data.len();
            }
            None => self.spill(data),
        }
    }

    /// [`KeyHasher::extend`] past the buffer: the buffer is hashed, then `data` is hashed too or
    /// starts the buffer again.
    #[cold]
    #[inline(never)]
    fn spill(&mut self, data: &[u8]) {
        let Buffer { bytes, len } = &mut self.buffer;
        let hasher = self.hasher.get_or_insert_with(Default::default);
        hasher.update(&bytes[..*len]);
        *len = 0;
        if data.len() > bytes.len() {
            hasher.update(data);
        } else {
            bytes[..data.len()].copy_from_slice(data);
            *len = data.len();
        }
    }
}

/// Where `postcard` writes an argument's bytes: straight into the hasher's buffer (a postcard
/// flavor, so a length prefix is a byte pushed, not an `io::Write` call). The bytes are
/// postcard's whatever writes them, so keys do not change.
struct Append<'a>(&'a mut KeyHasher);

impl postcard::ser_flavors::Flavor for Append<'_> {
    type Output = ();

    #[inline]
    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.0.extend(data);
        Ok(())
    }

    #[inline]
    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        self.0.push(data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<()> {
        Ok(())
    }
}

/// The lease companion of an entry: same hash tag, so the same Cluster slot.
pub(crate) fn lease_key(entry: &str) -> String {
    format!("{entry}:lease")
}

/// `{prefix}:{function}[:v{version}]`: what every key of one function starts with (and of a
/// same-named function of another module: the hash tells them apart).
pub(crate) fn function_base(spec: &Spec) -> String {
    match spec.version {
        Some(v) => format!("{}:{}:v{v}", spec.prefix, spec.function),
        None => format!("{}:{}", spec.prefix, spec.function),
    }
}

/// The key holding a function's generation, bumped by `function(..)` invalidations:
/// `{prefix}:{function}[:vN]:gen:{id}`, `id` telling same-named functions of other modules or
/// types apart (16 hex digits of blake3 over the module and the owner without generic arguments).
pub(crate) fn generation_key(function: &CachedFn) -> String {
    let (.., module, owner) = function.id();
    let digest = KeyHasher::start(module, owner).digest();
    let mut key = function_base(function.spec());
    key.push_str(":gen:");
    push_hex(&mut key, &digest.as_bytes()[..8]);
    key
}

/// How long a function's generation key lives after it is last read or raised: twice the
/// function's TTL, so it outlives every entry written under it while the function is in use.
pub(crate) fn generation_life(ttl: std::time::Duration) -> std::time::Duration {
    ttl.saturating_mul(2)
}

/// The invalidation stamp of an entry (`K:inv`, same hash tag): when it was last invalidated.
pub(crate) fn invalidation_key(entry: &str) -> String {
    format!("{entry}:inv")
}

/// Appends `bytes` as lowercase hex digits, a buffer's worth at a time (a `push` per digit cost
/// about 500 instructions per key, and a key is formatted on every Redis lookup).
fn push_hex(key: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for chunk in bytes.chunks(32) {
        let mut digits = [0u8; 64];
        for (pair, byte) in digits.chunks_exact_mut(2).zip(chunk) {
            pair[0] = HEX[usize::from(byte >> 4)];
            pair[1] = HEX[usize::from(byte & 0x0f)];
        }
        // Always ASCII.
        if let Ok(digits) = std::str::from_utf8(&digits[..2 * chunk.len()]) {
            key.push_str(digits);
        }
    }
}

fn format_key(prefix: &str, function: &str, version: Option<u32>, hash: &[u8]) -> String {
    let mut key = String::with_capacity(prefix.len() + function.len() + 50);
    key.push_str(prefix);
    key.push(':');
    key.push_str(function);
    if let Some(v) = version {
        key.push_str(":v");
        key.push_str(&v.to_string());
    }
    key.push_str(":{");
    push_hex(&mut key, hash);
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
        module: "my_service::market",
        ttl: Duration::from_secs(300),
        version: Some(2),
        jitter_percent: 0,
        eager_refresh_percent: 0,
        stale_if_error: Duration::ZERO,
        near: Duration::ZERO,
    };
    const FREE: CachedFn = CachedFn::free(&SPEC);

    fn key(function: &CachedFn, args: &[&dyn erased::Arg]) -> Option<String> {
        let mut h = KeyHasher::new(function);
        for a in args {
            a.add(&mut h);
        }
        h.finish()
    }

    mod erased {
        pub trait Arg {
            fn add(&self, h: &mut super::KeyHasher);
        }
        impl<T: serde::Serialize> Arg for T {
            fn add(&self, h: &mut super::KeyHasher) {
                h.arg(self)
            }
        }
    }

    #[test]
    fn str_and_string_give_the_same_key() {
        assert_eq!(key(&FREE, &[&"AAPL"]), key(&FREE, &[&String::from("AAPL")]));
    }

    #[test]
    fn a_call_key_formats_to_the_key_and_splits_back() {
        let mut h = KeyHasher::new(&FREE);
        h.arg("AAPL");
        assert!(matches!(h.args(), Some(ArgsRef::Encoded(_))), "a short key is kept as its bytes");
        let call = h.call_key(true).unwrap();
        let text = call.text();
        assert_eq!(Some(text.clone()), key(&FREE, &[&"AAPL"]));
        assert_eq!(split_entry(&text), Some(("market:quote:v2", call.hash())));
        for other in [
            "market:quote:v2:gen:0011223344556677",
            &format!("{text}:lease"),
            &format!("{text}:inv"),
            "market:quote:{0g112233445566778899aabbccddeeff}",
            "market:quote:{00112233}",
            "market:quote:{00112233445566778899AABBCCDDEEFF}",
            "plain",
        ] {
            assert_eq!(split_entry(other), None, "{other}");
        }
        // Bytes that outgrow the buffer are hashed as they come: the same key.
        let long = "x".repeat(500);
        let mut h = KeyHasher::new(&FREE);
        h.arg(long.as_str());
        assert!(matches!(h.args(), Some(ArgsRef::Hashed(_))));
        // Asked twice (the near lookup, then the key): the same hash.
        let call = h.call_key(true).unwrap();
        assert_eq!(Some(call.text()), key(&FREE, &[&long.as_str()]));
    }

    #[test]
    fn long_arguments_hash_as_one_stream() {
        // Crosses the buffer several times, in pieces of every size.
        let long: Vec<String> = (0..40).map(|i| "x".repeat(i)).collect();
        let mut bytes = postcard::to_allocvec("my_service::market").unwrap();
        bytes.extend(postcard::to_allocvec("").unwrap());
        bytes.extend(postcard::to_allocvec(&long).unwrap());
        let one_shot = blake3::hash(&bytes);
        let expected = format_key("market", "quote", Some(2), &one_shot.as_bytes()[..16]);
        assert_eq!(key(&FREE, &[&long]), Some(expected));
    }

    #[test]
    fn text_is_written_as_postcard_writes_a_str() {
        for len in [0, 1, 5, 127, 128, 191, 192, 300, 16_383, 16_384, 70_000] {
            let text = "é".repeat(len / 2) + &"x".repeat(len % 2);
            let (mut ours, mut postcards) = (KeyHasher::empty(), KeyHasher::empty());
            ours.text(&text);
            postcards.arg(text.as_str());
            assert_eq!(ours.digest().as_bytes(), postcards.digest().as_bytes(), "length {len}");
            let mut short = KeyHasher::empty();
            short.text(&text);
            if let Some(ArgsRef::Encoded(bytes)) = short.args() {
                assert_eq!(bytes, postcard::to_allocvec(text.as_str()).unwrap(), "length {len}");
            }
        }
    }

    #[test]
    fn argument_order_matters() {
        assert_ne!(key(&FREE, &[&1u32, &2u32]), key(&FREE, &[&2u32, &1u32]));
    }

    #[test]
    fn module_and_owner_enter_the_key_but_not_the_readable_part() {
        const OTHER: Spec = Spec { module: "my_service::us", ..SPEC };
        let eu = key(&FREE, &[&"X"]).unwrap();
        let us = key(&CachedFn::free(&OTHER), &[&"X"]).unwrap();
        let method = key(&CachedFn::method(&SPEC, "my_service::Feed"), &[&"X"]).unwrap();
        assert_ne!(eu, us);
        assert_ne!(eu, method);
        for k in [&eu, &us, &method] {
            assert!(k.starts_with("market:quote:v2:{"), "{k}");
        }
        assert_ne!(generation_key(&FREE), generation_key(&CachedFn::free(&OTHER)));
    }

    #[test]
    fn instantiations_share_a_generation_but_not_keys() {
        let a = CachedFn::method(&SPEC, "my_service::Repo<u32>");
        let b = CachedFn::method(&SPEC, "my_service::Repo<u64>");
        assert_ne!(key(&a, &[&1]), key(&b, &[&1]));
        assert_eq!(generation_key(&a), generation_key(&b));
        assert_eq!(a.id(), b.id());
    }

    #[test]
    fn builder_matches_the_hasher() {
        let by_hand = KeyBuilder::new("my_service::market", "market", "quote")
            .version(2)
            .owner("my_service::Feed")
            .type_arg("f64")
            .arg(&7u8)
            .arg("X")
            .finish();
        let mut h = KeyHasher::new(&CachedFn::method(&SPEC, "my_service::Feed"));
        h.type_arg("f64");
        h.arg(&7u8);
        h.arg("X");
        assert_eq!(by_hand, h.finish());
    }
}
