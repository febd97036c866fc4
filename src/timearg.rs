//! Parsing of time arguments given by people: RFC 3339 timestamps, plain dates
//! (midnight UTC), `now`, and relative forms such as `-7d` or `-36h` (from now).

use anyhow::{anyhow, bail, Result};
use chrono::{DateTime, NaiveDate, TimeZone, Utc};
use serde::{Deserialize, Deserializer};

/// Parse `text` as an instant, relative forms counted back from `now`.
pub fn parse_instant(text: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>> {
    let t = text.trim();
    if t.eq_ignore_ascii_case("now") {
        return Ok(now);
    }
    if let Some(rel) = t.strip_prefix('-') {
        let d = humantime::parse_duration(rel)
            .map_err(|e| anyhow!("time `{text}`: {e}; write a relative time like -7d or -36h"))?;
        let d =
            chrono::Duration::from_std(d).map_err(|_| anyhow!("time `{text}` is too far back"))?;
        return now
            .checked_sub_signed(d)
            .ok_or_else(|| anyhow!("time `{text}` is too far back"));
    }
    if let Ok(dt) = DateTime::parse_from_rfc3339(t) {
        return Ok(dt.with_timezone(&Utc));
    }
    if let Ok(d) = NaiveDate::parse_from_str(t, "%Y-%m-%d") {
        let midnight = d.and_hms_opt(0, 0, 0).expect("midnight exists");
        return Ok(Utc.from_utc_datetime(&midnight));
    }
    bail!(
        "cannot read time `{text}`; use RFC 3339 (2019-01-01T00:00:00Z), a date (2019-01-01), \
         `now`, or a relative time (-7d)"
    )
}

/// A `[from, to)` range given on the command line; reversed or empty is an error.
pub fn parse_range(
    from: &str,
    to: &str,
    now: DateTime<Utc>,
) -> Result<(DateTime<Utc>, DateTime<Utc>)> {
    let f = parse_instant(from, now)?;
    let t = parse_instant(to, now)?;
    if f >= t {
        bail!("the range --from {from} --to {to} is empty or reversed ({f} >= {t}); --from must be earlier than --to");
    }
    Ok((f, t))
}

/// Serde helper for instants in settings files.
pub fn deserialize_instant<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<DateTime<Utc>, D::Error> {
    let s = String::deserialize(d)?;
    parse_instant(&s, Utc::now()).map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 21, 12, 0, 0).unwrap()
    }

    #[test]
    fn parses_every_accepted_form() {
        assert_eq!(
            parse_instant("2019-01-01", now()).unwrap(),
            Utc.with_ymd_and_hms(2019, 1, 1, 0, 0, 0).unwrap()
        );
        assert_eq!(
            parse_instant("2019-01-01T05:00:00+02:00", now()).unwrap(),
            Utc.with_ymd_and_hms(2019, 1, 1, 3, 0, 0).unwrap()
        );
        assert_eq!(
            parse_instant("-7d", now()).unwrap(),
            Utc.with_ymd_and_hms(2026, 11, 14, 12, 0, 0).unwrap()
        );
        assert_eq!(parse_instant("now", now()).unwrap(), now());
    }

    #[test]
    fn rejects_garbage_and_reversed_ranges() {
        assert!(parse_instant("yesterday-ish", now()).is_err());
        let err = parse_range("2020-02-01", "2020-01-01", now())
            .unwrap_err()
            .to_string();
        assert!(err.contains("reversed"), "{err}");
        assert!(parse_range("2020-01-01", "2020-01-01", now()).is_err());
    }
}
