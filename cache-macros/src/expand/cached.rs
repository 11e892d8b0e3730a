//! What `#[cached]` emits: the user's function, signature re-emitted piece by piece, whose body
//! builds the key and reads through `::cache_runtime::__private::call`; and beside it the two
//! companions that invalidation calls (see `expand::Site`).

use proc_macro2::{Span, TokenStream};
use quote::{quote, quote_spanned, ToTokens};
use syn::spanned::Spanned;
use syn::{Ident, ItemFn};

use super::Site;
use crate::args::CachedArgs;
use crate::ctxt::Errors;
use crate::validate::{self, Cached, Policy, Receiver, TtlValue};

pub(crate) fn expand(args: TokenStream, item: TokenStream) -> TokenStream {
    let func: ItemFn = match syn::parse2(item.clone()) {
        Ok(func) => func,
        Err(e) => {
            let e = syn::Error::new(e.span(), format!("#[cached] goes on an `async fn` with a body: {e}"));
            return super::fallback(item, e);
        }
    };
    // A function's attribute cannot tell an inherent `impl` from a trait impl, which may hold
    // only the trait's items: a method's companions always go where `#[cached_impl]` puts them.
    let site = super::companion_site(&func.sig);
    if let Site::Associated = site {
        let at = func.sig.receiver().map_or_else(|| func.sig.ident.span(), |r| r.self_token.span);
        let name = &func.sig.ident;
        let e = syn::Error::new(
            at,
            format!(
                "`{name}` is a method: put `#[cached_impl]` on its `impl` block (above `#[async_trait]` if \
                 there is one); `#[cached]` needs it on every function of an `impl`, written in the block \
                 itself (not through `cfg_attr` or a macro). A trait's default method cannot be cached: \
                 cache it in each `impl`"
            ),
        );
        return super::fallback(item, e);
    }
    match expand_parts(args, &func, site, &Owner::Free) {
        Ok(Parts { mut function, companions, registration }) => {
            function.extend(companions);
            function.extend(registration);
            function
        }
        Err(fallback) => fallback,
    }
}

/// Whose function it is, for the registry.
pub(crate) enum Owner {
    Free,
    /// A method or associated function: the type's name, and the type when it can be named
    /// without generic arguments.
    Type {
        name: String,
        ty: Option<Box<syn::Type>>,
    },
}

/// What `#[cached]` emits for one function, in three places: the function; its companions (for
/// `#[cached_impl]`, in an `impl` block of their own); its registry entry (at module level).
pub(crate) struct Parts {
    pub(crate) function: TokenStream,
    pub(crate) companions: TokenStream,
    pub(crate) registration: TokenStream,
}

/// The function's [`Parts`]; or the user's function with the errors.
pub(crate) fn expand_parts(
    args: TokenStream,
    func: &ItemFn,
    site: Site,
    owner: &Owner,
) -> Result<Parts, TokenStream> {
    let mut errors = Errors::default();
    let args = CachedArgs::parse(args, &mut errors);
    let model = validate::cached(args, func, &mut errors);
    match (errors.into_result(), model) {
        (Ok(()), Some(model)) => Ok(Parts {
            function: function(func, &model, site),
            // A free function's entry goes into its spec companion's body (an item there is
            // compiled whether or not the companion is called): where a method's entry would
            // be out of place, the companions already are, and say so once.
            companions: companions(func, &model, site, registration(func, &model, owner)),
            registration: match site {
                Site::Module => TokenStream::new(),
                Site::Associated => registration(func, &model, owner),
            },
        }),
        (Err(e), _) => Err(super::fallback(func, e)),
        (Ok(()), None) => unreachable!("validation returns no model only with an error"),
    }
}

/// `const __CACHE_SPEC: Spec = ...;` then `let __cache_fn: CachedFn = ...;`: the function as the
/// runtime identifies it, the same in the function and in its companions.
fn identity(func: &ItemFn, model: &Cached, function: &Ident, in_function: bool, site: Site) -> TokenStream {
    let spec = Ident::new("__CACHE_SPEC", Span::mixed_site());
    // A method's entries are also told apart by `Self` (two `impl` blocks, or one generic `impl`
    // with several type arguments).
    let value = match site {
        // Its companion type is named by the function's name (see `companions`).
        Site::Module => {
            let holder = &func.sig.ident;
            quote!(::cache_runtime::__private::CachedFn::free_in(&#spec, ::core::any::type_name::<#holder>()))
        }
        Site::Associated => quote! {
            ::cache_runtime::__private::CachedFn::method(&#spec, ::core::any::type_name::<Self>())
        },
    };
    // A constant TTL is checked where it is evaluated, spanned at the expression: zero, negative
    // or longer than the bound is a compile error there, reported once (in the function, not in
    // its companions, whose names the user did not write).
    let ttl_check = match &model.ttl {
        TtlValue::Const(expr) if in_function => {
            let seconds = ttl_seconds(&model.ttl);
            quote_spanned!(expr.span()=> const _: u64 = ::cache_runtime::__private::checked_ttl(#seconds);)
        }
        _ => quote!(),
    };
    let spec_value = spec_value(func, model);
    // The function's calls find its state through a `static` of their own (`StateMemo`).
    let (memo_static, value) = if in_function {
        let memo = Ident::new("__CACHE_STATE", Span::mixed_site());
        (
            quote!(static #memo: ::cache_runtime::__private::StateMemo = ::cache_runtime::__private::StateMemo::new();),
            quote!(#value.remembered(&#memo)),
        )
    } else {
        (quote!(), value)
    };
    quote! {
        #ttl_check
        const #spec: ::cache_runtime::__private::Spec = #spec_value;
        #memo_static
        let #function: ::cache_runtime::__private::CachedFn = #value;
    }
}

/// The `Spec` constant's value: the options and where the function is written.
fn spec_value(func: &ItemFn, model: &Cached) -> TokenStream {
    let Cached {
        db,
        prefix,
        version,
        format,
        jitter_percent,
        eager_refresh_percent,
        stale_if_error_seconds,
        near,
        ..
    } = model;
    let near_seconds = near.map_or(0, |(seconds, _)| seconds);
    // `r#type` is `type` in keys, as in `type_name` and `KeyBuilder`.
    let name = syn::ext::IdentExt::unraw(&func.sig.ident).to_string();
    let version = match version {
        Some(v) => quote!(::core::option::Option::Some(#v)),
        None => quote!(::core::option::Option::None),
    };
    // Spanned at the `db` path: a hand-written CacheDb impl at index 15 is reported there.
    let db_index = quote_spanned!(db.span()=> <#db as ::cache_runtime::__private::CacheDb>::CHECKED_INDEX);
    let ttl_seconds = ttl_seconds(&model.ttl);
    quote! {
        ::cache_runtime::__private::Spec {
            db: #db_index,
            prefix: #prefix,
            function: #name,
            module: ::core::module_path!(),
            ttl: ::core::time::Duration::from_secs(#ttl_seconds),
            version: #version,
            format: ::cache_runtime::__private::Format::#format,
            jitter_percent: #jitter_percent,
            eager_refresh_percent: #eager_refresh_percent,
            stale_if_error: ::core::time::Duration::from_secs(#stale_if_error_seconds),
            near: ::core::time::Duration::from_secs(#near_seconds),
        }
    }
}

/// The TTL in seconds, as a constant expression.
fn ttl_seconds(ttl: &TtlValue) -> TokenStream {
    match ttl {
        TtlValue::Seconds(seconds) => quote!(#seconds),
        // Through `__private::ttl`, by the constant's type (an integer or a `Duration`); an expression of
        // literals alone (`60 * 60 * 24`) has no type of its own yet, and is read as an integer.
        TtlValue::Const(expr) if has_ident(expr.to_token_stream()) => {
            quote_spanned!(expr.span()=> ::cache_runtime::__private::ttl(#expr).seconds())
        }
        TtlValue::Const(expr) => quote_spanned!(expr.span()=> ((#expr) as u64)),
    }
}

/// The function's entry in the registry (`cache_runtime::registry`), an item placed where items may
/// go (the spec companion's body, or beside an `impl` block): `owner` is
/// the `Self` type's name for a method, `""` for a free function; `owner_type` the type itself
/// when it can be named without arguments (a non-generic `impl`).
fn registration(func: &ItemFn, model: &Cached, owner: &Owner) -> TokenStream {
    let (owner, owner_type) = match owner {
        Owner::Free => {
            let holder = &func.sig.ident;
            (String::new(), quote!(::core::option::Option::Some(::core::any::type_name::<#holder>)))
        }
        Owner::Type { name, ty: Some(ty) } => {
            (name.clone(), quote!(::core::option::Option::Some(::core::any::type_name::<#ty>)))
        }
        Owner::Type { name, ty: None } => (name.clone(), quote!(::core::option::Option::None)),
    };
    let spec_value = spec_value(func, model);
    let db = &model.db;
    let cfgs = super::conditions(&func.attrs);
    quote! {
        #(#cfgs)*
        const _: () = {
            ::cache_runtime::__private::inventory::submit! {
                ::cache_runtime::__private::Registration::new(
                    #spec_value,
                    #owner,
                    #owner_type,
                    <#db as ::cache_runtime::__private::CacheDb>::NAME,
                )
            }
        };
    }
}

/// Whether `tokens` hold a name at any depth (a constant, a path, a call), not literals alone.
fn has_ident(tokens: TokenStream) -> bool {
    tokens.into_iter().any(|t| match t {
        proc_macro2::TokenTree::Ident(_) => true,
        proc_macro2::TokenTree::Group(g) => has_ident(g.stream()),
        _ => false,
    })
}

/// Where a key is computed: in the function, whose receiver is as the user wrote it, or in its
/// key companion, whose receiver is always `&self`.
#[derive(Clone, Copy)]
enum KeyIn {
    Function,
    Companion,
}

/// The key of one call of `function` (a `CachedFn` in scope), from what is in scope: the generic
/// parameters, the receiver, the key parameters, hashed into `__cache_hasher`. In the function, a
/// block ending in `near_first` (which returns a near hit, or evaluates to the key, an
/// `Option<CallKey>`); in its companion, a block evaluating to it, an `Option<String>`. Both use
/// it, so invalidation hashes exactly what the call does.
fn key_expr(
    func: &ItemFn,
    model: &Cached,
    function: &Ident,
    scope: KeyIn,
    near_first: TokenStream,
) -> TokenStream {
    let hasher = Ident::new("__cache_hasher", Span::mixed_site());
    let generics = &func.sig.generics;
    // Instantiations are different computations: each type argument's name, each const
    // argument's value, and the type of each key parameter written `impl Trait` (a type
    // parameter without a name). A generic parameter that only `skip`ped parameters name (an
    // executor, a pool) stays out of the key, as those parameters do; every other one is in it,
    // including one named only in the body or by a turbofish.
    let matters = |name: &Ident| !only_in_skipped(model, &name.to_string());
    let type_arg = quote!(::cache_runtime::__private::KeyHasher::type_arg);
    let type_args = generics.type_params().filter(|p| matters(&p.ident)).map(|p| {
        let name = &p.ident;
        quote!(#type_arg(&mut #hasher, ::core::any::type_name::<#name>());)
    });
    let impl_trait_params = model.key_params.iter().filter(|(_, ty)| super::mentions(ty, "impl"));
    let impl_trait_args = impl_trait_params
        .map(|(param, _)| quote!(#type_arg(&mut #hasher, ::core::any::type_name_of_val(&#param));));
    let const_args = generics.const_params().filter(|p| matters(&p.ident)).map(|p| {
        let name = &p.ident;
        quote_spanned!(name.span()=> ::cache_runtime::__private::key_arg(&mut #hasher, &#name);)
    });
    // Spanned at `self`, and the same tokens in both places: a receiver that is not Serialize is
    // reported once, there.
    let receiver = match &model.receiver {
        Receiver::Hashed { self_token, by_value } => {
            let value = match (scope, by_value) {
                (KeyIn::Function, true) => quote_spanned!(self_token.span=> &#self_token),
                (KeyIn::Function, false) | (KeyIn::Companion, _) => {
                    quote_spanned!(self_token.span=> &*#self_token)
                }
            };
            Some(
                quote_spanned!(self_token.span=> ::cache_runtime::__private::key_receiver(&mut #hasher, #value);),
            )
        }
        Receiver::None | Receiver::Skipped => None,
    };
    // Spanned at each argument: an argument that is not Serialize is reported on its name.
    let args = model.key_params.iter().map(|(param, _)| {
        quote_spanned!(param.span()=> ::cache_runtime::__private::key_arg(&mut #hasher, &#param);)
    });
    let hashed = quote! {
        #[allow(unused_mut)]
        let mut #hasher = ::cache_runtime::__private::KeyHasher::fresh(&#function);
        ::cache_runtime::__private::KeyHasher::begin(&mut #hasher, &#function);
        #(#type_args)*
        #(#impl_trait_args)*
        #(#const_args)*
        #receiver
        #(#args)*
    };
    // A call asks for a near copy by the bytes hashed, in a block of its own so that the hasher
    // is not kept in the function's future; a companion gives the key's text, for invalidation.
    match scope {
        KeyIn::Function => quote! {{
            #hashed
            #near_first
        }},
        KeyIn::Companion => quote! {{
            #hashed
            ::cache_runtime::__private::KeyHasher::finish(#hasher)
        }},
    }
}

fn function(func: &ItemFn, model: &Cached, site: Site) -> TokenStream {
    let ItemFn { attrs, vis, sig, block } = func;
    // A parameter written as a pattern takes the name the key hashes, and is destructured first
    // thing in the body, as the user wrote it.
    let mut sig = sig.clone();
    let mut block = (**block).clone();
    for (i, input) in sig.inputs.iter_mut().enumerate() {
        let syn::FnArg::Typed(typed) = input else { continue };
        let own = format!("__cache_arg{i}");
        if let Some((name, pattern)) = model.destructured.iter().find(|(name, _)| *name == own) {
            *typed.pat = syn::parse_quote!(#name);
            block.stmts.insert(0, syn::parse_quote!(let #pattern = #name;));
        }
    }
    let (sig, block) = (&sig, &block);
    let Cached { ret, policy, .. } = model;
    let function = Ident::new("__cache_fn", Span::mixed_site());
    let key = Ident::new("__cache_key", Span::mixed_site());
    let identity = identity(func, model, &function, true, site);
    let policy = match policy {
        Policy::Whole => quote_spanned!(ret.span()=> ::cache_runtime::__private::Whole),
        Policy::OkOnly => quote_spanned!(ret.span()=> ::cache_runtime::__private::OkOnly),
        Policy::SomeOnly => quote_spanned!(ret.span()=> ::cache_runtime::__private::SomeOnly),
    };
    // Spanned at the return type: a value that cannot be stored is reported there.
    let call = quote_spanned!(ret.span()=> ::cache_runtime::__private::call::<#policy, _, _, _>);
    let stored =
        |span: Span| quote_spanned!(span=> <#policy as ::cache_runtime::__private::Policy<#ret>>::Stored);
    // Whether the near tier can keep the value typed: required with `near` (reported there),
    // else chosen by the type (`__private::Probe`; a type that cannot be stored at all is
    // reported at the return type).
    let keeper = match model.near {
        Some((_, span)) => {
            let stored = stored(span);
            quote_spanned!(span=> ::cache_runtime::__private::near_keeper::<#stored>())
        }
        None => {
            let stored = stored(ret.span());
            quote! {{
                #[allow(unused_imports)]
                use ::cache_runtime::__private::{Typed as _, Untyped as _};
                (&::cache_runtime::__private::Probe::<#stored>::new()).keeper()
            }}
        }
    };
    // A near copy is asked for first, synchronously, after spending tokio's budget (a near hit
    // never yields) if one may answer; then the call reads through with the key.
    let keeper_var = Ident::new("__cache_keeper", Span::mixed_site());
    let near_var = Ident::new("__cache_near", Span::mixed_site());
    let (hit, key_out) =
        (Ident::new("__cache_hit", Span::mixed_site()), Ident::new("__cache_key", Span::mixed_site()));
    let hasher = Ident::new("__cache_hasher", Span::mixed_site());
    let restore = quote_spanned!(ret.span()=> <#policy as ::cache_runtime::__private::Policy<#ret>>::restore);
    let near_first = quote! {
        match ::cache_runtime::__private::near_first(&#function, &mut #hasher, #keeper_var, #near_var) {
            ::core::result::Result::Ok(#hit) => return #restore(#hit),
            ::core::result::Result::Err(#key_out) => #key_out,
        }
    };
    let key_expr = key_expr(func, model, &function, KeyIn::Function, near_first);
    let body = super::async_body(Some(ret), block);
    quote! {
        #(#attrs)*
        #vis #sig {
            #identity
            let #keeper_var = #keeper;
            let #near_var = ::cache_runtime::__private::near_on(&#function, &#keeper_var);
            if #near_var {
                ::cache_runtime::__private::budget().await;
            }
            let #key = #key_expr;
            #call(#function, #key, #keeper_var, move || #body).await
        }
    }
}

/// Whether the generic parameter `name` is named only by `skip`ped parameters' types (an
/// executor's, a pool's): not by a key parameter's, nor by the return type.
fn only_in_skipped(model: &Cached, name: &str) -> bool {
    let in_key_or_return =
        super::mentions(&model.ret, name) || model.key_params.iter().any(|(_, ty)| super::mentions(ty, name));
    !in_key_or_return && model.skipped_types.iter().any(|ty| super::mentions(ty, name))
}

/// The key companion's generic parameters: the function's, less those only `skip`ped
/// parameters name, which the key leaves out too: invalidation names the key arguments alone
/// (`user(id)` for `user<E: Executor>(db: E, id: i64)` with `skip(db)`), and nothing would
/// infer them. Their bounds go with them, inline or in `where`. When a kept parameter's bound
/// names one left out (`T: From<E>`), all are kept (the invalidation then names them all, as
/// before).
fn companion_generics(func: &ItemFn, model: &Cached) -> syn::Generics {
    let all = &func.sig.generics;
    let left_out: Vec<String> = all
        .type_params()
        .map(|p| &p.ident)
        .chain(all.const_params().map(|p| &p.ident))
        .map(ToString::to_string)
        .filter(|name| only_in_skipped(model, name))
        .collect();
    if left_out.is_empty() {
        return all.clone();
    }
    let names_left_out = |tokens: &dyn ToTokens| left_out.iter().any(|name| super::mentions(tokens, name));
    let mut kept = all.clone();
    kept.params = all
        .params
        .iter()
        .filter(|p| match p {
            syn::GenericParam::Type(t) => !left_out.contains(&t.ident.to_string()),
            syn::GenericParam::Const(c) => !left_out.contains(&c.ident.to_string()),
            syn::GenericParam::Lifetime(_) => true,
        })
        .cloned()
        .collect();
    if kept.params.iter().any(|p| names_left_out(p)) {
        return all.clone();
    }
    let kept_names: Vec<String> = kept
        .type_params()
        .map(|p| &p.ident)
        .chain(kept.const_params().map(|p| &p.ident))
        .map(ToString::to_string)
        .collect();
    let names_kept = |tokens: &dyn ToTokens| kept_names.iter().any(|name| super::mentions(tokens, name));
    if let Some(clause) = &mut kept.where_clause {
        let mut predicates = syn::punctuated::Punctuated::new();
        for predicate in &clause.predicates {
            // As written inline: a bound on a left-out parameter goes with it, whatever it names;
            // one on a kept parameter that names a left-out one ties them.
            let (bounded, bounds): (&dyn ToTokens, &dyn ToTokens) = match predicate {
                syn::WherePredicate::Type(t) => (&t.bounded_ty, &t.bounds),
                other => (other, other),
            };
            match (names_left_out(bounded), names_kept(bounded), names_left_out(bounds)) {
                // `E: Executor`, `E: From<T>`, `for<'c> &'c mut E: Executor<'c>`: goes with `E`.
                (true, false, _) => {}
                (false, _, false) => predicates.push(predicate.clone()),
                // `T: From<E>`, `(E, T): Trait`.
                _ => return all.clone(),
            }
        }
        clause.predicates = predicates;
    }
    kept
}

/// The key and spec functions that invalidation calls (see `expand::Site`).
fn companions(func: &ItemFn, model: &Cached, site: Site, registration: TokenStream) -> TokenStream {
    let generics = &companion_generics(func, model);
    let where_clause = &generics.where_clause;
    let function = Ident::new("__cache_fn", Span::mixed_site());
    let identity = identity(func, model, &function, false, site);
    // When the receiver is part of the key, the instance comes first, as `&self` (the user's
    // `self` token): `Self::quote(self, symbol)`, `Feed::quote(&feed, symbol)`.
    let receiver = match &model.receiver {
        Receiver::Hashed { self_token, .. } => Some(quote!(&#self_token)),
        Receiver::None | Receiver::Skipped => None,
    };
    let key_expr = key_expr(func, model, &function, KeyIn::Companion, TokenStream::new());
    let params = receiver.into_iter().chain(model.key_params.iter().map(|(name, ty)| quote!(#name: #ty)));
    // A function under `#[cfg]` has its companions under the same `#[cfg]`.
    let cfgs = super::conditions(&func.attrs);
    let key_sig = |vis: TokenStream, name: &Ident| {
        quote! {
            #(#cfgs)*
            #[doc(hidden)]
            #[allow(non_snake_case, dead_code, clippy::needless_lifetimes)]
            #vis fn #name #generics (#(#params),*) -> ::core::option::Option<::std::string::String> #where_clause {
                #identity
                #key_expr
            }
        }
    };
    let spec_sig = |vis: TokenStream, name: &Ident, registration: &TokenStream| {
        quote! {
            #(#cfgs)*
            #[doc(hidden)]
            #[allow(non_snake_case, dead_code)]
            #vis fn #name() -> ::cache_runtime::__private::CachedFn {
                #registration
                #identity
                #function
            }
        }
    };
    let vis = &func.vis;
    match site {
        Site::Associated => {
            let key_fn = key_sig(quote!(#vis), &super::key_fn_name(&func.sig.ident, site));
            let spec_fn =
                spec_sig(quote!(#vis), &super::spec_fn_name(&func.sig.ident, site), &TokenStream::new());
            quote!(#key_fn #spec_fn)
        }
        Site::Module => {
            let holder = &func.sig.ident;
            let key_fn = key_sig(quote!(pub), &super::key_fn_name(holder, site));
            let spec_fn = spec_sig(quote!(pub), &super::spec_fn_name(holder, site), &registration);
            let doc = format!("Cache companions of `{holder}` (generated by `#[cached]`; not an API).");
            quote! {
                #(#cfgs)*
                #[doc = #doc]
                #[doc(hidden)]
                #[allow(non_camel_case_types, dead_code)]
                #vis struct #holder {}

                #(#cfgs)*
                impl #holder {
                    #key_fn
                    #spec_fn
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proc_macro2::TokenStream;
    use quote::quote;

    fn expand(args: TokenStream, item: TokenStream) -> String {
        super::expand(args, item).to_string()
    }

    /// A method as `#[cached_impl]` expands it: the function, then its companions.
    fn expand_method(args: TokenStream, item: TokenStream) -> String {
        let func = syn::parse2(item).unwrap();
        match super::expand_parts(args, &func, super::Site::Associated, &super::Owner::Free) {
            Ok(super::Parts { function, companions, .. }) => format!("{function} {companions}"),
            Err(fallback) => fallback.to_string(),
        }
    }

    #[test]
    fn a_method_outside_cached_impl_is_told_to_add_it() {
        for receiver in [quote!(&self,), quote!()] {
            let out = expand(
                quote!(db = MarketData, prefix = "m", ttl = 60, skip(self)),
                quote!(
                    async fn quote(#receiver x: u32) -> Option<Self> {
                        None
                    }
                ),
            );
            let errors = errors(&out);
            assert_eq!(errors.len(), 1, "{errors:?}");
            assert!(
                errors[0].starts_with("`quote` is a method: put `#[cached_impl]` on its `impl` block"),
                "{errors:?}"
            );
            assert!(!out.contains("__cache"), "no companions, nothing generated named: {out}");
        }
    }

    /// The messages of the `compile_error!`s in an expansion.
    fn errors(expansion: &str) -> Vec<String> {
        expansion
            .split("compile_error !")
            .skip(1)
            .map(|rest| rest.split('"').nth(1).unwrap_or_default().to_owned())
            .collect()
    }

    fn assert_valid(expansion: &str) {
        assert!(errors(expansion).is_empty(), "{expansion}");
        syn::parse_file(expansion).unwrap_or_else(|e| panic!("{e}: {expansion}"));
    }

    /// The key companion: without the parameters only skipped ones name, and without the
    /// `where` predicates about them alone; kept whole when a predicate ties one to a kept one.
    #[test]
    fn the_key_companion_leaves_out_what_only_skipped_parameters_name() {
        let squeeze = |s: &str| s.split_whitespace().collect::<String>();
        let key_fn = |item: TokenStream| {
            let out = squeeze(&expand(quote!(db = MarketData, prefix = "m", ttl = 60, skip(db)), item));
            let at = out.find("fn__cache_key").expect("a key companion");
            out[at..].split('{').next().unwrap().to_owned()
        };
        let apart = key_fn(quote!(
            async fn balance<'e, E: Executor<'e>, T: Clone>(db: E, account: T) -> u64
            where
                for<'c> &'c E: Send,
                T: Send,
            {
                0
            }
        ));
        assert_eq!(
            apart,
            "fn__cache_key<'e,T:Clone>(account:T)->::core::option::Option<::std::string::String>whereT:Send"
        );
        let bound_apart = key_fn(quote!(
            async fn balance<E, T: Clone>(db: E, account: T) -> u64
            where
                E: From<T>,
            {
                0
            }
        ));
        assert!(bound_apart.starts_with("fn__cache_key<T:Clone>"), "as written inline: {bound_apart}");
        let tied = key_fn(quote!(
            async fn balance<E, T: Clone>(db: E, account: T) -> u64
            where
                T: From<E>,
            {
                0
            }
        ));
        assert!(tied.starts_with("fn__cache_key<E,T:Clone>"), "{tied}");
    }

    #[test]
    fn syntax_error_is_the_only_error() {
        let out = expand(
            quote!(db = MarketData prefix = "m", ttl = 300),
            quote!(
                async fn f(x: u32) -> u32 {
                    x
                }
            ),
        );
        let errors = errors(&out);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(!errors[0].contains("missing"), "{errors:?}");
        // The function is still emitted, so call sites do not fail too.
        assert!(out.contains("async fn f"));
    }

    #[test]
    fn ttl_is_bounded() {
        let item = quote!(
            async fn f(x: u32) -> u32 {
                x
            }
        );
        for ttl in
            [quote!(18446744073709551615), quote!(18446744073709551616), quote!("400d"), quote!(31536001)]
        {
            let errors = errors(&expand(quote!(db = MarketData, prefix = "m", ttl = #ttl), item.clone()));
            assert_eq!(errors.len(), 1, "{ttl}: {errors:?}");
            assert!(errors[0].starts_with("`ttl` may be at most 365 days (31536000 seconds)"), "{errors:?}");
        }
        for ttl in [quote!(31536000), quote!("365d")] {
            assert_valid(&expand(quote!(db = MarketData, prefix = "m", ttl = #ttl), item.clone()));
        }
    }

    #[test]
    fn skip_self_needs_a_receiver() {
        let out = expand(
            quote!(db = MarketData, prefix = "m", ttl = 60, skip(self)),
            quote!(
                async fn f(x: u32) -> u32 {
                    x
                }
            ),
        );
        assert_eq!(
            errors(&out),
            ["`f` takes no `self`: `skip(self)` leaves a method's receiver out of the key; remove it"]
        );
    }

    #[test]
    fn skipped_receiver_is_not_hashed() {
        let out = expand_method(
            quote!(db = MarketData, prefix = "m", ttl = 60, skip(self)),
            quote!(
                async fn f(&self, x: u32) -> u32 {
                    x
                }
            ),
        );
        assert_valid(&out);
        assert!(!out.contains("key_receiver"), "{out}");
        assert!(out.contains("fn __cache_key_f (x : u32)"), "{out}");
        assert!(out.contains("CachedFn :: method"), "{out}");
    }

    #[test]
    fn receiver_is_hashed() {
        let args = quote!(db = MarketData, prefix = "m", ttl = 60);
        for (receiver, value) in [
            (quote!(&self), "& * self"),
            (quote!(&mut self), "& * self"),
            (quote!(self: std::sync::Arc<Self>), "& * self"),
            (quote!(self), "& self"),
            (quote!(mut self), "& self"),
        ] {
            let out = expand_method(args.clone(), quote!(async fn f(#receiver, x: u32) -> u32 { x }));
            assert_valid(&out);
            assert!(out.contains(&format!("key_receiver (& mut __cache_hasher , {value}) ;")), "{out}");
            // The key companion takes the instance first, as `&self`, and hashes it as `Self`.
            assert!(out.contains("fn __cache_key_f (& self , x : u32)"), "{out}");
            assert!(out.contains("key_receiver (& mut __cache_hasher , & * self) ;"), "{out}");
        }
    }

    #[test]
    fn generic_arguments_are_hashed_in_order() {
        let out = expand(
            quote!(db = MarketData, prefix = "m", ttl = 60),
            quote!(
                async fn f<'a, U: Unit, const N: usize, V>(x: &'a str, y: impl Serialize) -> u32 {
                    0
                }
            ),
        );
        assert_valid(&out);
        let hashed = |item: &str| out.find(item).unwrap_or_else(|| panic!("no {item} in {out}"));
        let order = [
            "type_name :: < U > ()",
            "type_name :: < V > ()",
            "type_name_of_val (& y)",
            "key_arg (& mut __cache_hasher , & N)",
            "key_arg (& mut __cache_hasher , & x)",
            "key_arg (& mut __cache_hasher , & y)",
        ];
        assert!(order.windows(2).all(|w| hashed(w[0]) < hashed(w[1])), "{out}");
        assert!(!out.contains("type_name :: < 'a >"), "{out}");
        assert!(out.contains("CachedFn :: free"), "{out}");
        assert!(out.contains("module : :: core :: module_path ! ()"), "{out}");
    }

    #[test]
    fn a_type_parameter_only_skipped_arguments_name_stays_out_of_the_key() {
        let out = expand(
            quote!(db = MarketData, prefix = "m", ttl = 60, skip(ex)),
            quote!(
                async fn load<E: Executor, R: Default, T>(ex: E, id: u32) -> T {
                    todo!()
                }
            ),
        );
        assert_valid(&out);
        assert!(!out.contains("type_name :: < E > ()"), "the executor's type is not part of the key: {out}");
        assert!(out.contains("type_name :: < R > ()"), "named only in the body: still part of the key");
        assert!(out.contains("type_name :: < T > ()"), "the return type's parameter is part of the key");
    }

    #[test]
    fn errors_never_name_generated_items() {
        let cases = [
            (
                quote!(db = 15, prefix = "Bad", ttl = 0, skip(nope, self), colour = 1),
                quote!(
                    fn f(x: u32) {}
                ),
            ),
            (
                quote!(db = MarketData, prefix = "m", ttl = "forever"),
                quote!(
                    async fn f((a, b): (u8, u8)) -> u8 {
                        a
                    }
                ),
            ),
        ];
        for (args, item) in cases {
            let out = expand(args, item);
            assert!(!errors(&out).is_empty());
            assert!(errors(&out).iter().all(|e| !e.contains("__cache")), "{out}");
        }
    }
}
