//! Schedule and listen-address syntax of `[daemon]`, checked when settings load and used
//! by the daemon: base code, so settings need not depend on the daemon.

use anyhow::{anyhow, Result};
use chrono::{DateTime, Utc};
use croner::parser::{CronParser, Seconds};
use croner::Cron;
use std::net::SocketAddr;

/// `daemon.schedule` in the six-field form the scheduler takes (seconds first): the
/// five-field form every crontab uses (`30 2 * * *`) fires at second 0; six fields (and
/// anything else, left for the parser to judge) pass unchanged.
pub fn with_seconds(expr: &str) -> String {
    if expr.split_whitespace().count() == 5 {
        format!("0 {}", expr.trim())
    } else {
        expr.to_owned()
    }
}

/// Parse a schedule exactly as tokio-cron-scheduler does (seconds required, day-of-month
/// and day-of-week both required to match), so what `check-config` accepts is what runs.
/// Five fields are read as a crontab line ([`with_seconds`]).
pub fn parse_schedule(expr: &str) -> Result<Cron> {
    CronParser::builder()
        .seconds(Seconds::Required)
        .dom_and_dow(true)
        .build()
        .parse(&with_seconds(expr))
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
    fn five_field_cron_fires_at_second_zero_and_six_fields_still_work() {
        let after: DateTime<Utc> = "2026-12-06T00:00:00Z".parse().unwrap();
        let five = upcoming("30 2 * * *", after, 2).unwrap();
        let six = upcoming("0 30 2 * * *", after, 2).unwrap();
        assert_eq!(five, six);
        assert_eq!(five[0].to_rfc3339(), "2026-12-06T02:30:00+00:00");
        assert_eq!(
            upcoming("*/15 * * * *", after, 2).unwrap()[1].to_rfc3339(),
            "2026-12-06T00:30:00+00:00"
        );
        assert_eq!(
            upcoming("10 */15 * * * *", after, 1).unwrap()[0].to_rfc3339(),
            "2026-12-06T00:00:10+00:00"
        );
        assert!(parse_schedule("30 2 * *").is_err());
        assert!(parse_schedule("61 2 * * *").is_err());
    }

    #[test]
    fn listen_addr_defaults_to_loopback() {
        assert_eq!(listen_addr("9464").unwrap().to_string(), "127.0.0.1:9464");
        assert_eq!(listen_addr("0.0.0.0:1").unwrap().to_string(), "0.0.0.0:1");
        assert!(listen_addr("localhost").is_err());
    }
}
