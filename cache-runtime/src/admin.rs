//! Admin routes for operators (feature `admin`, axum): mount [`router`] under the service's own
//! authentication, for example at `/cache`.
//!
//! - `GET status`: the backend (kind, address without password, server version, used memory,
//!   keys per DB), the breaker's state, queued writes and invalidations, and the hit rate overall,
//!   per DB and prefix, and per function.
//! - `GET functions`: the registry ([`crate::registry::functions`]).
//! - `POST clear` with a JSON body: `{"db": 5, "prefix": "market"}` (a DB by number or name)
//!   removes every key under `prefix:` in that DB (`SCAN` + `UNLINK` on Redis, never `FLUSHDB`),
//!   if a `#[cached]` function or a [`Cache`](crate::Cache) handle of this process uses that
//!   prefix in that DB (a 404 otherwise: keys the service does not own are never cleared);
//!   `{"function": "my_service::market::quote"}` invalidates every entry of one function (its
//!   path, or its bare name when only one function has it). Anything else, DB 15, or an unknown
//!   DB or function is a 4xx with a message, and clears nothing.
//! - `GET config`: the configuration, passwords redacted.
//!
//! ```
//! use axum::Router;
//! let app: Router = Router::new().nest("/cache", cache_runtime::admin::router());
//! ```

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::db::RESERVED_DB;
use crate::registry::FindError;
use crate::runtime::Runtime;
use crate::stats::PrefixStats;

/// The routes, serving the process-wide runtime ([`crate::global`]).
pub fn router() -> Router {
    routes(None)
}

/// The routes, serving `runtime` (a service with several runtimes, or a test).
pub fn router_for(runtime: Runtime) -> Router {
    routes(Some(runtime))
}

fn routes(runtime: Option<Runtime>) -> Router {
    Router::new()
        .route("/status", get(status))
        .route("/functions", get(functions))
        .route("/clear", post(clear))
        .route("/config", get(config))
        .with_state(Admin(runtime))
}

#[derive(Clone)]
struct Admin(Option<Runtime>);

impl Admin {
    fn runtime(&self) -> Runtime {
        self.0.clone().unwrap_or_else(|| crate::global().clone())
    }
}

/// A 4xx (or 5xx) with `{"error": message}`.
fn refuse(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

fn with_rate(stats: &PrefixStats) -> Value {
    let mut value = serde_json::to_value(stats).unwrap_or(Value::Null);
    if let Value::Object(map) = &mut value {
        map.insert("hit_rate".to_owned(), json!(stats.hit_rate()));
    }
    value
}

async fn status(State(admin): State<Admin>) -> Json<Value> {
    let runtime = admin.runtime();
    let (server, server_error) = match runtime.backend_info().await {
        Ok(info) => (Some(info), None),
        Err(error) => (None, Some(error.to_string())),
    };
    let stats = runtime.stats();
    Json(json!({
        "backend": runtime.backend_kind(),
        "address": runtime.description(),
        "near": runtime.near_status(),
        "server": server,
        "server_error": server_error,
        "breaker_open": runtime.breaker_open(),
        "queued_writes": runtime.queued_writes(),
        "pending_invalidations": runtime.pending_invalidations(),
        "hit_rate": stats.hit_rate(),
        "prefixes": stats.entries.iter().map(with_rate).collect::<Vec<_>>(),
        "functions": stats.functions.iter().map(with_rate).collect::<Vec<_>>(),
    }))
}

async fn functions() -> Json<Value> {
    Json(json!(crate::registry::functions()))
}

async fn config(State(admin): State<Admin>) -> Json<Value> {
    let runtime = admin.runtime();
    let c = runtime.config();
    let (batch_max, batch_delay, batch_queue) = c.batching();
    let (breaker_threshold, breaker_cooldown) = c.breaker();
    let ms = |d: std::time::Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    let (near_on, near_default, near_capacity, near_max_bytes) = c.near();
    Json(json!({
        "backend": runtime.backend_kind(),
        // `Display` of the target: never a password.
        "address": runtime.description(),
        "key_namespace": c.key_namespace(),
        "op_timeout_ms": ms(c.op_timeout()),
        "connect_timeout_ms": ms(c.connect_timeout()),
        "lease_ttl_ms": ms(c.lease_ttl()),
        "generation_refresh_ms": ms(c.generation_refresh()),
        "invalidation_recheck_ms": ms(c.invalidation_recheck()),
        "shutdown_timeout_ms": ms(c.shutdown_timeout()),
        "pool_size": c.pool_size(),
        "read_coalescing": c.read_coalescing(),
        "sentinel_announcements": c.sentinel_announcements(),
        "batch_max": batch_max,
        "batch_delay_ms": ms(batch_delay),
        "batch_queue": batch_queue,
        "retry_on_timeout": c.retry_on_timeout(),
        "breaker_threshold": breaker_threshold,
        "breaker_cooldown_ms": ms(breaker_cooldown),
        "memory_capacity": c.memory_capacity(),
        "memory_max_bytes": c.memory_max_bytes(),
        "near": near_on,
        "near_default_ms": near_default.map(ms),
        "near_capacity": near_capacity,
        "near_max_bytes": near_max_bytes,
        "near_status": runtime.near_status(),
    }))
}

/// What a clear request names, checked before anything is touched.
enum ClearRequest {
    Prefix { db: u8, prefix: String },
    Function(String),
}

fn parse_clear(body: &[u8]) -> Result<ClearRequest, String> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| format!("the body is not JSON ({e}): send {{\"db\": 5, \"prefix\": \"market\"}} or {{\"function\": \"path::to::f\"}}"))?;
    let Value::Object(fields) = value else {
        return Err("the body must be a JSON object: {\"db\": 5, \"prefix\": \"market\"} or {\"function\": \"path::to::f\"}".into());
    };
    if let Some(unknown) = fields.keys().find(|k| !matches!(k.as_str(), "db" | "prefix" | "function")) {
        return Err(format!("unknown field `{unknown}`: a clear takes `db` and `prefix`, or `function`"));
    }
    match (fields.get("db"), fields.get("prefix"), fields.get("function")) {
        (None, None, Some(Value::String(function))) => Ok(ClearRequest::Function(function.clone())),
        (None, None, Some(_)) => {
            Err("`function` must be a string: the function's path, as GET functions lists it".into())
        }
        (Some(db), Some(Value::String(prefix)), None) => {
            let db = parse_db(db)?;
            if let Some(problem) = crate::prefix_problem(prefix) {
                return Err(format!("bad prefix `{prefix}`: {problem}"));
            }
            Ok(ClearRequest::Prefix { db, prefix: prefix.clone() })
        }
        (Some(_), Some(_), None) => Err("`prefix` must be a string".into()),
        (_, _, Some(_)) => Err("give `function` alone, or `db` and `prefix`, not both".into()),
        _ => {
            Err("a clear takes `db` and `prefix` together (a whole DB is never cleared), or `function`"
                .into())
        }
    }
}

/// A DB by number or by name (`cache_db!`'s label of the standard DBs); never DB 15.
fn parse_db(db: &Value) -> Result<u8, String> {
    let index = match db {
        Value::Number(n) => n.as_u64().filter(|&n| n < 16).map(|n| n as u8),
        Value::String(name) => crate::db::STANDARD.iter().find(|(_, n)| n == name).map(|(i, _)| *i),
        _ => None,
    };
    match index {
        Some(RESERVED_DB) => {
            Err(format!("DB {RESERVED_DB} is reserved for the platform: the cache never reads or clears it"))
        }
        Some(index) => Ok(index),
        None => {
            let names: Vec<String> = crate::db::STANDARD
                .iter()
                .filter(|(i, _)| *i != RESERVED_DB)
                .map(|(i, n)| format!("{i} ({n})"))
                .collect();
            Err(format!("unknown DB {db}: give a number or name among {}", names.join(", ")))
        }
    }
}

async fn clear(State(admin): State<Admin>, body: Bytes) -> Response {
    let request = match parse_clear(&body) {
        Ok(request) => request,
        Err(message) => return refuse(StatusCode::BAD_REQUEST, message),
    };
    let runtime = admin.runtime();
    match request {
        ClearRequest::Prefix { db, prefix } => {
            use crate::backend::Store;
            let known = crate::registry::prefixes();
            if !known.contains(&(db, prefix.clone())) {
                let known: Vec<String> =
                    known.iter().map(|(db, prefix)| format!("{prefix} in DB {db}")).collect();
                let message = format!(
                    "no cached function or Cache handle of this process uses prefix `{prefix}` in DB {db}: the \
                     route clears only this service's own prefixes ({})",
                    if known.is_empty() { "it has none yet".to_owned() } else { known.join(", ") }
                );
                return refuse(StatusCode::NOT_FOUND, message);
            }
            let cleared = runtime.inner().backend.clear(db, &prefix).await;
            // This process's near copies go now; other processes' with the store's notifications.
            runtime.inner().near.flush();
            match cleared {
                Ok(removed) => {
                    tracing::info!(db, prefix, removed, "admin: cleared a prefix");
                    Json(json!({ "db": db, "prefix": prefix, "removed": removed })).into_response()
                }
                Err(error) => refuse(StatusCode::SERVICE_UNAVAILABLE, format!("the clear failed: {error}")),
            }
        }
        ClearRequest::Function(name) => match runtime.invalidate_function(&name).await {
            Ok(info) => {
                tracing::info!(function = %info.path, "admin: invalidated a function");
                Json(json!({
                    "invalidated": info.path,
                    "pending_invalidations": runtime.pending_invalidations(),
                }))
                .into_response()
            }
            Err(error @ FindError::Unknown(_)) => refuse(StatusCode::NOT_FOUND, error.to_string()),
            Err(error) => refuse(StatusCode::BAD_REQUEST, error.to_string()),
        },
    }
}
