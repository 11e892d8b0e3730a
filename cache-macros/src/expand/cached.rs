//! What `#[cached]` emits: the user's function, signature re-emitted piece by piece, whose body
//! builds the key and reads through `::cache_runtime::__private::call`; and beside it the two
//! companions that invalidation calls (see `expand::key_fn_name`).

use proc_macro2::{Span, TokenStream};
use quote::{quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{Ident, ItemFn};

use crate::args::CachedArgs;
use crate::ctxt::Errors;
use crate::validate::{self, CachedFn, Policy};

pub(crate) fn expand(args: TokenStream, item: TokenStream) -> TokenStream {
    let func: ItemFn = match syn::parse2(item.clone()) {
        Ok(func) => func,
        Err(e) => {
            let e = syn::Error::new(e.span(), format!("#[cached] goes on an `async fn` with a body: {e}"));
            return super::fallback(item, e);
        }
    };
    let mut errors = Errors::default();
    let args = CachedArgs::parse(args, &mut errors);
    let model = validate::cached(args, &func, &mut errors);
    match (errors.into_result(), model) {
        (Ok(()), Some(model)) => {
            let mut tokens = function(&func, &model);
            tokens.extend(companions(&func, &model));
            tokens
        }
        (Err(e), _) => super::fallback(&func, e),
        (Ok(()), None) => unreachable!("validation returns no model only with an error"),
    }
}

/// `const __CACHE_SPEC: Spec = ...;`, the same in the function and in its companions.
fn spec_const(func: &ItemFn, model: &CachedFn, name: &Ident) -> TokenStream {
    let CachedFn { db, prefix, ttl_seconds, version, format, .. } = model;
    let function = func.sig.ident.to_string();
    let version = match version {
        Some(v) => quote!(::core::option::Option::Some(#v)),
        None => quote!(::core::option::Option::None),
    };
    // Spanned at the `db` path: a hand-written CacheDb impl at index 15 is reported there.
    let db_index = quote_spanned!(db.span()=> <#db as ::cache_runtime::__private::CacheDb>::CHECKED_INDEX);
    quote! {
        const #name: ::cache_runtime::__private::Spec = ::cache_runtime::__private::Spec {
            db: #db_index,
            prefix: #prefix,
            function: #function,
            ttl: ::core::time::Duration::from_secs(#ttl_seconds),
            version: #version,
            format: ::cache_runtime::__private::Format::#format,
        };
    }
}

/// A block evaluating to the key (`Option<String>`) of the key parameters in scope.
fn key_expr(model: &CachedFn, spec: &Ident) -> TokenStream {
    let hasher = Ident::new("__cache_hasher", Span::mixed_site());
    // Spanned at each argument: an argument that is not Serialize is reported on its name.
    let hash_args = model.key_params.iter().map(|(param, _)| {
        quote_spanned!(param.span()=> ::cache_runtime::__private::key_arg(&mut #hasher, &#param);)
    });
    quote! {{
        let mut #hasher = ::cache_runtime::__private::KeyHasher::new();
        #(#hash_args)*
        #hasher.finish(&#spec)
    }}
}

fn function(func: &ItemFn, model: &CachedFn) -> TokenStream {
    let ItemFn { attrs, vis, sig, block } = func;
    let CachedFn { ret, policy, .. } = model;
    let spec = Ident::new("__CACHE_SPEC", Span::mixed_site());
    let key = Ident::new("__cache_key", Span::mixed_site());
    let spec_const = spec_const(func, model, &spec);
    let key_expr = key_expr(model, &spec);
    let policy = match policy {
        Policy::Whole => quote_spanned!(ret.span()=> ::cache_runtime::__private::Whole),
        Policy::OkOnly => quote_spanned!(ret.span()=> ::cache_runtime::__private::OkOnly),
        Policy::SomeOnly => quote_spanned!(ret.span()=> ::cache_runtime::__private::SomeOnly),
    };
    // Spanned at the return type: a value that cannot be stored is reported there.
    let call = quote_spanned!(ret.span()=> ::cache_runtime::__private::call::<#policy, _, _>);
    let body = super::async_body(Some(ret), block);
    quote! {
        #(#attrs)*
        #vis #sig {
            #spec_const
            let #key = #key_expr;
            #call(&#spec, #key, #body).await
        }
    }
}

/// The key and spec functions that invalidation calls (see `expand::companions`).
fn companions(func: &ItemFn, model: &CachedFn) -> TokenStream {
    let generics = &func.sig.generics;
    let where_clause = &generics.where_clause;
    let spec = Ident::new("__CACHE_SPEC", Span::mixed_site());
    let spec_const = spec_const(func, model, &spec);
    let key_expr = key_expr(model, &spec);
    let params = model.key_params.iter().map(|(name, ty)| quote!(#name: #ty));
    let key_sig = |vis: TokenStream, name: &Ident| {
        quote! {
            #[doc(hidden)]
            #[allow(non_snake_case, dead_code, clippy::needless_lifetimes)]
            #vis fn #name #generics (#(#params),*) -> ::core::option::Option<::std::string::String> #where_clause {
                #spec_const
                #key_expr
            }
        }
    };
    let spec_sig = |vis: TokenStream, name: &Ident| {
        quote! {
            #[doc(hidden)]
            #[allow(non_snake_case, dead_code)]
            #vis fn #name() -> &'static ::cache_runtime::__private::Spec {
                #spec_const
                &#spec
            }
        }
    };
    let vis = &func.vis;
    match super::companion_site(&func.sig) {
        super::Site::Associated => {
            let key_fn = key_sig(quote!(#vis), &super::key_fn_name(&func.sig.ident));
            let spec_fn = spec_sig(quote!(#vis), &super::spec_fn_name(&func.sig.ident));
            quote!(#key_fn #spec_fn)
        }
        super::Site::Module => {
            let holder = &func.sig.ident;
            let key_fn = key_sig(quote!(pub), &super::key_fn_name(holder));
            let spec_fn = spec_sig(quote!(pub), &super::spec_fn_name(holder));
            let doc = format!("Cache companions of `{holder}` (generated by `#[cached]`; not an API).");
            quote! {
                #[doc = #doc]
                #[doc(hidden)]
                #[allow(non_camel_case_types, dead_code)]
                #vis struct #holder {}

                impl #holder {
                    #key_fn
                    #spec_fn
                }
            }
        }
    }
}
