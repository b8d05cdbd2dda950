//! Jittered exponential backoff, for reconnecting to the coordinator and retrying enrollment.

use std::time::Duration;

/// First reconnect delay; doubles per failed attempt up to [`BACKOFF_MAX`].
pub const BACKOFF_BASE: Duration = Duration::from_millis(250);
/// Longest reconnect delay: a coordinator that comes back is found within this (plus handshake).
pub const BACKOFF_MAX: Duration = Duration::from_secs(4);

/// Delay before reconnect attempt `attempt` (0-based): exponential, capped, with "equal jitter"
/// (half fixed, half random) so that a fleet that lost its coordinator does not return in lockstep.
/// `random` is in `[0, 1)`.
pub fn backoff_delay(attempt: u32, random: f64) -> Duration {
    let ceiling = BACKOFF_BASE.saturating_mul(1u32 << attempt.min(16)).min(BACKOFF_MAX);
    ceiling / 2 + ceiling.mul_f64(random.clamp(0.0, 1.0) / 2.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_jitters() {
        assert_eq!(backoff_delay(0, 0.0), BACKOFF_BASE / 2);
        assert_eq!(backoff_delay(1, 0.0), BACKOFF_BASE);
        assert!(backoff_delay(0, 0.999) < BACKOFF_BASE);
        for attempt in [5, 20, u32::MAX] {
            let d = backoff_delay(attempt, 0.999);
            assert!(d <= BACKOFF_MAX && d >= BACKOFF_MAX / 2, "{attempt}: {d:?}");
        }
    }
}
