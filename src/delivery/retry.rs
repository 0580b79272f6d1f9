//! *Whether* to retry (`classify`) kept apart from *when* (`RetryPolicy::next_delay`), each a pure
//! function with a table test.

use std::time::{Duration, SystemTime};

use backoff::backoff::Backoff;
use backoff::ExponentialBackoff;

use crate::config::RetrySettings;

/// What happened on the wire during one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptResult {
    Status {
        code: u16,
        retry_after: Option<Duration>,
    },
    Timeout,
    Connect,
    /// The resolved address is not global and not allowed: never retried.
    BlockedAddress,
    Other,
}

/// What to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Delivered,
    /// Retry, possibly not before the receiver's Retry-After.
    Retry {
        not_before: Option<Duration>,
    },
    /// Dead-letter this delivery, the run goes on.
    DeadLetter {
        reason: &'static str,
    },
    /// 410 Gone: disable the webhook, dead-letter this delivery.
    DisableWebhook,
}

pub fn classify(result: &AttemptResult) -> Verdict {
    match result {
        AttemptResult::Status { code, .. } if (200..300).contains(code) => Verdict::Delivered,
        AttemptResult::Status { code: 410, .. } => Verdict::DisableWebhook,
        AttemptResult::Status { code: 413, .. } => Verdict::DeadLetter {
            reason: "payload_too_large",
        },
        AttemptResult::Status {
            code: 429 | 503,
            retry_after,
        } => Verdict::Retry {
            not_before: *retry_after,
        },
        AttemptResult::Status { .. } | AttemptResult::Timeout | AttemptResult::Connect | AttemptResult::Other => {
            Verdict::Retry { not_before: None }
        }
        AttemptResult::BlockedAddress => Verdict::DeadLetter {
            reason: "blocked_address",
        },
    }
}

/// Did the receiver say it is overloaded (429) or fail to answer in time? Such a delivery is not
/// retried sooner than the overload floor.
pub fn is_overload(result: &AttemptResult) -> bool {
    matches!(result, AttemptResult::Status { code: 429, .. } | AttemptResult::Timeout)
}

/// Metric label for an attempt result.
pub fn result_label(r: &AttemptResult) -> &'static str {
    match r {
        AttemptResult::Status { code, .. } => match code {
            200..=299 => "success",
            300..=399 => "http_3xx",
            400..=499 => "http_4xx",
            _ => "http_5xx",
        },
        AttemptResult::Timeout => "timeout",
        AttemptResult::Connect => "connect_error",
        AttemptResult::BlockedAddress => "blocked_address",
        AttemptResult::Other => "other_error",
    }
}

/// Parse `Retry-After`: delta seconds or an HTTP date.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let v = value.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(v).ok()?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub initial: Duration,
    pub multiplier: f64,
    pub max_interval: Duration,
    pub randomization_factor: f64,
    pub max_attempts: u32,
    pub max_elapsed: Duration,
    pub retry_after_ceiling: Duration,
    /// Least delay after a 429 or a timeout.
    pub overload_floor: Duration,
}

impl From<&RetrySettings> for RetryPolicy {
    fn from(s: &RetrySettings) -> Self {
        RetryPolicy {
            initial: Duration::from_millis(s.initial_interval_ms),
            multiplier: s.multiplier,
            max_interval: Duration::from_millis(s.max_interval_ms),
            randomization_factor: s.randomization_factor,
            max_attempts: s.max_attempts,
            max_elapsed: Duration::from_millis(s.max_elapsed_ms),
            retry_after_ceiling: Duration::from_millis(s.retry_after_ceiling_ms),
            overload_floor: Duration::from_millis(s.overload_floor_ms),
        }
    }
}

impl RetryPolicy {
    /// The delay before attempt `attempts_made + 1`, or `None` when the policy is exhausted
    /// (attempt count, or the elapsed time since the first attempt would pass the limit).
    ///
    /// The schedule is stateless so it survives restarts: the base interval for retry n is
    /// `initial * multiplier^(n-1)` capped at `max_interval`, and the `backoff` crate's
    /// `ExponentialBackoff` applies the jitter to it. A receiver's Retry-After replaces the
    /// computed delay when longer, up to the configured ceiling.
    pub fn next_delay(&self, attempts_made: u32, elapsed: Duration, retry_after: Option<Duration>) -> Option<Duration> {
        self.next_delay_after(attempts_made, elapsed, retry_after, false)
    }

    /// `next_delay`, and after an overload (`is_overload`: 429, timeout) never less than the
    /// overload floor: retrying an overloaded receiver soon only adds to its load.
    pub fn next_delay_after(
        &self,
        attempts_made: u32,
        elapsed: Duration,
        retry_after: Option<Duration>,
        overload: bool,
    ) -> Option<Duration> {
        if attempts_made >= self.max_attempts {
            return None;
        }
        let exp = attempts_made.saturating_sub(1).min(64) as i32;
        let base = self.initial.as_secs_f64() * self.multiplier.powi(exp);
        let base = Duration::from_secs_f64(base.min(self.max_interval.as_secs_f64()));
        let mut eb = ExponentialBackoff {
            current_interval: base,
            initial_interval: self.initial,
            randomization_factor: self.randomization_factor,
            multiplier: 1.0,
            max_interval: self.max_interval,
            max_elapsed_time: None,
            ..ExponentialBackoff::default()
        };
        let mut delay = eb.next_backoff().unwrap_or(base);
        if let Some(ra) = retry_after {
            delay = delay.max(ra.min(self.retry_after_ceiling));
        }
        if overload {
            delay = delay.max(self.overload_floor);
        }
        if elapsed + delay > self.max_elapsed {
            return None;
        }
        Some(delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(code: u16) -> AttemptResult {
        AttemptResult::Status {
            code,
            retry_after: None,
        }
    }

    #[test]
    fn classification_table() {
        let ra = Some(Duration::from_secs(7));
        let table: Vec<(AttemptResult, Verdict)> = vec![
            (st(200), Verdict::Delivered),
            (st(204), Verdict::Delivered),
            (st(299), Verdict::Delivered),
            (st(301), Verdict::Retry { not_before: None }),
            (st(302), Verdict::Retry { not_before: None }),
            (st(400), Verdict::Retry { not_before: None }),
            (st(401), Verdict::Retry { not_before: None }),
            (st(404), Verdict::Retry { not_before: None }),
            (st(410), Verdict::DisableWebhook),
            (
                st(413),
                Verdict::DeadLetter {
                    reason: "payload_too_large",
                },
            ),
            (
                AttemptResult::Status {
                    code: 429,
                    retry_after: ra,
                },
                Verdict::Retry { not_before: ra },
            ),
            (
                AttemptResult::Status {
                    code: 503,
                    retry_after: ra,
                },
                Verdict::Retry { not_before: ra },
            ),
            (
                AttemptResult::Status {
                    code: 500,
                    retry_after: ra,
                },
                Verdict::Retry { not_before: None },
            ),
            (st(502), Verdict::Retry { not_before: None }),
            (AttemptResult::Timeout, Verdict::Retry { not_before: None }),
            (AttemptResult::Connect, Verdict::Retry { not_before: None }),
            (AttemptResult::Other, Verdict::Retry { not_before: None }),
            (
                AttemptResult::BlockedAddress,
                Verdict::DeadLetter {
                    reason: "blocked_address",
                },
            ),
        ];
        for (input, want) in table {
            assert_eq!(classify(&input), want, "{input:?}");
        }
    }

    fn policy() -> RetryPolicy {
        RetryPolicy {
            initial: Duration::from_secs(1),
            multiplier: 2.0,
            max_interval: Duration::from_secs(10),
            randomization_factor: 0.0,
            max_attempts: 6,
            max_elapsed: Duration::from_secs(3600),
            retry_after_ceiling: Duration::from_secs(60),
            overload_floor: Duration::from_secs(30),
        }
    }

    #[test]
    fn overloads_wait_at_least_the_floor() {
        let p = policy();
        assert!(is_overload(&AttemptResult::Timeout));
        assert!(is_overload(&st(429)));
        assert!(!is_overload(&st(503)) && !is_overload(&st(500)) && !is_overload(&AttemptResult::Connect));
        assert_eq!(
            p.next_delay_after(1, Duration::ZERO, None, true),
            Some(Duration::from_secs(30))
        );
        // A longer Retry-After wins; without an overload the schedule is unchanged.
        assert_eq!(
            p.next_delay_after(1, Duration::ZERO, Some(Duration::from_secs(45)), true),
            Some(Duration::from_secs(45))
        );
        assert_eq!(
            p.next_delay_after(1, Duration::ZERO, None, false),
            Some(Duration::from_secs(1))
        );
        // The floor still respects the elapsed-time limit.
        let short = RetryPolicy {
            max_elapsed: Duration::from_secs(20),
            ..policy()
        };
        assert_eq!(short.next_delay_after(1, Duration::ZERO, None, true), None);
    }

    #[test]
    fn schedule_grows_exponentially_and_caps() {
        let p = policy();
        let d: Vec<u64> = (1..6)
            .map(|n| p.next_delay(n, Duration::ZERO, None).unwrap().as_millis() as u64)
            .collect();
        assert_eq!(d, vec![1000, 2000, 4000, 8000, 10000]);
        assert_eq!(p.next_delay(6, Duration::ZERO, None), None, "max attempts");
    }

    #[test]
    fn schedule_stops_at_max_elapsed() {
        let p = RetryPolicy {
            max_elapsed: Duration::from_secs(5),
            ..policy()
        };
        assert!(p.next_delay(1, Duration::from_secs(3), None).is_some());
        assert_eq!(p.next_delay(3, Duration::from_secs(3), None), None);
    }

    #[test]
    fn jitter_stays_within_the_factor() {
        let p = RetryPolicy {
            randomization_factor: 0.5,
            ..policy()
        };
        for _ in 0..200 {
            let d = p.next_delay(3, Duration::ZERO, None).unwrap().as_millis();
            assert!((2000..=6000).contains(&d), "{d}");
        }
    }

    #[test]
    fn retry_after_is_honoured_within_the_ceiling() {
        let p = policy();
        assert_eq!(
            p.next_delay(1, Duration::ZERO, Some(Duration::from_secs(30))),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            p.next_delay(1, Duration::ZERO, Some(Duration::from_secs(7200))),
            Some(Duration::from_secs(60))
        );
        // A shorter Retry-After never shortens the backoff.
        assert_eq!(
            p.next_delay(3, Duration::ZERO, Some(Duration::ZERO)),
            Some(Duration::from_secs(4))
        );
    }

    #[test]
    fn retry_after_parses_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(parse_retry_after("120", now), Some(Duration::from_secs(120)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(90));
        assert_eq!(parse_retry_after(&later, now), Some(Duration::from_secs(90)));
        assert_eq!(parse_retry_after("soon", now), None);
    }
}
