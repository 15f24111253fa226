//! The append-only audit log: who touched which patient's information, how and when.
//!
//! Every read of a conversation and every change made through the API adds one row.
//! **Architecture Invariant:** nothing in caremsg updates or deletes `audit_log` rows;
//! the table has no foreign keys, so it outlives anything it mentions.

use caremsg_entities::audit_log;
use chrono::{DateTime, Utc};
use sea_orm::ActiveValue::Set;

use crate::writer::{WriteError, WriteUnit, Writer};

/// One audited action.
#[derive(Debug, Clone)]
pub struct AuditEntry<'a> {
    /// The API client's configured name.
    pub client: &'a str,
    /// The staff user acting, if any.
    pub actor_user_id: Option<&'a str>,
    /// The patient whose information was touched, if any.
    pub patient_id: Option<&'a str>,
    /// What happened, e.g. `admin.patient.upsert`, `conversation.read`.
    pub action: &'static str,
    /// Extra, non-PHI detail (ids, counts).
    pub detail: Option<String>,
}

impl AuditEntry<'_> {
    /// Adds this entry to `unit`, so it commits with the change it describes.
    pub fn add_to(&self, unit: WriteUnit, at: DateTime<Utc>) -> WriteUnit {
        unit.insert(audit_log::ActiveModel {
            id: Set(uuid::Uuid::now_v7().to_string()),
            at: Set(at),
            client: Set(self.client.to_owned()),
            actor_user_id: Set(self.actor_user_id.map(str::to_owned)),
            patient_id: Set(self.patient_id.map(str::to_owned)),
            action: Set(self.action.to_owned()),
            detail: Set(self.detail.clone()),
        })
    }

    /// Records this entry on its own (for reads, which change nothing else).
    pub async fn record(&self, writer: &Writer, at: DateTime<Utc>) -> Result<(), WriteError> {
        writer.write(self.add_to(WriteUnit::new(), at)).await
    }
}
