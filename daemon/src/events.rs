//! Live events: what the server-sent event streams of staff and portal carry.
//!
//! Events are published *after* the change they describe has committed; a stream
//! that falls behind loses events (and is told so), never the stored data — a client
//! re-reads the conversation.

use std::sync::Arc;

use caremsg_entities::{Channel, Direction, notification};
use tokio::sync::broadcast;

use crate::phi::Body;

/// A new message in a conversation.
#[derive(Debug, Clone)]
pub struct MessageEvent {
    /// The conversation.
    pub patient_id: String,
    /// Its practice.
    pub practice_id: String,
    /// The message's position.
    pub seq: i64,
    /// Who it is from.
    pub direction: Direction,
    /// Where it arrived or went.
    pub channel: Channel,
    /// The text (PHI: only the stream's JSON shows it).
    pub body: Body,
}

/// An SMS authentication status change of a patient.
#[derive(Debug, Clone)]
pub struct SmsStatusEvent {
    /// The patient.
    pub patient_id: String,
    /// Its practice.
    pub practice_id: String,
    /// The new status.
    pub status: caremsg_entities::SmsStatus,
    /// Why, when known (`wrong_dob_3x`, `expired`, `patient_stop`, ...).
    pub reason: Option<String>,
}

/// Everything the streams may carry.
#[derive(Debug, Clone)]
pub enum Event {
    /// A message was stored.
    Message(Arc<MessageEvent>),
    /// A patient's SMS authentication status changed.
    SmsStatus(Arc<SmsStatusEvent>),
    /// A notification for one staff user was stored (only that user's stream shows it).
    Notification {
        /// The user notified.
        user_id: String,
        /// The notification.
        notification: Arc<notification::Model>,
    },
}

/// The in-process event bus.
#[derive(Debug, Clone)]
pub struct Events {
    // Every stream subscribes to this; its capacity bounds how far one may lag.
    tx: broadcast::Sender<Event>,
}

impl Events {
    /// A bus keeping up to `capacity` events for slow subscribers.
    pub fn new(capacity: usize) -> Self {
        Self {
            tx: broadcast::channel(capacity.max(16)).0,
        }
    }

    /// Publishes `event` to every current subscriber.
    pub fn publish(&self, event: Event) {
        // No subscriber is not an error.
        let _ = self.tx.send(event);
    }

    /// A new subscription, starting now.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.tx.subscribe()
    }
}
