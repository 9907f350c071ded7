//! Logging setup: `tracing` to STDERR (stdout belongs to the stdout sink), filtered by
//! `RUST_LOG` (default `info`), as JSON or human-readable text.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Log line format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One JSON object per line, with span fields (group, client, stream, shard).
    Json,
    /// Human-readable lines.
    #[default]
    Text,
}

/// Installs the global subscriber. Call once, at startup.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colors only for a person at a terminal, never in collected pod logs.
        .with_ansi(std::io::stderr().is_terminal());
    // A second init (tests) is not an error worth failing over.
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
