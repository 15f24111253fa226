//! The staff application's notification API: my notification settings (`GET`, and
//! `PUT` merging the fields given), my notifications (newest first, paged, with their
//! read state) and marking one read. Live notifications reach the staff event stream
//! as `notification` events (`super::conversation::wire`).
//!
//! The rules — defaults, the reminder's dependency on New Patient Message, email that
//! falls back to in-app — are `crate::notifications::settings`'; this module maps them
//! to JSON.

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use caremsg_entities::{notification, notification_settings, user};
use chrono::{DateTime, Utc};
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryTrait, Value};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, ApiResult};
use super::extract::{ApiJson, ApiPath, ApiQuery, Staff};
use super::staff::page_limit;
use crate::access::{ACCESSIBLE_IN_PRACTICE, Denied, accessible_in_practice_values, patient_for};
use crate::audit::AuditEntry;
use crate::notifications::settings::{
    self, Change, Channels, Prefs, Setting, SettingsError, email_unavailable,
};
use crate::sql::statement;
use crate::state::Shared;
use crate::writer::{Expect, WriteUnit};

/// The notification routes.
pub fn routes() -> Router<Shared> {
    Router::new()
        .route(
            "/v1/staff/settings/notifications",
            get(get_settings).put(put_settings),
        )
        .route("/v1/staff/notifications", get(list))
        .route(
            "/v1/staff/notifications/{notification_id}/read",
            post(mark_read),
        )
}

// ----- Settings ----------------------------------------------------------------------

/// A channel a notification is delivered on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ChannelName {
    /// Stored, listed in `GET /v1/staff/notifications`, pushed on the event stream.
    InApp,
    /// An email through the notifications' email gateway; it carries no patient
    /// information, only the practice, the kind and a link.
    Email,
}

fn channel_names(channels: Channels) -> Vec<ChannelName> {
    let mut names = Vec::new();
    if channels.in_app {
        names.push(ChannelName::InApp);
    }
    if channels.email {
        names.push(ChannelName::Email);
    }
    names
}

/// The channels of each setting, keyed by setting name.
#[derive(Debug, Serialize, ToSchema)]
pub struct ChannelsOut {
    /// Default `["in_app"]`.
    pub new_patient_message: Vec<ChannelName>,
    /// Default `["in_app"]`.
    pub unread_reminder: Vec<ChannelName>,
    /// Default `["in_app"]`.
    pub two_way_texting: Vec<ChannelName>,
}

/// My notification settings.
#[derive(Debug, Serialize, ToSchema)]
pub struct SettingsOut {
    /// Notified of every message from the patients in whose Care Team panel I am
    /// (default on).
    pub new_patient_message: bool,
    /// Reminded once when a patient message stays unviewed for the configured time
    /// (24 hours by default); only while `new_patient_message` is on (default off).
    pub unread_reminder: bool,
    /// Notified of SMS authentication status changes (enabled, failed, opted out)
    /// of patients in my panel or whose authentication I started (default off).
    pub two_way_texting: bool,
    /// Where each setting's notifications go.
    pub channels: ChannelsOut,
    /// Why email cannot reach me, when it cannot (`no email address`, `no email
    /// gateway configured`): settings whose channels name email are then in-app.
    pub email_unavailable: Option<String>,
}

/// The channels to change, keyed by setting name; a setting not named keeps its own.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChannelsIn {
    /// At least one channel.
    pub new_patient_message: Option<Vec<ChannelName>>,
    /// At least one channel.
    pub unread_reminder: Option<Vec<ChannelName>>,
    /// At least one channel.
    pub two_way_texting: Option<Vec<ChannelName>>,
}

/// A change of my settings: the fields given are changed, the others kept.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SettingsIn {
    /// New Patient Message. Turning it off turns the reminder off.
    pub new_patient_message: Option<bool>,
    /// Unread Message Reminder: `true` while New Patient Message is (or stays) off
    /// is refused (422, field `unread_reminder`).
    pub unread_reminder: Option<bool>,
    /// Two-Way Texting.
    pub two_way_texting: Option<bool>,
    /// Channels per setting.
    pub channels: Option<ChannelsIn>,
}

fn settings_out(prefs: &Prefs, email: Option<&str>, state: &Shared) -> SettingsOut {
    let config = state.settings.load();
    SettingsOut {
        new_patient_message: prefs.new_patient_message,
        unread_reminder: prefs.is_on(Setting::UnreadReminder),
        two_way_texting: prefs.two_way_texting,
        channels: ChannelsOut {
            new_patient_message: channel_names(prefs.channels(Setting::NewPatientMessage)),
            unread_reminder: channel_names(prefs.channels(Setting::UnreadReminder)),
            two_way_texting: channel_names(prefs.channels(Setting::TwoWayTexting)),
        },
        email_unavailable: email_unavailable(email, &config.notifications).map(str::to_owned),
    }
}

async fn current_prefs(state: &Shared, user_id: &str) -> ApiResult<Prefs> {
    let row = notification_settings::Entity::find_by_id(user_id.to_owned())
        .one(&state.db)
        .await?;
    Ok(Prefs::from_row(row.as_ref()))
}

#[utoipa::path(get, path = "/v1/staff/settings/notifications", tag = "staff",
    responses((status = 200, body = SettingsOut)), security(("bearer" = [])))]
/// My notification settings.
pub async fn get_settings(
    State(state): State<Shared>,
    staff: Staff,
) -> ApiResult<Json<SettingsOut>> {
    let prefs = current_prefs(&state, &staff.user.id).await?;
    Ok(Json(settings_out(
        &prefs,
        staff.user.email.as_deref(),
        &state,
    )))
}

#[utoipa::path(put, path = "/v1/staff/settings/notifications", tag = "staff",
    request_body = SettingsIn,
    responses((status = 200, body = SettingsOut), (status = 422, body = super::error::ErrorBody)),
    security(("bearer" = [])))]
/// Changes my notification settings: the fields given are merged into the current
/// ones; returns the settings now in force.
pub async fn put_settings(
    State(state): State<Shared>,
    staff: Staff,
    ApiJson(input): ApiJson<SettingsIn>,
) -> ApiResult<Json<SettingsOut>> {
    let mut change = Change {
        new_patient_message: input.new_patient_message,
        unread_reminder: input.unread_reminder,
        two_way_texting: input.two_way_texting,
        channels: Vec::new(),
    };
    let channels = input.channels.unwrap_or_default();
    for (setting, names) in [
        (Setting::NewPatientMessage, channels.new_patient_message),
        (Setting::UnreadReminder, channels.unread_reminder),
        (Setting::TwoWayTexting, channels.two_way_texting),
    ] {
        if let Some(names) = names {
            change.channels.push((
                setting,
                Channels {
                    in_app: names.contains(&ChannelName::InApp),
                    email: names.contains(&ChannelName::Email),
                },
            ));
        }
    }
    let current = current_prefs(&state, &staff.user.id).await?;
    let next = settings::apply(current, &change).map_err(|err| match err {
        SettingsError::ReminderWithoutNewPatientMessage => ApiError::invalid(
            "unread_reminder",
            "The Unread Message Reminder can be on only while New Patient Message is on.",
        )
        .with_code("requires_new_patient_message"),
        SettingsError::NoChannel(setting) => ApiError::invalid(
            format!("channels.{}", setting.name()),
            "Name at least one channel (in_app, email); to stop these notifications, turn the setting off.",
        ),
    })?;
    let now = state.clock.now();
    let unit = WriteUnit::new().upsert(
        next.to_row(&staff.user.id, now),
        &[notification_settings::Column::UserId],
    );
    let audit = AuditEntry {
        client: &staff.caller.client,
        actor_user_id: Some(&staff.user.id),
        patient_id: None,
        action: "notification_settings.update",
        detail: None,
    };
    state.writer.write(audit.add_to(unit, now)).await?;
    Ok(Json(settings_out(
        &next,
        staff.user.email.as_deref(),
        &state,
    )))
}

// ----- Notifications -----------------------------------------------------------------

/// A notification, as listed and as pushed on the event stream.
#[derive(Debug, Serialize, ToSchema)]
pub struct NotificationOut {
    /// Its id.
    pub id: String,
    /// `new_patient_message`, `unread_reminder` or `sms_status`.
    pub kind: String,
    /// The patient it is about (open the conversation for the rest).
    pub patient_id: String,
    /// The message it is about: the new one, or the oldest unviewed one (reminder),
    /// or the status change's system message.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message_seq: Option<i64>,
    /// The new SMS status (`sms_status` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sms_status: Option<String>,
    /// When it was created.
    #[serde(serialize_with = "super::timestamp::serialize")]
    pub created_at: DateTime<Utc>,
    /// When I marked it read; null while unread. (A notification whose channels are
    /// email only is stored already read.)
    #[serde(serialize_with = "super::timestamp::option::serialize")]
    pub read_at: Option<DateTime<Utc>>,
}

impl From<&notification::Model> for NotificationOut {
    fn from(n: &notification::Model) -> Self {
        Self {
            id: n.id.clone(),
            kind: n.kind.as_str().to_owned(),
            patient_id: n.patient_id.clone(),
            message_seq: n.message_seq,
            sms_status: n.sms_status.map(|s| s.as_str().to_owned()),
            created_at: n.created_at,
            read_at: n.read_at,
        }
    }
}

/// `?limit=&cursor=`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct NotificationsQuery {
    /// Page size (default 50, at most 200).
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<u64>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// A page of my notifications.
#[derive(Debug, Serialize, ToSchema)]
pub struct NotificationList {
    /// Newest first.
    pub notifications: Vec<NotificationOut>,
    /// The cursor of the next (older) page; null at the end.
    pub next_cursor: Option<String>,
    /// How many of my notifications are unread, on every page.
    pub unread: u64,
}

/// Where a page ended.
#[derive(Debug, Serialize, Deserialize)]
struct Cursor {
    created_at: DateTime<Utc>,
    id: String,
}

/// The notifications of `user` about patients still active and accessible to the
/// user (the `WHERE` of the list and of the unread count).
fn visible(user: &user::Model) -> (String, Vec<Value>) {
    let mut values = vec![user.id.clone().into()];
    values.extend(accessible_in_practice_values(user));
    (
        format!(
            "FROM notifications n JOIN patients p ON p.id = n.patient_id \
             WHERE n.user_id = ? AND {ACCESSIBLE_IN_PRACTICE}"
        ),
        values,
    )
}

#[utoipa::path(get, path = "/v1/staff/notifications", tag = "staff", params(NotificationsQuery),
    responses((status = 200, body = NotificationList)), security(("bearer" = [])))]
/// My notifications, newest first, with their read state. Notifications about a
/// patient I may no longer access, or one removed, are left out.
pub async fn list(
    State(state): State<Shared>,
    staff: Staff,
    ApiQuery(query): ApiQuery<NotificationsQuery>,
) -> ApiResult<Json<NotificationList>> {
    let limit = page_limit(query.limit)?;
    let cursor: Option<Cursor> = query
        .cursor
        .as_deref()
        .map(|text| {
            hex::decode(text)
                .ok()
                .and_then(|bytes| serde_json::from_slice(&bytes).ok())
                .ok_or_else(|| ApiError::invalid("cursor", "Not a cursor this API returned."))
        })
        .transpose()?;
    let backend = state.db.get_database_backend();
    let (from, base) = visible(&staff.user);

    let mut sql = format!("SELECT n.* {from}");
    let mut values = base.clone();
    if let Some(c) = &cursor {
        sql.push_str(" AND (n.created_at < ? OR (n.created_at = ? AND n.id < ?))");
        values.extend([
            c.created_at.into(),
            c.created_at.into(),
            c.id.clone().into(),
        ]);
    }
    sql.push_str(" ORDER BY n.created_at DESC, n.id DESC LIMIT ?");
    values.push(((limit + 1) as i64).into());
    let mut rows = notification::Entity::find()
        .from_raw_sql(statement(backend, &sql, values))
        .all(&state.db)
        .await?;
    let more = rows.len() as u64 > limit;
    rows.truncate(limit as usize);
    let next_cursor = if more {
        rows.last().and_then(|n| {
            serde_json::to_vec(&Cursor {
                created_at: n.created_at,
                id: n.id.clone(),
            })
            .ok()
            .map(hex::encode)
        })
    } else {
        None
    };

    let count_sql = format!("SELECT COUNT(*) AS unread {from} AND n.read_at IS NULL");
    let unread: i64 = match state
        .db
        .query_one_raw(statement(backend, &count_sql, base))
        .await?
    {
        Some(row) => row.try_get("", "unread")?,
        None => 0,
    };
    Ok(Json(NotificationList {
        notifications: rows.iter().map(NotificationOut::from).collect(),
        next_cursor,
        unread: u64::try_from(unread).unwrap_or(0),
    }))
}

#[utoipa::path(post, path = "/v1/staff/notifications/{notification_id}/read", tag = "staff",
    params(("notification_id" = String, Path)),
    responses((status = 200, body = NotificationOut), (status = 403, body = super::error::ErrorBody),
        (status = 404, body = super::error::ErrorBody)),
    security(("bearer" = [])))]
/// Marks one of my notifications read (again: it keeps its first `read_at`). Another
/// user's notification, or one about a patient removed or of a deactivated practice,
/// is a 404; one about a patient I am now restricted from is a 403
/// `access_restricted` (the access rule, as for the patient's own paths).
pub async fn mark_read(
    State(state): State<Shared>,
    staff: Staff,
    ApiPath(notification_id): ApiPath<String>,
) -> ApiResult<Json<NotificationOut>> {
    let mine = || {
        notification::Entity::find_by_id(notification_id.clone())
            .filter(notification::Column::UserId.eq(staff.user.id.clone()))
    };
    let Some(found) = mine().one(&state.db).await? else {
        return Err(ApiError::not_found("notification"));
    };
    // The access rule, as for a direct request about the patient: a patient removed
    // (or of a deactivated practice) makes the notification unknown, as the list
    // leaves it out; a patient the user is now restricted from is 403.
    match patient_for(&state.db, &staff.user, &found.patient_id).await? {
        Ok(_) => {}
        Err(Denied::NotFound) => return Err(ApiError::not_found("notification")),
        Err(Denied::Restricted) => {
            return Err(ApiError::forbidden(
                "access_restricted",
                "You are restricted from every program this notification's patient is enrolled in.",
            ));
        }
    }
    if found.read_at.is_none() {
        let unit = WriteUnit::new().exec(
            notification::Entity::update_many()
                .col_expr(
                    notification::Column::ReadAt,
                    Expr::value(Some(state.clock.now())),
                )
                .filter(notification::Column::Id.eq(found.id.clone()))
                .filter(notification::Column::ReadAt.is_null())
                .into_query(),
            Expect::Any,
            "notification read",
        );
        state.writer.write(unit).await?;
    }
    let read = mine()
        .one(&state.db)
        .await?
        .ok_or_else(|| ApiError::not_found("notification"))?;
    Ok(Json(NotificationOut::from(&read)))
}
