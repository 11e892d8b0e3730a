//! What `#[cached_impl]` emits: the `impl` block with each `#[cached]` function expanded in
//! place, and the functions' companions (see `expand::Site`) in an inherent `impl` block of the
//! same type beside it. That is what lets `#[cached]` work in a trait impl (which may hold only
//! the trait's items) and on associated functions without `self` (which `#[cached]` alone takes
//! for free functions), and lets `#[invalidates(Type::f(..))]` find them.

use proc_macro2::TokenStream;
use quote::{quote, ToTokens};
use syn::spanned::Spanned;
use syn::{ImplItem, ItemFn, ItemImpl};

use super::Site;

pub(crate) fn expand(args: TokenStream, item: TokenStream) -> TokenStream {
    if !args.is_empty() {
        let e = syn::Error::new(args.span(), "#[cached_impl] takes no arguments: write `#[cached_impl]`");
        return super::fallback(item, e);
    }
    let mut block: ItemImpl = match syn::parse2(item.clone()) {
        Ok(block) => block,
        Err(e) => {
            let e = syn::Error::new(
                e.span(),
                "#[cached_impl] goes on an `impl` block (`impl Type { .. }` or `impl Trait for Type { .. }`) \
                 whose functions are marked #[cached]",
            );
            return super::fallback(item, e);
        }
    };
    let mut companions = TokenStream::new();
    let mut paths: Vec<syn::Path> = Vec::new();
    for item in &mut block.items {
        let ImplItem::Fn(f) = item else { continue };
        let Some(at) = f.attrs.iter().position(is_cached) else { continue };
        let attr = f.attrs.remove(at);
        if !paths.contains(attr.path()) {
            paths.push(attr.path().clone());
        }
        let args = match &attr.meta {
            syn::Meta::List(list) => list.tokens.clone(),
            // `#[cached]` alone: the options are missing, which the validation reports by name.
            _ => TokenStream::new(),
        };
        // `ttl = Self::TTL`: the generated constants are checked outside the `impl`, where
        // `Self` is not defined, so the type's name takes its place.
        if super::mentions(&args, "Self") && !block.generics.params.is_empty() {
            let e = syn::Error::new(
                args.span(),
                "`Self` in `#[cached]` is not supported in a generic `impl`: use a module-level constant",
            );
            *item = ImplItem::Verbatim(super::fallback(&*f, e));
            continue;
        }
        let args = replace_self(args, &block.self_ty);
        let func = ItemFn {
            attrs: f.attrs.clone(),
            vis: f.vis.clone(),
            sig: f.sig.clone(),
            block: Box::new(f.block.clone()),
        };
        match super::cached::expand_parts(args, &func, Site::Associated) {
            Ok((function, companion)) => {
                *item = ImplItem::Verbatim(function);
                companions.extend(companion);
            }
            Err(fallback) => *item = ImplItem::Verbatim(fallback),
        }
    }
    let (impl_generics, _, where_clause) = block.generics.split_for_impl();
    let self_ty = &block.self_ty;
    let mut tokens = block.to_token_stream();
    // The `#[cached]` attributes were consumed here, not expanded: name each path once more, so
    // the user's `use cache_runtime::cached;` still counts as used.
    for path in &paths {
        tokens.extend(quote! {
            #[allow(unused_imports)]
            const _: () = {
                use #path as _;
            };
        });
    }
    if !companions.is_empty() {
        tokens.extend(quote! {
            #[doc(hidden)]
            impl #impl_generics #self_ty #where_clause {
                #companions
            }
        });
    }
    tokens
}

/// `tokens` with each `Self` replaced by `ty` (in angle brackets, so `Self::TTL` becomes
/// `<PgRepo>::TTL`).
fn replace_self(tokens: TokenStream, ty: &syn::Type) -> TokenStream {
    use proc_macro2::{Group, TokenTree};
    tokens
        .into_iter()
        .flat_map(|t| -> Vec<TokenTree> {
            match t {
                // Spanned at the `Self` the user wrote: an error on the expression points there.
                TokenTree::Ident(i) if i == "Self" => respan(quote!(<#ty>), i.span()).into_iter().collect(),
                TokenTree::Group(g) => {
                    let mut group = Group::new(g.delimiter(), replace_self(g.stream(), ty));
                    group.set_span(g.span());
                    vec![TokenTree::Group(group)]
                }
                other => vec![other],
            }
        })
        .collect()
}

fn respan(tokens: TokenStream, span: proc_macro2::Span) -> TokenStream {
    use proc_macro2::{Group, TokenTree};
    tokens
        .into_iter()
        .map(|mut t| {
            if let TokenTree::Group(g) = &t {
                let mut group = Group::new(g.delimiter(), respan(g.stream(), span));
                group.set_span(span);
                return TokenTree::Group(group);
            }
            t.set_span(span);
            t
        })
        .collect()
}

/// `#[cached(..)]` or `#[cache_runtime::cached(..)]`.
fn is_cached(attr: &syn::Attribute) -> bool {
    attr.path().segments.last().is_some_and(|s| s.ident == "cached")
}
