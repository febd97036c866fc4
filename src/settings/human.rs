//! Durations in settings, read and written in the form people write them: `"365d"`,
//! `"1h 30m"`, `"250ms"` (humantime's syntax). Written by hand because humantime's own
//! formatter counts in years of 365.25 days and months of 30.44 days, so `"365d"` comes
//! back as `"11months 30days 4h 32m 48s"`.

use serde::{Deserializer, Serializer};
use std::time::Duration;

/// `d`, largest unit first, only the units that are not zero (`"0s"` for zero); humantime
/// reads it back to the same duration.
pub fn fmt_duration(d: Duration) -> String {
    let secs = d.as_secs();
    let nanos = d.subsec_nanos();
    let parts = [
        (secs / 86_400, "d"),
        (secs % 86_400 / 3_600, "h"),
        (secs % 3_600 / 60, "m"),
        (secs % 60, "s"),
        (u64::from(nanos / 1_000_000), "ms"),
        (u64::from(nanos % 1_000_000 / 1_000), "us"),
        (u64::from(nanos % 1_000), "ns"),
    ];
    let text: Vec<String> = parts
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, unit)| format!("{n}{unit}"))
        .collect();
    if text.is_empty() {
        "0s".into()
    } else {
        text.join(" ")
    }
}

/// `#[serde(with = "human")]` for a `Duration` setting.
pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&fmt_duration(*d))
}

/// Reads what humantime reads (`"5m"`, `"1h 30m"`, `"365d"`).
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    humantime_serde::deserialize(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_back_to_themselves() {
        for (secs, nanos, text) in [
            (31_536_000, 0, "365d"),
            (300, 0, "5m"),
            (5_400, 0, "1h 30m"),
            (0, 250_000_000, "250ms"),
            (0, 0, "0s"),
            (90_061, 1_000, "1d 1h 1m 1s 1us"),
        ] {
            let d = Duration::new(secs, nanos);
            assert_eq!(fmt_duration(d), text);
            assert_eq!(humantime::parse_duration(text).unwrap(), d, "{text}");
        }
    }
}
