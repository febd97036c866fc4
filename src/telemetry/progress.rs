//! Progress display for long commands: an indicatif bar on a terminal, and a stderr
//! writer for the logger that lifts the bar out of the way while a log line prints,
//! so bar and log lines never tear each other.

use indicatif::ProgressBar;
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
