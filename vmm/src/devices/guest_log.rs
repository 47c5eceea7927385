//! Rate limiting for log lines the guest can trigger.
//!
//! The guest is untrusted, and anything it can make the VMM log it can make the VMM
//! log a million times a second: every invalid register write, every malformed
//! descriptor chain. Those lines go through `guest_warn!` (and `guest_error!`,
//! `guest_info!`; crate-internal macros), which give each call site its own
//! [`LogLimiter`]: at most [`BURST`] lines per [`WINDOW`]. What is dropped meanwhile
//! is counted, and the next line that gets through is preceded by one
//! "N similar messages suppressed" line. Debug lines are not limited (they are off
//! unless someone asked for them), and neither are lines only the host can cause.
//!
//! Windows are fixed: the first line opens one, and the window after it opens with
//! the first line past its end. The count of a window that nothing follows is never
//! printed; that is the price of not running a timer for it.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines a call site may log per [`WINDOW`].
pub const BURST: u32 = 10;
/// The window [`BURST`] counts over.
pub const WINDOW: Duration = Duration::from_secs(10);

/// One call site's budget: at most `burst` lines per `window`.
pub struct LogLimiter {
    burst: u32,
    window: Duration,
    state: Mutex<State>,
}

struct State {
    /// When the current window opened; None before the first line.
    opened: Option<Instant>,
    /// Lines let through in the current window.
    logged: u32,
    /// Lines dropped since the last one let through.
    suppressed: u64,
}

impl LogLimiter {
    /// A limiter letting `burst` lines through per `window`.
    pub const fn new(burst: u32, window: Duration) -> Self {
        Self { burst, window, state: Mutex::new(State { opened: None, logged: 0, suppressed: 0 }) }
    }

    /// Whether a line may be logged now: `Some(n)` when it may, `n` being the number
    /// of lines dropped since the last one logged (to be reported first); None when
    /// it must be dropped.
    pub fn check(&self) -> Option<u64> {
        self.check_at(Instant::now())
    }

    /// [`Self::check`] at time `now` (monotonic; tests pass their own clock).
    pub fn check_at(&self, now: Instant) -> Option<u64> {
        // A panic while holding the lock cannot leave the counters inconsistent.
        let mut s = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if s.opened.is_none_or(|at| now.saturating_duration_since(at) >= self.window) {
            s.opened = Some(now);
            s.logged = 0;
        }
        if s.logged < self.burst {
            s.logged += 1;
            Some(std::mem::take(&mut s.suppressed))
        } else {
            s.suppressed += 1;
            None
        }
    }
}

/// Logs through `tracing` at `$level` (warn, error or info), rate limited per call
/// site (see the module documentation).
macro_rules! guest_log {
    ($level:ident, $($arg:tt)+) => {{
        static LIMITER: $crate::devices::guest_log::LogLimiter =
            $crate::devices::guest_log::LogLimiter::new($crate::devices::guest_log::BURST, $crate::devices::guest_log::WINDOW);
        if let Some(suppressed) = LIMITER.check() {
            if suppressed > 0 {
                tracing::$level!("{suppressed} similar messages suppressed ({}:{})", file!(), line!());
            }
            tracing::$level!($($arg)+);
        }
    }};
}

/// `tracing::warn!` for lines the guest can trigger: rate limited per call site.
macro_rules! guest_warn {
    ($($arg:tt)+) => { $crate::devices::guest_log::guest_log!(warn, $($arg)+) };
}

/// `tracing::error!` for lines the guest can trigger: rate limited per call site.
macro_rules! guest_error {
    ($($arg:tt)+) => { $crate::devices::guest_log::guest_log!(error, $($arg)+) };
}

/// `tracing::info!` for lines the guest can trigger: rate limited per call site.
#[allow(unused_macros)] // nothing guest-triggered logs at info yet
macro_rules! guest_info {
    ($($arg:tt)+) => { $crate::devices::guest_log::guest_log!(info, $($arg)+) };
}

#[allow(unused_imports)]
pub(crate) use {guest_error, guest_info, guest_log, guest_warn};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_silence_then_one_line_with_the_count() {
        let l = LogLimiter::new(10, Duration::from_secs(10));
        let t0 = Instant::now();
        for i in 0..10 {
            assert_eq!(l.check_at(t0 + Duration::from_millis(i)), Some(0), "line {i} of the burst");
        }
        for i in 0..990 {
            assert_eq!(l.check_at(t0 + Duration::from_millis(10 + i)), None);
        }
        // Still inside the window.
        assert_eq!(l.check_at(t0 + Duration::from_millis(9999)), None);
        // The next window: the first line carries the count, the rest of the burst not.
        assert_eq!(l.check_at(t0 + Duration::from_secs(10)), Some(991));
        for _ in 0..9 {
            assert_eq!(l.check_at(t0 + Duration::from_secs(11)), Some(0));
        }
        assert_eq!(l.check_at(t0 + Duration::from_secs(12)), None);
        // A quiet period opens a fresh window whenever the next line comes.
        assert_eq!(l.check_at(t0 + Duration::from_secs(3600)), Some(1));
    }

    #[test]
    fn a_clock_going_backwards_does_not_reopen_the_window() {
        let l = LogLimiter::new(1, Duration::from_secs(10));
        let t0 = Instant::now() + Duration::from_secs(60);
        assert_eq!(l.check_at(t0), Some(0));
        assert_eq!(l.check_at(t0 - Duration::from_secs(30)), None);
    }

    #[test]
    fn the_counters_see_both_facades() {
        assert_eq!(testing::count_logs(|| tracing::warn!("w")), (1, 0));
        assert_eq!(testing::count_logs(|| tracing::debug!("d")), (0, 0));
        assert_eq!(testing::count_logs(|| log::error!("virtio-queue style")), (0, 1));
    }

    #[test]
    fn the_macros_limit_each_call_site_on_its_own() {
        let (lines, _) = testing::count_logs(|| {
            for i in 0..10_000 {
                guest_warn!("hostile register write {i}");
            }
        });
        assert_eq!(lines, BURST as usize);
        let (lines, _) = testing::count_logs(|| {
            for i in 0..10_000 {
                guest_error!("hostile chain {i}");
                guest_warn!("another call site {i}");
            }
        });
        assert_eq!(lines, 2 * BURST as usize);
    }
}

/// Test support: counting what code logs.
#[cfg(test)]
pub(crate) mod testing {
    use std::cell::Cell;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Once};

    thread_local! {
        static LOG_RECORDS: Cell<usize> = const { Cell::new(0) };
    }

    /// Counts the `log` crate's records (virtio-queue logs through it) per thread.
    struct LogCounter;

    impl log::Log for LogCounter {
        fn enabled(&self, _: &log::Metadata<'_>) -> bool {
            true
        }
        fn log(&self, _: &log::Record<'_>) {
            LOG_RECORDS.with(|n| n.set(n.get() + 1));
        }
        fn flush(&self) {}
    }

    static LOG_COUNTER: LogCounter = LogCounter;

    /// Counts tracing events at warn level and above.
    struct Sub(Arc<AtomicUsize>);

    impl tracing::Subscriber for Sub {
        fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
            tracing::span::Id::from_u64(1)
        }
        fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
        fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
        fn event(&self, e: &tracing::Event<'_>) {
            if *e.metadata().level() <= tracing::Level::WARN {
                self.0.fetch_add(1, Ordering::Relaxed);
            }
        }
        fn enter(&self, _: &tracing::span::Id) {}
        fn exit(&self, _: &tracing::span::Id) {}
    }

    /// Runs `f` and returns the number of lines it logged on this thread: tracing
    /// events at warn or above, and records of any level through the `log` crate.
    pub fn count_logs(f: impl FnOnce()) -> (usize, usize) {
        static INSTALL: Once = Once::new();
        INSTALL.call_once(|| {
            if log::set_logger(&LOG_COUNTER).is_ok() {
                log::set_max_level(log::LevelFilter::Trace);
            }
        });
        let events = Arc::new(AtomicUsize::new(0));
        let before = LOG_RECORDS.with(Cell::get);
        tracing::subscriber::with_default(Sub(events.clone()), f);
        (events.load(Ordering::Relaxed), LOG_RECORDS.with(Cell::get) - before)
    }
}
