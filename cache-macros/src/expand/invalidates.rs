//! What `#[invalidates(...)]` and `invalidate!(...)` emit: targets built from the companions of
//! each named `#[cached]` function (so a wrong name, arity or type is a compile error on that
//! entry), then one call to `::cache_runtime::__private::invalidate`.

use proc_macro2::{Span, TokenStream};
use quote::{quote, quote_spanned};
use syn::spanned::Spanned;
use syn::{Ident, ItemFn, Path, ReturnType};

use super::Site;
use crate::args::InvalidatesArgs;
use crate::ctxt::Errors;
use crate::validate::{self, Invalidation};

/// `#[invalidates(...)]` on an async fn.
pub(crate) fn expand_attribute(args: TokenStream, item: TokenStream) -> TokenStream {
    let func: ItemFn = match syn::parse2(item.clone()) {
        Ok(func) => func,
        Err(e) => {
            let e =
                syn::Error::new(e.span(), format!("#[invalidates] goes on an `async fn` with a body: {e}"));
            return super::fallback(item, e);
        }
    };
    let mut errors = Errors::default();
    let entries = InvalidatesArgs::parse(args, &mut errors).entries;
    let checked = validate::invalidations(entries, Some(&func), &mut errors);
    if let Err(e) = errors.into_result() {
        return super::fallback(&func, e);
    }
    let ItemFn { attrs, vis, sig, block } = &func;
    let targets_ident = Ident::new("__cache_targets", Span::mixed_site());
    let output = Ident::new("__cache_output", Span::mixed_site());
    let targets = targets(&checked);
    let registration = registration(&checked, &sig.ident.to_string());
    let ret = match &sig.output {
        ReturnType::Type(_, ty) => Some(&**ty),
        ReturnType::Default => None,
    };
    let body = super::async_body(ret, block);
    let succeeded = if validate::returns_result(&func) {
        quote!(::core::result::Result::is_ok(&#output))
    } else {
        quote!(true)
    };
    quote! {
        #(#attrs)*
        #vis #sig {
            #registration
            // Keys are computed from the arguments as they come in, before the body may move them.
            let #targets_ident = #targets;
            let #output = #body.await;
            if #succeeded {
                ::cache_runtime::__private::invalidate(&#targets_ident).await;
            }
            #output
        }
    }
}

/// `invalidate!(...)`: a future that applies the invalidations; the arguments are evaluated
/// where the macro is written.
pub(crate) fn expand_macro(input: TokenStream) -> TokenStream {
    let mut errors = Errors::default();
    let entries = InvalidatesArgs::parse(input, &mut errors).entries;
    let checked = validate::invalidations(entries, None, &mut errors);
    if let Err(e) = errors.into_result() {
        let error = e.to_compile_error();
        return quote!({ #error; async {} });
    }
    let targets_ident = Ident::new("__cache_targets", Span::mixed_site());
    let targets = targets(&checked);
    let registration = registration(&checked, "");
    quote! {{
        #registration
        let #targets_ident = #targets;
        async move { ::cache_runtime::__private::invalidate(&#targets_ident).await }
    }}
}

fn targets(checked: &[Invalidation]) -> TokenStream {
    let targets = checked.iter().map(|entry| {
        let span = entry.path.span();
        let spec_fn = companion(&entry.path, super::spec_fn_name, false);
        match &entry.args {
            None => quote_spanned!(span=> ::cache_runtime::__private::Target::All(#spec_fn())),
            Some(args) => {
                let key_fn = companion(&entry.path, super::key_fn_name, true);
                quote_spanned!(span=> ::cache_runtime::__private::Target::Key(#spec_fn(), #key_fn(#(#args),*)))
            }
        }
    });
    quote!([#(#targets),*])
}

/// The site's entry in the registry (`cache_runtime::registry`): `function` is the name of the
/// function carrying `#[invalidates]`, `""` for `invalidate!`. A free function is named through
/// its spec companion; a method by its type's name and its own, since a site inside an `impl`
/// cannot name `Self` (or a generic type) from the item that registers it.
fn registration(checked: &[Invalidation], function: &str) -> TokenStream {
    let entries = checked.iter().map(|entry| match method_target(&entry.path) {
        Some((owner, name)) => quote! {
            ::cache_runtime::__private::SiteTarget::Method { owner: #owner, function: #name }
        },
        None => {
            let spec_fn = companion(&entry.path, super::spec_fn_name, false);
            quote!(::cache_runtime::__private::SiteTarget::Free(#spec_fn))
        }
    });
    let count = checked.len();
    quote! {
        const _: () = {
            static __CACHE_SITE_TARGETS: [::cache_runtime::__private::SiteTarget; #count] = [#(#entries),*];
            ::cache_runtime::__private::inventory::submit! {
                ::cache_runtime::__private::Site::new(
                    ::core::module_path!(),
                    #function,
                    ::core::line!(),
                    &__CACHE_SITE_TARGETS,
                )
            }
        };
    }
}

/// `Type::f` or `Self::f` (a method, see [`companion`]): the type's and the function's names.
fn method_target(path: &Path) -> Option<(String, String)> {
    let n = path.segments.len();
    if n < 2 {
        return None;
    }
    let owner = path.segments[n - 2].ident.to_string();
    let method = owner == "Self" || owner.starts_with(|c: char| c.is_ascii_uppercase());
    method.then(|| (owner, path.segments[n - 1].ident.to_string()))
}

/// `a::b::f` → `a::b::f::__cache_key` for a free function, `Type::f` / `Self::f` →
/// `Type::__cache_key_f` for a method (see `expand::Site` and `expand::key_fn_name`). The spec
/// companion takes no generic arguments.
fn companion(path: &Path, name: fn(&Ident, Site) -> Ident, keep_generics: bool) -> Path {
    let mut path = path.clone();
    let method = method_target(&path).is_some();
    let Some(last) = path.segments.pop().map(|p| p.into_value()) else {
        return path;
    };
    let site = if method { Site::Associated } else { Site::Module };
    let mut companion = syn::PathSegment::from(name(&last.ident, site));
    if keep_generics {
        companion.arguments = last.arguments.clone();
    }
    if !method {
        path.segments.push(syn::PathSegment::from(last.ident));
    }
    path.segments.push(companion);
    path
}
