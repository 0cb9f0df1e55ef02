//! Listener status for the API and UI: state, URL, connection count, counters and last error.

use std::sync::Mutex;

use iotgate_pipeline::ListenerCounters;
use serde::Serialize;
use time::OffsetDateTime;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerState {
    Running,
    Connecting,
    Retrying,
    Error,
    Disabled,
    Stopped,
}

#[derive(Debug)]
struct StatusInner {
    state: ListenerState,
    url: Option<String>,
    last_error: Option<String>,
    since: OffsetDateTime,
}

/// Shared, mutable status of one listener.
#[derive(Debug)]
pub struct ListenerStatus {
    key: String,
    inner: Mutex<StatusInner>,
    counters: ListenerCounters,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ListenerStatusView {
    pub key: String,
    pub state: ListenerState,
    pub url: Option<String>,
    pub connections: i64,
    pub messages_received: u64,
    pub messages_accepted: u64,
    pub messages_rejected: u64,
    pub last_error: Option<String>,
    pub since: String,
}

impl ListenerStatus {
    pub fn new(key: &str, state: ListenerState, counters: ListenerCounters) -> Self {
        Self {
            key: key.to_owned(),
            inner: Mutex::new(StatusInner {
                state,
                url: None,
                last_error: None,
                since: OffsetDateTime::now_utc(),
            }),
            counters,
        }
    }

    pub fn set(&self, state: ListenerState, last_error: Option<String>) {
        let mut inner = self.inner.lock().expect("status lock");
        if inner.state != state {
            inner.since = OffsetDateTime::now_utc();
        }
        inner.state = state;
        if last_error.is_some() || state == ListenerState::Running {
            inner.last_error = last_error;
        }
    }

    pub fn set_url(&self, url: String) {
        self.inner.lock().expect("status lock").url = Some(url);
    }

    pub fn state(&self) -> ListenerState {
        self.inner.lock().expect("status lock").state
    }

    pub fn view(&self) -> ListenerStatusView {
        let inner = self.inner.lock().expect("status lock");
        ListenerStatusView {
            key: self.key.clone(),
            state: inner.state,
            url: inner.url.clone(),
            connections: self.counters.connections.get(),
            messages_received: self.counters.received.get(),
            messages_accepted: self.counters.accepted.get(),
            messages_rejected: self.counters.rejected.get(),
            last_error: inner.last_error.clone(),
            since: iotgate_core::envelope::format_timestamp(inner.since),
        }
    }
}
