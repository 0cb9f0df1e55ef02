//! A Web PubSub connection's state that outlives one socket on the reliable protocol: its place
//! in the connection hub (so groups and messages keep arriving while it is away), the messages
//! sent but not yet acknowledged with `sequenceAck`, and the ack ids already answered.
//!
//! When a reliable connection drops without a closing handshake, its session waits in the
//! listener's [`SessionStore`] for `resumeWindowSeconds`. A client that reconnects with
//! `awps_connection_id` and `awps_reconnection_token` gets it back: the same connection id and
//! groups, and every message it had not acknowledged is sent again, in order. After the window
//! the session ends (its hub registration is dropped, which leaves its groups).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use iotgate_pipeline::{ConnectionPresence, DownlinkReceiver, Pipeline, Registration};
use subtle::ConstantTimeEq as _;
use tokio::sync::Notify;

use super::protocol::Dialect;

/// Messages sent to a reliable client and not yet acknowledged; at this many the connection
/// stops taking messages from its hub queue (which then refuses more, counted) until the client
/// acknowledges.
pub const MAX_UNACKED: usize = 1024;

/// Ack ids remembered per connection to answer a repeat with `Duplicate`.
const REMEMBERED_ACK_IDS: usize = 1024;

/// The ack ids a connection used, the most recent [`REMEMBERED_ACK_IDS`] of them.
#[derive(Debug, Default)]
pub struct AckIds {
    order: VecDeque<u64>,
    seen: HashSet<u64>,
}

impl AckIds {
    /// Records `id`; false when it was already recorded (a duplicate).
    pub fn record(&mut self, id: u64) -> bool {
        if !self.seen.insert(id) {
            return false;
        }
        self.order.push_back(id);
        if self.order.len() > REMEMBERED_ACK_IDS {
            if let Some(oldest) = self.order.pop_front() {
                self.seen.remove(&oldest);
            }
        }
        true
    }

    pub fn contains(&self, id: u64) -> bool {
        self.seen.contains(&id)
    }
}

/// What one Web PubSub connection keeps between sockets.
pub struct Session {
    pub registration: Registration,
    pub downlinks: DownlinkReceiver,
    /// The device the connection speaks for (the token's `sub`).
    pub user_id: Arc<str>,
    pub dialect: Dialect,
    /// Presented on resume; compared in constant time.
    pub reconnection_token: String,
    next_sequence_id: u64,
    /// (sequence id, frame) sent and not yet acknowledged, oldest first.
    unacked: VecDeque<(u64, String)>,
    pub ack_ids: AckIds,
    /// Announces `$connected` when the session starts and `$disconnected` when it ends for good
    /// (not while it waits to be resumed).
    presence: Option<ConnectionPresence>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("connection", &self.registration.connection_id())
            .field("user", &self.user_id)
            .finish_non_exhaustive()
    }
}

impl Session {
    pub fn new(
        registration: Registration,
        downlinks: DownlinkReceiver,
        user_id: Arc<str>,
        dialect: Dialect,
    ) -> Self {
        Self {
            registration,
            downlinks,
            user_id,
            dialect,
            reconnection_token: new_reconnection_token(),
            next_sequence_id: 1,
            unacked: VecDeque::new(),
            ack_ids: AckIds::default(),
            presence: None,
        }
    }

    /// Announces the device connected (a new session, not a resumed one).
    pub async fn announce(&mut self, pipeline: &Pipeline, presence: ConnectionPresence) {
        let mut presence = presence;
        presence
            .bind(pipeline, &self.registration, &self.user_id, true)
            .await;
        self.presence = Some(presence);
    }

    /// Ends the session for good: `$disconnected` with the close code and reason, then the hub
    /// registration goes (leaving every group).
    pub async fn finish(
        mut self,
        pipeline: &Pipeline,
        close_code: Option<u16>,
        close_reason: Option<String>,
    ) {
        if let Some(presence) = self.presence.take() {
            presence
                .end(pipeline, &self.registration, close_code, close_reason)
                .await;
        }
    }

    pub fn connection_id(&self) -> u64 {
        self.registration.connection_id()
    }

    /// Whether another message may be taken from the hub queue now.
    pub fn can_take_message(&self) -> bool {
        self.unacked.len() < MAX_UNACKED
    }

    /// The next sequence id, remembering `frame` under it until the client acknowledges it.
    /// `build` makes the frame for the id.
    pub fn sequence(&mut self, build: impl FnOnce(u64) -> String) -> String {
        let id = self.next_sequence_id;
        self.next_sequence_id += 1;
        let frame = build(id);
        self.unacked.push_back((id, frame.clone()));
        frame
    }

    /// The client has every message up to and including `sequence_id`.
    pub fn acknowledge(&mut self, sequence_id: u64) {
        while self
            .unacked
            .front()
            .is_some_and(|(id, _)| *id <= sequence_id)
        {
            self.unacked.pop_front();
        }
    }

    /// The frames to send again after a resume, oldest first.
    pub fn unacknowledged(&self) -> impl Iterator<Item = &str> {
        self.unacked.iter().map(|(_, frame)| frame.as_str())
    }
}

fn new_reconnection_token() -> String {
    use base64::Engine as _;
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Where a resumable session is.
enum Slot {
    /// A socket serves it; `takeover` asks that socket's task to let go (a resume arrived while
    /// the server still thought the old socket open).
    Attached { takeover: Arc<Notify> },
    /// Waiting for its client; `generation` tells the expiry timer whether it is still the
    /// detachment it was started for.
    Detached {
        session: Box<Session>,
        generation: u64,
    },
}

/// The resumable sessions of one listener.
#[derive(Default)]
pub struct SessionStore {
    slots: Mutex<HashMap<u64, Slot>>,
    generation: std::sync::atomic::AtomicU64,
}

/// Why a resume was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResumeRefusal {
    /// No such session (never existed, ended, expired) or the token does not match.
    NotFound,
    /// The session belongs to another device than the one the new credentials name.
    OtherUser,
}

impl SessionStore {
    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Slot>> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks a new session attached; the returned notifier fires when a resume takes it over.
    pub fn attach_new(&self, connection_id: u64) -> Arc<Notify> {
        let takeover = Arc::new(Notify::new());
        self.slots().insert(
            connection_id,
            Slot::Attached {
                takeover: takeover.clone(),
            },
        );
        takeover
    }

    /// The session ended for good (client closed, listener stopped, not reliable).
    pub fn forget(&self, connection_id: u64) {
        self.slots().remove(&connection_id);
    }

    /// Parks a session whose socket dropped; unless resumed within `window`, it is handed to
    /// `expire` (which ends it).
    pub fn detach<F, Fut>(self: &Arc<Self>, session: Session, window: Duration, expire: F)
    where
        F: FnOnce(Session) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let id = session.connection_id();
        let generation = self
            .generation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.slots().insert(
            id,
            Slot::Detached {
                session: Box::new(session),
                generation,
            },
        );
        let store = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep(window).await;
            let Some(store) = store.upgrade() else {
                return;
            };
            let expired = {
                let mut slots = store.slots();
                match slots.get(&id) {
                    Some(Slot::Detached { generation: g, .. }) if *g == generation => {
                        slots.remove(&id)
                    }
                    _ => None,
                }
            };
            // Ended outside the lock.
            if let Some(Slot::Detached { session, .. }) = expired {
                tracing::debug!(connection = id, "resume window passed; session ended");
                expire(*session).await;
            }
        });
    }

    /// Takes a session back for a resuming socket, after checking its token and user. A session
    /// still attached to an old socket is asked to let go first (waiting up to two seconds).
    pub async fn resume(
        &self,
        connection_id: u64,
        token: &str,
        user_id: &str,
    ) -> Result<(Session, Arc<Notify>), ResumeRefusal> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        loop {
            let waiting = {
                let mut slots = self.slots();
                match slots.get(&connection_id) {
                    None => return Err(ResumeRefusal::NotFound),
                    Some(Slot::Attached { takeover }) => takeover.clone(),
                    Some(Slot::Detached { session, .. }) => {
                        if !bool::from(
                            session
                                .reconnection_token
                                .as_bytes()
                                .ct_eq(token.as_bytes()),
                        ) {
                            return Err(ResumeRefusal::NotFound);
                        }
                        if &*session.user_id != user_id {
                            return Err(ResumeRefusal::OtherUser);
                        }
                        let takeover = Arc::new(Notify::new());
                        let Some(Slot::Detached { session, .. }) = slots.insert(
                            connection_id,
                            Slot::Attached {
                                takeover: takeover.clone(),
                            },
                        ) else {
                            unreachable!("the slot was detached a moment ago under the lock");
                        };
                        return Ok((*session, takeover));
                    }
                }
            };
            // notify_one stores a permit, so the old task sees it even if it is not waiting yet.
            waiting.notify_one();
            if tokio::time::Instant::now() >= deadline {
                return Err(ResumeRefusal::NotFound);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iotgate_pipeline::ConnectionHub;

    fn session(hub: &Arc<ConnectionHub>, id: u64) -> Session {
        let (registration, downlinks) = hub.register(id, "wps".into(), Some("dev".into()), None);
        Session::new(registration, downlinks, "dev".into(), Dialect::ReliableJson)
    }

    #[test]
    fn acknowledged_frames_are_not_sent_again() {
        let hub = Arc::new(ConnectionHub::default());
        let mut s = session(&hub, 1);
        for _ in 0..3 {
            s.sequence(|id| format!("m{id}"));
        }
        s.acknowledge(2);
        assert_eq!(s.unacknowledged().collect::<Vec<_>>(), vec!["m3"]);
    }

    #[test]
    fn ack_ids_are_duplicates_within_the_remembered_window() {
        let mut ids = AckIds::default();
        assert!(ids.record(1));
        assert!(!ids.record(1));
        for id in 2..=(REMEMBERED_ACK_IDS as u64 + 1) {
            ids.record(id);
        }
        assert!(!ids.contains(1));
    }

    #[tokio::test]
    async fn a_detached_session_resumes_with_its_token_and_expires_after_the_window() {
        let hub = Arc::new(ConnectionHub::default());
        let store = Arc::new(SessionStore::default());
        let s = session(&hub, 7);
        let token = s.reconnection_token.clone();
        store.attach_new(7);
        store.detach(s, Duration::from_millis(200), |s| async { drop(s) });
        assert_eq!(
            store.resume(7, "wrong", "dev").await.unwrap_err(),
            ResumeRefusal::NotFound
        );
        assert_eq!(
            store.resume(7, &token, "other").await.unwrap_err(),
            ResumeRefusal::OtherUser
        );
        let (s, _) = store.resume(7, &token, "dev").await.unwrap();
        assert!(s.registration.join("g"));
        store.detach(s, Duration::from_millis(50), |s| async { drop(s) });
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(
            store.resume(7, &token, "dev").await.unwrap_err(),
            ResumeRefusal::NotFound
        );
        assert!(hub.is_empty(), "the expired session left the hub");
    }
}
