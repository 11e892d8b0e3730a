//! Parsing: the tokens of `#[cached(...)]` into [`CachedArgs`], each value kept with its span.
//! Nothing here judges a value against the rules; that is `validate.rs`.

use proc_macro2::{Span, TokenStream};
use syn::ext::IdentExt;
use syn::parse::Parser;
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{Expr, ExprLit, Ident, Lit, LitInt, LitStr, Meta, Path, Token};

use crate::ctxt::{Errors, Given, Once};

/// What `db = ...` names.
pub(crate) enum DbArg {
    /// `db = MarketData`: a marker type (the only accepted form).
    Type(Path),
    /// `db = 5`: a hard-coded number, kept so that validation can reject it on its token.
    Number(LitInt),
}

/// A TTL as written: seconds known now (`ttl = 300`, `ttl = "5m"`, with the literal's span), or
/// a constant expression of integer seconds (`ttl = TTL_MARKET`, `ttl = 60 * 60 * 24`) checked
/// by the compiler where the function is.
pub(crate) enum Ttl {
    Seconds { seconds: u64, span: Span },
    Const(Expr),
}

/// The options of one `#[cached(...)]`, as written. Absent options are `None`.
pub(crate) struct CachedArgs {
    pub(crate) db: Given<DbArg>,
    pub(crate) prefix: Given<LitStr>,
    pub(crate) ttl: Given<Ttl>,
    pub(crate) skip: Vec<Ident>,
    pub(crate) version: Option<u32>,
    /// `format = Json` or `format = MessagePack`, as written (checked in `validate.rs`).
    pub(crate) format: Option<Ident>,
    /// `jitter = "10%"`: the percentage, with the literal (checked in `validate.rs`).
    pub(crate) jitter: Option<(u64, LitStr)>,
    /// `eager_refresh = "80%"`: the percentage, with the literal (checked in `validate.rs`).
    pub(crate) eager_refresh: Option<(u64, LitStr)>,
    /// `stale_if_error = "1h"`: seconds, with the value's span (checked in `validate.rs`).
    pub(crate) stale_if_error: Option<(u64, Span)>,
    /// `near = "30s"`: seconds, with the value's span (checked in `validate.rs`).
    pub(crate) near: Option<(u64, Span)>,
}

pub(crate) const OPTIONS: &str =
    "db, prefix, ttl, skip, version, format, jitter, eager_refresh, stale_if_error, near";

impl CachedArgs {
    /// Parses every option, recording each problem in `errors` and going on with the next.
    pub(crate) fn parse(tokens: TokenStream, errors: &mut Errors) -> CachedArgs {
        let mut db = Once::new("db");
        let mut prefix = Once::new("prefix");
        let mut ttl = Once::new("ttl");
        let mut skip = Once::new("skip");
        let mut version = Once::new("version");
        let mut format = Once::new("format");
        let mut jitter = Once::new("jitter");
        let mut eager_refresh = Once::new("eager_refresh");
        let mut stale_if_error = Once::new("stale_if_error");
        let mut near = Once::new("near");

        let metas = match Punctuated::<Meta, Token![,]>::parse_terminated.parse2(tokens) {
            Ok(metas) => metas,
            Err(e) => {
                // What the list says is unknown, so no option is reported missing: the syntax
                // error is the one mistake to show.
                errors.push(e);
                return CachedArgs::unknown();
            }
        };
        for meta in metas {
            let name = meta.path().get_ident().map(Ident::to_string).unwrap_or_default();
            let at = meta.path().span();
            match (name.as_str(), &meta) {
                ("db", Meta::NameValue(nv)) => db.set(at, parse_db(&nv.value, errors), errors),
                ("prefix", Meta::NameValue(nv)) => prefix.set(at, parse_prefix(&nv.value, errors), errors),
                ("ttl", Meta::NameValue(nv)) => ttl.set(at, parse_ttl(&nv.value, errors), errors),
                ("version", Meta::NameValue(nv)) => version.set(at, parse_version(&nv.value, errors), errors),
                ("format", Meta::NameValue(nv)) => format.set(at, parse_format(&nv.value, errors), errors),
                ("jitter", Meta::NameValue(nv)) => jitter.set(
                    at,
                    parse_percent(
                        &nv.value,
                        "`jitter` takes a percentage of the TTL, e.g. `jitter = \"10%\"`",
                        errors,
                    ),
                    errors,
                ),
                ("stale_if_error", Meta::NameValue(nv)) => stale_if_error.set(
                    at,
                    parse_seconds(
                        &nv.value,
                        "stale_if_error",
                        "`stale_if_error` takes whole seconds or a duration literal, e.g. `stale_if_error = \"1h\"`",
                        errors,
                    ),
                    errors,
                ),
                ("near", Meta::NameValue(nv)) => near.set(
                    at,
                    parse_seconds(
                        &nv.value,
                        "near",
                        "`near` takes whole seconds or a duration literal, e.g. `near = \"30s\"`",
                        errors,
                    ),
                    errors,
                ),
                ("eager_refresh", Meta::NameValue(nv)) => eager_refresh.set(
                    at,
                    parse_percent(
                        &nv.value,
                        "`eager_refresh` takes a percentage of the TTL, e.g. `eager_refresh = \"80%\"`",
                        errors,
                    ),
                    errors,
                ),
                ("skip", Meta::List(list)) => {
                    let names = list.parse_args_with(|input: syn::parse::ParseStream| {
                        // `any`: so that `skip(self)` parses (`self` is a keyword).
                        Punctuated::<Ident, Token![,]>::parse_terminated_with(input, Ident::parse_any)
                    });
                    let names = names.map_err(|e| errors.push(e)).ok();
                    skip.set(at, names.map(|n| n.into_iter().collect()), errors)
                }
                (
                    "db" | "prefix" | "ttl" | "version" | "format" | "jitter" | "eager_refresh"
                    | "stale_if_error"
                    | "near",
                    _,
                ) => errors.on(&meta, format_args!("write `{name} = ...`")),
                ("skip", _) => {
                    errors.on(&meta, "write `skip(arg, ...)` with the parameters to leave out of the key")
                }
                _ => errors.on(
                    meta.path(),
                    format_args!("unknown option `{}`: #[cached] takes {OPTIONS}", path_text(meta.path())),
                ),
            }
        }
        CachedArgs {
            db: db.get(),
            prefix: prefix.get(),
            ttl: ttl.get(),
            skip: skip.get().valid().unwrap_or_default(),
            version: version.get().valid(),
            format: format.get().valid(),
            jitter: jitter.get().valid(),
            eager_refresh: eager_refresh.get().valid(),
            stale_if_error: stale_if_error.get().valid(),
            near: near.get().valid(),
        }
    }

    /// The options of a list that did not parse: each one unknown, none absent.
    fn unknown() -> CachedArgs {
        CachedArgs {
            db: Given::Invalid,
            prefix: Given::Invalid,
            ttl: Given::Invalid,
            skip: Vec::new(),
            version: None,
            format: None,
            jitter: None,
            eager_refresh: None,
            stale_if_error: None,
            near: None,
        }
    }
}

fn path_text(path: &Path) -> String {
    path.segments.iter().map(|s| s.ident.to_string()).collect::<Vec<_>>().join("::")
}

fn parse_prefix(value: &Expr, errors: &mut Errors) -> Option<LitStr> {
    match value {
        Expr::Lit(ExprLit { lit: Lit::Str(s), .. }) => Some(s.clone()),
        other => {
            errors.on(other, "`prefix` takes a string literal, e.g. `prefix = \"market\"`");
            None
        }
    }
}

fn parse_format(value: &Expr, errors: &mut Errors) -> Option<Ident> {
    match value {
        Expr::Path(p) if p.qself.is_none() && p.path.get_ident().is_some() => p.path.get_ident().cloned(),
        other => {
            errors.on(other, "`format` takes `Json` or `MessagePack`, e.g. `format = MessagePack`");
            None
        }
    }
}

/// `jitter = "10%"`, `eager_refresh = "80%"`: a whole percentage, kept with its literal (the
/// bounds are checked in `validate.rs`). `help` is the error when it is not one.
fn parse_percent(value: &Expr, help: &str, errors: &mut Errors) -> Option<(u64, LitStr)> {
    match value {
        Expr::Lit(ExprLit { lit: Lit::Str(s), .. }) => {
            let text = s.value();
            let digits = text
                .trim()
                .strip_suffix('%')
                .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()));
            match digits {
                Some(d) => Some((d.parse::<u64>().unwrap_or(u64::MAX), s.clone())),
                None => {
                    errors.on(s, help);
                    None
                }
            }
        }
        other => {
            errors.on(other, help);
            None
        }
    }
}

/// `stale_if_error = "1h"`, `near = 30`: a duration in seconds (bounds checked in
/// `validate.rs`). `help` is the error when it is not one.
fn parse_seconds(value: &Expr, option: &str, help: &'static str, errors: &mut Errors) -> Option<(u64, Span)> {
    let parsed = match value {
        Expr::Lit(ExprLit { lit: Lit::Int(i), .. }) => whole_seconds(i, option),
        Expr::Lit(ExprLit { lit: Lit::Str(s), .. }) => parse_duration(&s.value()).map_err(String::from),
        _ => Err(help.to_owned()),
    };
    parsed.map(|seconds| (seconds, value.span())).map_err(|message| errors.on(value, message)).ok()
}

fn parse_version(value: &Expr, errors: &mut Errors) -> Option<u32> {
    match value {
        Expr::Lit(ExprLit { lit: Lit::Int(i), .. }) => i
            .base10_parse::<u32>()
            .map_err(|_| errors.on(i, "`version` is a whole number from 0 to 4294967295"))
            .ok(),
        other => {
            errors.on(other, "`version` takes a number, e.g. `version = 2`");
            None
        }
    }
}

fn parse_db(value: &Expr, errors: &mut Errors) -> Option<DbArg> {
    match value {
        Expr::Path(p) if p.qself.is_none() => Some(DbArg::Type(p.path.clone())),
        Expr::Lit(ExprLit { lit: Lit::Int(i), .. }) => Some(DbArg::Number(i.clone())),
        other => {
            errors.on(other, "`db` takes a DB type, e.g. `db = MarketData` (see cache_runtime::db)");
            None
        }
    }
}

fn parse_ttl(value: &Expr, errors: &mut Errors) -> Option<Ttl> {
    let parsed = match value {
        Expr::Lit(ExprLit { lit: Lit::Int(i), .. }) => whole_seconds(i, "ttl"),
        Expr::Lit(ExprLit { lit: Lit::Str(s), .. }) => parse_duration(&s.value()).map_err(String::from),
        Expr::Lit(_) => Err("`ttl` takes whole seconds, a duration literal or a constant, e.g. `ttl = 300`, `ttl = \"5m\"` or `ttl = TTL_MARKET`".to_owned()),
        // A constant, a path to one, or arithmetic on them: its value is checked at compile time
        // where the function is (`expand/cached.rs`).
        other => return Some(Ttl::Const(other.clone())),
    };
    match parsed {
        Ok(seconds) => Some(Ttl::Seconds { seconds, span: value.span() }),
        Err(message) => {
            errors.on(value, message);
            None
        }
    }
}

/// Whole seconds from an integer literal, `300` or `300u64`. Rust reads `5m`, `1h` or `2d`
/// written without quotes as a number with a suffix: refused, since the suffix would otherwise
/// be dropped and `5m` mean 5 seconds.
fn whole_seconds(i: &syn::LitInt, option: &str) -> Result<u64, String> {
    const INTEGER_TYPES: [&str; 12] =
        ["u8", "u16", "u32", "u64", "u128", "usize", "i8", "i16", "i32", "i64", "i128", "isize"];
    if i.suffix().is_empty() || INTEGER_TYPES.contains(&i.suffix()) {
        // Too large for `u64` is over any bound: kept saturated, so that validation reports it
        // as too long (syn's digits are base 10, so overflow is the only failure).
        return Ok(i.base10_parse::<u64>().unwrap_or(u64::MAX));
    }
    Err(format!("`{i}` is not a number of seconds: write a duration in quotes, `{option} = \"{i}\"`"))
}

/// `"90s"`, `"5m"`, `"1h30m"`, `"2d"`: numbers each followed by a unit (s, m, h, d). A total
/// beyond `u64` saturates (validation reports it as too long).
pub(crate) fn parse_duration(text: &str) -> Result<u64, &'static str> {
    const HELP: &str = "a duration is numbers with units s, m, h or d, e.g. \"90s\", \"5m\", \"1h30m\"";
    let mut total: u64 = 0;
    let mut number: Option<u64> = None;
    for c in text.trim().chars() {
        if let Some(d) = c.to_digit(10) {
            number = Some(number.unwrap_or(0).saturating_mul(10).saturating_add(u64::from(d)));
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            _ => return Err(HELP),
        };
        let n = number.take().ok_or(HELP)?;
        total = total.saturating_add(n.saturating_mul(unit));
    }
    if number.is_some() || text.trim().is_empty() {
        return Err(HELP);
    }
    Ok(total)
}

/// The entries of `#[invalidates(...)]` or `invalidate!(...)`, as written.
pub(crate) struct InvalidatesArgs {
    pub(crate) entries: Vec<Expr>,
}

impl InvalidatesArgs {
    pub(crate) fn parse(tokens: TokenStream, errors: &mut Errors) -> InvalidatesArgs {
        match Punctuated::<Expr, Token![,]>::parse_terminated.parse2(tokens) {
            Ok(entries) => InvalidatesArgs { entries: entries.into_iter().collect() },
            Err(e) => {
                errors.push(e);
                InvalidatesArgs { entries: Vec::new() }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Ok(90));
        assert_eq!(parse_duration("5m"), Ok(300));
        assert_eq!(parse_duration("1h30m"), Ok(5400));
        assert_eq!(parse_duration("2d"), Ok(172_800));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("m").is_err());
        assert!(parse_duration("5 minutes").is_err());
        assert!(parse_duration("").is_err());
    }
}
