//! High availability at the HTTP edge: a daemon that is not the active one answers
//! every `/v1` request 503 `standby` with `Retry-After`, so a load balancer's retry or
//! a client's reaches the active one. `/healthz`, `/readyz` and `/metrics` stay open.

use axum::extract::{Request, State};
use axum::http::{HeaderValue, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use crate::state::Shared;

/// The gate in front of the routes.
pub async fn gate(State(state): State<Shared>, request: Request, next: Next) -> Response {
    let active = state.role.borrow().is_active();
    if active || !request.uri().path().starts_with("/v1/") {
        return next.run(request).await;
    }
    let mut response = ApiError::standby().into_response();
    let retry = state.settings.load().ha.lease_renew.as_secs().max(1);
    if let Ok(value) = HeaderValue::from_str(&retry.to_string()) {
        response.headers_mut().insert(header::RETRY_AFTER, value);
    }
    response
}
