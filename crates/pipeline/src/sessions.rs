//! Live device sessions: which open connections speak for which device, with which key. A
//! registry change — a device disabled or deleted, the key a connection used rotated — or a
//! sentinel disabled closes the connections concerned at once (1008 with the reason), instead of
//! leaving them open until their next message is refused.
//!
//! A connection holds an [`Arc<SessionCloser>`] and watches it; the registry and the listener
//! keep only weak references, so a closed connection needs no unregistering: its entries die
//! with it and are swept on the next registration.

use std::sync::{Arc, Mutex, OnceLock, Weak};

use tokio_util::sync::CancellationToken;

/// Why a live connection is closed from the outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseCause {
    DeviceDisabled,
    DeviceDeleted,
    KeyRotated,
    SentinelDisabled,
}

impl CloseCause {
    /// The close reason the device reads (WebSocket close frame, code 1008).
    pub fn as_str(self) -> &'static str {
        match self {
            CloseCause::DeviceDisabled => "device_disabled",
            CloseCause::DeviceDeleted => "device_deleted",
            CloseCause::KeyRotated => "key_rotated",
            CloseCause::SentinelDisabled => "sentinel_disabled",
        }
    }
}

/// One connection's "close me" switch.
#[derive(Debug, Default)]
pub struct SessionCloser {
    token: CancellationToken,
    cause: OnceLock<CloseCause>,
}

impl SessionCloser {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Asks the connection to close; the first cause given is the one it reports.
    pub fn close(&self, cause: CloseCause) {
        let _ = self.cause.set(cause);
        self.token.cancel();
    }

    /// Resolves once the connection was asked to close, with the cause.
    pub async fn closed(&self) -> CloseCause {
        self.token.cancelled().await;
        self.cause
            .get()
            .copied()
            .unwrap_or(CloseCause::DeviceDisabled)
    }
}

/// The open connections of one listener, so a change to its sentinel can close them all.
#[derive(Debug, Default)]
pub struct LiveConnections {
    closers: Mutex<Vec<Weak<SessionCloser>>>,
}

impl LiveConnections {
    pub fn register(&self, closer: &Arc<SessionCloser>) {
        let mut closers = self.closers.lock().expect("live connections lock");
        closers.retain(|c| c.strong_count() > 0);
        closers.push(Arc::downgrade(closer));
    }

    /// Closes every open connection of the listener with `cause`; returns how many.
    pub fn close_all(&self, cause: CloseCause) -> usize {
        let mut closers = self.closers.lock().expect("live connections lock");
        let mut closed = 0;
        for closer in closers.drain(..).filter_map(|c| c.upgrade()) {
            closer.close(cause);
            closed += 1;
        }
        closed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_first_cause_is_reported_and_dead_connections_are_skipped() {
        let live = LiveConnections::default();
        let a = SessionCloser::new();
        let b = SessionCloser::new();
        live.register(&a);
        live.register(&b);
        drop(b);
        assert_eq!(live.close_all(CloseCause::SentinelDisabled), 1);
        a.close(CloseCause::KeyRotated);
        assert_eq!(a.closed().await, CloseCause::SentinelDisabled);
    }
}
