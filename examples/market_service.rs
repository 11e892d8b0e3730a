//! A small market-data service built the way a team would build it: cached reads, an
//! invalidating write, the cache's admin routes under `/cache` behind the service's own token, and
//! Prometheus text at `/metrics`.
//!
//! ```text
//! cargo run --example market_service                       # embedded cache, port 3000
//! REDIS_URL=redis://127.0.0.1:6379 PORT=8080 ADMIN_TOKEN=s3cret cargo run --example market_service
//! ```
//!
//! Routes: `GET /quotes/{symbol}`, `PUT /quotes/{symbol}` with `{"price": 151.0}`, `GET /metrics`,
//! and `/cache/status`, `/cache/functions`, `/cache/config`, `POST /cache/clear` (with
//! `Authorization: Bearer $ADMIN_TOKEN`; without `ADMIN_TOKEN` they are closed).

use std::collections::HashMap;
use std::sync::{LazyLock, RwLock};
use std::time::Duration;

use axum::extract::{Path, Request};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use cache_runtime::db::MarketData;
use cache_runtime::telemetry::Prometheus;
use cache_runtime::{admin, cached, invalidates};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Quote {
    symbol: String,
    price: f64,
}

#[derive(Debug)]
enum FeedError {
    UnknownSymbol,
}

/// The service's database: slow on purpose (20 ms a read), which the cache hides.
struct Database {
    prices: RwLock<HashMap<String, f64>>,
}

static DATABASE: LazyLock<Database> = LazyLock::new(|| Database {
    prices: RwLock::new(HashMap::from([("AAPL".to_owned(), 150.25), ("MSFT".to_owned(), 410.5)])),
});

#[cached(db = MarketData, prefix = "market", ttl = 300)]
async fn quote(symbol: &str) -> Result<Quote, FeedError> {
    tokio::time::sleep(Duration::from_millis(20)).await;
    let price = DATABASE.prices.read().unwrap().get(symbol).copied();
    price.map(|price| Quote { symbol: symbol.to_owned(), price }).ok_or(FeedError::UnknownSymbol)
}

#[invalidates(quote(symbol))]
async fn update_quote(symbol: &str, price: f64) -> Result<(), FeedError> {
    DATABASE.prices.write().unwrap().insert(symbol.to_owned(), price);
    Ok(())
}

async fn get_quote(Path(symbol): Path<String>) -> Response {
    match quote(&symbol).await {
        Ok(quote) => Json(quote).into_response(),
        Err(FeedError::UnknownSymbol) => {
            (StatusCode::NOT_FOUND, format!("no quote for {symbol}\n")).into_response()
        }
    }
}

#[derive(Deserialize)]
struct NewPrice {
    price: f64,
}

async fn put_quote(Path(symbol): Path<String>, Json(new): Json<NewPrice>) -> Response {
    match update_quote(&symbol, new.price).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(FeedError::UnknownSymbol) => StatusCode::NOT_FOUND.into_response(),
    }
}

/// The service's own authentication, in front of the cache's admin routes.
async fn require_admin_token(request: Request, next: Next) -> Response {
    static TOKEN: LazyLock<Option<String>> =
        LazyLock::new(|| std::env::var("ADMIN_TOKEN").ok().filter(|t| !t.is_empty()));
    let given = request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    match TOKEN.as_deref() {
        Some(token) if given == Some(&format!("Bearer {token}")) => next.run(request).await,
        Some(_) => {
            (StatusCode::UNAUTHORIZED, "a valid `Authorization: Bearer` token is needed\n").into_response()
        }
        None => (StatusCode::FORBIDDEN, "admin routes are closed: start the service with ADMIN_TOKEN\n")
            .into_response(),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    // The recorder first, then the cache: every cached function records into it.
    let prometheus = Prometheus::install()?;
    let runtime = cache_runtime::init_from_env()?;
    let app = Router::new()
        .route("/quotes/{symbol}", get(get_quote).put(put_quote))
        .route("/metrics", get(move || async move { prometheus.render() }))
        .nest("/cache", admin::router().route_layer(middleware::from_fn(require_admin_token)));
    let port: u16 = std::env::var("PORT").ok().and_then(|p| p.parse().ok()).unwrap_or(3000);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    println!("market_service listening on http://127.0.0.1:{port} (cache: {})", runtime.description());
    axum::serve(listener, app).with_graceful_shutdown(shutdown_signal()).await?;
    // Writes the cache accepted are made before the process exits.
    runtime.shutdown().await?;
    println!("market_service stopped");
    Ok(())
}

async fn shutdown_signal() {
    let mut terminate =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("a SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}
