//! Per calling cluster limits on inbound streams (`limits:` in the config): a token bucket
//! for the rate of new streams and a count of open ones, per (caller, service), keyed on
//! the caller's verified identity. Sans-IO: the clock is an argument.
//!
//! Cardinality is bounded by what is authorized: callers are verified clusters of the
//! federation and services are this cluster's exports.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

use strait_common::config::Limit;

/// Which limit refused a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limited {
    /// Too many new streams per second.
    Rate,
    /// Too many streams open at once.
    Concurrency,
}

impl Limited {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Limited::Rate => "rate",
            Limited::Concurrency => "concurrency",
        }
    }
}

/// An admitted stream: it counts as open until dropped.
#[derive(Debug)]
pub struct Admitted(Option<Arc<AtomicU32>>);

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Some(open) = &self.0 {
            open.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[derive(Debug)]
struct Budget {
    tokens: f64,
    refilled: Instant,
    open: Arc<AtomicU32>,
}

/// The budgets of every (caller, service) seen.
#[derive(Debug, Default)]
pub struct CallerLimiter {
    budgets: std::sync::Mutex<HashMap<(String, String), Budget>>,
}

impl CallerLimiter {
    /// Admits one new stream of `caller` to `service` under `limit` at `now`, or says
    /// which limit refuses it.
    pub fn admit(
        &self,
        caller: &str,
        service: &str,
        limit: Limit,
        now: Instant,
    ) -> Result<Admitted, Limited> {
        if limit.streams_per_second.is_none() && limit.concurrent_streams.is_none() {
            return Ok(Admitted(None));
        }
        let mut budgets = self.budgets.lock().unwrap_or_else(|p| p.into_inner());
        let capacity = limit
            .streams_per_second
            .map(|rate| f64::from(limit.burst.unwrap_or_else(|| rate.ceil().max(1.0) as u32)));
        let b = budgets
            .entry((caller.to_owned(), service.to_owned()))
            .or_insert_with(|| Budget {
                tokens: capacity.unwrap_or(0.0),
                refilled: now,
                open: Arc::new(AtomicU32::new(0)),
            });
        if let Some(max) = limit.concurrent_streams
            && b.open.load(Ordering::Relaxed) >= max
        {
            return Err(Limited::Concurrency);
        }
        if let (Some(rate), Some(capacity)) = (limit.streams_per_second, capacity) {
            let elapsed = now.saturating_duration_since(b.refilled).as_secs_f64();
            b.tokens = (b.tokens + elapsed * rate).min(capacity);
            b.refilled = now;
            if b.tokens < 1.0 {
                return Err(Limited::Rate);
            }
            b.tokens -= 1.0;
        }
        b.open.fetch_add(1, Ordering::Relaxed);
        Ok(Admitted(Some(b.open.clone())))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn limit(rate: Option<f64>, burst: Option<u32>, concurrent: Option<u32>) -> Limit {
        Limit {
            streams_per_second: rate,
            burst,
            concurrent_streams: concurrent,
        }
    }

    #[test]
    fn the_rate_allows_a_burst_then_refills_with_time() {
        let l = CallerLimiter::default();
        let t0 = Instant::now();
        let lim = limit(Some(2.0), Some(3), None);
        let admitted: Vec<_> = (0..3)
            .map(|_| l.admit("west", "shop/web", lim, t0).unwrap())
            .collect();
        assert_eq!(
            l.admit("west", "shop/web", lim, t0).unwrap_err(),
            Limited::Rate
        );
        // Another service and another caller have budgets of their own.
        assert!(l.admit("west", "shop/cart", lim, t0).is_ok());
        assert!(l.admit("north", "shop/web", lim, t0).is_ok());
        // Half a second gives one token back (2 per second).
        let t1 = t0 + Duration::from_millis(500);
        assert!(l.admit("west", "shop/web", lim, t1).is_ok());
        assert_eq!(
            l.admit("west", "shop/web", lim, t1).unwrap_err(),
            Limited::Rate
        );
        drop(admitted);
    }

    #[test]
    fn concurrency_counts_open_streams_until_they_end() {
        let l = CallerLimiter::default();
        let t0 = Instant::now();
        let lim = limit(None, None, Some(2));
        let a = l.admit("west", "shop/web", lim, t0).unwrap();
        let _b = l.admit("west", "shop/web", lim, t0).unwrap();
        assert_eq!(
            l.admit("west", "shop/web", lim, t0).unwrap_err(),
            Limited::Concurrency
        );
        drop(a);
        assert!(l.admit("west", "shop/web", lim, t0).is_ok());
    }

    #[test]
    fn no_limit_admits_everything_and_keeps_no_state() {
        let l = CallerLimiter::default();
        let t0 = Instant::now();
        for _ in 0..1000 {
            assert!(l.admit("west", "shop/web", Limit::default(), t0).is_ok());
        }
        assert!(l.budgets.lock().unwrap().is_empty());
    }
}
