//! Progress display for long commands: an indicatif bar on a terminal, and a stderr
//! writer for the logger that lifts the bar out of the way while a log line prints,
//! so log lines go above the bar and never tear it. While a bar is drawn, the logger
//! hides per-window summaries unless asked for DEBUG ([`crate::telemetry`]).

use indicatif::{ProgressBar, ProgressState, ProgressStyle};
use std::io::{self, Write};
use std::sync::RwLock;

/// The bar being drawn, if any. A lock because the logger writes from any thread.
static ACTIVE: RwLock<Option<ProgressBar>> = RwLock::new(None);

/// Make `bar` the one log lines print around (None: stop).
pub fn set_active(bar: Option<ProgressBar>) {
    if let Ok(mut a) = ACTIVE.write() {
        *a = bar;
    }
}

/// Whether a progress bar is being drawn now.
pub fn bar_active() -> bool {
    ACTIVE.read().map(|a| a.is_some()).unwrap_or(false)
}

/// A documents bar: position/length in documents, the rate rounded to whole documents per
/// second, the ETA, and a message (e.g. chunks done).
pub fn docs_bar(len: u64, position: u64) -> ProgressBar {
    let b = ProgressBar::new(len.max(position));
    b.set_style(docs_style());
    b.set_position(position);
    b.reset_eta();
    b
}

fn docs_style() -> ProgressStyle {
    ProgressStyle::with_template(
        "{spinner} {elapsed_precise} [{wide_bar}] {human_pos}/{human_len} docs  {rate}  ETA {eta}  {msg}",
    )
    .expect("valid template")
    .with_key("rate", |s: &ProgressState, w: &mut dyn std::fmt::Write| {
        let _ = write!(w, "{}", rate(s.per_sec()));
    })
}

/// A rate for people: whole documents per second, with thousands separated.
pub fn rate(per_sec: f64) -> String {
    let n = if per_sec.is_finite() && per_sec > 0.0 {
        per_sec.round() as u64
    } else {
        0
    };
    format!("{} docs/s", indicatif::HumanCount(n))
}

/// The logger's writer: stderr, with the active bar suspended during each write.
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let bar = ACTIVE.read().ok().and_then(|a| a.clone());
        match bar {
            Some(b) => b.suspend(|| io::stderr().write(buf)),
            None => io::stderr().write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

/// `MakeWriter` for tracing-subscriber.
pub fn log_writer() -> LogWriter {
    LogWriter
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_whole_documents_per_second() {
        assert_eq!(rate(1234.5678), "1,235 docs/s");
        assert_eq!(rate(0.4), "0 docs/s");
        assert_eq!(rate(f64::NAN), "0 docs/s");
        assert_eq!(rate(f64::INFINITY), "0 docs/s");
    }

    #[test]
    fn bar_active_follows_the_drawn_bar() {
        let b = ProgressBar::with_draw_target(Some(1000), indicatif::ProgressDrawTarget::hidden());
        assert!(!bar_active());
        set_active(Some(b));
        assert!(bar_active());
        set_active(None);
        assert!(!bar_active());
    }
}
