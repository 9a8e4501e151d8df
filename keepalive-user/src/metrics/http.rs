//! The metrics endpoint: `/metrics` (OpenMetrics text), `/healthz` and
//! `/readyz`, served by axum on a thread of its own with its own runtime so
//! a slow scraper never delays the ring drain.
//!
//! The address is bound before anything else starts ([`bind`]), so an
//! address in use is one clear error and nothing is attached.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{Context, Result, anyhow};
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::sync::oneshot;

use super::{Format, Metrics};

/// Parses and binds `--metrics ADDR` (`127.0.0.1:9977`, `[::]:9977`, `0.0.0.0:9977`).
pub fn bind(addr: &str) -> Result<TcpListener> {
    let sa: SocketAddr = addr.parse().map_err(|_| {
        anyhow!(
            "invalid --metrics address `{addr}`: expected IP:PORT like 127.0.0.1:9977 or [::]:9977"
        )
    })?;
    let l = TcpListener::bind(sa).map_err(|e| {
        let why = if e.kind() == std::io::ErrorKind::AddrInUse {
            "address already in use (another keepalive or exporter?)".to_string()
        } else {
            e.to_string()
        };
        anyhow!("cannot listen for metrics on {sa}: {why}")
    })?;
    l.set_nonblocking(true)
        .context("setting the metrics socket non-blocking")?;
    Ok(l)
}

/// The running endpoint; stops when dropped.
pub struct Server {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn metrics(State(m): State<Arc<Metrics>>, headers: HeaderMap) -> impl IntoResponse {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let format = Format::negotiate(accept);
    (
        [(header::CONTENT_TYPE, format.content_type())],
        m.encode_as(format),
    )
}

fn answer(r: Result<(), String>) -> (StatusCode, String) {
    match r {
        Ok(()) => (StatusCode::OK, "ok\n".into()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

async fn healthz(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    answer(m.health.healthy())
}

async fn readyz(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    answer(m.health.ready())
}

async fn index() -> impl IntoResponse {
    "keepalive: /metrics (OpenMetrics), /healthz, /readyz\n"
}

pub fn router(m: Arc<Metrics>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(m)
}

/// Serves `m` on `listener` from a new thread until the [`Server`] is dropped.
pub fn spawn(listener: TcpListener, m: Arc<Metrics>) -> Result<Server> {
    let addr = listener.local_addr()?;
    let (stop, stopped) = oneshot::channel::<()>();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .context("starting the metrics server")?;
    let thread = std::thread::Builder::new()
        .name("metrics-http".into())
        .spawn(move || {
            // Capabilities are per thread: this one serves HTTP and needs none.
            crate::kernel::privileges::drop_all_in_this_thread("metrics server");
            rt.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!("metrics endpoint: {e}");
                        return;
                    }
                };
                let served = axum::serve(listener, router(m))
                    .with_graceful_shutdown(async {
                        let _ = stopped.await;
                    })
                    .await;
                if let Err(e) = served {
                    tracing::error!("metrics endpoint: {e}");
                }
            })
        })
        .context("starting the metrics thread")?;
    Ok(Server {
        addr,
        stop: Some(stop),
        thread: Some(thread),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    fn get(addr: SocketAddr, path: &str) -> String {
        get_accept(addr, path, "*/*")
    }

    fn get_accept(addr: SocketAddr, path: &str, accept: &str) -> String {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    }

    #[test]
    fn serves_metrics_and_health_on_loopback() {
        let m = Arc::new(Metrics::new(
            &crate::metrics::labels::LabelOptions::default(),
        ));
        let server = spawn(bind("127.0.0.1:0").unwrap(), m.clone()).unwrap();
        let r = get(server.addr, "/metrics");
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        assert!(r.contains("text/plain; version=0.0.4"), "{r}");
        assert!(r.contains("# TYPE keepalive_probes_total counter\n"), "{r}");
        assert!(r.contains("\nkeepalive_probes_total 0\n"), "{r}");
        // What Prometheus sends.
        let r = get_accept(
            server.addr,
            "/metrics",
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
        );
        assert!(r.contains("application/openmetrics-text"), "{r}");
        assert!(r.contains("# TYPE keepalive_probes counter\n"), "{r}");
        assert!(r.ends_with("# EOF\n"), "{r}");
        let r = get(server.addr, "/readyz");
        assert!(r.starts_with("HTTP/1.1 503"), "{r}");
        m.health
            .attached
            .store(true, std::sync::atomic::Ordering::Relaxed);
        m.health.drained();
        assert!(get(server.addr, "/readyz").starts_with("HTTP/1.1 200"));
        assert!(get(server.addr, "/healthz").starts_with("HTTP/1.1 200"));
        drop(server);
    }

    #[test]
    fn address_in_use_is_one_clear_error() {
        let first = bind("127.0.0.1:0").unwrap();
        let addr = first.local_addr().unwrap().to_string();
        let e = bind(&addr).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "cannot listen for metrics on {addr}: address already in use (another keepalive or exporter?)"
            )
        );
        let e = bind("localhost").unwrap_err().to_string();
        assert!(
            e.starts_with("invalid --metrics address `localhost`"),
            "{e}"
        );
    }
}
