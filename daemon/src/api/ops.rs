//! Operations endpoints: liveness, readiness, metrics and the OpenAPI document.

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use sea_orm::ConnectionTrait;
use serde::Serialize;
use utoipa::{OpenApi, ToSchema};

use std::collections::BTreeMap;

use super::ApiDoc;
use crate::gateways::health::GatewayHealth;
use crate::state::Shared;
use crate::writer::StorageHealth;

/// The ops routes (no token; bind the daemon to loopback).
pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/openapi.json", get(openapi))
}

/// A health or readiness answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok` or `unavailable`.
    pub status: String,
    /// High availability: `active` or `standby` (readiness only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    /// Why the daemon is unavailable (never PHI).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// `/readyz` only: each gateway plugin's health at the last poll, by instance
    /// name. A gateway that is down makes the daemon unavailable only with its
    /// `down_fails_readiness` setting.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateways: Option<BTreeMap<String, GatewayHealth>>,
}

#[utoipa::path(get, path = "/healthz", tag = "ops", responses((status = 200, body = Health)))]
/// The process is alive and serving HTTP.
pub async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".to_owned(),
        role: None,
        reason: None,
        gateways: None,
    })
}

#[utoipa::path(get, path = "/readyz", tag = "ops",
    responses((status = 200, body = Health), (status = 503, body = Health)))]
/// Ready to take writes: this daemon is the active one (a standby answers 503 with
/// `"role":"standby"`), the writer's last commit (or probe write) succeeded, the
/// database answers, every migration is applied, and no gateway with
/// `down_fails_readiness` reports itself down. Otherwise 503 with the reason. Lists
/// every gateway's health either way.
pub async fn readyz(State(state): State<Shared>) -> impl IntoResponse {
    let role = *state.role.borrow();
    if !role.is_active() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(Health {
                status: "unavailable".to_owned(),
                role: Some(role.name().to_owned()),
                reason: None,
                gateways: None,
            }),
        );
    }
    let (gateways, required_down) = state.gateways.health_report(&state.settings.load());
    let reason = match unready(&state).await {
        Some(reason) => Some(reason),
        None => required_down.map(|name| format!("gateway {name} reports itself down")),
    };
    let (code, status) = match reason {
        None => (StatusCode::OK, "ok"),
        Some(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
    };
    (
        code,
        Json(Health {
            status: status.to_owned(),
            role: Some(role.name().to_owned()),
            reason,
            gateways: Some(gateways),
        }),
    )
}

/// Why the daemon is not ready, if it is not.
async fn unready(state: &Shared) -> Option<String> {
    if let StorageHealth::Failing(cause) = state.writer.storage() {
        return Some(format!(
            "the writer cannot commit ({cause}); a probe write is retried every {}s",
            crate::writer::PROBE_RETRY.as_secs()
        ));
    }
    if let Err(err) = state.db.execute_unprepared("SELECT 1").await {
        tracing::warn!(error = %err, "Readiness check: the database does not answer.");
        return Some("the database does not answer".to_owned());
    }
    match crate::db::migrations_applied(&state.db).await {
        Ok(true) => None,
        Ok(false) => Some("migrations are pending".to_owned()),
        Err(err) => {
            tracing::warn!(error = %err, "Readiness check: migrations could not be read.");
            Some("the applied migrations could not be read".to_owned())
        }
    }
}

#[utoipa::path(get, path = "/metrics", tag = "ops", responses((status = 200, description = "Prometheus text format")))]
/// Prometheus metrics.
pub async fn metrics(State(state): State<Shared>) -> impl IntoResponse {
    if let Err(err) = scrape_gauges(&state).await {
        tracing::warn!(error = %err, "Metrics: the outbox, delivery and timer gauges could not be read.");
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.render(),
    )
}

/// The gauges that are read from the database when scraped.
async fn scrape_gauges(state: &Shared) -> Result<(), sea_orm::DbErr> {
    use caremsg_entities::{DeliveryStatus, delivery, timer};
    use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter, QuerySelect};
    let now = state.clock.now();
    let queued =
        delivery::Entity::find().filter(delivery::Column::Status.eq(DeliveryStatus::Queued));
    let depth = queued.clone().count(&state.db).await?;
    // MIN over the `(status, created_at)` index: one index probe, never a sort of
    // the outbox.
    let oldest: Option<chrono::DateTime<chrono::Utc>> = queued
        .select_only()
        .column_as(delivery::Column::CreatedAt.min(), "oldest")
        .into_tuple::<Option<chrono::DateTime<chrono::Utc>>>()
        .one(&state.db)
        .await?
        .flatten();
    let reconcile = delivery::Entity::find()
        .filter(delivery::Column::Status.eq(DeliveryStatus::Reconcile))
        .count(&state.db)
        .await?;
    let due = timer::Entity::find()
        .filter(timer::Column::Fired.eq(false))
        .filter(timer::Column::DueAt.lte(now))
        .count(&state.db)
        .await?;
    let metrics = &state.metrics;
    metrics
        .outbox_depth
        .set(i64::try_from(depth).unwrap_or(i64::MAX));
    metrics
        .outbox_oldest_seconds
        .set(oldest.map_or(0, |d| (now - d).num_seconds().max(0)));
    metrics
        .deliveries_reconcile
        .set(i64::try_from(reconcile).unwrap_or(i64::MAX));
    metrics
        .timers_due
        .set(i64::try_from(due).unwrap_or(i64::MAX));
    metrics
        .actors_live
        .set(i64::try_from(state.conversations.live()).unwrap_or(i64::MAX));
    Ok(())
}

#[utoipa::path(get, path = "/v1/openapi.json", tag = "ops",
    responses((status = 200, description = "This document (OpenAPI 3.1)", content_type = "application/json")))]
/// The OpenAPI document of this API.
pub async fn openapi() -> impl IntoResponse {
    Json(ApiDoc::openapi())
}
