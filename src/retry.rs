//! Retry policy: the delay before the next attempt of something that failed.

use std::time::Duration;

/// Delay before retry number `failures` (1-based): `initial * 2^(failures-1)`, capped at
/// `max`, plus up to 20% jitter (`jitter` in `[0, 1)`) so several daemons do not retry in step.
pub fn backoff_delay(failures: u32, initial: Duration, max: Duration, jitter: f64) -> Duration {
    let doublings = failures.saturating_sub(1).min(20);
    let base = initial.saturating_mul(1u32 << doublings).min(max);
    base + base.mul_f64(jitter.clamp(0.0, 1.0) * 0.2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_with_bounded_jitter() {
        let (i, m) = (Duration::from_secs(30), Duration::from_secs(600));
        assert_eq!(backoff_delay(1, i, m, 0.0), Duration::from_secs(30));
        assert_eq!(backoff_delay(2, i, m, 0.0), Duration::from_secs(60));
        assert_eq!(backoff_delay(5, i, m, 0.0), Duration::from_secs(480));
        assert_eq!(backoff_delay(6, i, m, 0.0), m);
        assert_eq!(backoff_delay(60, i, m, 0.0), m);
        assert_eq!(backoff_delay(60, i, m, 0.999), m.mul_f64(1.0 + 0.999 * 0.2));
    }
}
