//! Code generation, one file per attribute. Each takes a validated model and emits tokens; on
//! errors, [`fallback`] emits the user's item untouched next to the errors, so one mistake in the
//! attribute does not turn into a cascade of "cannot find function" errors at every call site.

pub(crate) mod cached;
pub(crate) mod cached_impl;
pub(crate) mod invalidates;

use proc_macro2::{Span, TokenStream};
use quote::{format_ident, quote, quote_spanned, ToTokens};
use syn::spanned::Spanned;
use syn::{Block, Ident, Type};

/// The conditions an item is compiled under, for the items generated beside it: its `#[cfg]`s,
/// and of each `#[cfg_attr(predicate, ...)]` the `cfg`s it applies (as
/// `#[cfg_attr(predicate, cfg(..))]`), not the other attributes it applies
/// (`tracing::instrument(skip(pool))` would fail on a companion without `pool`).
pub(crate) fn conditions(attrs: &[syn::Attribute]) -> Vec<TokenStream> {
    attrs
        .iter()
        .filter(|attr| attr.path().is_ident("cfg") || attr.path().is_ident("cfg_attr"))
        .filter_map(|attr| match &attr.meta {
            syn::Meta::List(list) if attr.path().is_ident("cfg_attr") => match cfg_only(list) {
                // One that does not parse (rustc rejects it anyway): copied as written, so that
                // the items beside the function are compiled where it is.
                Err(()) => Some(attr.to_token_stream()),
                Ok(Some(kept)) => Some(quote!(#[#kept])),
                Ok(None) => None,
            },
            _ => Some(attr.to_token_stream()),
        })
        .collect()
}

/// `cfg_attr(predicate, attrs..)` with only the `cfg`s among `attrs` (nested `cfg_attr`s
/// filtered the same way); `None` when none is left; `Err` when it does not parse.
fn cfg_only(list: &syn::MetaList) -> Result<Option<TokenStream>, ()> {
    let parsed = list
        .parse_args_with(syn::punctuated::Punctuated::<syn::Meta, syn::Token![,]>::parse_terminated)
        .map_err(|_| ())?;
    let mut parsed = parsed.into_iter();
    let predicate = parsed.next().ok_or(())?;
    let mut kept = Vec::new();
    for meta in parsed {
        match &meta {
            syn::Meta::List(nested) if nested.path.is_ident("cfg_attr") => {
                if let Some(nested) = cfg_only(nested)? {
                    kept.push(nested);
                }
            }
            _ if meta.path().is_ident("cfg") => kept.push(meta.to_token_stream()),
            _ => {}
        }
    }
    Ok((!kept.is_empty()).then(|| quote!(cfg_attr(#predicate, #(#kept),*))))
}

pub(crate) fn fallback(item: impl ToTokens, error: syn::Error) -> TokenStream {
    let mut tokens = error.to_compile_error();
    item.to_tokens(&mut tokens);
    tokens
}

/// Where `#[cached]` puts the companions of a function `f` that `#[invalidates(f(..))]` and
/// `invalidate!` call: a key function, `Option<String>` from the key arguments (after `&self`
/// when the receiver is part of the key, so callers name the instance first), with the
/// function's generics; and a spec function, the `CachedFn` the runtime identifies `f` by. This
/// and the two names below are the whole contract between the attributes. The site also decides
/// whether the runtime identifies `f` as a method, by its `Self` type.
#[derive(Clone, Copy)]
pub(crate) enum Site {
    /// A free function: a hidden empty struct `f` (in the type namespace, so `use m::f;` brings
    /// it along with the function, and an `impl` resolves names where the function does, even in
    /// a function body) with `f::__cache_key` and `f::__cache_spec`.
    Module,
    /// Any function of an `impl` block marked `#[cached_impl]`: associated functions
    /// `Self::__cache_key_f` and `Self::__cache_spec_f`, in an inherent `impl` block of the same
    /// type emitted beside it (a trait impl cannot hold them). `#[cached]` alone refuses a
    /// method (it has a receiver, or names `Self`), saying to add `#[cached_impl]`.
    Associated,
}

pub(crate) fn companion_site(sig: &syn::Signature) -> Site {
    if sig.receiver().is_some() || mentions(sig, "Self") {
        Site::Associated
    } else {
        Site::Module
    }
}

/// Whether `tokens` contain the identifier or keyword `word`, at any depth.
pub(crate) fn mentions(tokens: impl ToTokens, word: &str) -> bool {
    fn walk(stream: TokenStream, word: &str) -> bool {
        stream.into_iter().any(|t| match t {
            proc_macro2::TokenTree::Ident(i) => i == word,
            proc_macro2::TokenTree::Group(g) => walk(g.stream(), word),
            _ => false,
        })
    }
    walk(tokens.to_token_stream(), word)
}

/// The names of `f`'s companions. A method's are `__cache_key_f` and `__cache_spec_f`, beside the
/// other functions of its type; a free function's are `__cache_key` and `__cache_spec`, its hidden
/// struct's own, so that the struct imported under another name (`use m::f as g;`) still has them.
/// The new names carry the user's span, so an error points at the `f` the user wrote.
pub(crate) fn key_fn_name(function: &Ident, site: Site) -> Ident {
    match site {
        Site::Associated => format_ident!("__cache_key_{}", function, span = function.span()),
        Site::Module => Ident::new("__cache_key", function.span()),
    }
}

pub(crate) fn spec_fn_name(function: &Ident, site: Site) -> Ident {
    match site {
        Site::Associated => format_ident!("__cache_spec_{}", function, span = function.span()),
        Site::Module => Ident::new("__cache_spec", function.span()),
    }
}

/// The user's body as an `async move` block whose output type is pinned to `ret` by a fake
/// return edge (after tracing-attributes), so `?` and `return` type-check exactly as they did
/// before the attribute and type errors point at the user's return type.
pub(crate) fn async_body(ret: Option<&Type>, block: &Block) -> TokenStream {
    let stmts = &block.stmts;
    // `let x: impl Trait` is not Rust: a function returning `impl Trait` (an axum handler's
    // `impl IntoResponse`) gets its body's type, unpinned.
    if ret.is_some_and(|r| mentions(r, "impl")) {
        return quote!(async move { #(#stmts)* });
    }
    let span = ret.map_or_else(Span::call_site, |r| r.span());
    let ret = ret.map_or_else(|| quote!(()), |r| quote!(#r));
    let fake_return = quote_spanned!(span=>
        #[allow(unreachable_code, clippy::empty_loop, clippy::diverging_sub_expression, clippy::needless_return)]
        if false {
            let __cache_fake_return: #ret = loop {};
            return __cache_fake_return;
        }
    );
    quote! {
        async move {
            #fake_return
            #(#stmts)*
        }
    }
}

#[cfg(test)]
mod tests {
    use quote::ToTokens;

    /// What the items beside a function are compiled under: its `cfg`s, and of its `cfg_attr`s
    /// the `cfg`s they apply (nested ones too), not the other attributes.
    #[test]
    fn conditions_keep_the_cfgs_alone() {
        let item: syn::ItemFn = syn::parse_quote! {
            #[cfg(unix)]
            #[cfg_attr(feature = "a", tracing::instrument(skip(pool)))]
            #[cfg_attr(feature = "b", cfg(windows), inline)]
            #[cfg_attr(x, cfg_attr(y, cfg(z), inline))]
            #[doc = "d"]
            fn f() {}
        };
        let got: Vec<String> = super::conditions(&item.attrs)
            .iter()
            .map(|c| c.to_token_stream().to_string().split_whitespace().collect())
            .collect();
        assert_eq!(
            got,
            ["#[cfg(unix)]", "#[cfg_attr(feature=\"b\",cfg(windows))]", "#[cfg_attr(x,cfg_attr(y,cfg(z)))]"]
        );
    }
}
