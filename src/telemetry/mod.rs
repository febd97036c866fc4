//! Logging: human lines on a terminal, JSON lines otherwise (journald-friendly).
//! `RUST_LOG` overrides the configured level. Every line passes through secret redaction
//! (`secret::RedactingWriter`), whatever module or dependency logged it.

pub mod metrics;
pub mod progress;

use crate::settings::LogFormat;
use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;

/// Install the global subscriber. Logs go to stderr; stdout is for command output.
pub fn init(format: LogFormat, level: &str) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Human => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| {
            crate::secret::RedactingWriter::new(crate::telemetry::progress::log_writer())
        });
    let _ = if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init()
    } else {
        builder.compact().try_init()
    };
}
