//! What the macro knows about one cached function ([`Spec`], a constant) and how the runtime
//! identifies it ([`CachedFn`]: the spec plus, for methods, the `Self` type). Every layer that
//! needs a function's identity imports it from here.

use std::time::Duration;

use crate::value::Format;

/// Everything the macro knows about one cached function, as a constant.
#[derive(Debug, Clone, Copy)]
pub struct Spec {
    /// The Redis DB number of the `db = ...` option (never 15).
    pub db: u8,
    /// The `prefix = "..."` option: the first part of every key.
    pub prefix: &'static str,
    /// The function's name as written.
    pub function: &'static str,
    /// `module_path!()` where the function is written: two same-named functions with the same
    /// prefix in two modules never share entries.
    pub module: &'static str,
    /// The `ttl = ...` option.
    pub ttl: Duration,
    /// The `version = N` option, part of the key when set.
    pub version: Option<u32>,
    /// The `format = ...` option (the encoding of stored values).
    pub format: Format,
}

/// One cached function as the runtime identifies it: its [`Spec`] and, for methods, the name of
/// the `Self` type (`std::any::type_name`), so that two `impl` blocks' same-named methods never
/// share entries.
#[derive(Debug, Clone, Copy)]
pub struct CachedFn {
    spec: &'static Spec,
    owner: &'static str,
}

impl CachedFn {
    /// A free function.
    pub const fn free(spec: &'static Spec) -> CachedFn {
        CachedFn { spec, owner: "" }
    }

    /// A method or associated function of the type named `owner` (`type_name::<Self>()`).
    pub const fn method(spec: &'static Spec, owner: &'static str) -> CachedFn {
        CachedFn { spec, owner }
    }

    pub(crate) fn spec(&self) -> &'static Spec {
        self.spec
    }

    /// The `Self` type's full name, generic arguments included: part of every key's hash.
    pub(crate) fn owner(&self) -> &'static str {
        self.owner
    }

    /// The function, whatever its generic arguments: what `f(..)` invalidates. Instantiations of
    /// a generic function (or of a generic `impl`) have their own entries but one generation.
    pub(crate) fn id(&self) -> FunctionId {
        let s = self.spec;
        let owner = self.owner.split('<').next().unwrap_or("");
        (s.db, s.prefix, s.function, s.version, s.module, owner)
    }
}

/// (db, prefix, function, version, module, owner without generic arguments).
pub(crate) type FunctionId = (u8, &'static str, &'static str, Option<u32>, &'static str, &'static str);

/// What one entry of `#[invalidates(...)]` drops.
#[derive(Debug, Clone)]
pub enum Target {
    /// One entry: the key of a call (`None` if an argument failed to serialize: nothing to drop,
    /// since such a call was never cached).
    Key(CachedFn, Option<String>),
    /// Every entry of a function.
    All(CachedFn),
}

impl Target {
    pub(crate) fn function(&self) -> &CachedFn {
        match self {
            Target::Key(f, _) | Target::All(f) => f,
        }
    }
}
