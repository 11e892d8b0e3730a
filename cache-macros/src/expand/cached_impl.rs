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
    if let Err(e) = companions_can_live_on(&block) {
        // The block as written, without its `#[cached]` attributes: this one error, not one per
        // function about where its companions could not go.
        for item in &mut block.items {
            if let ImplItem::Fn(f) = item {
                f.attrs.retain(|a| !is_cached(a));
            }
        }
        return super::fallback(block, e);
    }
    // Under a trait, `Self::TTL` may be the trait's constant: name it through the trait.
    let self_path = match &block.trait_ {
        Some((_, tr, _)) if block.items.iter().any(|i| matches!(i, ImplItem::Const(_))) => {
            let ty = &block.self_ty;
            quote!(<#ty as #tr>)
        }
        _ => {
            let ty = &block.self_ty;
            quote!(<#ty>)
        }
    };
    let owner = super::cached::Owner::Type {
        name: owner_name(&block.self_ty),
        ty: block.generics.params.is_empty().then(|| block.self_ty.clone()),
    };
    let mut companions = TokenStream::new();
    let mut registrations = TokenStream::new();
    let mut paths: Vec<String> = Vec::new();
    let mut path_tokens: Vec<syn::Path> = Vec::new();
    for item in &mut block.items {
        let ImplItem::Fn(f) = item else { continue };
        // `#[invalidates]` is expanded here too, while the function is the `async fn` written:
        // an `#[async_trait]` below would turn it into one returning a boxed future first.
        if let (None, Some(at)) =
            (f.attrs.iter().position(is_cached), f.attrs.iter().position(is_invalidates))
        {
            let attr = f.attrs.remove(at);
            if !paths.contains(&attr.path().to_token_stream().to_string()) {
                paths.push(attr.path().to_token_stream().to_string());
                path_tokens.push(attr.path().clone());
            }
            let args = match &attr.meta {
                syn::Meta::List(list) => list.tokens.clone(),
                _ => TokenStream::new(),
            };
            *item = ImplItem::Verbatim(super::invalidates::expand_attribute(args, f.to_token_stream()));
            continue;
        }
        let Some(at) = f.attrs.iter().position(is_cached) else { continue };
        let attr = f.attrs.remove(at);
        let path = attr.path().to_token_stream().to_string();
        if !paths.contains(&path) {
            paths.push(path);
            path_tokens.push(attr.path().clone());
        }
        let args = match &attr.meta {
            syn::Meta::List(list) => list.tokens.clone(),
            // `#[cached]` alone: the options are missing, which the validation reports by name.
            _ => TokenStream::new(),
        };
        // `#[async_trait]` above this attribute has already turned the `async fn` into a
        // function returning a boxed future.
        if f.sig.asyncness.is_none() && super::mentions(&f.sig.output, "Pin") {
            let e = syn::Error::new(
                f.sig.fn_token.span,
                "write `#[cached_impl]` above `#[async_trait]`, so that it sees the `async fn` as you wrote it",
            );
            *item = ImplItem::Verbatim(super::fallback(&*f, e));
            continue;
        }
        // `ttl = Self::TTL`: the generated constants are checked outside the `impl`, where
        // `Self` is not defined, so the type's name takes its place.
        if let Some(at) = first_self(&args) {
            if !block.generics.params.is_empty() {
                let e = syn::Error::new(
                    at,
                    "`Self` in `#[cached]` is not supported in a generic `impl`: use a module-level constant",
                );
                *item = ImplItem::Verbatim(super::fallback(&*f, e));
                continue;
            }
        }
        let args = replace_self(args, &self_path);
        let func = ItemFn {
            attrs: f.attrs.clone(),
            vis: f.vis.clone(),
            sig: f.sig.clone(),
            block: Box::new(f.block.clone()),
        };
        // A trait's function has no visibility of its own; its companions are `pub` (and
        // hidden), so `#[invalidates(Type::f(..))]` works from any module, as for other methods.
        // Its parameters' `Self::Id` names the trait's associated type, which the inherent `impl`
        // the companions go into cannot: there it is written `<Type as Trait>::Id`.
        let companion_func = match &block.trait_ {
            Some((_, tr, _)) => {
                let mut sig = func.sig.clone();
                let ty = &block.self_ty;
                for input in &mut sig.inputs {
                    if let syn::FnArg::Typed(typed) = input {
                        let written = typed.ty.to_token_stream();
                        if let Ok(ty) = syn::parse2(qualify_self(written, &quote!(<#ty as #tr>))) {
                            *typed.ty = ty;
                        }
                    }
                }
                ItemFn { vis: syn::parse_quote!(pub), sig, ..func.clone() }
            }
            None => func.clone(),
        };
        match super::cached::expand_parts(args.clone(), &func, Site::Associated, &owner) {
            Ok(parts) => {
                *item = ImplItem::Verbatim(parts.function);
                registrations.extend(parts.registration);
                if let Ok(parts) =
                    super::cached::expand_parts(args, &companion_func, Site::Associated, &owner)
                {
                    companions.extend(parts.companions);
                }
            }
            Err(fallback) => *item = ImplItem::Verbatim(fallback),
        }
    }
    let (impl_generics, _, where_clause) = block.generics.split_for_impl();
    let self_ty = &block.self_ty;
    // The companions exist where the functions do.
    let cfgs = super::conditions(&block.attrs);
    let mut tokens = block.to_token_stream();
    // The `#[cached]` attributes were consumed here, not expanded: name each path once more, so
    // the user's `use cache_runtime::cached;` still counts as used.
    for path in &path_tokens {
        tokens.extend(quote! {
            #[allow(unused_imports)]
            const _: () = {
                use #path as _;
            };
        });
    }
    if !companions.is_empty() {
        tokens.extend(quote! {
            #(#cfgs)*
            #[doc(hidden)]
            impl #impl_generics #self_ty #where_clause {
                #companions
            }

            #(#cfgs)*
            const _: () = {
                #registrations
            };
        });
    }
    tokens
}

/// The `Self` type's name as the registry shows it: the last segment of its path.
fn owner_name(self_ty: &syn::Type) -> String {
    match self_ty {
        syn::Type::Path(path) => path.path.segments.last().map(|s| s.ident.to_string()).unwrap_or_default(),
        other => other.to_token_stream().to_string(),
    }
}

/// The companions go into `impl Type { .. }`: a type of this crate, written as a path, using
/// every parameter of the `impl` (not `&Type`, `Box<Type>`, `dyn Trait` or a bare parameter).
fn companions_can_live_on(block: &ItemImpl) -> syn::Result<()> {
    let syn::Type::Path(path) = &*block.self_ty else {
        return Err(syn::Error::new(
            block.self_ty.span(),
            "#[cached_impl] needs an `impl` for a type of this crate named by its path (`impl Repo for PgRepo`): \
             it adds an `impl` block of that type for the cached functions' companions",
        ));
    };
    let unused = block.generics.params.iter().find(|p| {
        let name = match p {
            syn::GenericParam::Type(t) => t.ident.to_string(),
            syn::GenericParam::Lifetime(l) => l.lifetime.ident.to_string(),
            syn::GenericParam::Const(c) => c.ident.to_string(),
        };
        path.qself.is_some() || !super::mentions(&path.path, &name)
    });
    match unused {
        Some(p) => Err(syn::Error::new(
            p.span(),
            "#[cached_impl] needs every parameter of the `impl` to appear in its type (`impl<T> Repo for PgRepo<T>`): \
             the cached functions' companions go into an `impl` of that type",
        )),
        None => Ok(()),
    }
}

/// The span of the first `Self` in `tokens`, at any depth.
fn first_self(tokens: &TokenStream) -> Option<proc_macro2::Span> {
    tokens.clone().into_iter().find_map(|t| match t {
        proc_macro2::TokenTree::Ident(i) if i == "Self" => Some(i.span()),
        proc_macro2::TokenTree::Group(g) => first_self(&g.stream()),
        _ => None,
    })
}

/// `tokens` with each `Self` replaced by `ty` (`<PgRepo>`, or `<PgRepo as Repo>` in a trait impl
/// with constants, so `Self::TTL` becomes `<PgRepo>::TTL`).
fn replace_self(tokens: TokenStream, ty: &TokenStream) -> TokenStream {
    use proc_macro2::{Group, TokenTree};
    tokens
        .into_iter()
        .flat_map(|t| -> Vec<TokenTree> {
            match t {
                // Spanned at the `Self` the user wrote: an error on the expression points there.
                TokenTree::Ident(i) if i == "Self" => respan(ty.clone(), i.span()).into_iter().collect(),
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

/// `tokens` with each `Self::` (a path through `Self`) written `qualified::` instead; a `Self`
/// alone is left as it is.
fn qualify_self(tokens: TokenStream, qualified: &TokenStream) -> TokenStream {
    use proc_macro2::{Group, TokenTree};
    let tokens: Vec<TokenTree> = tokens.into_iter().collect();
    let mut out = Vec::with_capacity(tokens.len());
    for (i, t) in tokens.iter().enumerate() {
        match t {
            TokenTree::Ident(ident) if ident == "Self" && starts_path(&tokens[i + 1..]) => {
                out.extend(respan(qualified.clone(), ident.span()));
            }
            TokenTree::Group(g) => {
                let mut group = Group::new(g.delimiter(), qualify_self(g.stream(), qualified));
                group.set_span(g.span());
                out.push(TokenTree::Group(group));
            }
            other => out.push(other.clone()),
        }
    }
    out.into_iter().collect()
}

/// Whether `rest` begins with `::`.
fn starts_path(rest: &[proc_macro2::TokenTree]) -> bool {
    use proc_macro2::{Spacing, TokenTree};
    matches!(rest, [TokenTree::Punct(a), TokenTree::Punct(b), ..]
        if a.as_char() == ':' && a.spacing() == Spacing::Joint && b.as_char() == ':')
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

/// `#[cached(..)]` or `#[cache_runtime::cached(..)]` (not another crate's `cached`).
fn is_cached(attr: &syn::Attribute) -> bool {
    is_ours(attr, "cached")
}

/// `#[invalidates(..)]` or `#[cache_runtime::invalidates(..)]`.
fn is_invalidates(attr: &syn::Attribute) -> bool {
    is_ours(attr, "invalidates")
}

fn is_ours(attr: &syn::Attribute, name: &str) -> bool {
    let segments: Vec<String> = attr.path().segments.iter().map(|s| s.ident.to_string()).collect();
    match segments.as_slice() {
        [only] => only == name,
        [.., krate, last] => krate == "cache_runtime" && last == name,
        [] => false,
    }
}
