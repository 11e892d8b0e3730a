//! The shape of a cached value's type: a fingerprint of what its `Deserialize` asks for (struct
//! and field names, variant names, the kind of every leaf, in order), so that an entry written by
//! a release whose type had other fields is a miss for this one, with no `version` bump
//! (`value.rs` stores it beside the value).
//!
//! It is traced, not declared: [`of`] runs `T::deserialize` once per thread against a recording
//! deserializer that answers every request with a placeholder (zero, `""`, one element per
//! sequence, the next variant of an enum at each visit, over as many passes as it takes to pick
//! each variant of each enum once, at most 64) and hashes the requests. What it sees:
//! - every field name of every struct, including `#[serde(default)]` ones, and renames;
//! - every variant name of every enum, and the fields of each variant;
//! - the kind of each leaf (`u32`, `str`, `option`, `seq`, `map`...) and nested types' shapes.
//!
//! What it cannot see, said in README: what a custom `Deserialize` does with a value (a type
//! that reads `deserialize_any`, such as `serde_json::Value`, is answered with a unit: the trace
//! goes on past it, but an untagged or internally tagged enum or a flattened struct refuses the
//! unit and ends the pass there); a `Deserialize` that refuses the placeholder (a date or a UUID
//! parsed from `""`) ends the pass too. An ended pass still fingerprints everything before it,
//! including the whole field list of the struct that holds it; past that point (later fields of
//! that struct, and of the structs around it), a changed type needs `version`. Nesting deeper than
//! 24 levels, and types of more than 200,000 requests, end the pass the same way.

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;

use serde::de::{self, DeserializeOwned, DeserializeSeed, IntoDeserializer, Visitor};

/// The fingerprint of `T`'s shape, traced on this thread's first call for `T`.
pub(crate) fn of<T: DeserializeOwned>() -> u64 {
    thread_local! {
        // By the address of `trace::<T>`, one per type (two types' names may be one string, and
        // the linker may merge them; two functions are merged only if they trace alike): one
        // lookup of a word per call, no lock.
        static SHAPES: RefCell<HashMap<usize, u64, foldhash::fast::FixedState>> = RefCell::default();
    }
    let id = trace::<T> as fn() -> u64 as usize;
    if let Some(shape) = SHAPES.with(|s| s.borrow().get(&id).copied()) {
        return shape;
    }
    let shape = trace::<T>();
    SHAPES.with(|s| s.borrow_mut().insert(id, shape));
    shape
}

/// Nesting deeper than this ends a pass (a recursive type would never end).
const MAX_DEPTH: u32 = 24;
/// Passes run until every variant of every enum seen has been picked once, at most this many.
const MAX_PASSES: usize = 64;
/// Requests traced in all, at most (a type that nests one struct twice at every level grows
/// exponentially with depth): past it, the trace ends there.
const MAX_STEPS: u64 = 200_000;
/// Elements of a tuple or array traced, at most.
const MAX_ELEMENTS: usize = 64;

/// Which variant each enum (by name and variant list) picks next, and which it has picked.
type Cursors = HashMap<(&'static str, &'static [&'static str]), (usize, Vec<bool>)>;

fn trace<T: DeserializeOwned>() -> u64 {
    let mut log = blake3::Hasher::new();
    let mut cursors = Cursors::new();
    let mut steps = 0;
    for _ in 0..MAX_PASSES {
        let mut tracer = Tracer { log: &mut log, depth: 0, cursors: &mut cursors, steps: &mut steps };
        let ended = T::deserialize(&mut tracer).err();
        log.update(match ended {
            Some(_) => b"|ended",
            None => b"|done",
        });
        let explored = cursors.values().all(|(_, picked)| picked.iter().all(|p| *p));
        if explored || steps >= MAX_STEPS {
            break;
        }
    }
    let hash = log.finalize();
    u64::from_le_bytes(hash.as_bytes()[..8].try_into().expect("8 bytes"))
}

struct Tracer<'a> {
    log: &'a mut blake3::Hasher,
    depth: u32,
    cursors: &'a mut Cursors,
    steps: &'a mut u64,
}

#[derive(Debug)]
struct Ended(String);

impl fmt::Display for Ended {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Ended {}

impl de::Error for Ended {
    fn custom<M: fmt::Display>(message: M) -> Self {
        Ended(message.to_string())
    }
}

impl Tracer<'_> {
    fn record(&mut self, what: &str) {
        *self.steps += 1;
        self.log.update(what.as_bytes());
        self.log.update(b";");
    }

    fn record_names(&mut self, names: &[&str]) {
        for name in names {
            self.log.update(name.as_bytes());
            self.log.update(b",");
        }
        self.log.update(b";");
    }

    /// One level deeper, or the end of the pass.
    fn nested<R>(&mut self, f: impl FnOnce(&mut Self) -> Result<R, Ended>) -> Result<R, Ended> {
        if self.depth >= MAX_DEPTH || *self.steps >= MAX_STEPS {
            self.record("deep");
            return Err(Ended("nested too deep, or too large".into()));
        }
        self.depth += 1;
        let result = f(self);
        self.depth -= 1;
        result
    }
}

macro_rules! leaf {
    ($($method:ident => $visit:ident($($value:expr)?)),* $(,)?) => {
        $(
            fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Ended> {
                self.record(stringify!($method));
                visitor.$visit($($value)?)
            }
        )*
    };
}

impl<'de> de::Deserializer<'de> for &mut Tracer<'_> {
    type Error = Ended;

    leaf! {
        deserialize_bool => visit_bool(false),
        deserialize_i8 => visit_i8(0),
        deserialize_i16 => visit_i16(0),
        deserialize_i32 => visit_i32(0),
        deserialize_i64 => visit_i64(0),
        deserialize_i128 => visit_i128(0),
        deserialize_u8 => visit_u8(0),
        deserialize_u16 => visit_u16(0),
        deserialize_u32 => visit_u32(0),
        deserialize_u64 => visit_u64(0),
        deserialize_u128 => visit_u128(0),
        deserialize_f32 => visit_f32(0.0),
        deserialize_f64 => visit_f64(0.0),
        deserialize_char => visit_char('0'),
        deserialize_str => visit_str(""),
        deserialize_string => visit_str(""),
        deserialize_bytes => visit_bytes(&[]),
        deserialize_byte_buf => visit_bytes(&[]),
        deserialize_unit => visit_unit(),
        deserialize_identifier => visit_str(""),
    }

    /// A type that reads whatever comes (`serde_json::Value`, an untagged or internally tagged
    /// enum) has no shape to trace: it is answered with a unit, which some accept (the trace
    /// goes on) and others refuse (it ends there).
    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Ended> {
        self.record("any");
        visitor.visit_unit()
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Ended> {
        self.record("ignored");
        visitor.visit_unit()
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Ended> {
        self.record("option");
        self.nested(|t| visitor.visit_some(t))
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Ended> {
        self.record("unit_struct");
        self.record(name);
        visitor.visit_unit()
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Ended> {
        self.record("newtype");
        self.record(name);
        self.nested(|t| visitor.visit_newtype_struct(t))
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Ended> {
        self.record("seq");
        self.nested(|t| visitor.visit_seq(Elements { tracer: t, left: 1 }))
    }

    fn deserialize_tuple<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, Ended> {
        self.record(&format!("tuple{len}"));
        self.nested(|t| visitor.visit_seq(Elements { tracer: t, left: len.min(MAX_ELEMENTS) }))
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        len: usize,
        visitor: V,
    ) -> Result<V::Value, Ended> {
        self.record(&format!("tuple_struct{len}"));
        self.record(name);
        self.nested(|t| visitor.visit_seq(Elements { tracer: t, left: len.min(MAX_ELEMENTS) }))
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Ended> {
        self.record("map");
        self.nested(|t| visitor.visit_map(Entries { tracer: t, fields: None, at: 0 }))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Ended> {
        self.record("struct");
        self.record(name);
        self.record_names(fields);
        self.nested(|t| visitor.visit_map(Entries { tracer: t, fields: Some(fields), at: 0 }))
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        name: &'static str,
        variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Ended> {
        self.record("enum");
        self.record(name);
        self.record_names(variants);
        if variants.is_empty() {
            return Err(Ended("an enum without variants".into()));
        }
        // Each visit picks the next variant, so that across passes each is traced, including an
        // enum reached only through another's later variant.
        let (next, picked) =
            self.cursors.entry((name, variants)).or_insert_with(|| (0, vec![false; variants.len()]));
        let at = *next % variants.len();
        *next += 1;
        picked[at] = true;
        let variant = variants[at];
        self.nested(|t| visitor.visit_enum(Variant { tracer: t, name: variant }))
    }
}

/// A sequence of `left` placeholder elements (one for a `Vec`, `len` for a tuple).
struct Elements<'t, 'a> {
    tracer: &'t mut Tracer<'a>,
    left: usize,
}

impl<'de> de::SeqAccess<'de> for Elements<'_, '_> {
    type Error = Ended;

    fn next_element_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<Option<S::Value>, Ended> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        seed.deserialize(&mut *self.tracer).map(Some)
    }
}

/// A struct's fields by name, in declaration order, or one placeholder entry of a map.
struct Entries<'t, 'a> {
    tracer: &'t mut Tracer<'a>,
    fields: Option<&'static [&'static str]>,
    at: usize,
}

impl<'de> de::MapAccess<'de> for Entries<'_, '_> {
    type Error = Ended;

    fn next_key_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<Option<S::Value>, Ended> {
        match self.fields {
            Some(fields) => {
                let Some(field) = fields.get(self.at) else { return Ok(None) };
                self.at += 1;
                seed.deserialize(IntoDeserializer::<Ended>::into_deserializer(*field)).map(Some)
            }
            None if self.at == 0 => {
                self.at += 1;
                self.tracer.record("key");
                seed.deserialize(&mut *self.tracer).map(Some)
            }
            None => Ok(None),
        }
    }

    fn next_value_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<S::Value, Ended> {
        seed.deserialize(&mut *self.tracer)
    }
}

/// The variant an enum picks in this pass.
struct Variant<'t, 'a> {
    tracer: &'t mut Tracer<'a>,
    name: &'static str,
}

impl<'de, 't, 'a> de::EnumAccess<'de> for Variant<'t, 'a> {
    type Error = Ended;
    type Variant = Self;

    fn variant_seed<S: DeserializeSeed<'de>>(self, seed: S) -> Result<(S::Value, Self), Ended> {
        self.tracer.record(self.name);
        let value = seed.deserialize(IntoDeserializer::<Ended>::into_deserializer(self.name))?;
        Ok((value, self))
    }
}

impl<'de> de::VariantAccess<'de> for Variant<'_, '_> {
    type Error = Ended;

    fn unit_variant(self) -> Result<(), Ended> {
        self.tracer.record("unit");
        Ok(())
    }

    fn newtype_variant_seed<S: DeserializeSeed<'de>>(self, seed: S) -> Result<S::Value, Ended> {
        self.tracer.record("newtype_variant");
        seed.deserialize(&mut *self.tracer)
    }

    fn tuple_variant<V: Visitor<'de>>(self, len: usize, visitor: V) -> Result<V::Value, Ended> {
        de::Deserializer::deserialize_tuple(&mut *self.tracer, len, visitor)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Ended> {
        de::Deserializer::deserialize_struct(&mut *self.tracer, "", fields, visitor)
    }
}

#[cfg(test)]
#[allow(dead_code)] // The types are only traced.
mod tests {
    use serde::Deserialize;

    use super::*;

    mod v1 {
        #[derive(serde::Deserialize)]
        pub struct Quote {
            pub symbol: String,
            pub price: f64,
        }
    }

    mod v2 {
        /// A field added with a default: old JSON decodes "fine" as this type.
        #[derive(serde::Deserialize)]
        pub struct Quote {
            pub symbol: String,
            pub price: f64,
            #[serde(default)]
            pub venue: String,
        }
    }

    mod v3 {
        /// The same fields, one of another type.
        #[derive(serde::Deserialize)]
        pub struct Quote {
            pub symbol: String,
            pub price: u64,
        }
    }

    #[derive(Deserialize)]
    enum Side {
        Bid { price: f64 },
        Ask { price: f64 },
    }

    #[derive(Deserialize)]
    enum SideChanged {
        Bid { price: f64 },
        Ask { price: f64, size: u32 },
    }

    #[derive(Deserialize)]
    enum Outer {
        A,
        B(Inner),
    }

    #[derive(Deserialize)]
    enum OuterChanged {
        A,
        B(InnerChanged),
    }

    #[derive(Deserialize)]
    #[serde(rename = "Inner")]
    enum Inner {
        X { a: u32 },
        Y,
    }

    /// `Inner` with its first variant changed, under the same name.
    #[derive(Deserialize)]
    #[serde(rename = "Inner")]
    enum InnerChanged {
        X { a: u32, b: u32 },
        Y,
    }

    #[derive(Deserialize)]
    enum Wide {
        A(Big),
        B,
    }

    #[derive(Deserialize)]
    enum WideChanged {
        A(BigChanged),
        B,
    }

    #[derive(Deserialize)]
    #[serde(rename = "Big")]
    enum Big {
        V0,
        V1,
        V2,
        V3 { a: u32 },
    }

    #[derive(Deserialize)]
    #[serde(rename = "Big")]
    enum BigChanged {
        V0,
        V1,
        V2,
        V3 { a: u64 },
    }

    /// Nests one struct twice at every level: exponential without the budget.
    #[derive(Deserialize)]
    struct Twice<T> {
        a: T,
        b: T,
    }

    #[derive(Deserialize)]
    struct Node {
        _children: Vec<Node>,
    }

    #[derive(Deserialize)]
    struct Stamped {
        _at: Parsed,
        _after: u32,
    }

    #[derive(Deserialize)]
    struct StampedMore {
        _at: Parsed,
        _after: u32,
        _more: u32,
    }

    /// Refuses the placeholder, as a date parsed from a string does.
    struct Parsed;

    impl<'de> Deserialize<'de> for Parsed {
        fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            let s = String::deserialize(d)?;
            s.parse::<u32>().map(|_| Parsed).map_err(de::Error::custom)
        }
    }

    #[test]
    fn a_changed_struct_has_another_shape() {
        // The danger: v1's JSON decodes as v2.
        assert!(serde_json::from_str::<v2::Quote>(r#"{"symbol":"A","price":1.0}"#).is_ok());
        let shapes = [trace::<v1::Quote>(), trace::<v2::Quote>(), trace::<v3::Quote>()];
        assert_ne!(shapes[0], shapes[1]);
        assert_ne!(shapes[0], shapes[2]);
        assert_ne!(shapes[1], shapes[2]);
        // Deterministic, and the same through the per-thread cache.
        assert_eq!(trace::<v1::Quote>(), shapes[0]);
        assert_eq!(of::<v1::Quote>(), shapes[0]);
        assert_eq!(of::<v1::Quote>(), shapes[0]);
    }

    #[test]
    fn every_variant_is_traced() {
        // The change is in the second variant, which only the second pass picks.
        assert_ne!(trace::<Side>(), trace::<SideChanged>());
        assert_ne!(trace::<Option<Side>>(), trace::<Side>());
        assert_ne!(trace::<Vec<u32>>(), trace::<Vec<u64>>());
        assert_ne!(trace::<std::collections::HashMap<String, u32>>(), trace::<Vec<(String, u32)>>());
    }

    #[test]
    fn enums_reached_only_through_another_variant_are_traced() {
        assert_ne!(trace::<Outer>(), trace::<OuterChanged>());
        assert_ne!(trace::<Wide>(), trace::<WideChanged>());
    }

    #[test]
    fn large_types_end_within_the_budget() {
        type T4<T> = Twice<Twice<Twice<Twice<T>>>>;
        let started = std::time::Instant::now();
        // 4,096 leaves.
        assert_eq!(trace::<T4<T4<T4<u32>>>>(), trace::<T4<T4<T4<u32>>>>());
        assert_ne!(trace::<T4<T4<T4<u32>>>>(), trace::<T4<T4<T4<u64>>>>());
        assert_ne!(trace::<[u32; 32]>(), trace::<[u64; 32]>());
        assert!(started.elapsed() < std::time::Duration::from_secs(10), "{:?}", started.elapsed());
    }

    #[test]
    fn a_field_after_an_untraceable_value_is_traced() {
        #[derive(Deserialize)]
        struct Before {
            _any: serde_json::Value,
            _n: u32,
        }
        #[derive(Deserialize)]
        struct After {
            _any: serde_json::Value,
            _n: u64,
        }
        assert_ne!(trace::<Before>(), trace::<After>());
    }

    #[test]
    fn recursive_and_refusing_types_end_without_panicking() {
        assert_eq!(trace::<Node>(), trace::<Node>());
        // The refusing field ends the trace, but the field list was seen whole.
        assert_ne!(trace::<Stamped>(), trace::<StampedMore>());
    }
}
