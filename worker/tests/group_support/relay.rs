//! A TCP relay between engines and the real DynamoDB, for faults no emulator offers: an
//! outage (every connection dropped, new ones refused), a lost answer (a request that
//! reaches DynamoDB and is applied, whose response never comes back), refused requests
//! (those carrying a given key fail before reaching DynamoDB), a stalled operation
//! (requests of one kind are never answered, until the client gives up) and slow requests
//! (those carrying given bytes pass on after a delay, and land late).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Requests containing all of these byte strings are passed on after the delay.
type Delay = Arc<Mutex<Option<(Vec<Vec<u8>>, Duration)>>>;

/// A running relay; see the module doc.
pub struct Relay {
    pub addr: SocketAddr,
    up: Arc<AtomicBool>,
    cut: Arc<Mutex<CancellationToken>>,
    /// The `X-Amz-Target` operation (e.g. `PutItem`) whose next answer is dropped.
    lose: Arc<Mutex<Option<String>>>,
    lost: Arc<AtomicUsize>,
    /// Requests containing these bytes are refused: their connection is closed before the
    /// request reaches DynamoDB.
    refuse: Arc<Mutex<Option<Vec<u8>>>>,
    refused: Arc<AtomicUsize>,
    /// `X-Amz-Target` operations whose requests are held unanswered.
    stalled: Arc<Mutex<Vec<String>>>,
    delayed: Delay,
    delayed_count: Arc<AtomicUsize>,
}

impl Relay {
    /// A relay in front of the DynamoDB endpoint the tests use (`AWS_ENDPOINT_URL_DYNAMODB`,
    /// checked by `env()`).
    pub async fn to_dynamodb() -> Relay {
        let direct = std::env::var("AWS_ENDPOINT_URL_DYNAMODB").expect("checked by env()");
        let target = direct
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_owned();
        Relay::start(target).await
    }

    /// Relays to `target` (`host:port`).
    pub async fn start(target: String) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = listener.local_addr().expect("addr");
        let relay = Relay {
            addr,
            up: Arc::new(AtomicBool::new(true)),
            cut: Arc::new(Mutex::new(CancellationToken::new())),
            lose: Arc::new(Mutex::new(None)),
            lost: Arc::new(AtomicUsize::new(0)),
            refuse: Arc::new(Mutex::new(None)),
            refused: Arc::new(AtomicUsize::new(0)),
            stalled: Arc::new(Mutex::new(Vec::new())),
            delayed: Arc::new(Mutex::new(None)),
            delayed_count: Arc::new(AtomicUsize::new(0)),
        };
        let (up, cut) = (relay.up.clone(), relay.cut.clone());
        let faults = Faults {
            lose: relay.lose.clone(),
            lost: relay.lost.clone(),
            refuse: relay.refuse.clone(),
            refused: relay.refused.clone(),
            stalled: relay.stalled.clone(),
            delayed: relay.delayed.clone(),
            delayed_count: relay.delayed_count.clone(),
        };
        tokio::spawn(async move {
            loop {
                let Ok((inbound, _)) = listener.accept().await else {
                    return;
                };
                if !up.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let token = cut.lock().unwrap().clone();
                let (target, faults) = (target.clone(), faults.clone());
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(&target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = pipe(inbound, outbound, faults) => {}
                        _ = token.cancelled() => {}
                    }
                });
            }
        });
        relay
    }

    /// The relay's endpoint URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Drops every connection and refuses new ones until [`Relay::restore`].
    pub fn cut(&self) {
        self.up.store(false, Ordering::SeqCst);
        self.cut.lock().unwrap().cancel();
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        *self.cut.lock().unwrap() = CancellationToken::new();
        self.up.store(true, Ordering::SeqCst);
    }

    /// The next request for `operation` (e.g. `PutItem`) is delivered to DynamoDB, but its
    /// answer is swallowed and the client's connection closed.
    pub fn lose_next_answer(&self, operation: &str) {
        *self.lose.lock().unwrap() = Some(format!("DynamoDB_20120810.{operation}"));
    }

    /// From now on, requests for `operation` (e.g. `DeleteItem`) are held: never passed on
    /// to DynamoDB, never answered, until the client closes the connection.
    pub fn stall(&self, operation: &str) {
        self.stalled
            .lock()
            .unwrap()
            .push(format!("DynamoDB_20120810.{operation}"));
    }

    /// From now on, each request whose bytes contain every one of `patterns` (e.g.
    /// `DynamoDB_20120810.Query`: each page of a paginated Query) is passed on to DynamoDB
    /// `by` late, so its answer comes that much later, and a write lands that much later,
    /// also when its client gave up waiting meanwhile.
    pub fn delay(&self, patterns: &[&str], by: Duration) {
        let patterns = patterns.iter().map(|p| p.as_bytes().to_vec()).collect();
        *self.delayed.lock().unwrap() = Some((patterns, by));
    }

    /// How many requests were delayed so far.
    pub fn delayed_requests(&self) -> usize {
        self.delayed_count.load(Ordering::SeqCst)
    }

    /// Passes every operation on again.
    pub fn unstall(&self) {
        self.stalled.lock().unwrap().clear();
    }

    /// How many answers were swallowed so far.
    pub fn lost_answers(&self) -> usize {
        self.lost.load(Ordering::SeqCst)
    }

    /// From now on, every request whose bytes contain `pattern` (e.g. a sort key) fails:
    /// its connection is closed before the request reaches DynamoDB, so it is not applied.
    pub fn refuse(&self, pattern: &str) {
        *self.refuse.lock().unwrap() = Some(pattern.as_bytes().to_vec());
    }

    /// Stops refusing requests.
    pub fn allow(&self) {
        *self.refuse.lock().unwrap() = None;
    }

    /// How many requests were refused so far.
    pub fn refused_requests(&self) -> usize {
        self.refused.load(Ordering::SeqCst)
    }
}

/// The faults armed on a relay, shared with its connections.
#[derive(Clone)]
struct Faults {
    lose: Arc<Mutex<Option<String>>>,
    lost: Arc<AtomicUsize>,
    refuse: Arc<Mutex<Option<Vec<u8>>>>,
    refused: Arc<AtomicUsize>,
    stalled: Arc<Mutex<Vec<String>>>,
    delayed: Delay,
    delayed_count: Arc<AtomicUsize>,
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Copies both ways. Once a request of the armed operation passed through, the connection's
/// next answer is read from DynamoDB (so the write was applied) and thrown away. A request
/// of a stalled operation ends the copying upstream: the connection hangs until the client
/// closes it.
async fn pipe(inbound: TcpStream, outbound: TcpStream, faults: Faults) {
    let Faults {
        lose,
        lost,
        refuse,
        refused,
        stalled,
        delayed,
        delayed_count,
    } = faults;
    let (mut in_r, mut in_w) = inbound.into_split();
    let (mut out_r, mut out_w) = outbound.into_split();
    let doomed = Arc::new(AtomicBool::new(false));
    let doomed_up = doomed.clone();
    let upstream = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match in_r.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let refuse_hit = refuse
                .lock()
                .unwrap()
                .as_deref()
                .is_some_and(|p| contains(&buf[..n], p));
            if refuse_hit {
                refused.fetch_add(1, Ordering::SeqCst);
                return;
            }
            let stall = {
                let ops = stalled.lock().unwrap();
                ops.iter().any(|op| contains(&buf[..n], op.as_bytes()))
            };
            if stall {
                // Hold the request: read (and drop) whatever else comes until the client
                // gives up and closes.
                while matches!(in_r.read(&mut buf).await, Ok(n) if n > 0) {}
                return;
            }
            let delay = delayed
                .lock()
                .unwrap()
                .as_ref()
                .filter(|(patterns, _)| patterns.iter().all(|p| contains(&buf[..n], p)))
                .map(|(_, by)| *by);
            if let Some(by) = delay {
                delayed_count.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(by).await;
            }
            {
                let mut armed = lose.lock().unwrap();
                let hit = armed
                    .as_deref()
                    .is_some_and(|op| contains(&buf[..n], op.as_bytes()));
                if hit {
                    *armed = None;
                    doomed_up.store(true, Ordering::SeqCst);
                }
            }
            if out_w.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    let downstream = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match out_r.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if doomed.load(Ordering::SeqCst) {
                // The write landed; its answer is lost with the connection.
                lost.fetch_add(1, Ordering::SeqCst);
                return;
            }
            if in_w.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    // Whichever direction ends first ends the connection (both halves are dropped).
    tokio::select! {
        _ = upstream => {}
        _ = downstream => {}
    }
}
