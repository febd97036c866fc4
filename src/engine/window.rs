//! Window planning: pure logic, no I/O, clock injected. Windows are half-open
//! `[from, to)` in UTC with millisecond precision (BSON dates are milliseconds).

use chrono::{DateTime, TimeDelta, Utc};
use futures::{StreamExt, TryStreamExt};
use std::time::Duration;

pub use crate::span::{fmt_ts, to_millis, ChunkBy, LaneState, Window, DEFAULT_CHUNK_DOCS};

fn delta(d: Duration) -> TimeDelta {
    TimeDelta::from_std(d).unwrap_or(TimeDelta::MAX)
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

/// The most parts one range is cut into per counting round of [`chunks_by_count`].
const MAX_PARTS: i64 = 64;

/// Counts [`chunks_by_count`] has in flight at once: each costs a round trip and a fixed
/// ~2 ms on the server besides its share of the index, which overlap.
const COUNTS_AT_ONCE: usize = 8;

/// Cut `[from, to)` into contiguous windows of at most about `target` documents each, asking
/// `count` how many documents a window holds (an indexed count per range in practice).
///
/// The range is cut into 64 equal-width parts and each is counted; a part holding more than
/// `target` is cut again into parts, about two per `target` documents it holds (at most 64),
/// each counted (the last one by subtraction), and so on, so dense stretches get narrow chunks and sparse
/// ones wide chunks. A part narrower than 2 ms is not cut (documents sharing one instant
/// cannot be split). Adjacent parts are then merged while together they hold at most
/// `target`, so years of sparse data become a few chunks. Each counting round costs about
/// one read of the range's index keys; evenly spread data needs one round. The parts of a
/// round are counted [`COUNTS_AT_ONCE`] at a time (on a loaded 2-core machine 64 counts of
/// 180,000 documents took 1.1-1.4 s eight at a time, 2.8-5.9 s one after another:
/// BENCHMARKS.md, session 18).
///
/// Returns the windows with the counts seen while planning. The counts only guide the cut:
/// documents written meanwhile make a chunk larger than planned, never lose a document,
/// since the windows always cover `[from, to)` exactly.
pub async fn chunks_by_count<F, Fut>(
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    target: u64,
    mut count: F,
) -> anyhow::Result<Vec<(Window, u64)>>
where
    F: FnMut(Window) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<u64>>,
{
    let target = target.max(1);
    let mut out: Vec<(Window, u64)> = Vec::new();
    if from >= to {
        return Ok(out);
    }
    let whole = Window::new(from, to);
    // The whole range is not counted: its first cut into MAX_PARTS parts is, so planning
    // evenly spread data reads the range's index once (a count costs about what reading
    // the documents costs on some servers: BENCHMARKS.md, sixteenth round).
    // Depth first, left to right, so the leaves come out in time order.
    let mut stack: Vec<(Window, Option<u64>)> = vec![(whole, None)];
    while let Some((w, n)) = stack.pop() {
        let (lo, hi) = (w.from.timestamp_millis(), w.to.timestamp_millis());
        if let Some(n) = n.filter(|&n| n <= target || hi - lo < 2) {
            match out.last_mut() {
                Some(last) if last.1 + n <= target => {
                    last.0.to = w.to;
                    last.1 += n;
                }
                _ => out.push((w, n)),
            }
            continue;
        }
        let want = n
            .map_or(MAX_PARTS as u64, |n| (2 * n).div_ceil(target))
            .clamp(2, MAX_PARTS as u64) as i64;
        let parts = want.min(hi - lo).max(1);
        let mut bounds: Vec<i64> = (0..parts).map(|i| lo + (hi - lo) * i / parts).collect();
        bounds.push(hi);
        bounds.dedup();
        let parts: Vec<Window> = bounds
            .windows(2)
            .map(|p| Window::new(at_ms(p[0]), at_ms(p[1])))
            .collect();
        // A part whose parent was counted is counted by subtraction when it is the last.
        let asked = parts.len() - usize::from(n.is_some());
        let mut counts: Vec<u64> = futures::stream::iter(parts[..asked].iter().map(|&p| count(p)))
            .buffered(COUNTS_AT_ONCE)
            .try_collect()
            .await?;
        if let Some(n) = n {
            counts.push(n.saturating_sub(counts.iter().sum()));
        }
        stack.extend(
            parts
                .into_iter()
                .zip(counts)
                .map(|(p, c)| (p, Some(c)))
                .rev(),
        );
    }
    Ok(out)
}

fn at_ms(v: i64) -> DateTime<Utc> {
    DateTime::<Utc>::from_timestamp_millis(v).unwrap_or(DateTime::<Utc>::MIN_UTC)
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

    /// Runs `chunks_by_count` over documents at the given millisecond instants, counting
    /// exactly; returns the windows and how many counts were asked for.
    fn count_plan(docs: &[i64], from: i64, to: i64, target: u64) -> (Vec<(Window, u64)>, usize) {
        let asked = std::cell::Cell::new(0usize);
        let count = |w: Window| {
            asked.set(asked.get() + 1);
            let (lo, hi) = (w.from.timestamp_millis(), w.to.timestamp_millis());
            let n = docs.iter().filter(|&&t| lo <= t && t < hi).count() as u64;
            async move { Ok(n) }
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let out = rt
            .block_on(chunks_by_count(at_ms(from), at_ms(to), target, count))
            .unwrap();
        (out, asked.get())
    }

    fn assert_cover(out: &[(Window, u64)], from: i64, to: i64, docs: &[i64]) {
        assert_eq!(out.first().unwrap().0.from, at_ms(from));
        assert_eq!(out.last().unwrap().0.to, at_ms(to));
        assert!(out.windows(2).all(|p| p[0].0.to == p[1].0.from), "{out:?}");
        assert_eq!(out.iter().map(|c| c.1).sum::<u64>(), docs.len() as u64);
    }

    #[test]
    fn sparse_years_become_few_chunks() {
        // 19,453 documents spread over six years, target 20,000: one chunk, one count.
        let six_years = 6 * 365 * 86_400_000i64;
        let docs: Vec<i64> = (0..19_453i64).map(|i| i * (six_years / 19_453)).collect();
        let (out, asked) = count_plan(&docs, 0, six_years, 20_000);
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(asked, 64, "one round of counts");
        assert_cover(&out, 0, six_years, &docs);
        // Target 5,000: chunks of at most 5,000, at least half full on average.
        let (out, asked) = count_plan(&docs, 0, six_years, 5_000);
        assert!((4..=8).contains(&out.len()), "{} chunks", out.len());
        assert!(out.iter().all(|c| c.1 <= 5_000), "{out:?}");
        assert_eq!(asked, 64, "one round of counts");
        assert_cover(&out, 0, six_years, &docs);
    }

    #[test]
    fn dense_stretches_get_narrow_chunks_and_ties_stay_whole() {
        // A quiet year, one busy day of 30,000 documents, and a tie of 7,000 at one instant.
        let day = 86_400_000i64;
        let mut docs: Vec<i64> = (0..365).map(|i| i * day).collect();
        docs.extend((0..30_000i64).map(|i| 200 * day + i * (day / 30_000)));
        docs.extend(std::iter::repeat_n(300 * day + 17, 7_000));
        let (out, _) = count_plan(&docs, 0, 366 * day, 5_000);
        assert_cover(&out, 0, 366 * day, &docs);
        let busy: Vec<_> = out
            .iter()
            .filter(|c| c.0.from >= at_ms(200 * day) && c.0.to <= at_ms(201 * day))
            .collect();
        assert!(busy.len() >= 6, "the busy day is cut: {out:?}");
        let tie = out
            .iter()
            .find(|c| c.0.contains(at_ms(300 * day + 17)))
            .unwrap();
        assert!(tie.1 >= 7_000, "the tie stays in one chunk: {tie:?}");
        assert!(
            out.iter().filter(|c| c.1 > 5_000).count() == 1,
            "only the tie's chunk exceeds the target: {out:?}"
        );
    }

    #[test]
    fn the_counts_of_a_round_overlap() {
        // Each count yields once: counted one after another, at most one is ever in flight.
        let (now, most) = (std::cell::Cell::new(0), std::cell::Cell::new(0));
        let (n, m) = (&now, &most);
        let count = move |_: Window| async move {
            n.set(n.get() + 1);
            m.set(m.get().max(n.get()));
            tokio::task::yield_now().await;
            n.set(n.get() - 1);
            Ok(0u64)
        };
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let out = rt
            .block_on(chunks_by_count(at_ms(0), at_ms(1_000_000), 10, count))
            .unwrap();
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(most.get(), COUNTS_AT_ONCE);
    }

    #[test]
    fn empty_range_and_empty_data() {
        assert!(count_plan(&[], 5, 5, 10).0.is_empty());
        let (out, asked) = count_plan(&[], 0, 1_000_000, 10);
        assert_eq!((out.len(), asked), (1, 64));
        assert_cover(&out, 0, 1_000_000, &[]);
    }

    #[test]
    fn chunks_are_contiguous_and_cover_the_range() {
        let c = chunks(t(0), t(5), Duration::from_secs(2 * 3600));
        assert_eq!(c.len(), 3);
        assert!(c.windows(2).all(|w| w[0].to == w[1].from));
        assert_eq!((c[0].from, c[2].to), (t(0), t(5)));
    }
}
