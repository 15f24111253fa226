//! The staff application's API: my patient list, search, a conversation (opening it
//! marks it read), sending, the Care Team panel, notify-me, and the event stream.
//!
//! **Architecture Invariant:** every path here goes through [`patient_for`] (or the
//! SQL form of the same rule for the acting user's practice,
//! [`ACCESSIBLE_IN_PRACTICE`]): a patient of another practice is a 404, a restricted
//! one a 403, and neither appears in a list or a search.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use caremsg_entities::{
    CareTeamRole, SmsStatus, care_team_member, notification_settings, patient, practice, user,
};
use chrono::{DateTime, NaiveDate, Utc};
use sea_orm::ActiveValue::Set;
use sea_orm::{ColumnTrait, ConnectionTrait, EntityTrait, QueryFilter, QueryTrait, Value};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::conversation::{self as conv, MessageOut, Page, PageQuery, SendIn};
use super::error::{ApiError, ApiResult};
use super::extract::{ApiJson, ApiPath, ApiQuery, Staff};
use crate::access::{
    ACCESSIBLE_IN_PRACTICE, Access, Denied, accessible_in_practice_values, may_access, patient_for,
};
use crate::actors::conversation::{Author, MarkRead, Reader, SendMessage};
use crate::audit::AuditEntry;
use crate::direct::StreamSocket;
use crate::events::{AccessChange, Event, Subscriber};
use crate::phi::Phi;
use crate::sql::{like_escape, statement};
use crate::state::Shared;
use crate::writer::{Expect, WriteUnit};

/// The staff routes.
pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/v1/staff/patients", get(my_patients))
        .route("/v1/staff/patients/search", get(search))
        .route(
            "/v1/staff/patients/{patient_id}/conversation",
            get(open_conversation),
        )
        .route("/v1/staff/patients/{patient_id}/messages", post(send))
        .route("/v1/staff/patients/{patient_id}/read", post(mark_read))
        .route("/v1/staff/patients/{patient_id}/care-team", get(care_team))
        .route(
            "/v1/staff/patients/{patient_id}/notify",
            put(notify_me).delete(stop_notifying_me),
        )
        .route("/v1/staff/events", get(events))
}

/// The patient `patient_id` (with its practice, and whether `staff` is on its panel) if
/// `staff` may act on it: 404 or 403 otherwise. One database statement.
pub async fn staff_patient(state: &Shared, staff: &Staff, patient_id: &str) -> ApiResult<Access> {
    match patient_for(&state.db, &staff.user, patient_id).await? {
        Ok(found) => Ok(found),
        Err(Denied::NotFound) => Err(ApiError::not_found("patient")),
        Err(Denied::Restricted) => Err(ApiError::forbidden(
            "access_restricted",
            "You are restricted from every program this patient is enrolled in.",
        )),
    }
}

// ----- My patient list ---------------------------------------------------------------

/// `?limit=&cursor=`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Page size (default 50, at most 200).
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<u64>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// One patient on my list.
#[derive(Debug, Serialize, ToSchema)]
pub struct ListedPatient {
    /// The platform's id.
    pub patient_id: String,
    /// "First Last".
    pub name: String,
    /// The red '!': a message I have not viewed, other than my own and system events.
    pub has_unread: bool,
    /// The newest message's time.
    #[serde(serialize_with = "super::timestamp::option::serialize")]
    pub last_message_at: Option<DateTime<Utc>>,
    /// SMS authentication status.
    pub sms_status: String,
    /// Portal enrollment.
    pub portal_enrolled: bool,
}

/// A page of my patients.
#[derive(Debug, Serialize, ToSchema)]
pub struct PatientList {
    /// Newest activity first.
    pub patients: Vec<ListedPatient>,
    /// The cursor of the next page; null at the end.
    pub next_cursor: Option<String>,
}

/// Where a list page ends. The order is "activity as of `snapshot`", so messages
/// arriving while a client pages do not move patients between pages: nothing is
/// skipped and nothing repeated.
#[derive(Debug, Serialize, Deserialize)]
struct ListCursor {
    snapshot: DateTime<Utc>,
    activity: Option<DateTime<Utc>>,
    id: String,
}

/// A page's cursor as the API hands it out (hex of its JSON); shared by the lists.
pub(crate) fn encode_cursor<T: Serialize>(cursor: &T) -> Option<String> {
    serde_json::to_vec(cursor).ok().map(hex::encode)
}

/// A cursor [`encode_cursor`] made, or 422 on `cursor`.
pub(crate) fn decode_cursor<T: for<'de> Deserialize<'de>>(text: &str) -> ApiResult<T> {
    hex::decode(text)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .ok_or_else(|| ApiError::invalid("cursor", "Not a cursor this API returned."))
}

/// `?limit=`: 50 by default, 1 to 200, or 422 on `limit`.
pub(crate) fn page_limit(limit: Option<u64>) -> ApiResult<u64> {
    match limit.unwrap_or(50) {
        n @ 1..=200 => Ok(n),
        _ => Err(ApiError::invalid("limit", "Must be between 1 and 200.")),
    }
}

/// The statement of one page of my patient list, with its values.
///
/// Every part reads the index `care_team_members (user_id, activity, patient_id)`,
/// where `activity` is the patient's newest message time (kept by the database, see
/// the `staff_list` migration), so a page costs the same for a user on 10 care teams
/// or 10,000:
/// - `a`: patients whose newest activity is at or before the snapshot, from the
///   cursor on, newest first, one page of them;
/// - `b`: patients active since the snapshot (few: the messages of the last moments),
///   with their activity as of the snapshot (NULL if they had none), so that nothing
///   moves between pages while a client pages;
/// - `c`: patients with no message yet, after all the others, by id.
///
/// The access rule ([`ACCESSIBLE_IN_PRACTICE`]) is applied in each part before its
/// limit; the red '!' (`has_unread`) is computed only for the page's rows.
fn list_page_sql(
    user: &user::Model,
    reader: &str,
    snapshot: DateTime<Utc>,
    cursor: Option<&ListCursor>,
    limit: u64,
) -> (String, Vec<Value>) {
    let page = (limit + 1) as i64;
    // Mine and accessible, for the care-team row `ct` and its patient `p`; the user's
    // part of the rule is evaluated once per part, not per row.
    let mine = format!("ct.user_id = ? AND {ACCESSIBLE_IN_PRACTICE}");
    let mine_values = || -> [Value; 5] {
        let [a, b, c, d] = accessible_in_practice_values(user);
        [user.id.clone().into(), a, b, c, d]
    };
    // Each part carries the page's columns from the rows it has already read: the
    // patient's, and `last_message_at`, which `ct.activity` copies in the statement
    // that moves it (the `staff_list` migration), so the page joins nothing again.
    let from = "FROM care_team_members ct JOIN patients p ON p.id = ct.patient_id";
    let carried = "ct.activity AS last_message_at, p.first_name, p.last_name, \
                   p.portal_enrolled, p.sms_status";
    let mut values: Vec<Value> = vec![user.id.clone().into(), reader.to_owned().into()];
    let mut parts = Vec::with_capacity(3);
    // a: not active since the snapshot; none left once the cursor is past them.
    let after_dated = cursor.and_then(|c| c.activity.map(|a| (a, c.id.clone())));
    if cursor.is_none() || after_dated.is_some() {
        let mut part = format!(
            "SELECT * FROM (SELECT ct.patient_id AS id, ct.activity AS activity, {carried} \
             {from} WHERE {mine} AND ct.activity <= ?"
        );
        values.extend(mine_values());
        values.push(snapshot.into());
        if let Some((activity, id)) = &after_dated {
            part.push_str(" AND (ct.activity < ? OR (ct.activity = ? AND ct.patient_id < ?))");
            values.extend([(*activity).into(), (*activity).into(), id.clone().into()]);
        }
        part.push_str(" ORDER BY ct.activity DESC, ct.patient_id DESC LIMIT ?) a");
        values.push(page.into());
        parts.push(part);
    }
    // b: active since the snapshot, placed by their activity as of the snapshot.
    let mut part = format!(
        "SELECT * FROM (SELECT ct.patient_id AS id, \
           (SELECT m.created_at FROM messages m WHERE m.patient_id = ct.patient_id \
              AND m.created_at <= ? ORDER BY m.seq DESC LIMIT 1) AS activity, {carried} \
         {from} WHERE {mine} AND ct.activity > ?) b"
    );
    values.push(snapshot.into());
    values.extend(mine_values());
    values.push(snapshot.into());
    match (cursor, &after_dated) {
        (None, _) => {}
        (Some(_), Some((activity, id))) => {
            part.push_str(
                " WHERE b.activity IS NULL OR b.activity < ? OR (b.activity = ? AND b.id < ?)",
            );
            values.extend([(*activity).into(), (*activity).into(), id.clone().into()]);
        }
        (Some(c), None) => {
            part.push_str(" WHERE b.activity IS NULL AND b.id < ?");
            values.push(c.id.clone().into());
        }
    }
    parts.push(part);
    // c: no message yet.
    let mut part = format!(
        "SELECT * FROM (SELECT ct.patient_id AS id, ct.activity AS activity, {carried} {from} \
         WHERE {mine} AND ct.activity IS NULL"
    );
    values.extend(mine_values());
    if let Some(c) = cursor.filter(|c| c.activity.is_none()) {
        part.push_str(" AND ct.patient_id < ?");
        values.push(c.id.clone().into());
    }
    part.push_str(" ORDER BY ct.patient_id DESC LIMIT ?) c");
    values.push(page.into());
    parts.push(part);
    values.push(page.into());
    let order = "CASE WHEN t.activity IS NULL THEN 1 ELSE 0 END, t.activity DESC, t.id DESC";
    let sql = format!(
        "SELECT t.id, t.activity, t.first_name, t.last_name, t.portal_enrolled, t.sms_status, \
           t.last_message_at, \
           CASE WHEN EXISTS (SELECT 1 FROM messages m WHERE m.patient_id = t.id \
              AND m.direction <> 'system' AND (m.author_user_id IS NULL OR m.author_user_id <> ?) \
              AND m.seq > COALESCE((SELECT rm.last_read_seq FROM read_markers rm \
                 WHERE rm.patient_id = t.id AND rm.reader = ?), 0)) THEN 1 ELSE 0 END AS has_unread \
         FROM (SELECT * FROM ({}) t ORDER BY {order} LIMIT ?) t \
         ORDER BY {order}",
        parts.join(" UNION ALL ")
    );
    (sql, values)
}

#[utoipa::path(get, path = "/v1/staff/patients", tag = "staff", params(ListQuery),
    responses((status = 200, body = PatientList)), security(("bearer" = [])))]
/// My patient list: patients whose care team I am on (as member or notification
/// user), newest activity first, with the red '!'.
pub async fn my_patients(
    State(state): State<Shared>,
    staff: Staff,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> ApiResult<Json<PatientList>> {
    let limit = page_limit(query.limit)?;
    let cursor: Option<ListCursor> = query.cursor.as_deref().map(decode_cursor).transpose()?;
    let snapshot = cursor
        .as_ref()
        .map_or_else(|| state.clock.now(), |c| c.snapshot);
    let user = &staff.user;
    let reader = caremsg_entities::read_marker::Model::user_reader(&user.id);
    let (sql, values) = list_page_sql(user, &reader, snapshot, cursor.as_ref(), limit);
    let backend = state.db.get_database_backend();
    let rows = state
        .db
        .query_all_raw(statement(backend, &sql, values))
        .await?;
    let mut patients = Vec::with_capacity(rows.len());
    let mut last: Option<(Option<DateTime<Utc>>, String)> = None;
    for row in rows.iter().take(limit as usize) {
        let id: String = row.try_get("", "id")?;
        let activity: Option<DateTime<Utc>> = row.try_get("", "activity")?;
        let first: String = row.try_get("", "first_name")?;
        let last_name: String = row.try_get("", "last_name")?;
        let status: SmsStatus = row.try_get("", "sms_status")?;
        let unread: i32 = row.try_get("", "has_unread")?;
        patients.push(ListedPatient {
            patient_id: id.clone(),
            name: format!("{first} {last_name}"),
            has_unread: unread != 0,
            last_message_at: row.try_get("", "last_message_at")?,
            sms_status: status.as_str().to_owned(),
            portal_enrolled: row.try_get("", "portal_enrolled")?,
        });
        last = Some((activity, id));
    }
    let next_cursor = if rows.len() as u64 > limit {
        last.and_then(|(activity, id)| {
            encode_cursor(&ListCursor {
                snapshot,
                activity,
                id,
            })
        })
    } else {
        None
    };
    Ok(Json(PatientList {
        patients,
        next_cursor,
    }))
}

// ----- Search ------------------------------------------------------------------------

/// `?q=&limit=&cursor=`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct SearchQuery {
    /// Name words (any word prefix, case-insensitive), a phone number (national or
    /// international), a date of birth (`YYYY-MM-DD` or `MM/DD/YYYY`), or the
    /// platform's patient id. 1 to 100 characters, not only white space.
    #[param(
        min_length = 1,
        max_length = 100,
        pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]*[^\\s\\u0000-\\u001F\\u007F-\\u009F][^\\u0000-\\u001F\\u007F-\\u009F]*$"
    )]
    pub q: String,
    /// Page size (default 50, at most 200).
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<u64>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// A patient found by search.
#[derive(Debug, Serialize, ToSchema)]
pub struct FoundPatient {
    /// The platform's id.
    pub patient_id: String,
    /// "First Last".
    pub name: String,
    /// Date of birth.
    pub date_of_birth: NaiveDate,
    /// Mobile number (E.164).
    pub mobile_phone: Option<String>,
    /// SMS authentication status.
    pub sms_status: String,
    /// Portal enrollment.
    pub portal_enrolled: bool,
}

/// Search results.
#[derive(Debug, Serialize, ToSchema)]
pub struct SearchResults {
    /// By name.
    pub patients: Vec<FoundPatient>,
    /// The cursor of the next page; null at the end.
    pub next_cursor: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct SearchCursor {
    name: String,
    id: String,
}

/// A date of birth as staff type it: `YYYY-MM-DD` or `MM/DD/YYYY`.
fn search_date(q: &str) -> Option<NaiveDate> {
    NaiveDate::parse_from_str(q, "%Y-%m-%d")
        .ok()
        .filter(|_| q.len() == 10)
        .or_else(|| NaiveDate::parse_from_str(q, "%m/%d/%Y").ok())
}

#[utoipa::path(get, path = "/v1/staff/patients/search", tag = "staff", params(SearchQuery),
    responses((status = 200, body = SearchResults)), security(("bearer" = [])))]
/// Any accessible patient of my practice, by name, phone, date of birth or id.
pub async fn search(
    State(state): State<Shared>,
    staff: Staff,
    ApiQuery(query): ApiQuery<SearchQuery>,
) -> ApiResult<Json<SearchResults>> {
    let limit = page_limit(query.limit)?;
    let q = query.q.trim();
    if q.is_empty() || q.chars().count() > 100 {
        return Err(ApiError::invalid("q", "Must be 1 to 100 characters."));
    }
    let cursor: Option<SearchCursor> = query.cursor.as_deref().map(decode_cursor).transpose()?;
    let user = &staff.user;
    let practice = practice::Entity::find_by_id(user.practice_id.clone())
        .one(&state.db)
        .await?
        .ok_or_else(|| {
            ApiError::forbidden("unknown_user", "The acting user's practice is not known.")
        })?;

    let mut criteria: Vec<String> = vec!["p.id = ?".to_owned()];
    let mut criteria_values: Vec<Value> = vec![q.to_owned().into()];
    if let Some(date) = search_date(q) {
        criteria.push("p.date_of_birth = ?".to_owned());
        criteria_values.push(date.into());
    }
    let digits = q.chars().filter(char::is_ascii_digit).count();
    let phone_like = q
        .chars()
        .all(|c| c.is_ascii_digit() || " +-().".contains(c));
    if digits >= 7
        && phone_like
        && let Some(region) = crate::phone::country(&practice.country)
        && let Ok(number) = crate::phone::parse_any(q, region)
    {
        criteria.push("p.mobile_phone = ?".to_owned());
        criteria_values.push(number.into_inner().into());
    }
    let words: Vec<String> = q
        .to_lowercase()
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|w| !w.is_empty())
        .map(str::to_owned)
        .collect();
    if !words.is_empty() && q.chars().any(char::is_alphabetic) {
        let mut all = Vec::new();
        for word in &words {
            let escaped = like_escape(word);
            all.push(
                "(p.search_name LIKE ? ESCAPE '\\' OR p.search_name LIKE ? ESCAPE '\\')".to_owned(),
            );
            criteria_values.push(format!("{escaped}%").into());
            criteria_values.push(format!("% {escaped}%").into());
        }
        criteria.push(format!("({})", all.join(" AND ")));
    }
    let mut values: Vec<Value> = accessible_in_practice_values(user).to_vec();
    values.extend(criteria_values);
    let mut sql = format!(
        "SELECT p.id, p.first_name, p.last_name, p.search_name, p.date_of_birth, p.mobile_phone, \
           p.sms_status, p.portal_enrolled \
         FROM patients p WHERE {ACCESSIBLE_IN_PRACTICE} AND ({})",
        criteria.join(" OR ")
    );
    if let Some(c) = &cursor {
        sql.push_str(" AND (p.search_name > ? OR (p.search_name = ? AND p.id > ?))");
        values.extend([
            c.name.clone().into(),
            c.name.clone().into(),
            c.id.clone().into(),
        ]);
    }
    sql.push_str(" ORDER BY p.search_name, p.id LIMIT ?");
    values.push(((limit + 1) as i64).into());
    let backend = state.db.get_database_backend();
    let rows = state
        .db
        .query_all_raw(statement(backend, &sql, values))
        .await?;
    let mut patients = Vec::new();
    let mut last = None;
    for row in rows.iter().take(limit as usize) {
        let id: String = row.try_get("", "id")?;
        let search_name: String = row.try_get("", "search_name")?;
        let first: String = row.try_get("", "first_name")?;
        let last_name: String = row.try_get("", "last_name")?;
        let status: SmsStatus = row.try_get("", "sms_status")?;
        patients.push(FoundPatient {
            patient_id: id.clone(),
            name: format!("{first} {last_name}"),
            date_of_birth: row.try_get("", "date_of_birth")?,
            mobile_phone: row.try_get("", "mobile_phone")?,
            sms_status: status.as_str().to_owned(),
            portal_enrolled: row.try_get("", "portal_enrolled")?,
        });
        last = Some(SearchCursor {
            name: search_name,
            id,
        });
    }
    let next_cursor = if rows.len() as u64 > limit {
        last.as_ref().and_then(encode_cursor)
    } else {
        None
    };
    Ok(Json(SearchResults {
        patients,
        next_cursor,
    }))
}

// ----- One conversation ------------------------------------------------------------

/// A conversation page as staff see it.
#[derive(Debug, Serialize, ToSchema)]
pub struct StaffConversation {
    /// The page, oldest first.
    #[serde(flatten)]
    pub page: Page,
    /// I am neither on the care team nor a notification user: ask "notify me?".
    pub ask_to_notify: bool,
}

#[utoipa::path(get, path = "/v1/staff/patients/{patient_id}/conversation", tag = "staff",
    params(("patient_id" = String, Path), PageQuery),
    responses((status = 200, body = StaffConversation), (status = 403, body = super::error::ErrorBody),
        (status = 404, body = super::error::ErrorBody)), security(("bearer" = [])))]
/// Opens a conversation (newest page first; `before` pages backwards) and marks it
/// read for me up to its newest message.
pub async fn open_conversation(
    State(state): State<Shared>,
    staff: Staff,
    ApiPath(patient_id): ApiPath<String>,
    ApiQuery(query): ApiQuery<PageQuery>,
) -> ApiResult<Json<StaffConversation>> {
    let Access {
        patient, on_panel, ..
    } = staff_patient(&state, &staff, &patient_id).await?;
    let page = conv::page(&state, &patient.id, &query).await?;
    // The read's audit row commits with the marker it moves.
    let audit = AuditEntry {
        client: &staff.caller.client,
        actor_user_id: Some(&staff.user.id),
        patient_id: Some(&patient.id),
        action: "conversation.read",
        detail: Some(format!("messages={}", page.messages.len())),
    }
    .add_to(WriteUnit::new(), state.clock.now());
    state
        .conversations
        .send(
            &patient.id,
            MarkRead {
                reader: Reader::User(staff.user.id.clone()),
                up_to: Some(page.last_seq),
                also: audit,
            },
        )
        .await??;
    Ok(Json(StaffConversation {
        page,
        ask_to_notify: !on_panel,
    }))
}

#[utoipa::path(post, path = "/v1/staff/patients/{patient_id}/messages", tag = "staff",
    params(("patient_id" = String, Path)), request_body = SendIn,
    responses((status = 201, body = MessageOut), (status = 409, body = super::error::ErrorBody),
        (status = 422, body = super::error::ErrorBody)), security(("bearer" = [])))]
/// Sends a message on every channel the patient can be reached on (idempotent on
/// `client_txn_id`).
pub async fn send(
    State(state): State<Shared>,
    staff: Staff,
    ApiPath(patient_id): ApiPath<String>,
    ApiJson(input): ApiJson<SendIn>,
) -> ApiResult<impl IntoResponse> {
    let access = staff_patient(&state, &staff, &patient_id).await?;
    let stored = state
        .conversations
        .send(
            &access.patient.id.clone(),
            SendMessage {
                author: Author::Staff(staff.user.clone()),
                client: staff.caller.client.clone(),
                body: Phi::new(input.body),
                client_txn_id: input.client_txn_id,
                rows: Some(access.into()),
                serves: None,
            },
        )
        .await??;
    Ok((StatusCode::CREATED, Json(MessageOut::stored(stored))))
}

/// My read marker.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReadOut {
    /// Everything up to this sequence number is read.
    pub last_read_seq: i64,
}

#[utoipa::path(post, path = "/v1/staff/patients/{patient_id}/read", tag = "staff",
    params(("patient_id" = String, Path)),
    responses((status = 200, body = ReadOut)), security(("bearer" = [])))]
/// Marks the conversation read for me up to its newest message.
pub async fn mark_read(
    State(state): State<Shared>,
    staff: Staff,
    ApiPath(patient_id): ApiPath<String>,
) -> ApiResult<Json<ReadOut>> {
    let patient = staff_patient(&state, &staff, &patient_id).await?.patient;
    let last_read_seq = state
        .conversations
        .send(
            &patient.id,
            MarkRead {
                reader: Reader::User(staff.user.id.clone()),
                up_to: None,
                also: WriteUnit::new(),
            },
        )
        .await??;
    Ok(Json(ReadOut { last_read_seq }))
}

// ----- Care Team panel and notify-me ---------------------------------------------------

/// One person in the Care Team panel.
#[derive(Debug, Serialize, ToSchema)]
pub struct PanelEntry {
    /// The user.
    pub user_id: String,
    /// Display name.
    pub name: String,
    /// `care_team` or `notification_user`.
    pub role: String,
    /// Notified now of new patient messages.
    pub notified: bool,
}

#[utoipa::path(get, path = "/v1/staff/patients/{patient_id}/care-team", tag = "staff",
    params(("patient_id" = String, Path)),
    responses((status = 200, body = [PanelEntry])), security(("bearer" = [])))]
/// The Care Team panel: members and notification users, and whether each is notified.
pub async fn care_team(
    State(state): State<Shared>,
    staff: Staff,
    ApiPath(patient_id): ApiPath<String>,
) -> ApiResult<Json<Vec<PanelEntry>>> {
    let patient = staff_patient(&state, &staff, &patient_id).await?.patient;
    Ok(Json(panel(&state.db, &patient).await?))
}

/// The Care Team panel of `patient`: members first, then notification users, by name.
/// A user is notified when active, not restricted from the patient, and their New
/// Patient Message setting is on.
pub async fn panel(
    db: &impl ConnectionTrait,
    patient: &patient::Model,
) -> Result<Vec<PanelEntry>, sea_orm::DbErr> {
    let rows = care_team_member::Entity::find()
        .filter(care_team_member::Column::PatientId.eq(patient.id.clone()))
        .find_also_related(user::Entity)
        .all(db)
        .await?;
    let mut entries = Vec::new();
    for (member, user) in rows {
        let Some(user) = user.filter(|u| u.active && u.practice_id == patient.practice_id) else {
            continue;
        };
        let setting = notification_settings::Entity::find_by_id(user.id.clone())
            .one(db)
            .await?
            .is_none_or(|s| s.new_patient_message);
        let notified = setting && may_access(db, &user.id, &patient.id).await?;
        entries.push(PanelEntry {
            user_id: user.id,
            name: user.name,
            role: match member.role {
                CareTeamRole::Member => "care_team".to_owned(),
                CareTeamRole::NotificationUser => "notification_user".to_owned(),
            },
            notified,
        });
    }
    entries.sort_by(|a, b| (a.role != "care_team", &a.name).cmp(&(b.role != "care_team", &b.name)));
    Ok(entries)
}

/// My place in the panel after a notify-me answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct NotifyOut {
    /// `care_team`, `notification_user`, or `none`.
    pub role: String,
}

#[utoipa::path(put, path = "/v1/staff/patients/{patient_id}/notify", tag = "staff",
    params(("patient_id" = String, Path)),
    responses((status = 200, body = NotifyOut)), security(("bearer" = [])))]
/// "Yes, notify me": I become a notification user of this patient (a care team
/// member already is notified; nothing changes).
pub async fn notify_me(
    State(state): State<Shared>,
    staff: Staff,
    ApiPath(patient_id): ApiPath<String>,
) -> ApiResult<Json<NotifyOut>> {
    let patient = staff_patient(&state, &staff, &patient_id).await?.patient;
    let unit = WriteUnit::new().insert_or_ignore(
        care_team_member::ActiveModel {
            patient_id: Set(patient.id.clone()),
            user_id: Set(staff.user.id.clone()),
            role: Set(CareTeamRole::NotificationUser),
            created_at: Set(state.clock.now()),
        },
        &[
            care_team_member::Column::PatientId,
            care_team_member::Column::UserId,
        ],
    );
    state.writer.write(unit).await?;
    state.events.access_changed(AccessChange::Panel {
        patient_id: &patient.id,
    });
    let role = care_team_member::Entity::find_by_id((patient.id, staff.user.id))
        .one(&state.db)
        .await?
        .map_or("none", |m| match m.role {
            CareTeamRole::Member => "care_team",
            CareTeamRole::NotificationUser => "notification_user",
        });
    Ok(Json(NotifyOut {
        role: role.to_owned(),
    }))
}

#[utoipa::path(delete, path = "/v1/staff/patients/{patient_id}/notify", tag = "staff",
    params(("patient_id" = String, Path)),
    responses((status = 204), (status = 409, body = super::error::ErrorBody)), security(("bearer" = [])))]
/// Turns my notifications for this patient off (notification users only; care team
/// membership comes from the chart).
pub async fn stop_notifying_me(
    State(state): State<Shared>,
    staff: Staff,
    ApiPath(patient_id): ApiPath<String>,
) -> ApiResult<StatusCode> {
    let patient = staff_patient(&state, &staff, &patient_id).await?.patient;
    let current = care_team_member::Entity::find_by_id((patient.id.clone(), staff.user.id.clone()))
        .one(&state.db)
        .await?;
    if current
        .as_ref()
        .is_some_and(|m| m.role == CareTeamRole::Member)
    {
        return Err(ApiError::conflict(
            "care_team_member",
            "You are on this patient's care team; that comes from the chart, not from this switch.",
        ));
    }
    let unit = WriteUnit::new().exec(
        care_team_member::Entity::delete_many()
            .filter(care_team_member::Column::PatientId.eq(patient.id.clone()))
            .filter(care_team_member::Column::UserId.eq(staff.user.id))
            .filter(care_team_member::Column::Role.eq(CareTeamRole::NotificationUser))
            .into_query(),
        Expect::Any,
        "notification user removed",
    );
    state.writer.write(unit).await?;
    state.events.access_changed(AccessChange::Panel {
        patient_id: &patient.id,
    });
    Ok(StatusCode::NO_CONTENT)
}

// ----- Events ------------------------------------------------------------------------

#[utoipa::path(get, path = "/v1/staff/events", tag = "staff",
    responses((status = 200, content_type = "text/event-stream", body = super::conversation::StaffEventData,
        description = "Server-sent events, each `event: <name>` and one `data:` line of JSON: \
        `message` (a message of a patient on my list I may access), `notification` (addressed \
        to me), `sms_status` (a patient on my list), `lagged` (events were missed: re-read), \
        and a last `end` (`{\"reason\"}`) when the daemon ends the stream. Comments (`:`) \
        every `server.sse_keepalive` keep it open. Under a burst, events within `events.coalesce` \
        of the last write wait for the end of that spell and are written together. No `id:` and no replay: after a reconnect, \
        re-read what is shown."),
        (status = 429, body = super::error::ErrorBody, description = "`too_many_streams`: this user has `events.max_streams_per_subscriber` open"),
        (status = 503, body = super::error::ErrorBody, description = "`stream_capacity`: `events.max_streams` are open")),
    security(("bearer" = [])))]
/// Server-sent events for me: new messages and SMS status changes of patients on my
/// list that I may access, and my notifications. The stream ends when I lose access.
pub async fn events(
    State(state): State<Shared>,
    staff: Staff,
    StreamSocket(direct): StreamSocket,
) -> Response {
    let who = Subscriber::Staff {
        user_id: staff.user.id.clone(),
        practice_id: staff.user.practice_id.clone(),
    };
    let subscription = match conv::open_stream(&state, &staff.caller, who) {
        Ok(subscription) => subscription,
        Err(refused) => return refused.into_response(),
    };
    // Subscribed first, checked again after: a deactivation that committed before
    // this check is seen here, one after it ends the stream (Events::access_changed).
    match crate::access::active_user(&state.db, &staff.user.id).await {
        Ok(Some(user)) if staff.caller.serves(&user.practice_id) => {}
        Ok(_) => {
            return ApiError::forbidden("unknown_user", "The acting user is not known.")
                .into_response();
        }
        Err(err) => return ApiError::from(err).into_response(),
    }
    conv::stream(&state, subscription, staff_event, direct)
}

/// A staff stream shows every event the hub gives it (messages and status changes
/// of patients it may see, its user's notifications).
fn staff_event(_: &Event) -> bool {
    true
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use caremsg_entities::{
        CareTeamRole, Channel, Direction, conversation, message, practice, user,
    };
    use caremsg_migration::{Migrator, MigratorTrait};
    use chrono::{Duration, NaiveDate, TimeZone};
    use sea_orm::{ActiveModelTrait, DatabaseConnection, IntoActiveModel, sea_query::Expr};

    use super::*;

    /// A practice, user `u` on the care teams of `n` patients `pt000…`; every patient
    /// with a number divisible by 3 has no message; the others one message at minute
    /// `i` (so the newest activity is the highest such `i`). Half of the care-team
    /// rows are inserted after the messages (the insert trigger must copy the
    /// activity), half before (the update trigger must).
    async fn clinic(db: &DatabaseConnection, n: usize) -> user::Model {
        let t0 = Utc.with_ymd_and_hms(2026, 12, 1, 8, 0, 0).unwrap();
        practice::Model {
            id: "pr".into(),
            name: "pr".into(),
            sms_enabled: false,
            portal_enabled: true,
            country: "US".into(),
            timezone: "UTC".into(),
            sign_outbound_sms: false,
            active: true,
            created_at: t0,
            updated_at: t0,
        }
        .into_active_model()
        .insert(db)
        .await
        .unwrap();
        let u = user::Model {
            id: "u".into(),
            practice_id: "pr".into(),
            name: "u".into(),
            email: None,
            active: true,
            created_at: t0,
            updated_at: t0,
        };
        u.clone().into_active_model().insert(db).await.unwrap();
        for i in 0..n {
            let id = format!("pt{i:03}");
            patient::Model {
                id: id.clone(),
                practice_id: "pr".into(),
                first_name: "f".into(),
                last_name: "l".into(),
                search_name: "f l".into(),
                date_of_birth: NaiveDate::from_ymd_opt(1950, 1, 1).unwrap(),
                mobile_phone: None,
                portal_enrolled: true,
                sms_status: SmsStatus::None,
                sms_status_reason: None,
                last_activity_at: None,
                active: true,
                created_at: t0,
                updated_at: t0,
            }
            .into_active_model()
            .insert(db)
            .await
            .unwrap();
            conversation::Model {
                patient_id: id.clone(),
                practice_id: "pr".into(),
                last_seq: 0,
                last_message_at: None,
                created_at: t0,
            }
            .into_active_model()
            .insert(db)
            .await
            .unwrap();
            let member = care_team_member::Model {
                patient_id: id.clone(),
                user_id: "u".into(),
                role: CareTeamRole::Member,
                created_at: t0,
            };
            if i % 2 == 0 {
                member.clone().into_active_model().insert(db).await.unwrap();
            }
            if i % 3 != 0 {
                message_at(db, &id, 1, t0 + Duration::minutes(i as i64)).await;
            }
            if i % 2 == 1 {
                member.into_active_model().insert(db).await.unwrap();
            }
        }
        u
    }

    /// Stores message `seq` from the patient at `at` and moves the conversation, as
    /// the writer's compare-and-set does.
    async fn message_at(db: &DatabaseConnection, patient: &str, seq: i64, at: DateTime<Utc>) {
        message::Model {
            id: uuid::Uuid::now_v7().to_string(),
            patient_id: patient.into(),
            seq,
            direction: Direction::FromPatient,
            channel: Channel::Portal,
            author_user_id: None,
            body: "b".into(),
            client_txn_key: None,
            gateway: None,
            provider_message_id: None,
            possible_opt_out: false,
            read_by_patient_at: None,
            created_at: at,
        }
        .into_active_model()
        .insert(db)
        .await
        .unwrap();
        conversation::Entity::update_many()
            .col_expr(conversation::Column::LastSeq, Expr::value(seq))
            .col_expr(conversation::Column::LastMessageAt, Expr::value(Some(at)))
            .filter(conversation::Column::PatientId.eq(patient))
            .exec(db)
            .await
            .unwrap();
    }

    /// Every page of `user`'s list at `snapshot`, walked to the end.
    async fn walk(
        db: &DatabaseConnection,
        user: &user::Model,
        snapshot: DateTime<Utc>,
        limit: u64,
        between_pages: impl AsyncFn(usize),
    ) -> Vec<String> {
        let mut out = Vec::new();
        let mut cursor: Option<ListCursor> = None;
        for page in 0.. {
            let (sql, values) = list_page_sql(user, "user:u", snapshot, cursor.as_ref(), limit);
            let rows = db
                .query_all_raw(statement(db.get_database_backend(), &sql, values))
                .await
                .unwrap();
            for row in rows.iter().take(limit as usize) {
                out.push(row.try_get::<String>("", "id").unwrap());
            }
            if rows.len() as u64 <= limit {
                break;
            }
            let last = &rows[limit as usize - 1];
            cursor = Some(ListCursor {
                snapshot,
                activity: last.try_get("", "activity").unwrap(),
                id: last.try_get("", "id").unwrap(),
            });
            between_pages(page).await;
        }
        out
    }

    /// The list pages in activity order (newest first, then the patients without a
    /// message by id), each patient once, while messages arrive between pages — also
    /// a first message to a patient who had none — and the triggers keep the index's
    /// copy of the activity right for care-team rows added before and after messages.
    #[tokio::test]
    async fn pages_follow_activity_as_of_the_snapshot() {
        for (db, schema) in crate::db::test_databases("list").await {
            let user = clinic(&db, 40).await;
            let t0 = Utc.with_ymd_and_hms(2026, 12, 1, 8, 0, 0).unwrap();
            let snapshot = t0 + Duration::hours(1);
            let mut expected: Vec<(Option<i64>, String)> = (0..40)
                .map(|i| ((i % 3 != 0).then_some(i as i64), format!("pt{i:03}")))
                .collect();
            expected.sort_by(|a, b| match (a.0, b.0) {
                (Some(x), Some(y)) => y.cmp(&x).then(b.1.cmp(&a.1)),
                (Some(_), None) => std::cmp::Ordering::Less,
                (None, Some(_)) => std::cmp::Ordering::Greater,
                (None, None) => b.1.cmp(&a.1),
            });
            let expected: Vec<String> = expected.into_iter().map(|(_, id)| id).collect();
            let quiet = walk(&db, &user, snapshot, 7, async |_| {}).await;
            assert_eq!(quiet, expected);
            // Messages after the snapshot, while paging: to a patient already listed,
            // to one not reached yet, and a first message to one without any.
            let busy = walk(&db, &user, snapshot, 7, async |page| {
                if page == 0 {
                    let later = snapshot + Duration::minutes(5);
                    message_at(&db, &expected[0], 2, later).await;
                    message_at(&db, &expected[20], 2, later).await;
                    message_at(&db, "pt003", 1, later).await;
                }
            })
            .await;
            assert_eq!(busy, expected);
            // A fresh list sees the new activity.
            let fresh = walk(&db, &user, snapshot + Duration::hours(1), 50, async |_| {}).await;
            assert_eq!(fresh[3..], {
                let mut rest: Vec<String> = expected
                    .iter()
                    .filter(|id| {
                        ![expected[0].as_str(), expected[20].as_str(), "pt003"]
                            .contains(&id.as_str())
                    })
                    .cloned()
                    .collect();
                rest.truncate(37);
                rest
            });
            crate::db::drop_test_database(&db, schema).await;
        }
    }

    /// Every part of the page reads the `(user_id, activity, patient_id)` index of the
    /// care-team rows, never the whole of them (SQLite's plan).
    #[tokio::test]
    async fn a_page_reads_the_activity_index() {
        let db = sea_orm::Database::connect("sqlite::memory:").await.unwrap();
        Migrator::up(&db, None).await.unwrap();
        let user = clinic(&db, 30).await;
        let snapshot = Utc::now();
        let dated = ListCursor {
            snapshot,
            activity: Some(snapshot - Duration::days(3)),
            id: "pt010".into(),
        };
        let undated = ListCursor {
            snapshot,
            activity: None,
            id: "pt010".into(),
        };
        for cursor in [None, Some(&dated), Some(&undated)] {
            let (sql, values) = list_page_sql(&user, "user:u", snapshot, cursor, 50);
            let plan = db
                .query_all_raw(statement(
                    db.get_database_backend(),
                    &format!("EXPLAIN QUERY PLAN {sql}"),
                    values,
                ))
                .await
                .unwrap();
            let lines: Vec<String> = plan
                .iter()
                .map(|row| row.try_get::<String>("", "detail").unwrap())
                .collect();
            let text = lines.join("\n");
            assert!(
                !lines.iter().any(|l| l.starts_with("SCAN ct")),
                "a full scan of the care-team rows:\n{text}"
            );
            let parts = if cursor.is_some_and(|c| c.activity.is_none()) {
                2
            } else {
                3
            };
            assert_eq!(
                lines
                    .iter()
                    .filter(|l| l.starts_with("SEARCH ct USING")
                        && l.contains("idx_care_team_members_user_id_activity_patient_id"))
                    .count(),
                parts,
                "{text}"
            );
        }
    }
}
