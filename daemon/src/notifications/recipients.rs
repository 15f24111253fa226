//! Who may be notified about a patient, read in one query per event (or per batch of
//! due reminders): the users in the patient's Care Team panel — care team members and
//! notification users — who are active, of the patient's practice and not restricted
//! from the patient, with their settings, email address and read marker.
//!
//! The access rule is [`crate::access::ACCESSIBLE`] itself, with the user taken from
//! the row instead of a parameter, so a restricted user is never a recipient. What
//! the caller then requires of the settings (New Patient Message on, the reminder on,
//! Two-Way Texting on) is its own rule.

use std::collections::BTreeSet;
use std::sync::LazyLock;

use caremsg_entities::Direction;
use caremsg_entities::read_marker::READER_USER_PREFIX;
use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DbErr, QueryResult, Value};

use super::settings::{COLUMNS, Prefs};
use crate::access::ACCESSIBLE;
use crate::sql::statement;

/// A user who may be notified about a patient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipient {
    /// The patient the notification is about.
    pub patient_id: String,
    /// The patient's practice.
    pub practice_id: String,
    /// Its display name (the only practice detail an email carries).
    pub practice_name: String,
    /// The user.
    pub user_id: String,
    /// Where email notifications go, if anywhere.
    pub email: Option<String>,
    /// The user's notification settings.
    pub prefs: Prefs,
    /// The user's read marker in the patient's conversation (0: nothing viewed).
    pub last_read: i64,
    /// The oldest stored message from the patient after `last_read` (the start of
    /// the user's unread streak): its sequence number and time, read in the same
    /// statement so that arming reminders reads nothing per user.
    pub streak_start: Option<(i64, DateTime<Utc>)>,
    /// In the patient's Care Team panel (a Two-Way Texting recipient may instead have
    /// started the authentication).
    pub in_panel: bool,
}

/// The access rule for the user of the row (`u.id`) and the patient `p`.
fn accessible_to_row_user() -> String {
    ACCESSIBLE.replacen('?', "u.id", 1)
}

fn select_columns() -> String {
    let settings: Vec<String> = COLUMNS.iter().map(|c| format!("s.{c} AS s_{c}")).collect();
    // The oldest message from the patient after the user's marker, twice (SQLite and
    // PostgreSQL share no row-valued subquery): each is one probe of the messages'
    // (patient_id, seq) key.
    let streak = |column: &str| {
        format!(
            "(SELECT m.{column} FROM messages m WHERE m.patient_id = p.id \
               AND m.direction = '{}' AND m.seq > COALESCE(rm.last_read_seq, 0) \
             ORDER BY m.seq LIMIT 1)",
            Direction::FromPatient.as_str()
        )
    };
    format!(
        "p.id AS patient_id, p.practice_id AS practice_id, pr.name AS practice_name, \
         u.id AS user_id, u.email AS email, {}, \
         COALESCE(rm.last_read_seq, 0) AS last_read, \
         {} AS streak_seq, {} AS streak_at",
        settings.join(", "),
        streak("seq"),
        streak("created_at"),
    )
}

/// The user's read marker of the row's patient (`rm`), after the row's joins.
fn marker_join() -> String {
    format!(
        "LEFT JOIN read_markers rm ON rm.patient_id = p.id \
           AND rm.reader = '{READER_USER_PREFIX}' || u.id"
    )
}

fn placeholders(n: usize) -> String {
    vec!["?"; n].join(", ")
}

/// The settings' names in the result rows (`s_<column>`, as [`select_columns`]
/// names them), made once.
static SETTING_ALIASES: LazyLock<Vec<String>> =
    LazyLock::new(|| COLUMNS.iter().map(|c| format!("s_{c}")).collect());

fn recipient(row: &QueryResult, in_panel: bool) -> Result<Recipient, DbErr> {
    let mut values = [None; 9];
    for (value, alias) in values.iter_mut().zip(SETTING_ALIASES.iter()) {
        *value = row.try_get::<Option<bool>>("", alias)?;
    }
    Ok(Recipient {
        patient_id: row.try_get("", "patient_id")?,
        practice_id: row.try_get("", "practice_id")?,
        practice_name: row.try_get("", "practice_name")?,
        user_id: row.try_get("", "user_id")?,
        email: row.try_get("", "email")?,
        prefs: Prefs::from_columns(values),
        last_read: row.try_get("", "last_read")?,
        streak_start: match row.try_get::<Option<i64>>("", "streak_seq")? {
            Some(seq) => Some((seq, row.try_get("", "streak_at")?)),
            None => None,
        },
        in_panel,
    })
}

/// [`in_panels`]'s statement up to its patients' placeholders (the rest varies with
/// the number of patients and users), made once.
///
/// CROSS JOIN keeps SQLite's join order: from the panel rows to their users. Left to
/// itself, without statistics, it may prefer walking every user of the practice
/// (`u.practice_id = p.practice_id` matches an index), ten times slower for a team of
/// ten in a practice of a thousand. PostgreSQL plans it as a plain join.
static IN_PANELS_HEAD: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT {} FROM care_team_members ct \
           CROSS JOIN patients p CROSS JOIN practices pr CROSS JOIN users u \
           LEFT JOIN notification_settings s ON s.user_id = u.id {} \
         WHERE p.id = ct.patient_id AND pr.id = p.practice_id AND u.id = ct.user_id \
           AND u.active = ? AND p.active = ? AND pr.active = ? AND u.practice_id = p.practice_id \
           AND {} AND ct.patient_id IN (",
        select_columns(),
        marker_join(),
        accessible_to_row_user(),
    )
});

/// The users in the Care Team panels of `patients` who may be notified about them
/// (whatever their settings), optionally only those among `users`, in no particular
/// order. Unknown or deleted patients have none.
pub async fn in_panels(
    db: &impl ConnectionTrait,
    patients: &BTreeSet<String>,
    users: Option<&BTreeSet<String>>,
) -> Result<Vec<Recipient>, DbErr> {
    if patients.is_empty() || users.is_some_and(BTreeSet::is_empty) {
        return Ok(Vec::new());
    }
    let mut sql = format!("{}{})", *IN_PANELS_HEAD, placeholders(patients.len()));
    let mut values: Vec<Value> = vec![true.into(), true.into(), true.into()];
    values.extend(patients.iter().map(|p| Value::from(p.clone())));
    if let Some(users) = users {
        sql.push_str(&format!(
            " AND ct.user_id IN ({})",
            placeholders(users.len())
        ));
        values.extend(users.iter().map(|u| Value::from(u.clone())));
    }
    let rows = db
        .query_all_raw(statement(db.get_database_backend(), &sql, values))
        .await?;
    rows.iter().map(|row| recipient(row, true)).collect()
}

/// The users who may be told about an SMS authentication status change of
/// `patient_id`: those in its Care Team panel and the one who started the
/// authentication (`started_by`), if still active, of the practice and not
/// restricted — whatever their settings.
pub async fn for_sms_status(
    db: &impl ConnectionTrait,
    patient_id: &str,
    started_by: Option<&str>,
) -> Result<Vec<Recipient>, DbErr> {
    let values: Vec<Value> = vec![
        patient_id.to_owned().into(),
        true.into(),
        true.into(),
        true.into(),
        Value::from(started_by.map(str::to_owned)),
    ];
    let rows = db
        .query_all_raw(statement(
            db.get_database_backend(),
            &FOR_SMS_STATUS,
            values,
        ))
        .await?;
    rows.iter()
        .map(|row| {
            let in_panel: i32 = row.try_get("", "in_panel")?;
            recipient(row, in_panel != 0)
        })
        .collect()
}

/// [`for_sms_status`]'s statement, made once.
static FOR_SMS_STATUS: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT {}, CASE WHEN EXISTS (SELECT 1 FROM care_team_members ct \
             WHERE ct.patient_id = p.id AND ct.user_id = u.id) THEN 1 ELSE 0 END AS in_panel \
         FROM patients p \
           JOIN practices pr ON pr.id = p.practice_id \
           JOIN users u ON u.practice_id = p.practice_id \
           LEFT JOIN notification_settings s ON s.user_id = u.id {} \
         WHERE p.id = ? AND u.active = ? AND p.active = ? AND pr.active = ? AND {} \
           AND (u.id = ? OR EXISTS (SELECT 1 FROM care_team_members ct \
             WHERE ct.patient_id = p.id AND ct.user_id = u.id)) \
         ORDER BY u.id",
        select_columns(),
        marker_join(),
        accessible_to_row_user(),
    )
});

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_access_rule_is_reused_with_the_row_user() {
        assert_eq!(ACCESSIBLE.matches('?').count(), 1);
        let rule = accessible_to_row_user();
        assert!(!rule.contains('?'));
        assert!(rule.contains("acc_u.id = u.id"));
    }
}
