//! The project's retry policies, on top of `backon`: how long to wait before the next attempt
//! of something that failed, and how many attempts there are. Every retry loop of the
//! program takes its delays from here (source reads, creating the mapped tables beside other
//! processes, the daemon between failed runs); which errors are worth retrying is decided
//! per backend (`source::mongo::is_retriable_error`, `sink::is_retriable_error`).

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use std::time::Duration;

/// Exponential backoff (`first`, doubling, capped at `max`) for at most `times` retries
/// (None: no limit), each delay lengthened by a random part of at most `jitter` of itself.
///
/// The jitter is ours rather than backon's: backon's adds up to a whole delay (or its
/// minimum), which would double the daemon's documented cap; ours keeps delays within
/// `[d, d * (1 + jitter)]`, as docs/OPERATIONS.md says.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Policy {
    pub first: Duration,
    pub max: Duration,
    pub times: Option<usize>,
    pub jitter: f64,
}

/// The delays of a [`Policy`]: backon's exponential schedule, jittered.
#[derive(Debug)]
pub struct Delays {
    inner: ExponentialBackoff,
    jitter: f64,
}

impl Iterator for Delays {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let d = self.inner.next()?;
        Some(d + d.mul_f64(self.jitter.clamp(0.0, 1.0) * rand::random::<f64>()))
    }
}

impl BackoffBuilder for Policy {
    type Backoff = Delays;

    fn build(self) -> Delays {
        let b = ExponentialBuilder::default()
            .with_min_delay(self.first)
            .with_max_delay(self.max)
            .with_factor(2.0);
        let b = match self.times {
            Some(n) => b.with_max_times(n),
            None => b.without_max_times(),
        };
        Delays {
            inner: b.build(),
            jitter: self.jitter,
        }
    }
}

impl Policy {
    /// The delay before retry number `n` (1-based), or None past the last retry.
    pub fn delay(self, n: u32) -> Option<Duration> {
        self.build().nth(n.max(1) as usize - 1)
    }
}

/// Reads from the source (window pages, metadata, lookups): 200 ms doubling to 10 s, up to
/// `source.retry_attempts` retries in a row, 20% jitter so that lanes do not retry in step.
pub fn source_reads(retry_attempts: u32) -> Policy {
    Policy {
        first: Duration::from_millis(200),
        max: Duration::from_secs(10),
        times: Some(retry_attempts as usize),
        jitter: 0.2,
    }
}

/// Creating the mapped tables while other processes may be creating them too (backfill
/// workers starting at once): two more tries, 200 ms and 400 ms later.
pub fn concurrent_ddl() -> Policy {
    Policy {
        first: Duration::from_millis(200),
        max: Duration::from_secs(1),
        times: Some(2),
        jitter: 0.2,
    }
}

/// Opening or migrating a new SQLite target while another process starting at the same
/// moment holds its lock (switching the file to WAL, applying the first migration): 100 ms
/// doubling to 1 s, `times` retries.
pub fn sqlite_start_race(times: usize) -> Policy {
    Policy {
        first: Duration::from_millis(100),
        max: Duration::from_secs(1),
        times: Some(times),
        jitter: 0.2,
    }
}

/// The daemon between failed runs: `daemon.backoff_initial` doubling to
/// `daemon.backoff_max`, for as long as runs fail, plus up to 20% jitter so that several
/// daemons do not retry in step.
pub fn daemon_runs(initial: Duration, max: Duration) -> Policy {
    Policy {
        first: initial,
        max,
        times: None,
        jitter: 0.2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_with_bounded_jitter() {
        let exact = Policy {
            jitter: 0.0,
            ..daemon_runs(Duration::from_secs(30), Duration::from_secs(600))
        };
        let secs = |n| exact.delay(n).map(|d| d.as_secs());
        assert_eq!(secs(1), Some(30));
        assert_eq!(secs(2), Some(60));
        assert_eq!(secs(5), Some(480));
        assert_eq!(secs(6), Some(600));
        assert_eq!(secs(60), Some(600));
        let jittered = daemon_runs(Duration::from_secs(30), Duration::from_secs(600));
        for n in [1, 6, 60] {
            let d = jittered.delay(n).unwrap();
            let base = exact.delay(n).unwrap();
            assert!(d >= base && d <= base.mul_f64(1.2), "{n}: {d:?}");
        }
    }

    #[test]
    fn source_reads_start_at_200_ms_and_stop_after_the_attempts() {
        let p = Policy {
            jitter: 0.0,
            ..source_reads(8)
        };
        let all: Vec<u64> = p.build().map(|d| d.as_millis() as u64).collect();
        assert_eq!(all, [200, 400, 800, 1600, 3200, 6400, 10_000, 10_000]);
        assert_eq!(source_reads(0).build().next(), None);
        assert_eq!(concurrent_ddl().build().count(), 2);
        assert_eq!(sqlite_start_race(10).build().count(), 10);
    }
}
