//! Admin: the outbox's deliveries by status, and the resolution of the ones whose
//! outcome is unknown.
//!
//! A delivery the daemon was sending when it stopped (a crash, a kill, a power cut)
//! is marked `reconcile` at the next start: whether the provider took it is unknown,
//! so it is never sent again on its own. An operator checks with the provider (the
//! delivery id is the idempotency key the provider was given, and the loopback
//! gateway's outbox line carries it as `delivery_id`), then resolves it here:
//! `resend` queues it again, `mark_sent` and `mark_failed` close it. Each resolution
//! is audited; only a `reconcile` delivery can be resolved.

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use caremsg_entities::{DeliveryStatus, delivery};
use chrono::{DateTime, Utc};
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, Condition, EntityTrait, QueryFilter, QueryOrder, QuerySelect};
use sea_orm::{QueryTrait, Value};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::error::{ApiError, ApiResult};
use super::extract::{Admin, ApiJson, ApiPath, ApiQuery};
use super::staff::{decode_cursor, encode_cursor, page_limit};
use crate::audit::AuditEntry;
use crate::state::Shared;
use crate::writer::{Expect, WriteError, WriteUnit};

/// The routes of this module (scope `admin`).
pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/v1/admin/deliveries", get(list))
        .route("/v1/admin/deliveries/{delivery_id}/resolve", post(resolve))
}

/// `?status=&limit=&cursor=`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct DeliveriesQuery {
    /// The status to list (default `reconcile`): `queued`, `sending`, `sent`,
    /// `delivered`, `failed`, `undelivered`, `reconcile`, `refused`.
    #[param(schema_with = status_schema)]
    pub status: Option<String>,
    /// Page size (default 50, at most 200).
    #[param(minimum = 1, maximum = 200)]
    pub limit: Option<u64>,
    /// The `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// A delivery, without its recipient or text (PHI).
#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryOut {
    /// caremsg's delivery id: the idempotency key given to the provider, and the
    /// `delivery_id` of the loopback gateway's outbox line.
    pub id: String,
    /// `sms` or `email` (or `portal`).
    pub channel: String,
    /// What it delivers: `message`, `notification`, `sms_auth`.
    pub purpose: String,
    /// The gateway instance that sends it.
    pub gateway: Option<String>,
    /// Its practice.
    pub practice_id: String,
    /// The patient it concerns, if any.
    pub patient_id: Option<String>,
    /// The conversation message it delivers (purpose `message`).
    pub message_id: Option<String>,
    /// The staff notification it delivers (purpose `notification`).
    pub notification_id: Option<String>,
    /// Where it stands.
    pub status: String,
    /// Attempts made.
    pub attempts: i32,
    /// The provider's message id, once sent.
    pub provider_message_id: Option<String>,
    /// Why it is where it is (`outcome_unknown` for `reconcile`).
    pub error_code: Option<String>,
    /// The same, for a person.
    pub error_reason: Option<String>,
    /// When it was last claimed for sending.
    #[serde(serialize_with = "super::timestamp::option::serialize")]
    pub claimed_at: Option<DateTime<Utc>>,
    /// When it was stored.
    #[serde(serialize_with = "super::timestamp::serialize")]
    pub created_at: DateTime<Utc>,
    /// When it last changed.
    #[serde(serialize_with = "super::timestamp::serialize")]
    pub updated_at: DateTime<Utc>,
}

impl From<&delivery::Model> for DeliveryOut {
    fn from(d: &delivery::Model) -> Self {
        Self {
            id: d.id.clone(),
            channel: d.channel.as_str().to_owned(),
            purpose: d.purpose.as_str().to_owned(),
            gateway: d.gateway.clone(),
            practice_id: d.practice_id.clone(),
            patient_id: d.patient_id.clone(),
            message_id: d.message_id.clone(),
            notification_id: d.notification_id.clone(),
            status: d.status.as_str().to_owned(),
            attempts: d.attempts,
            provider_message_id: d.provider_message_id.clone(),
            error_code: d.error_code.clone(),
            error_reason: d.error_reason.clone(),
            claimed_at: d.claimed_at,
            created_at: d.created_at,
            updated_at: d.updated_at,
        }
    }
}

/// A page of deliveries.
#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryList {
    /// Oldest first.
    pub deliveries: Vec<DeliveryOut>,
    /// The cursor of the next page; null at the end.
    pub next_cursor: Option<String>,
}

/// Where a page ended.
#[derive(Debug, Serialize, Deserialize)]
struct Cursor {
    created_at: DateTime<Utc>,
    id: String,
}

#[utoipa::path(get, path = "/v1/admin/deliveries", tag = "admin", params(DeliveriesQuery),
    responses((status = 200, body = DeliveryList),
        (status = 422, description = "An unknown status, a bad limit or cursor", body = super::error::ErrorBody)),
    security(("bearer" = [])))]
/// The deliveries of one status (by default `reconcile`: those whose outcome is
/// unknown after a crash), oldest first, paged.
pub async fn list(
    State(state): State<Shared>,
    Admin(_caller): Admin,
    ApiQuery(query): ApiQuery<DeliveriesQuery>,
) -> ApiResult<Json<DeliveryList>> {
    let status = match query.status.as_deref() {
        None => DeliveryStatus::Reconcile,
        Some(text) => serde_json::from_value(serde_json::Value::String(text.to_owned()))
            .map_err(|_| ApiError::invalid("status", "Not a delivery status."))?,
    };
    let limit = page_limit(query.limit)?;
    let cursor: Option<Cursor> = query.cursor.as_deref().map(decode_cursor).transpose()?;
    let mut select = delivery::Entity::find().filter(delivery::Column::Status.eq(status));
    if let Some(c) = &cursor {
        select = select.filter(
            Condition::any()
                .add(delivery::Column::CreatedAt.gt(c.created_at))
                .add(
                    Condition::all()
                        .add(delivery::Column::CreatedAt.eq(c.created_at))
                        .add(delivery::Column::Id.gt(c.id.clone())),
                ),
        );
    }
    let mut rows = select
        .order_by_asc(delivery::Column::CreatedAt)
        .order_by_asc(delivery::Column::Id)
        .limit(limit + 1)
        .all(&state.db)
        .await?;
    let more = rows.len() as u64 > limit;
    rows.truncate(limit as usize);
    let next_cursor = if more {
        rows.last().and_then(|d| {
            encode_cursor(&Cursor {
                created_at: d.created_at,
                id: d.id.clone(),
            })
        })
    } else {
        None
    };
    Ok(Json(DeliveryList {
        deliveries: rows.iter().map(DeliveryOut::from).collect(),
        next_cursor,
    }))
}

/// `POST /v1/admin/deliveries/{delivery_id}/resolve`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResolveIn {
    /// `resend` (queue it again: the provider did not take it), `mark_sent` (the
    /// provider took it) or `mark_failed` (close it unsent).
    #[schema(schema_with = action_schema)]
    pub action: String,
}

/// A string schema allowing only `values`.
fn one_of(values: impl IntoIterator<Item = &'static str>) -> utoipa::openapi::Object {
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::Type::String)
        .enum_values(Some(values))
        .build()
}

/// The schema of `?status=`: every delivery status.
fn status_schema() -> utoipa::openapi::Object {
    use sea_orm::Iterable;
    one_of(DeliveryStatus::iter().map(DeliveryStatus::as_str))
}

/// The schema of a resolution's `action`.
fn action_schema() -> utoipa::openapi::Object {
    one_of(Resolution::ALL.map(Resolution::as_str))
}

/// What an operator decided about a delivery in `reconcile`.
#[derive(Debug, Clone, Copy)]
enum Resolution {
    Resend,
    MarkSent,
    MarkFailed,
}

impl Resolution {
    const ALL: [Self; 3] = [Self::Resend, Self::MarkSent, Self::MarkFailed];

    fn parse(text: &str) -> ApiResult<Self> {
        Self::ALL
            .into_iter()
            .find(|r| r.as_str() == text)
            .ok_or_else(|| ApiError::invalid("action", "Must be resend, mark_sent or mark_failed."))
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Resend => "resend",
            Self::MarkSent => "mark_sent",
            Self::MarkFailed => "mark_failed",
        }
    }

    /// The columns the resolution sets.
    fn set(self, now: DateTime<Utc>) -> Vec<(delivery::Column, Value)> {
        use delivery::Column as C;
        let none = Value::String(None);
        match self {
            Self::Resend => vec![
                (C::Status, DeliveryStatus::Queued.as_str().into()),
                (C::NextAttemptAt, now.into()),
                (C::ClaimedAt, Option::<DateTime<Utc>>::None.into()),
                (C::ErrorCode, none.clone()),
                (C::ErrorReason, none),
            ],
            Self::MarkSent => vec![
                (C::Status, DeliveryStatus::Sent.as_str().into()),
                (C::ErrorCode, none.clone()),
                (C::ErrorReason, none),
            ],
            Self::MarkFailed => vec![
                (C::Status, DeliveryStatus::Failed.as_str().into()),
                (C::ErrorCode, "operator_marked_failed".into()),
                (
                    C::ErrorReason,
                    "An operator found that the provider did not take this delivery and \
                     closed it unsent."
                        .into(),
                ),
            ],
        }
    }
}

/// Precondition of a resolution: the delivery is still in `reconcile`.
const IN_RECONCILE: &str = "delivery in reconcile";

#[utoipa::path(post, path = "/v1/admin/deliveries/{delivery_id}/resolve", tag = "admin",
    params(("delivery_id" = String, Path)),
    request_body = ResolveIn,
    responses((status = 200, description = "The delivery as resolved", body = DeliveryOut),
        (status = 404, description = "No such delivery", body = super::error::ErrorBody),
        (status = 409, description = "The delivery is not in reconcile (code not_in_reconcile)", body = super::error::ErrorBody),
        (status = 422, description = "An unknown action", body = super::error::ErrorBody)),
    security(("bearer" = [])))]
/// Resolves a delivery whose outcome is unknown (`reconcile`): `resend` queues it
/// again for its gateway, `mark_sent` records it sent, `mark_failed` closes it
/// unsent. Audited (`admin.delivery.resolve`).
pub async fn resolve(
    State(state): State<Shared>,
    Admin(caller): Admin,
    ApiPath(delivery_id): ApiPath<String>,
    ApiJson(input): ApiJson<ResolveIn>,
) -> ApiResult<Json<DeliveryOut>> {
    let resolution = Resolution::parse(&input.action)?;
    let not_in_reconcile = || {
        ApiError::conflict(
            "not_in_reconcile",
            "Only a delivery in reconcile can be resolved.",
        )
    };
    let found = delivery::Entity::find_by_id(delivery_id.clone())
        .one(&state.db)
        .await?
        .ok_or_else(|| ApiError::not_found("delivery"))?;
    if found.status != DeliveryStatus::Reconcile {
        return Err(not_in_reconcile());
    }
    let now = state.clock.now();
    let mut update = delivery::Entity::update_many()
        .col_expr(delivery::Column::UpdatedAt, Expr::value(now))
        .filter(delivery::Column::Id.eq(delivery_id.clone()))
        .filter(delivery::Column::Status.eq(DeliveryStatus::Reconcile));
    for (column, value) in resolution.set(now) {
        update = update.col_expr(column, Expr::value(value));
    }
    let unit = WriteUnit::new().exec(update.into_query(), Expect::Exactly(1), IN_RECONCILE);
    let audit = AuditEntry {
        client: &caller.client,
        actor_user_id: None,
        patient_id: found.patient_id.as_deref(),
        action: "admin.delivery.resolve",
        detail: Some(format!(
            "delivery_id={delivery_id} action={}",
            resolution.as_str()
        )),
    };
    match state.writer.write(audit.add_to(unit, now)).await {
        Ok(()) => {}
        // Resolved by someone else meanwhile.
        Err(WriteError::Precondition(IN_RECONCILE)) => return Err(not_in_reconcile()),
        Err(err) => return Err(err.into()),
    }
    tracing::info!(delivery_id = %delivery_id, action = resolution.as_str(), "A delivery in reconcile was resolved.");
    if matches!(resolution, Resolution::Resend) {
        state.gateways.wake();
    }
    let resolved = delivery::Entity::find_by_id(delivery_id)
        .one(&state.db)
        .await?
        .ok_or_else(|| ApiError::not_found("delivery"))?;
    Ok(Json(DeliveryOut::from(&resolved)))
}
