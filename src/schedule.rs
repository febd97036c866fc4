//! Schedule and listen-address syntax of `[daemon]`, checked when settings load and used
//! by the daemon: base code, so settings need not depend on the daemon.

use anyhow::{anyhow, Result};
use chrono::{DateTime, Utc};
use croner::parser::{CronParser, Seconds};
use croner::Cron;
use std::net::SocketAddr;

/// Parse a schedule exactly as tokio-cron-scheduler does (seconds required, day-of-month
/// and day-of-week both required to match), so what `check-config` accepts is what runs.
pub fn parse_schedule(expr: &str) -> Result<Cron> {
    CronParser::builder()
        .seconds(Seconds::Required)
        .dom_and_dow(true)
        .build()
        .parse(expr)
        .map_err(|e| anyhow!("{e}"))
}

/// The next `n` times a schedule fires strictly after `after` (UTC).
pub fn upcoming(expr: &str, after: DateTime<Utc>, n: usize) -> Result<Vec<DateTime<Utc>>> {
    Ok(parse_schedule(expr)?.iter_after(after).take(n).collect())
}

/// `daemon.metrics_listen`: `PORT` (binds 127.0.0.1) or `ADDR:PORT`.
pub fn listen_addr(text: &str) -> Result<SocketAddr> {
    let t = text.trim();
    if let Ok(port) = t.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    t.parse().map_err(|_| {
        anyhow!(
            "daemon.metrics_listen = {text:?} is not PORT or ADDR:PORT; use e.g. \"9464\" or \"127.0.0.1:9464\", or \"\" for off"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addr_defaults_to_loopback() {
        assert_eq!(listen_addr("9464").unwrap().to_string(), "127.0.0.1:9464");
        assert_eq!(listen_addr("0.0.0.0:1").unwrap().to_string(), "0.0.0.0:1");
        assert!(listen_addr("localhost").is_err());
    }
}
