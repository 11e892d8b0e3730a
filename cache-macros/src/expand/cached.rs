//! What `#[cached]` emits: the user's function, signature re-emitted piece by piece, whose body
//! builds the key and reads through `::cache_runtime::__private::call`.

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
            let e = syn::Error::new(
                e.span(),
                format!("#[cached] goes on an `async fn` with a body: {e}"),
            );
            return super::fallback(item, e);
        }
    };
    let mut errors = Errors::default();
    let args = CachedArgs::parse(args, &mut errors);
    let model = validate::cached(args, &func, &mut errors);
    match (errors.into_result(), model) {
        (Ok(()), Some(model)) => emit(&func, &model),
        (Err(e), _) => super::fallback(&func, e),
        (Ok(()), None) => unreachable!("validation returns no model only with an error"),
    }
}

fn emit(func: &ItemFn, model: &CachedFn) -> TokenStream {
    let ItemFn {
        attrs,
        vis,
        sig,
        block,
    } = func;
    let CachedFn {
        db,
        prefix,
        ttl_seconds,
        version,
        key_params,
        ret,
        policy,
    } = model;

    let spec = Ident::new("__CACHE_SPEC", Span::mixed_site());
    let hasher = Ident::new("__cache_hasher", Span::mixed_site());
    let key = Ident::new("__cache_key", Span::mixed_site());
    let function = sig.ident.to_string();
    let version = match version {
        Some(v) => quote!(::core::option::Option::Some(#v)),
        None => quote!(::core::option::Option::None),
    };
    // Spanned at the `db` path: a hand-written CacheDb impl at index 15 is reported there.
    let db_index = quote_spanned!(db.span()=> <#db as ::cache_runtime::db::CacheDb>::CHECKED_INDEX);
    // Spanned at each argument: an argument that is not Serialize is reported on its name.
    let hash_args = key_params.iter().map(|param| {
        quote_spanned!(param.span()=> ::cache_runtime::__private::key_arg(&mut #hasher, &#param);)
    });
    let policy = match policy {
        Policy::Whole => quote_spanned!(ret.span()=> ::cache_runtime::__private::Whole),
        Policy::OkOnly => quote_spanned!(ret.span()=> ::cache_runtime::__private::OkOnly),
        Policy::SomeOnly => quote_spanned!(ret.span()=> ::cache_runtime::__private::SomeOnly),
    };
    // Spanned at the return type: a value that cannot be stored is reported there.
    let call = quote_spanned!(ret.span()=> ::cache_runtime::__private::call::<#policy, _, _>);
    let body = &block.stmts;
    // The fake return pins the inner block's type to the declared return type, so `?` and
    // `return` in the body type-check exactly as they did before the attribute (and type errors
    // point at the user's return type, not at generated code).
    let fake_return = quote_spanned!(ret.span()=>
        #[allow(unreachable_code, clippy::empty_loop, clippy::diverging_sub_expression, clippy::needless_return)]
        if false {
            let __cache_fake_return: #ret = loop {};
            return __cache_fake_return;
        }
    );

    quote! {
        #(#attrs)*
        #vis #sig {
            const #spec: ::cache_runtime::__private::Spec = ::cache_runtime::__private::Spec {
                db: #db_index,
                prefix: #prefix,
                function: #function,
                ttl: ::core::time::Duration::from_secs(#ttl_seconds),
                version: #version,
            };
            let #key = {
                let mut #hasher = ::cache_runtime::__private::KeyHasher::new();
                #(#hash_args)*
                #hasher.finish(&#spec)
            };
            #call(&#spec, #key, async move {
                #fake_return
                #(#body)*
            })
            .await
        }
    }
}
