//! Logging: human lines on a terminal, JSON lines otherwise; when stderr is the journal each
//! line carries its syslog priority. Dependencies log at WARN unless asked; `RUST_LOG`
//! overrides the configured level. Every line passes through secret redaction
//! (`secret::RedactingWriter`), whatever module or dependency logged it.

pub mod metrics;
pub mod progress;

use crate::settings::LogFormat;
use std::io::IsTerminal;
use std::io::Write;
use tracing::Level;
use tracing_subscriber::filter::{filter_fn, EnvFilter};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// Where log events go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Compact lines for a person at a terminal.
    Human,
    /// One JSON object a line, keys unique (a pipe, a file, a log shipper).
    Json,
    /// JSON lines on stderr connected to the journal, each prefixed with its syslog priority
    /// (`<3>` …, sd-daemon(3)), which journald strips and records as `PRIORITY`, so
    /// `journalctl -p err` works.
    Journald,
}

/// Pick the output. `auto` is human on a terminal, journald when systemd connected stderr
/// to the journal (`JOURNAL_STREAM` names stderr's device and inode, as systemd.exec(5)
/// says to check), JSON otherwise. An explicit `json` or `human` is taken as asked.
pub fn choose(
    format: LogFormat,
    stderr_is_terminal: bool,
    journal_stream: Option<&str>,
    stderr_dev_ino: Option<(u64, u64)>,
) -> Output {
    match format {
        LogFormat::Human => Output::Human,
        LogFormat::Json => Output::Json,
        LogFormat::Auto if stderr_is_terminal => Output::Human,
        LogFormat::Auto => {
            let journal = journal_stream
                .and_then(|v| v.split_once(':'))
                .and_then(|(d, i)| Some((d.parse::<u64>().ok()?, i.parse::<u64>().ok()?)));
            if journal.is_some() && journal == stderr_dev_ino {
                Output::Journald
            } else {
                Output::Json
            }
        }
    }
}

/// The filter for `log.level`: a bare level applies to tidemark only, dependencies stay at
/// WARN (sqlx's notices, the scheduler's state changes); a directive list such as
/// `"info,sqlx=debug"` is taken as written.
pub fn directives(level: &str) -> String {
    let level = level.trim();
    if level.is_empty() {
        "warn,tidemark=info".into()
    } else if level.contains('=') || level.contains(',') {
        level.to_owned()
    } else {
        format!("warn,tidemark={level}")
    }
}

/// Device and inode of stderr, to compare with `JOURNAL_STREAM`.
fn stderr_dev_ino() -> Option<(u64, u64)> {
    use std::os::fd::AsFd;
    use std::os::unix::fs::MetadataExt;
    let fd = std::io::stderr().as_fd().try_clone_to_owned().ok()?;
    let meta = std::fs::File::from(fd).metadata().ok()?;
    Some((meta.dev(), meta.ino()))
}

/// Whether the filter lets tidemark's DEBUG events through (the person asked for detail).
fn asks_for_debug(directives: &str) -> bool {
    directives.contains("debug") || directives.contains("trace")
}

/// A window's summary (an INFO event with a `window` field) while a progress bar is drawn:
/// hidden unless the filter asks for DEBUG, so a backfill's bar is not flooded.
fn hidden_under_bar(meta: &tracing::Metadata<'_>, verbose: bool) -> bool {
    !verbose
        && *meta.level() == Level::INFO
        && meta.fields().field("window").is_some()
        && progress::bar_active()
}

/// The output chosen by [`init`] (None before it ran).
static OUTPUT: std::sync::OnceLock<Output> = std::sync::OnceLock::new();

/// Whether log lines go to the journal: then a command's final error is logged as an
/// ERROR event (priority 3, found by `journalctl -p err`) instead of a plain stderr line.
pub fn to_journal() -> bool {
    OUTPUT.get() == Some(&Output::Journald)
}

/// Install the global subscriber. Logs go to stderr (or the journal); stdout is for command output.
pub fn init(format: LogFormat, level: &str) {
    let asked = std::env::var("RUST_LOG").ok().filter(|v| !v.is_empty());
    let wanted = asked.clone().unwrap_or_else(|| directives(level));
    let filter = EnvFilter::try_new(&wanted).unwrap_or_else(|_| EnvFilter::new(directives("info")));
    let verbose = asks_for_debug(&wanted);
    let output = choose(
        format,
        std::io::stderr().is_terminal(),
        std::env::var("JOURNAL_STREAM").ok().as_deref(),
        stderr_dev_ino(),
    );
    let registry = tracing_subscriber::registry().with(filter);
    let redacted = || crate::secret::RedactingWriter::new(progress::log_writer());
    let json = tracing_subscriber::fmt::layer()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(false);
    let result = match output {
        Output::Human => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .compact()
                    .with_writer(redacted)
                    .with_filter(filter_fn(move |m| !hidden_under_bar(m, verbose))),
            )
            .try_init(),
        Output::Json => registry.with(json.with_writer(redacted)).try_init(),
        Output::Journald => registry
            .with(json.with_ansi(false).with_writer(Prioritized))
            .try_init(),
    };
    if result.is_ok() {
        let _ = OUTPUT.set(output);
    }
}

/// The syslog priority of a level: ERROR 3, WARN 4, INFO 6, DEBUG and TRACE 7.
pub fn priority(level: &Level) -> u8 {
    match *level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

/// `MakeWriter` for stderr connected to the journal: each event's line starts with its
/// priority, then passes through secret redaction like any other log line.
struct Prioritized;

impl<'a> MakeWriter<'a> for Prioritized {
    type Writer = PriorityWriter<crate::secret::RedactingWriter<progress::LogWriter>>;

    fn make_writer(&'a self) -> Self::Writer {
        PriorityWriter::new(
            6,
            crate::secret::RedactingWriter::new(progress::log_writer()),
        )
    }

    fn make_writer_for(&'a self, meta: &tracing::Metadata<'_>) -> Self::Writer {
        PriorityWriter::new(
            priority(meta.level()),
            crate::secret::RedactingWriter::new(progress::log_writer()),
        )
    }
}

/// Writes `<N>` before the first bytes of one event's line.
pub struct PriorityWriter<W: Write> {
    prefix: Option<u8>,
    inner: W,
}

impl<W: Write> PriorityWriter<W> {
    pub fn new(priority: u8, inner: W) -> Self {
        Self {
            prefix: Some(priority),
            inner,
        }
    }
}

impl<W: Write> Write for PriorityWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(p) = self.prefix.take() {
            write!(self.inner, "<{p}>")?;
        }
        self.inner.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dependencies_stay_at_warn_unless_asked() {
        assert_eq!(directives("info"), "warn,tidemark=info");
        assert_eq!(directives(" debug "), "warn,tidemark=debug");
        assert_eq!(directives(""), "warn,tidemark=info");
        assert_eq!(directives("info,sqlx=debug"), "info,sqlx=debug");
        assert_eq!(directives("tidemark=trace"), "tidemark=trace");
        for d in ["warn,tidemark=info", "info,sqlx=debug"] {
            assert!(EnvFilter::try_new(d).is_ok(), "{d}");
        }
    }

    #[test]
    fn auto_picks_the_journal_only_when_stderr_is_the_journal_stream() {
        let me = Some((8, 123));
        assert_eq!(
            choose(LogFormat::Auto, false, Some("8:123"), me),
            Output::Journald
        );
        // JOURNAL_STREAM inherited by a child whose stderr was redirected elsewhere.
        assert_eq!(
            choose(LogFormat::Auto, false, Some("8:999"), me),
            Output::Json
        );
        assert_eq!(choose(LogFormat::Auto, false, None, me), Output::Json);
        assert_eq!(
            choose(LogFormat::Auto, false, Some("garbage"), me),
            Output::Json
        );
        assert_eq!(
            choose(LogFormat::Auto, true, Some("8:123"), me),
            Output::Human
        );
        assert_eq!(
            choose(LogFormat::Json, false, Some("8:123"), me),
            Output::Json
        );
        assert_eq!(choose(LogFormat::Human, false, None, None), Output::Human);
    }

    #[test]
    fn journal_lines_start_with_their_priority() {
        assert_eq!(priority(&Level::ERROR), 3);
        assert_eq!(priority(&Level::WARN), 4);
        assert_eq!(priority(&Level::INFO), 6);
        assert_eq!(priority(&Level::DEBUG), 7);
        let mut out = Vec::new();
        {
            let mut w = PriorityWriter::new(3, &mut out);
            w.write_all(b"{\"level\":\"ERROR\"").unwrap();
            w.write_all(b"}\n").unwrap();
        }
        assert_eq!(out, b"<3>{\"level\":\"ERROR\"}\n");
    }
}
