//! Error collection: every mistake in an attribute is reported in one compile, each on its own
//! token (after serde_derive's `Ctxt`).

use std::fmt::Display;

use proc_macro2::Span;
use quote::ToTokens;

/// The errors found so far.
#[derive(Default)]
pub(crate) struct Errors {
    combined: Option<syn::Error>,
}

impl Errors {
    pub(crate) fn push(&mut self, error: syn::Error) {
        match &mut self.combined {
            Some(all) => all.combine(error),
            None => self.combined = Some(error),
        }
    }

    /// An error on `span`.
    pub(crate) fn at(&mut self, span: Span, message: impl Display) {
        self.push(syn::Error::new(span, message));
    }

    /// An error covering every token of `tokens`.
    pub(crate) fn on(&mut self, tokens: impl ToTokens, message: impl Display) {
        self.push(syn::Error::new_spanned(tokens, message));
    }

    pub(crate) fn into_result(self) -> syn::Result<()> {
        self.combined.map_or(Ok(()), Err)
    }
}

/// What became of one option: not written, written but unparsable (already reported), or parsed.
pub(crate) enum Given<T> {
    Absent,
    Invalid,
    Valid(T),
}

impl<T> Given<T> {
    /// The value if one was given and parsed (an invalid one was reported already).
    pub(crate) fn valid(self) -> Option<T> {
        match self {
            Given::Valid(value) => Some(value),
            Given::Absent | Given::Invalid => None,
        }
    }
}

/// An option that may be given once; a second one is an error on its name. One helper for every
/// option, so no option can forget the duplicate check.
pub(crate) struct Once<T> {
    name: &'static str,
    given: Given<T>,
}

impl<T> Once<T> {
    pub(crate) fn new(name: &'static str) -> Self {
        Once { name, given: Given::Absent }
    }

    /// Records the option written at `at`; `None` when its value did not parse (and was reported).
    pub(crate) fn set(&mut self, at: Span, value: Option<T>, errors: &mut Errors) {
        if !matches!(self.given, Given::Absent) {
            errors.at(at, format_args!("duplicate option `{}`: give each option once", self.name));
            return;
        }
        self.given = value.map_or(Given::Invalid, Given::Valid);
    }

    pub(crate) fn get(self) -> Given<T> {
        self.given
    }
}
