//! The http sink against a real local HTTP server (axum, in the test): 2xx acknowledges,
//! 500 and timeouts fail the batch (the reader retries it), batches are split into chunks;
//! a reader's own sink sends its fencing token and nothing past its fencing deadline.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use kcg_worker::delivery::http::HttpSink;
use kcg_worker::delivery::{BatchHandler, Record, ShardContext};
use kcg_worker::fence::{BootInstant, Fence, FenceSetter};
use kcg_worker::reader::ShardProgress;

/// What the server does with each request, by request number (0-based).
#[derive(Clone, Copy, Debug)]
enum Answer {
    Ok,
    Fail,
    Slow,
}

#[derive(Clone)]
struct Server {
    bodies: Arc<Mutex<Vec<serde_json::Value>>>,
    /// The fencing-token headers of each request: (stream, shard, lease counter).
    tokens: Arc<Mutex<Vec<(String, String, String)>>>,
    script: Arc<dyn Fn(usize) -> Answer + Send + Sync>,
}

async fn receive(State(s): State<Server>, headers: HeaderMap, body: String) -> StatusCode {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned()
    };
    s.tokens.lock().unwrap().push((
        header("kcg-stream"),
        header("kcg-shard-id"),
        header("kcg-lease-counter"),
    ));
    let n = {
        let mut b = s.bodies.lock().unwrap();
        b.push(serde_json::from_str(&body).expect("body is JSON"));
        b.len() - 1
    };
    match (s.script)(n) {
        Answer::Ok => StatusCode::NO_CONTENT,
        Answer::Fail => StatusCode::INTERNAL_SERVER_ERROR,
        Answer::Slow => {
            tokio::time::sleep(Duration::from_secs(3)).await;
            StatusCode::OK
        }
    }
}

async fn serve(script: impl Fn(usize) -> Answer + Send + Sync + 'static) -> (String, Server) {
    let state = Server {
        bodies: Arc::new(Mutex::new(Vec::new())),
        tokens: Arc::new(Mutex::new(Vec::new())),
        script: Arc::new(script),
    };
    let app = Router::new()
        .route("/records", post(receive))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}/records"), state)
}

/// `n` records; record 4, if any, is user record 4 of a KPL aggregate.
fn records(n: usize) -> Vec<Record> {
    (0..n)
        .map(|i| Record {
            stream: "orders".into(),
            shard_id: "shardId-000000000000".into(),
            sequence: format!("{}", 1000 + i),
            sub_sequence: (i == 4).then_some(4),
            partition_key: format!("k{i}"),
            explicit_hash_key: None,
            data: format!("payload-{i}").into_bytes(),
            arrival: Some(jiff::Timestamp::from_second(1_700_000_000).unwrap()),
        })
        .collect()
}

#[tokio::test]
async fn posts_chunks_and_acks_on_2xx() {
    let (url, server) = serve(|_| Answer::Ok).await;
    let sink = HttpSink::with(&url, Duration::from_secs(2), 2).expect("sink");
    sink.handle(&records(5)).await.expect("2xx acknowledges");
    let bodies = server.bodies.lock().unwrap().clone();
    assert_eq!(bodies.len(), 3, "5 records in chunks of 2");
    let seqs: Vec<&str> = bodies
        .iter()
        .flat_map(|b| b["records"].as_array().unwrap().iter())
        .map(|r| r["sequence"].as_str().unwrap())
        .collect();
    assert_eq!(seqs, ["1000", "1001", "1002", "1003", "1004"]);
    let first = &bodies[0]["records"][0];
    assert_eq!(first["stream"], "orders");
    assert_eq!(first["shard"], "shardId-000000000000");
    assert_eq!(first["partitionKey"], "k0");
    assert_eq!(first["data"], "cGF5bG9hZC0w");
    assert_eq!(first["arrival"], "2023-11-14T22:13:20Z");
    assert!(
        first.get("subSequence").is_none(),
        "no sub-sequence outside an aggregate"
    );
    assert_eq!(bodies[2]["records"][0]["subSequence"], 4);
}

#[tokio::test]
async fn non_2xx_is_an_error_and_retry_succeeds() {
    // First two requests answer 500.
    let (url, server) = serve(|n| if n < 2 { Answer::Fail } else { Answer::Ok }).await;
    let sink = HttpSink::with(&url, Duration::from_secs(2), 100).expect("sink");
    let batch = records(3);
    let err = sink.handle(&batch).await.expect_err("500 fails the batch");
    assert!(err.message.contains("500"), "{err}");
    assert!(sink.handle(&batch).await.is_err());
    sink.handle(&batch)
        .await
        .expect("third attempt acknowledged");
    assert_eq!(server.bodies.lock().unwrap().len(), 3);
}

#[tokio::test]
async fn timeout_is_an_error() {
    let (url, _server) = serve(|n| if n == 0 { Answer::Slow } else { Answer::Ok }).await;
    let sink = HttpSink::with(&url, Duration::from_millis(300), 100).expect("sink");
    let started = std::time::Instant::now();
    let err = sink
        .handle(&records(1))
        .await
        .expect_err("timeout fails the batch");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "timed out after {:?}",
        started.elapsed()
    );
    assert!(err.message.contains("timed out"), "{err}");
    sink.handle(&records(1))
        .await
        .expect("next attempt acknowledged");
}

#[tokio::test]
async fn unreachable_endpoint_is_an_error() {
    // Bind then drop: nothing listens on that port any more.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let sink = HttpSink::with(
        &format!("http://127.0.0.1:{port}/x"),
        Duration::from_secs(1),
        10,
    )
    .expect("sink");
    assert!(sink.handle(&records(1)).await.is_err());
}

/// The sink of one reader, as the engine opens it: fenced at `deadline` from now.
/// Keep the setter: a dropped one means "the reader is being stopped".
fn shard_sink(sink: &HttpSink, deadline: Duration) -> (Arc<dyn BatchHandler>, FenceSetter) {
    let (setter, fence) = Fence::new(BootInstant::now() + deadline);
    let handler = sink
        .open_shard(ShardContext {
            stream: "orders".into(),
            shard_id: "shardId-000000000000".into(),
            initial_position: "LATEST",
            progress: tokio::sync::watch::channel(ShardProgress::default()).1,
            fence,
            lease_counter: 7,
        })
        .expect("a sink per reader");
    (handler, setter)
}

#[tokio::test]
async fn a_readers_sink_sends_its_token_and_nothing_past_its_deadline() {
    let (url, server) = serve(|n| if n == 1 { Answer::Slow } else { Answer::Ok }).await;
    let sink = HttpSink::with(&url, Duration::from_secs(10), 100).expect("sink");

    // Request 0: well before the deadline, with the fencing token.
    let (reader_sink, _keep) = shard_sink(&sink, Duration::from_millis(500));
    reader_sink
        .handle(&records(1))
        .await
        .expect("before the deadline");
    assert_eq!(
        server.tokens.lock().unwrap()[0],
        ("orders".into(), "shardId-000000000000".into(), "7".into())
    );

    // Request 1 takes 3 s: it is cut at the deadline, not at the 10 s request timeout.
    let started = std::time::Instant::now();
    let err = reader_sink
        .handle(&records(1))
        .await
        .expect_err("cut at the deadline");
    assert!(err.message.contains("fencing deadline"), "{err}");
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "cut after {:?}",
        started.elapsed()
    );

    // Past the deadline nothing is sent at all.
    let err = reader_sink.handle(&records(1)).await.expect_err("fenced");
    assert!(err.message.contains("not sent"), "{err}");
    assert_eq!(
        server.bodies.lock().unwrap().len(),
        2,
        "no request past the deadline"
    );

    // The shared sink (outside a group) sends no token.
    sink.handle(&records(1)).await.expect("plain sink");
    assert_eq!(server.tokens.lock().unwrap()[2], Default::default());
}
