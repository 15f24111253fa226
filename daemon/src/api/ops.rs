//! Operations endpoints: liveness, readiness, metrics and the OpenAPI document.

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use sea_orm::ConnectionTrait;
use serde::Serialize;
use utoipa::{OpenApi, ToSchema};

use super::ApiDoc;
use crate::state::Shared;

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
    /// `ok` or what is wrong.
    pub status: String,
}

#[utoipa::path(get, path = "/healthz", tag = "ops", responses((status = 200, body = Health)))]
/// The process is alive and serving HTTP.
pub async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".to_owned(),
    })
}

#[utoipa::path(get, path = "/readyz", tag = "ops",
    responses((status = 200, body = Health), (status = 503, body = Health)))]
/// The database answers and every migration is applied.
pub async fn readyz(State(state): State<Shared>) -> impl IntoResponse {
    let ping = state.db.execute_unprepared("SELECT 1").await;
    let status = match ping {
        Err(err) => {
            tracing::warn!(error = %err, "Readiness check: the database does not answer.");
            "database unreachable"
        }
        Ok(_) => match crate::db::migrations_applied(&state.db).await {
            Ok(true) => "ok",
            Ok(false) => "migrations pending",
            Err(err) => {
                tracing::warn!(error = %err, "Readiness check: migrations could not be read.");
                "migrations unknown"
            }
        },
    };
    let code = if status == "ok" {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        Json(Health {
            status: status.to_owned(),
        }),
    )
}

#[utoipa::path(get, path = "/metrics", tag = "ops", responses((status = 200, description = "Prometheus text format")))]
/// Prometheus metrics.
pub async fn metrics(State(state): State<Shared>) -> impl IntoResponse {
    if let Err(err) = scrape_gauges(&state).await {
        tracing::warn!(error = %err, "Metrics: the outbox and timer gauges could not be read.");
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
    use sea_orm::{ColumnTrait, EntityTrait, PaginatorTrait, QueryFilter, QueryOrder};
    let now = state.clock.now();
    let queued =
        delivery::Entity::find().filter(delivery::Column::Status.eq(DeliveryStatus::Queued));
    let depth = queued.clone().count(&state.db).await?;
    let oldest = queued
        .order_by_asc(delivery::Column::CreatedAt)
        .one(&state.db)
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
        .set(oldest.map_or(0, |d| (now - d.created_at).num_seconds().max(0)));
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
