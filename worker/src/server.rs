//! The worker's HTTP endpoints: `/metrics` (Prometheus/OpenMetrics text), `/healthz`
//! (liveness: the engine loop is not stuck) and `/readyz` (readiness: registered in the
//! group and heartbeating).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::health::Health;
use crate::metrics::{CONTENT_TYPE, Metrics};

/// The default listen address.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8080";

/// Errors of the HTTP server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The address could not be bound (in use, no permission).
    #[error("binding the metrics/health server to {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The server failed while running.
    #[error("metrics/health server: {0}")]
    Serve(std::io::Error),
}

#[derive(Clone)]
struct AppState {
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

/// The router, separate from the listener so tests can drive it.
pub fn router(metrics: Arc<Metrics>, health: Arc<Health>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(AppState { metrics, health })
}

async fn metrics_handler(State(s): State<AppState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], s.metrics.encode())
}

async fn healthz(State(s): State<AppState>) -> impl IntoResponse {
    if s.health.is_live() {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "engine loop stalled\n")
    }
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    if s.health.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not registered in the group (yet)\n",
        )
    }
}

/// Binds `addr`; separate from [`serve`] so a bad address fails at startup.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind { addr, source })
}

/// Serves until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> Result<(), ServerError> {
    axum::serve(listener, router(metrics, health))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
        .map_err(ServerError::Serve)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn get(url: &str) -> (u16, String, String) {
        let r = reqwest::get(url).await.expect("request");
        let status = r.status().as_u16();
        let ct = r
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        (status, ct, r.text().await.expect("body"))
    }

    #[tokio::test]
    async fn endpoints() {
        let metrics = Arc::new(Metrics::new());
        let health = Arc::new(Health::new(Duration::from_secs(30)));
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(
            listener,
            metrics.clone(),
            health.clone(),
            stop.clone(),
        ));

        let (status, ct, body) = get(&format!("{base}/metrics")).await;
        assert_eq!(status, 200);
        assert_eq!(ct, CONTENT_TYPE);
        assert!(body.contains("kcg_worker_leases_held"), "{body}");

        assert_eq!(get(&format!("{base}/healthz")).await.0, 200);
        assert_eq!(
            get(&format!("{base}/readyz")).await.0,
            503,
            "not registered yet"
        );
        health.heartbeat_ok();
        assert_eq!(get(&format!("{base}/readyz")).await.0, 200);
        health.deregistered();
        assert_eq!(get(&format!("{base}/readyz")).await.0, 503);

        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("server stops")
            .unwrap()
            .unwrap();
    }

    #[tokio::test]
    async fn liveness_fails_when_the_loop_stalls() {
        let health = Arc::new(Health::new(Duration::from_millis(500)));
        let app = router(Arc::new(Metrics::new()), health.clone());
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(get(&format!("{base}/healthz")).await.0, 503);
        health.tick();
        assert_eq!(get(&format!("{base}/healthz")).await.0, 200);
    }
}
