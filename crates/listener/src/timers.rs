//! Everything a WebSocket connection waits on in time, behind one timer: the next ping, the
//! answer to the ping outstanding, the idle timeout, the deadline to authenticate and the
//! expiry of the connection's token.
//!
//! One sleep per connection instead of one per limit keeps an idle connection small (a tokio
//! `Sleep` is about 100 bytes, and the ping interval boxed one more) and puts one entry, not
//! four, in the runtime's timer wheel. Nothing on the message path touches the timer: a frame
//! from the peer only clears the outstanding ping and stamps the time of the last data frame,
//! and a deadline that moved later is found when the timer fires early and re-arms.

use std::time::Duration;

use iotgate_core::definition::ListenerDefinition;
use iotgate_core::websocket_settings::EffectiveWebSocketSettings;
use tokio::time::{Instant, Sleep};

/// What fell due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Due {
    /// The connection's token expired.
    TokenExpired,
    /// No authenticated message within the deadline (`within` after the connection opened).
    Unauthenticated { within: Duration },
    /// The peer did not answer a ping within `autoPingTimeoutSeconds`.
    PingUnanswered,
    /// No data frame within `idleTimeoutSeconds`.
    Idle,
    /// Time to send a ping.
    Ping,
}

/// How long a connection of `definition`'s listener has to send its first authenticated message:
/// `authTimeoutSeconds` (0 turns it off) when a sentinel authenticates its messages, else no limit.
pub(crate) fn authentication_limit(
    definition: &ListenerDefinition,
    behind_sentinel: bool,
) -> Option<Duration> {
    let limit = Duration::from_secs(u64::from(definition.auth_timeout_seconds));
    (behind_sentinel && !limit.is_zero()).then_some(limit)
}

/// The deadlines of one connection (see the module documentation).
pub(crate) struct ConnectionTimers {
    /// Zero: no pings.
    ping_interval: Duration,
    ping_timeout: Duration,
    /// Zero: no idle timeout.
    idle_timeout: Duration,
    next_ping: Option<Instant>,
    /// Set while a ping is outstanding.
    answer_by: Option<Instant>,
    last_data: Instant,
    /// Set until the deadline passes; whether the connection authenticated is asked then.
    authenticate_by: Option<Instant>,
    authenticate_within: Duration,
    token_expires: Option<Instant>,
}

impl ConnectionTimers {
    /// Timers starting now. `authenticate_within` and `token_left` are `None` where they do not
    /// apply.
    pub fn new(
        websocket: &EffectiveWebSocketSettings,
        authenticate_within: Option<Duration>,
        token_left: Option<Duration>,
    ) -> Self {
        let now = Instant::now();
        let ping_interval = websocket.auto_ping_interval;
        Self {
            ping_interval,
            ping_timeout: websocket.auto_ping_timeout,
            idle_timeout: websocket.idle_timeout,
            next_ping: (!ping_interval.is_zero()).then(|| now + ping_interval),
            answer_by: None,
            last_data: now,
            authenticate_by: authenticate_within.map(|limit| now + limit),
            authenticate_within: authenticate_within.unwrap_or_default(),
            token_expires: token_left.map(|left| now + left),
        }
    }

    /// A frame of any kind came from the peer: the ping outstanding, if any, is answered.
    #[inline]
    pub fn frame_received(&mut self) {
        self.answer_by = None;
    }

    /// A data frame came from the peer (called besides [`frame_received`](Self::frame_received)).
    #[inline]
    pub fn data_received(&mut self) {
        if !self.idle_timeout.is_zero() {
            self.last_data = Instant::now();
        }
    }

    /// The earliest instant something may be due; far away when nothing is armed.
    fn next_deadline(&self) -> Instant {
        let idle = (!self.idle_timeout.is_zero()).then(|| self.last_data + self.idle_timeout);
        [
            self.token_expires,
            self.authenticate_by,
            self.answer_by,
            idle,
            self.next_ping,
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400 * 366))
    }

    /// What is due at `now`, most serious first; a ping that falls due is counted as sent.
    fn due_at(&mut self, now: Instant, authenticated: bool) -> Option<Due> {
        if self.token_expires.is_some_and(|at| now >= at) {
            return Some(Due::TokenExpired);
        }
        if self.authenticate_by.is_some_and(|at| now >= at) {
            self.authenticate_by = None;
            if !authenticated {
                return Some(Due::Unauthenticated {
                    within: self.authenticate_within,
                });
            }
        }
        if self.answer_by.is_some_and(|at| now >= at) {
            return Some(Due::PingUnanswered);
        }
        if !self.idle_timeout.is_zero() && now >= self.last_data + self.idle_timeout {
            return Some(Due::Idle);
        }
        match self.next_ping {
            Some(at) if now >= at => {
                // The next one an interval after this one was due, or after now when this one
                // is late (a busy runtime does not make pings bunch up).
                let next = at + self.ping_interval;
                self.next_ping = Some(if next > now {
                    next
                } else {
                    now + self.ping_interval
                });
                // A second ping does not move the first one's answer deadline.
                self.answer_by.get_or_insert(now + self.ping_timeout);
                Some(Due::Ping)
            }
            _ => None,
        }
    }

    /// Waits on `sleep` until something is due and says what; `sleep` is left armed for the
    /// next deadline. `authenticated` is whether the connection authenticated a message yet.
    pub async fn next(&mut self, mut sleep: std::pin::Pin<&mut Sleep>, authenticated: bool) -> Due {
        loop {
            sleep.as_mut().await;
            let due = self.due_at(Instant::now(), authenticated);
            sleep.as_mut().reset(self.next_deadline());
            if let Some(due) = due {
                return due;
            }
        }
    }

    /// The timer a connection waits on with [`next`](Self::next), armed for the first deadline.
    pub fn sleep(&self) -> Sleep {
        tokio::time::sleep_until(self.next_deadline())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(ping: u64, ping_timeout: u64, idle: u64) -> EffectiveWebSocketSettings {
        EffectiveWebSocketSettings {
            max_frame_bytes: 65536,
            max_message_bytes: 65536,
            open_handshake_timeout: None,
            close_handshake_timeout: Duration::ZERO,
            auto_ping_interval: Duration::from_secs(ping),
            auto_ping_timeout: Duration::from_secs(ping_timeout),
            auto_ping_size: 0,
            fail_by_drop: false,
            idle_timeout: Duration::from_secs(idle),
        }
    }

    /// A connection's timers on the paused test clock.
    struct Clock {
        timers: ConnectionTimers,
        sleep: std::pin::Pin<Box<Sleep>>,
        start: Instant,
    }

    impl Clock {
        fn new(
            settings: EffectiveWebSocketSettings,
            authenticate_within: Option<u64>,
            token_left: Option<u64>,
        ) -> Self {
            let timers = ConnectionTimers::new(
                &settings,
                authenticate_within.map(Duration::from_secs),
                token_left.map(Duration::from_secs),
            );
            let sleep = Box::pin(timers.sleep());
            Self {
                timers,
                sleep,
                start: Instant::now(),
            }
        }

        /// What falls due next, and when (in milliseconds since the start).
        async fn next(&mut self, authenticated: bool) -> (Due, u128) {
            let due = self.timers.next(self.sleep.as_mut(), authenticated).await;
            (due, self.start.elapsed().as_millis())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn pings_on_the_interval_and_fails_an_unanswered_one() {
        let mut clock = Clock::new(settings(10, 3, 0), None, None);
        assert_eq!(clock.next(false).await, (Due::Ping, 10_000));
        // Answered: the next ping comes an interval later, not a timeout.
        clock.timers.frame_received();
        assert_eq!(clock.next(false).await, (Due::Ping, 20_000));
        // Unanswered: the timeout counts from that ping.
        assert_eq!(clock.next(false).await, (Due::PingUnanswered, 23_000));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_counts_from_the_last_data_frame() {
        let mut clock = Clock::new(settings(0, 0, 5), None, None);
        tokio::time::sleep(Duration::from_secs(4)).await;
        clock.timers.data_received();
        // The timer fires at 5 s, finds the deadline moved to 9 s and waits again.
        assert_eq!(clock.next(false).await, (Due::Idle, 9_000));
    }

    #[tokio::test(start_paused = true)]
    async fn the_auth_deadline_only_closes_an_unauthenticated_connection() {
        let mut clock = Clock::new(settings(0, 0, 0), Some(2), None);
        assert_eq!(
            clock.next(false).await,
            (
                Due::Unauthenticated {
                    within: Duration::from_secs(2)
                },
                2_000
            )
        );
        // Authenticated by then: nothing until the token expires.
        let mut clock = Clock::new(settings(0, 0, 0), Some(2), Some(7));
        assert_eq!(clock.next(true).await, (Due::TokenExpired, 7_000));
    }

    #[tokio::test(start_paused = true)]
    async fn a_late_ping_does_not_bunch_up_the_next_ones() {
        let mut clock = Clock::new(settings(1, 30, 0), None, None);
        // The connection was busy for 5.5 s: one ping now, the next a whole interval later.
        tokio::time::sleep(Duration::from_millis(5_500)).await;
        assert_eq!(clock.next(false).await, (Due::Ping, 5_500));
        clock.timers.frame_received();
        assert_eq!(clock.next(false).await, (Due::Ping, 6_500));
    }
}
