//! Wall-clock timestamps as the state database, certificates and reports record them: seconds or
//! milliseconds since the Unix epoch, UTC. Intervals and timeouts use `tokio::time`/`Instant`, never
//! these.

/// Seconds since the Unix epoch.
pub fn now_unix() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// Milliseconds since the Unix epoch (0 for a clock set before 1970).
pub fn now_unix_ms() -> u64 {
    u64::try_from(time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_and_milliseconds_tell_the_same_time() {
        let (secs, ms) = (now_unix(), now_unix_ms());
        // After 2020 and agreeing within a second of each other.
        assert!(secs > 1_577_836_800, "{secs}");
        assert!((ms / 1000).abs_diff(secs as u64) <= 1, "{secs} {ms}");
    }
}
