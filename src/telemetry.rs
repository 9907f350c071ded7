//! Logging setup: JSON (for clusters) or text (for terminals) tracing output with an
//! `RUST_LOG`-style env filter.

use tracing_subscriber::EnvFilter;

/// Log output format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line, with span fields (group, stream, shard, client).
    #[default]
    Json,
    /// Human-readable lines.
    Text,
}

/// Installs the global subscriber. `RUST_LOG` overrides the default filter (`info`).
/// Called once at startup; a second call (tests) is ignored.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
