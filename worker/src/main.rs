//! `kcg-worker`: one member of a Kinesis consumer group.
//!
//! - `kcg-worker run --config FILE`: join the group and consume until SIGTERM/SIGINT;
//!   `KCG__SECTION__FIELD` environment variables override the file.
//! - `kcg-worker create-table --table T`: create the state-store table.
//!
//! Logs go to stderr (stdout belongs to the stdout sink). Exit codes: 0 after a graceful
//! shutdown, 2 for an unusable configuration, 1 for anything else.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use aws_config::{BehaviorVersion, Region};
use clap::{Parser, Subcommand};
use kcg_worker::config::{ConfigOrigin, ORIGIN_ENV, WorkerConfig};
use kcg_worker::delivery::build_handler;
use kcg_worker::engine::{self, EngineError, EngineOptions};
use kcg_worker::health::Health;
use kcg_worker::metrics::Metrics;
use kcg_worker::runtime;
use kcg_worker::server;
use kcg_worker::store::StateStore;
use kcg_worker::telemetry::{self, LogFormat};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// Command line of `kcg-worker`.
#[derive(Debug, Parser)]
#[command(
    name = "kcg-worker",
    version,
    about = "Kinesis consumer group worker (kcg)"
)]
struct Cli {
    /// Log format.
    #[arg(long, env = "KCG_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    /// Tokio runtime threads. One is enough for most workers: see the `runtime` module.
    #[arg(long, env = "KCG_WORKER_THREADS", default_value_t = runtime::DEFAULT_WORKER_THREADS, global = true)]
    worker_threads: usize,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Join the consumer group described by the config file and consume until stopped.
    ///
    /// Any config field can be overridden from the environment: `KCG__` followed by the
    /// field path in upper snake case, `__` between levels, for example
    /// `KCG__TUNING__POLL_INTERVAL=500ms`, `KCG__STATE_STORE__TABLE=other`,
    /// `KCG__GROUP=ns/name`. Overrides win over the file and are checked like it. Quote a
    /// value that looks like a number to keep it a string: `KCG__STATE_STORE__TABLE='"123"'`.
    /// An unusable config exits with code 2 and a message naming the field.
    Run {
        /// The worker config (YAML), as the operator renders it into the ConfigMap;
        /// `KCG__...` environment variables override its fields.
        #[arg(long, env = "KCG_CONFIG")]
        config: String,
        /// Who wrote the config file: `user` (unknown fields are errors) or `operator` (the
        /// operator sets this in the pods it renders; unknown fields, which a newer operator
        /// may write, are logged as warnings). `KCG__` overrides are always checked strictly.
        #[arg(long, env = ORIGIN_ENV, value_enum, default_value_t = ConfigOrigin::User)]
        config_origin: ConfigOrigin,
        /// Base of this client's id (a random suffix is added); default: POD_NAME, else
        /// the host name.
        #[arg(long, env = "KCG_CLIENT_ID")]
        client_id: Option<String>,
        /// Address of the /metrics, /healthz and /readyz server.
        #[arg(long, env = "KCG_LISTEN", default_value = server::DEFAULT_LISTEN)]
        listen: SocketAddr,
        /// Create the state-store table when it does not exist (same as
        /// `stateStore.create: true`).
        #[arg(long)]
        create_table: bool,
    },
    /// Create the DynamoDB state-store table (idempotent).
    CreateTable {
        /// Table name.
        #[arg(long)]
        table: String,
        /// Region; default: the standard AWS configuration (AWS_REGION, profile).
        #[arg(long)]
        region: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    let rt = match runtime::build(cli.worker_threads) {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "cannot start the Tokio runtime");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        match cli.command {
            Command::Run {
                config,
                config_origin,
                client_id,
                listen,
                create_table,
            } => run(&config, config_origin, client_id, listen, create_table).await,
            Command::CreateTable { table, region } => create(table, region).await,
        }
    })
}

/// Exit code for a configuration the user must fix.
const EXIT_CONFIG: u8 = 2;

async fn run(
    path: &str,
    origin: ConfigOrigin,
    client_id: Option<String>,
    listen: SocketAddr,
    create_table: bool,
) -> ExitCode {
    let mut config = match WorkerConfig::load(path, origin) {
        Ok(loaded) => {
            for field in &loaded.ignored {
                warn!(
                    field = %field.path,
                    "the operator's config holds a field this worker version does not know; ignoring it (upgrade the worker image to use it)"
                );
            }
            loaded.config
        }
        Err(e) => {
            error!(error = %e, "cannot start");
            eprintln!("kcg-worker: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if create_table {
        config.state_store.create = true;
    }
    let handler = match build_handler(&config.delivery) {
        Ok(h) => h,
        Err(e) => {
            error!(error = %e, "cannot build the delivery sink");
            eprintln!("kcg-worker: delivery: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let metrics = Arc::new(Metrics::new());
    // The engine ticks every heartbeat interval; liveness fails only after several missed.
    let stall_after = (config.tuning.client_timeout * 3).max(Duration::from_secs(30));
    let health = Arc::new(Health::new(stall_after));
    let listener = match server::bind(listen).await {
        Ok(l) => l,
        Err(e) => {
            error!(error = %e, "cannot start");
            eprintln!("kcg-worker: {e}");
            return ExitCode::FAILURE;
        }
    };

    let shutdown = CancellationToken::new();
    // Installed before anything runs: without them the worker could not drain on SIGTERM.
    let term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    tokio::spawn(watch_signals(term, int, shutdown.clone()));
    let server_stop = CancellationToken::new();
    let server = tokio::spawn(server::serve(
        listener,
        metrics.clone(),
        health.clone(),
        server_stop.clone(),
    ));
    info!(group = %config.group, streams = config.streams.len(), %listen, "starting");

    let opts = EngineOptions {
        client_id,
        pod: std::env::var("POD_NAME").ok(),
    };
    let result = engine::run(config, opts, handler, metrics, health, shutdown).await;
    // Keep /metrics up until the engine finished its shutdown, then stop the server.
    server_stop.cancel();
    match tokio::time::timeout(Duration::from_secs(5), server).await {
        Ok(Ok(Err(e))) => warn!(error = %e, "metrics server failed"),
        Ok(Err(e)) => warn!(error = %e, "metrics server task failed"),
        Ok(Ok(Ok(()))) | Err(_) => {}
    }
    match result {
        Ok(()) => {
            info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e @ EngineError::Config(_)) => {
            error!(error = %e, "cannot start");
            eprintln!("kcg-worker: {e}");
            ExitCode::from(EXIT_CONFIG)
        }
        Err(e) => {
            error!(error = %e, "engine failed");
            eprintln!("kcg-worker: {e}");
            ExitCode::FAILURE
        }
    }
}

/// First SIGTERM/SIGINT: graceful shutdown. A second one: exit at once.
async fn watch_signals(mut term: Signal, mut int: Signal, shutdown: CancellationToken) {
    for round in 0..2 {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        if round == 0 {
            info!(
                signal = name,
                "shutting down: finishing batches, checkpointing, releasing leases"
            );
            shutdown.cancel();
        } else {
            warn!(
                signal = name,
                "second signal: exiting without a graceful shutdown"
            );
            std::process::exit(130);
        }
    }
}

async fn create(table: String, region: Option<String>) -> ExitCode {
    let mut loader = aws_config::defaults(BehaviorVersion::latest());
    if let Some(r) = region {
        loader = loader.region(Region::new(r));
    }
    let conf = loader.load().await;
    let store = StateStore::new(aws_sdk_dynamodb::Client::new(&conf), table.clone());
    match store.create_table().await {
        Ok(()) => {
            info!(%table, "state-store table ready");
            ExitCode::SUCCESS
        }
        Err(e) => {
            error!(%table, error = %e, "create-table failed");
            eprintln!("kcg-worker: create-table {table}: {e}");
            ExitCode::FAILURE
        }
    }
}
