//! HTTP relays the benchmarks put between the engines and an emulator: the plumbing they
//! share (a server on threads of its own, a request passed on as it came). The cost
//! benchmark's metering relay ([`crate::cost::Relay`]) and the scale benchmark's Kinesis
//! gate ([`Gate`]) are built on it.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio::sync::Semaphore;

/// Serves `app` on `listener` (already bound, so its address can be handed out before any
/// thread starts) on a runtime and thread of its own, until the process ends: what it
/// relays for (engines on the bench's runtime, or each on its own) never waits for it
/// behind their own work.
pub fn serve(
    name: &'static str,
    listener: std::net::TcpListener,
    app: axum::Router,
) -> anyhow::Result<()> {
    listener.set_nonblocking(true)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name(format!("kcg-bench-{name}"))
        .spawn(move || {
            rt.block_on(async move {
                let served = match tokio::net::TcpListener::from_std(listener) {
                    Ok(listener) => axum::serve(listener, app).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = served {
                    eprintln!("kcg-bench: {name} stopped: {e}");
                }
            });
        })?;
    Ok(())
}

/// An HTTP client for a relay's upstream, keeping up to `idle` connections open.
pub fn client(idle: usize) -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .pool_max_idle_per_host(idle)
        .build()?)
}

/// An upstream answer, as received.
pub struct Answer {
    /// Its status.
    pub status: StatusCode,
    /// Its headers, but the framing ones (the relay frames its own answer).
    pub headers: HeaderMap,
    /// Its body.
    pub body: Bytes,
}

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        let mut out = (self.status, self.body).into_response();
        for (n, v) in self.headers {
            if let Some(n) = n {
                out.headers_mut().insert(n, v);
            }
        }
        out
    }
}

/// Posts `body` with the caller's `headers` (but `host` and `content-length`) to
/// `upstream`; a failure is the relay's 502.
pub async fn pass_on(
    http: &reqwest::Client,
    upstream: &str,
    headers: &HeaderMap,
    body: Bytes,
) -> Result<Answer, Response> {
    let bad_gateway = |e: reqwest::Error| (StatusCode::BAD_GATEWAY, e.to_string()).into_response();
    let mut req = http.post(upstream).body(body);
    for (name, value) in headers {
        if name != "host" && name != "content-length" {
            req = req.header(name, value);
        }
    }
    let res = req.send().await.map_err(bad_gateway)?;
    let status = res.status();
    let mut kept = res.headers().clone();
    kept.remove("content-length");
    kept.remove("transfer-encoding");
    let body = res.bytes().await.map_err(bad_gateway)?;
    Ok(Answer {
        status,
        headers: kept,
        body,
    })
}

/// A relay in front of kinesis-local that lets at most `in_flight` reads (see [`GATED`])
/// through at a time, over as many kept-alive connections; the others wait in the gate, and one whose
/// caller gives up (the SDK's attempt timeout) is dropped there, never reaching the
/// emulator. 5,000 readers starting at once held 8,000 to 14,000 sockets open on
/// kinesis-local, which then closed its listening socket for good. A real Kinesis endpoint
/// serves such a start; the gate keeps the emulator alive through it, at the price of the
/// wait it adds.
pub struct Gate {
    upstream: String,
    http: reqwest::Client,
    permits: Semaphore,
}

impl Gate {
    /// Serves the gate on `listener` (see [`serve`]) in front of `upstream`.
    pub fn serve(
        listener: std::net::TcpListener,
        upstream: String,
        in_flight: usize,
    ) -> anyhow::Result<()> {
        let gate = Arc::new(Gate {
            upstream,
            http: client(in_flight)?,
            permits: Semaphore::new(in_flight),
        });
        let app = axum::Router::new().fallback(pass).with_state(gate);
        serve("kinesis-gate", listener, app)
    }
}

/// The reads of every reader, which the gate bounds; other calls (a leader's `ListShards`)
/// are few and pass at once, as a real endpoint would not queue them behind the readers.
const GATED: [&str; 3] = ["GetShardIterator", "GetRecords", "SubscribeToShard"];

async fn pass(State(gate): State<Arc<Gate>>, headers: HeaderMap, body: Bytes) -> Response {
    let gated = headers
        .get("x-amz-target")
        .and_then(|v| v.to_str().ok())
        .and_then(|t| t.rsplit('.').next())
        .is_some_and(|op| GATED.contains(&op));
    let _permit = if gated {
        match gate.permits.acquire().await {
            Ok(p) => Some(p),
            Err(_) => return StatusCode::SERVICE_UNAVAILABLE.into_response(),
        }
    } else {
        None
    };
    match pass_on(&gate.http, &gate.upstream, &headers, body).await {
        Ok(answer) => answer.into_response(),
        Err(failed) => failed,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    /// An upstream that answers each request after a short wait with its body, counting the
    /// most requests it ever had at once.
    fn upstream(busy: Arc<AtomicUsize>, most: Arc<AtomicUsize>) -> anyhow::Result<String> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let url = format!("http://{}", listener.local_addr()?);
        let app = axum::Router::new().fallback(move |body: Bytes| {
            let (busy, most) = (busy.clone(), most.clone());
            async move {
                let now = busy.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(50)).await;
                busy.fetch_sub(1, Ordering::SeqCst);
                body
            }
        });
        serve("test-upstream", listener, app)?;
        Ok(url)
    }

    #[tokio::test]
    async fn the_gate_passes_every_read_but_only_so_many_at_once() -> anyhow::Result<()> {
        let (busy, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let up = upstream(busy, most.clone())?;
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let gate = format!("http://{}", listener.local_addr()?);
        Gate::serve(listener, up, 3)?;
        let http = reqwest::Client::new();
        let mut calls = tokio::task::JoinSet::new();
        for i in 0..12 {
            let (http, gate) = (http.clone(), gate.clone());
            calls.spawn(async move {
                let res = http
                    .post(&gate)
                    .header("x-amz-target", "Kinesis_20131202.GetRecords")
                    .body(format!("call {i}"))
                    .send()
                    .await?;
                anyhow::Ok((i, res.status(), res.text().await?))
            });
        }
        let mut answered = 0;
        while let Some(call) = calls.join_next().await {
            let (i, status, body) = call??;
            assert_eq!(status, StatusCode::OK);
            assert_eq!(body, format!("call {i}"));
            answered += 1;
        }
        assert_eq!(answered, 12);
        let most = most.load(Ordering::SeqCst);
        assert!((1..=3).contains(&most), "{most} requests at once upstream");
        Ok(())
    }
}
