//! Window planning: pure logic, no I/O, clock injected. Windows are half-open
//! `[from, to)` in UTC with millisecond precision (BSON dates are milliseconds).

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// A half-open `[from, to)` interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Window {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
}

impl Window {
    pub fn new(from: DateTime<Utc>, to: DateTime<Utc>) -> Self {
        debug_assert!(from < to, "empty window {from}..{to}");
        Self { from, to }
    }

    pub fn contains(&self, t: DateTime<Utc>) -> bool {
        self.from <= t && t < self.to
    }
}

impl std::fmt::Display for Window {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "[{}, {})", fmt_ts(self.from), fmt_ts(self.to))
    }
}

/// RFC 3339 with milliseconds and `Z`.
pub fn fmt_ts(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// Drop sub-millisecond precision, which BSON cannot hold.
pub fn to_millis(t: DateTime<Utc>) -> DateTime<Utc> {
    t.duration_trunc(TimeDelta::milliseconds(1)).unwrap_or(t)
}

fn delta(d: Duration) -> TimeDelta {
    TimeDelta::from_std(d).unwrap_or(TimeDelta::MAX)
}

/// What the checkpoint table says about one lane.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LaneState {
    /// Everything strictly before this has been read (the end of the last finished window).
    pub watermark: Option<DateTime<Utc>>,
    /// A window that was started and not finished (its position is kept by the caller).
    pub open: Option<Window>,
}

/// Knobs for planning a catch-up.
#[derive(Debug, Clone, Copy)]
pub struct PlanInput {
    /// Initial watermark of a lane that never ran.
    pub start: DateTime<Utc>,
    pub overlap: Duration,
    pub max_window: Duration,
    /// Source server clock at planning time.
    pub source_now: DateTime<Utc>,
    pub settle: Duration,
    /// Optional user cap (`--until`).
    pub until: Option<DateTime<Utc>>,
}

impl PlanInput {
    /// The newest instant a window may reach: `min(source_now - settle, until)`.
    pub fn upper(&self) -> DateTime<Utc> {
        let settled = self.source_now - delta(self.settle);
        to_millis(match self.until {
            Some(u) if u < settled => u,
            _ => settled,
        })
    }
}

/// The windows a catch-up run goes through, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// An unfinished window from an earlier run, resumed from its saved position.
    pub resume: Option<Window>,
    /// New windows, contiguous, each at most `max_window` long.
    pub fresh: Vec<Window>,
    /// Where new windows start (the end of `resume`, or the watermark minus the overlap).
    pub fresh_from: DateTime<Utc>,
    /// Where the catch-up stops.
    pub upper: DateTime<Utc>,
}

/// Plan a catch-up from `state` up to `input.upper()`.
pub fn plan(state: &LaneState, input: &PlanInput) -> Plan {
    let upper = input.upper();
    let (resume, from) = match (&state.open, state.watermark) {
        (Some(w), _) => (Some(*w), w.to),
        (None, Some(wm)) => (None, (wm - delta(input.overlap)).max(input.start.min(wm))),
        (None, None) => (None, to_millis(input.start)),
    };
    Plan {
        resume,
        fresh: chunks(from, upper, input.max_window),
        fresh_from: from,
        upper,
    }
}

/// The next window of a catch-up that is at `cursor`, given the time of the first source
/// document at or after `cursor` (found with one indexed query). An empty stretch before
/// `first` is folded into the window, so a long quiet period costs one window, not thousands.
pub fn next(
    cursor: DateTime<Utc>,
    first: Option<DateTime<Utc>>,
    max_window: Duration,
    upper: DateTime<Utc>,
) -> Option<Window> {
    if cursor >= upper {
        return None;
    }
    let start = match first {
        None => return Some(Window::new(cursor, upper)),
        Some(t) => to_millis(t).max(cursor),
    };
    let to = start
        .checked_add_signed(delta(max_window))
        .map_or(upper, |t| t.min(upper));
    (to > cursor).then(|| Window::new(cursor, to))
}

/// Cut `[from, to)` into contiguous windows of at most `size`.
pub fn chunks(from: DateTime<Utc>, to: DateTime<Utc>, size: Duration) -> Vec<Window> {
    let step = delta(size).max(TimeDelta::milliseconds(1));
    let mut out = Vec::new();
    let mut cur = from;
    while cur < to {
        let next = cur.checked_add_signed(step).map_or(to, |n| n.min(to));
        out.push(Window::new(cur, next));
        cur = next;
    }
    out
}

/// How far behind the lane is: `source_now - watermark` (None if it never ran).
pub fn lag(watermark: Option<DateTime<Utc>>, source_now: DateTime<Utc>) -> Option<Duration> {
    watermark.map(|w| (source_now - w).to_std().unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn t(h: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2020, 1, 1, h, 0, 0).unwrap()
    }

    fn input(now: DateTime<Utc>) -> PlanInput {
        PlanInput {
            start: t(0),
            overlap: Duration::from_secs(3600),
            max_window: Duration::from_secs(6 * 3600),
            source_now: now,
            settle: Duration::from_secs(300),
            until: None,
        }
    }

    #[test]
    fn first_run_starts_at_start_and_stops_at_settled_now() {
        let p = plan(&LaneState::default(), &input(t(13)));
        let upper = t(13) - TimeDelta::minutes(5);
        assert_eq!(p.resume, None);
        assert_eq!(
            p.fresh,
            vec![
                Window::new(t(0), t(6)),
                Window::new(t(6), t(12)),
                Window::new(t(12), upper)
            ]
        );
    }

    #[test]
    fn later_run_rereads_the_overlap() {
        let state = LaneState {
            watermark: Some(t(10)),
            open: None,
        };
        let p = plan(&state, &input(t(12)));
        assert_eq!(p.fresh.first().unwrap().from, t(9));
    }

    #[test]
    fn open_window_is_resumed_without_overlap_then_continues_contiguously() {
        let open = Window::new(t(2), t(8));
        let state = LaneState {
            watermark: Some(t(2)),
            open: Some(open),
        };
        let p = plan(&state, &input(t(10)));
        assert_eq!(p.resume, Some(open));
        assert_eq!(p.fresh[0].from, t(8));
    }

    #[test]
    fn nothing_to_do_when_caught_up_and_until_caps() {
        let state = LaneState {
            watermark: Some(t(12)),
            open: None,
        };
        let mut i = input(t(12));
        i.overlap = Duration::ZERO;
        assert!(plan(&state, &i).fresh.is_empty());
        let mut i = input(t(20));
        i.until = Some(t(3));
        let p = plan(&LaneState::default(), &i);
        assert_eq!(p.fresh.last().unwrap().to, t(3));
    }

    #[test]
    fn next_window_skips_quiet_stretches() {
        let six = Duration::from_secs(6 * 3600);
        assert_eq!(next(t(0), None, six, t(20)), Some(Window::new(t(0), t(20))));
        assert_eq!(
            next(t(0), Some(t(10)), six, t(20)),
            Some(Window::new(t(0), t(16)))
        );
        assert_eq!(
            next(t(0), Some(t(1)), six, t(20)),
            Some(Window::new(t(0), t(7)))
        );
        assert_eq!(next(t(20), Some(t(1)), six, t(20)), None);
    }

    #[test]
    fn chunks_are_contiguous_and_cover_the_range() {
        let c = chunks(t(0), t(5), Duration::from_secs(2 * 3600));
        assert_eq!(c.len(), 3);
        assert!(c.windows(2).all(|w| w[0].to == w[1].from));
        assert_eq!((c[0].from, c[2].to), (t(0), t(5)));
    }
}
