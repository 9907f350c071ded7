//! `kcg-bench`: kcg's speed and memory goals as ONE command that prints ONE table.
//!
//! Pure functions (planner, handoff decision, status builder) are timed in-process; the
//! end-to-end and rebalance benchmarks run the real engine against the emulators named by
//! the standard `AWS_ENDPOINT_URL_*` variables (`bench/run.sh` starts and sets them).
//! Exits non-zero when a stated goal is missed, or when a selected benchmark produced no
//! result (nothing measured must not read as "all stated goals met").

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use kcg_bench::report::{self, Row};
use kcg_bench::support::Aws;
use kcg_bench::{cost, e2e, failover, micro, operator, rebalance, relay, scale, sink};

/// The benchmarks, in the order they run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Bench {
    /// Assignment plan (snapshot -> plan) for 4x2, 100x10, 1000x100 shards x clients.
    Planner,
    /// Handoff decision of one client in those groups.
    Handoff,
    /// Operator status builder for 1000 shards x 100 clients: time and JSON size.
    Status,
    /// One engine consuming N records from a fresh stream (needs emulators).
    E2e,
    /// Join, graceful stop and kill of engines on 8 shards (needs emulators).
    Rebalance,
    /// The `kcg-worker` binary's stdout sink writing N records into a file: CPU per record
    /// of the whole process (needs emulators and a release `kcg-worker` next to kcg-bench).
    Sink,
    /// Failover and joins of real `kcg-worker` processes with the default tuning: SIGKILL,
    /// a container restarted in its pod, a join (needs emulators and a release `kcg-worker`
    /// next to kcg-bench).
    Failover,
    /// The operator's steady-state API requests and memory with N groups on a real control
    /// plane (needs DynamoDB Local and `../shared/kube/cluster.sh`).
    Operator,
    /// DynamoDB read and write units of the engines' coordination (needs emulators; runs
    /// only when named, and alone among the emulator benchmarks: every DynamoDB request of
    /// this process goes through its metering relay).
    Cost,
    /// Tick length, join time and table reads of one group on thousands of shards (needs
    /// emulators, kinesis-local with a raised shard limit; runs only when named, and alone
    /// among the emulator benchmarks, like `cost`).
    Scale,
}

/// Command-line options.
#[derive(Parser, Debug)]
#[command(
    about = "kcg benchmarks: prints one table; exits 1 when a goal is missed or a selected \
             benchmark produced no result"
)]
struct Args {
    /// Run only these benchmarks (repeat or comma-separate); default: all.
    #[arg(long, value_delimiter = ',')]
    only: Vec<Bench>,
    /// Records the end-to-end benchmark produces and consumes.
    #[arg(long, default_value_t = 200_000)]
    records: u64,
    /// Times the end-to-end benchmark reads them (engine and bare loop each); the CPU rows
    /// give the median.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Payload bytes per record.
    #[arg(long, default_value_t = 200)]
    payload: usize,
    /// Shards of the end-to-end stream.
    #[arg(long, default_value_t = 4)]
    shards: i32,
    /// Records per GetRecords call in the end-to-end benchmark (Kinesis allows 10000).
    #[arg(long, default_value_t = 10_000)]
    max_records_per_call: u32,
    /// Seconds the end-to-end benchmark waits for every record.
    #[arg(long, default_value_t = 120)]
    e2e_timeout: u64,
    /// Folder holding `node_modules/lifion-kinesis` (1.3.3) for the side-by-side run of the
    /// e2e benchmark; bench/run.sh installs it and sets this.
    #[arg(long, env = "KCG_BENCH_PEER_DIR")]
    peer_dir: Option<std::path::PathBuf>,
    /// Skip the side-by-side peer run.
    #[arg(long)]
    no_peer: bool,
    /// Join / graceful-stop rounds of the rebalance benchmark.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Kill rounds of the rebalance benchmark (each waits about one client timeout).
    #[arg(long, default_value_t = 3)]
    kill_rounds: usize,
    /// Rounds of the failover benchmark (each: join, graceful stop, restart in the pod,
    /// kill and a join; about 30 s).
    #[arg(long, default_value_t = 3)]
    failover_rounds: usize,
    /// Groups of the operator benchmark.
    #[arg(long, default_value_t = 100)]
    groups: usize,
    /// Seconds of the operator benchmark's measured steady window.
    #[arg(long, default_value_t = 60)]
    operator_window: u64,
    /// The `kcg-operator` binary of the operator benchmark; default target/release, else
    /// target/debug.
    #[arg(long)]
    operator_bin: Option<std::path::PathBuf>,
    /// Groups of the cost benchmark: `<shards>x<workers>` idle, `<shards>x<workers>@<rate>`
    /// with `rate` records/s written to each shard.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "8x2,8x2@100,1000x50,1000x50@0.1"
    )]
    cost_scenarios: Vec<String>,
    /// Seconds of each measured window of the cost benchmark.
    #[arg(long, default_value_t = 60)]
    cost_window: u64,
    /// Seconds the cost benchmark waits after a group is balanced, before measuring.
    #[arg(long, default_value_t = 30)]
    cost_settle: u64,
    /// Monthly USD of the engine to compare with, as `<scenario>=<usd>` (e.g.
    /// `1000x50=1384.2`; repeat or separate with commas); the goal is at most a tenth of it,
    /// at the configured tick rate.
    #[arg(long, value_delimiter = ',')]
    cost_baseline: Vec<String>,
    /// Groups of the scale benchmark: `<shards>x<workers>` (the last worker joins a settled
    /// group).
    #[arg(long, value_delimiter = ',', default_value = "1000x20,5000x100")]
    scale_scenarios: Vec<String>,
    /// Seconds of the scale benchmark's steady window after the join.
    #[arg(long, default_value_t = 30)]
    scale_window: u64,
    /// Heartbeat interval of the scale benchmark's engines, in milliseconds (the client
    /// timeout follows: the shortest valid, 4x from 1 s on). The default is the worker's;
    /// a longer one spreads the same per-tick work over more time, for a machine whose
    /// DynamoDB Local cannot serve every engine's tick each second.
    #[arg(long, default_value_t = 1000)]
    scale_heartbeat_ms: u64,
    /// Name of the Kinesis emulator, for the report line.
    #[arg(long, env = "KCG_BENCH_KINESIS_EMULATOR", default_value = "unknown")]
    kinesis_emulator: String,
}

fn machine() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        })
        .unwrap_or_else(|| "unknown cpu".into());
    let rustc =
        std::process::Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into()))
            .arg("--version")
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "rustc unknown".into());
    let profile = if cfg!(debug_assertions) {
        "debug build"
    } else {
        "release build"
    };
    format!("machine: nproc {cores}, {cpu}, {rustc}, {profile}")
}

/// The operator benchmark's parameters: binaries and the cluster folder under the
/// workspace root (the bench runs from it, as `bench/run.sh` does).
fn operator_params(args: &Args) -> operator::Params {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let built = |profile: &str| root.join("target").join(profile).join("kcg-operator");
    let operator_bin = args.operator_bin.clone().unwrap_or_else(|| {
        Some(built("release"))
            .filter(|p| p.exists())
            .unwrap_or_else(|| built("debug"))
    });
    operator::Params {
        groups: args.groups,
        window: Duration::from_secs(args.operator_window),
        operator_bin,
        cluster_script: root.join("../shared/kube/cluster.sh"),
        cluster_dir: root.join(".kube-bench"),
    }
}

/// The emulators line; `dynamodb` overrides the DynamoDB endpoint shown (the real one
/// behind the cost relay).
fn emulators(kinesis_name: &str, dynamodb: Option<&str>) -> String {
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| "(unset)".into());
    format!(
        "emulators: Kinesis {} at {}, DynamoDB at {} (DynamoDB Local via scripts/emulators.sh)",
        kinesis_name,
        var("AWS_ENDPOINT_URL_KINESIS"),
        dynamodb.map_or_else(|| var("AWS_ENDPOINT_URL_DYNAMODB"), str::to_owned),
    )
}

/// Runs on `kcg-worker`'s runtime (same builder, same thread count), so the e2e CPU and RSS
/// rows measure the engine as it runs in a pod.
fn main() -> ExitCode {
    let args = Args::parse();
    let relay = if args.only.contains(&Bench::Cost) || args.only.contains(&Bench::Scale) {
        match cost_relay_listener() {
            Ok(r) => Some(r),
            Err(e) => {
                eprintln!("kcg-bench: cost: {e:#}");
                return ExitCode::from(2);
            }
        }
    } else {
        None
    };
    if args.only.contains(&Bench::Scale)
        && let Err(e) = kinesis_gate()
    {
        eprintln!("kcg-bench: scale: {e:#}");
        return ExitCode::from(2);
    }
    match kcg_worker::runtime::build(kcg_worker::runtime::DEFAULT_WORKER_THREADS) {
        Ok(rt) => rt.block_on(bench(args, relay)),
        Err(e) => {
            eprintln!("kcg-bench: cannot start the Tokio runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Binds the cost benchmark's relay and points every DynamoDB client this process creates
/// from now on at it. Returns the listener and the real DynamoDB endpoint.
fn cost_relay_listener() -> anyhow::Result<(std::net::TcpListener, String)> {
    use anyhow::Context;
    let upstream = std::env::var("AWS_ENDPOINT_URL_DYNAMODB")
        .context("AWS_ENDPOINT_URL_DYNAMODB is not set (run bench/run.sh)")?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding the relay")?;
    let url = format!("http://{}", listener.local_addr()?);
    // SAFETY: called before the runtime is built, while this is the only thread.
    unsafe { std::env::set_var("AWS_ENDPOINT_URL_DYNAMODB", &url) };
    Ok((listener, upstream))
}

/// Puts the scale benchmark's [`relay::Gate`] in front of Kinesis: every Kinesis client this
/// process creates from now on goes through it.
fn kinesis_gate() -> anyhow::Result<()> {
    use anyhow::Context;
    let upstream = std::env::var("AWS_ENDPOINT_URL_KINESIS")
        .context("AWS_ENDPOINT_URL_KINESIS is not set (run bench/run.sh)")?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding the gate")?;
    let url = format!("http://{}", listener.local_addr()?);
    // SAFETY: called before the runtime is built and before the gate's thread starts, while
    // this is the only thread.
    unsafe { std::env::set_var("AWS_ENDPOINT_URL_KINESIS", &url) };
    relay::Gate::serve(listener, upstream, scale::KINESIS_IN_FLIGHT)
}

/// Parses the scale benchmark's `<shards>x<workers>`.
fn scale_scenario(s: &str) -> Option<scale::Scenario> {
    if s.contains('@') {
        return None;
    }
    let c: cost::Scenario = s.parse().ok()?;
    Some(scale::Scenario {
        shards: c.shards,
        workers: c.workers,
    })
}

/// Parses `<scenario>=<monthly USD>`.
fn cost_baseline(s: &str) -> Result<(cost::Scenario, f64), String> {
    let (scenario, usd) = s
        .split_once('=')
        .ok_or_else(|| format!("{s} is not <scenario>=<usd>"))?;
    let usd = usd
        .parse()
        .map_err(|_| format!("{s}: {usd} is not a number of USD"))?;
    Ok((scenario.parse()?, usd))
}

async fn bench(args: Args, relay: Option<(std::net::TcpListener, String)>) -> ExitCode {
    let dynamodb = relay.as_ref().map(|(_, upstream)| upstream.clone());
    // Engine logs only on request: they would bury the table.
    if std::env::var_os("RUST_LOG").is_some() {
        kcg_worker::telemetry::init(kcg_worker::telemetry::LogFormat::Text);
    }
    // The cost and scale benchmarks run only when named.
    let selected = |b: Bench| {
        args.only.contains(&b) || (args.only.is_empty() && b != Bench::Cost && b != Bench::Scale)
    };
    let needs_kinesis = selected(Bench::E2e)
        || selected(Bench::Rebalance)
        || selected(Bench::Sink)
        || selected(Bench::Failover)
        || selected(Bench::Cost)
        || selected(Bench::Scale);
    let needs_aws = needs_kinesis || selected(Bench::Operator);
    let relayed = [Bench::Cost, Bench::Scale]
        .into_iter()
        .filter(|b| selected(*b))
        .count();
    let others = [
        Bench::E2e,
        Bench::Rebalance,
        Bench::Failover,
        Bench::Operator,
    ]
    .into_iter()
    .any(selected);
    if relayed > 1 || (relayed == 1 && others) {
        eprintln!(
            "kcg-bench: run the cost or the scale benchmark alone (--only cost, --only scale): \
             its relay would carry the other benchmarks' DynamoDB traffic too"
        );
        return ExitCode::from(2);
    }
    let Some(scale_scenarios) = args
        .scale_scenarios
        .iter()
        .map(|s| scale_scenario(s))
        .collect::<Option<Vec<_>>>()
    else {
        eprintln!("kcg-bench: --scale-scenarios: each is <shards>x<workers>");
        return ExitCode::from(2);
    };
    let scenarios: Vec<cost::Scenario> =
        match args.cost_scenarios.iter().map(|s| s.parse()).collect() {
            Ok(s) => s,
            Err(bad) => {
                eprintln!("kcg-bench: --cost-scenarios: {bad}");
                return ExitCode::from(2);
            }
        };
    let baselines: Vec<(cost::Scenario, f64)> = match args
        .cost_baseline
        .iter()
        .map(|s| cost_baseline(s))
        .collect()
    {
        Ok(b) => b,
        Err(bad) => {
            eprintln!("kcg-bench: --cost-baseline: {bad}");
            return ExitCode::from(2);
        }
    };
    if (needs_kinesis && std::env::var_os("AWS_ENDPOINT_URL_KINESIS").is_none())
        || (needs_aws && std::env::var_os("AWS_ENDPOINT_URL_DYNAMODB").is_none())
    {
        eprintln!(
            "kcg-bench: e2e and rebalance need the emulators: run bench/run.sh, or set \
             AWS_ENDPOINT_URL_KINESIS and AWS_ENDPOINT_URL_DYNAMODB (or pass --only planner,handoff,status)"
        );
        return ExitCode::from(2);
    }

    let mut rows = Collected::default();
    let progress = |name: &str| eprintln!("kcg-bench: running {name} ...");
    if selected(Bench::Planner) {
        progress("planner");
        rows.add(Bench::Planner, micro::planner());
    }
    if selected(Bench::Handoff) {
        progress("handoff");
        rows.add(Bench::Handoff, micro::handoff());
    }
    if selected(Bench::Status) {
        progress("status");
        rows.add(Bench::Status, micro::status());
    }
    if needs_aws {
        let aws = Aws::load().await;
        let params = e2e::Params {
            records: args.records,
            runs: args.runs,
            payload: args.payload,
            shards: args.shards,
            max_records_per_call: args.max_records_per_call,
            timeout: Duration::from_secs(args.e2e_timeout),
            peer_dir: if args.no_peer {
                None
            } else {
                args.peer_dir.clone()
            },
        };
        if selected(Bench::E2e) {
            progress("e2e");
            rows.add(Bench::E2e, e2e::run(&aws, &params).await);
        }
        if selected(Bench::Sink) {
            progress("sink");
            rows.add(Bench::Sink, sink::run(&aws, &params).await);
        }
        if selected(Bench::Rebalance) {
            progress("rebalance");
            rows.add(
                Bench::Rebalance,
                rebalance::run(&aws, args.rounds, args.kill_rounds).await,
            );
        }
        if selected(Bench::Failover) {
            progress("failover");
            let params = failover::Params {
                rounds: args.failover_rounds,
            };
            rows.add(Bench::Failover, failover::run(&aws, &params).await);
        }
        if selected(Bench::Operator) {
            progress("operator");
            rows.add(
                Bench::Operator,
                operator::run(&aws, &operator_params(&args)).await,
            );
        }
        if let (true, Some((listener, upstream))) = (relayed == 1, relay) {
            let direct = aws_sdk_dynamodb::Client::from_conf(
                aws_sdk_dynamodb::config::Builder::from(
                    &aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await,
                )
                .endpoint_url(&upstream)
                .build(),
            );
            match cost::Relay::serve(listener, upstream) {
                Ok(relay) if selected(Bench::Scale) => {
                    progress("scale");
                    let params = scale::Params {
                        scenarios: scale_scenarios,
                        window: Duration::from_secs(args.scale_window),
                        relay,
                        direct,
                        heartbeat: Duration::from_millis(args.scale_heartbeat_ms),
                    };
                    rows.add(Bench::Scale, scale::run(&aws, &params).await);
                }
                Ok(relay) => {
                    progress("cost");
                    let params = cost::Params {
                        scenarios,
                        window: Duration::from_secs(args.cost_window),
                        settle: Duration::from_secs(args.cost_settle),
                        relay,
                        direct,
                        baselines,
                    };
                    rows.add(Bench::Cost, cost::run(&aws, &params).await);
                }
                Err(e) => {
                    let bench = if selected(Bench::Scale) {
                        Bench::Scale
                    } else {
                        Bench::Cost
                    };
                    rows.add(bench, vec![report::Row::failed("relay", &e)]);
                }
            }
        }
    }

    println!();
    print!("{}", report::render(&rows.rows));
    println!("{}", machine());
    if needs_aws {
        println!("{}", emulators(&args.kinesis_emulator, dynamodb.as_deref()));
    }
    let silent: Vec<String> = Bench::value_variants()
        .iter()
        .filter(|b| selected(**b) && !rows.produced.contains(b))
        .filter_map(|b| b.to_possible_value().map(|v| v.get_name().to_owned()))
        .collect();
    let (lines, passed) = report::verdict(&rows.rows, &silent);
    for line in lines {
        println!("{line}");
    }
    if passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The rows of the run, and which benchmarks contributed any.
#[derive(Default)]
struct Collected {
    rows: Vec<Row>,
    produced: Vec<Bench>,
}

impl Collected {
    fn add(&mut self, bench: Bench, rows: Vec<Row>) {
        if !rows.is_empty() {
            self.produced.push(bench);
        }
        self.rows.extend(rows);
    }
}
