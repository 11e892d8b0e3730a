//! Code generation, one file per attribute. Each takes a validated model and emits tokens; on
//! errors, [`fallback`] emits the user's item untouched next to the errors, so one mistake in the
//! attribute does not turn into a cascade of "cannot find function" errors at every call site.

pub(crate) mod cached;

use proc_macro2::TokenStream;
use quote::ToTokens;

pub(crate) fn fallback(item: impl ToTokens, error: syn::Error) -> TokenStream {
    let mut tokens = error.to_compile_error();
    item.to_tokens(&mut tokens);
    tokens
}
