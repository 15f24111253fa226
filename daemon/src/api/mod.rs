//! The HTTP API: routes, credentials, the error contract and the OpenAPI document.
//!
//! **Architecture Invariant:** only `daemon/src/api` knows HTTP and JSON; the rest of
//! the daemon speaks in entities, write units and typed errors.

pub mod admin;
pub mod conversation;
pub mod deliveries;
pub mod doc;
pub mod error;
pub mod extract;
pub mod hooks;
pub mod notifications;
pub mod ops;
pub mod portal;
pub mod sms;
pub mod staff;
pub mod standby;
pub mod timestamp;

use std::time::Instant;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use tower_http::catch_panic::CatchPanicLayer;
use utoipa::OpenApi;

use self::doc::Contract;
use self::error::ApiError;
use crate::metrics::HttpLabels;
use crate::state::Shared;

/// The OpenAPI document, generated from the handlers' annotations.
#[derive(OpenApi)]
#[openapi(
    info(title = "caremsg", description = "Patient messaging daemon: admin sync, staff, portal and gateway APIs."),
    paths(
        admin::put_practice, admin::delete_practice, admin::put_program,
        admin::put_user, admin::delete_user, admin::put_patient, admin::delete_patient,
        deliveries::list, deliveries::resolve,
        staff::my_patients, staff::search, staff::open_conversation, staff::send,
        staff::mark_read, staff::care_team, staff::notify_me, staff::stop_notifying_me, staff::events,
        notifications::get_settings, notifications::put_settings, notifications::list, notifications::mark_read,
        sms::status, sms::start, sms::resend, sms::opt_out,
        portal::conversation, portal::send, portal::mark_read, portal::events,
        hooks::hook,
        ops::healthz, ops::readyz, ops::metrics, ops::openapi,
    ),
    components(schemas(error::ErrorBody, error::ErrorDetail)),
    modifiers(&Contract),
    tags((name = "admin", description = "Platform sync (scope admin)"),
         (name = "staff", description = "The staff application (scope staff, X-Caremsg-User)"),
         (name = "sms", description = "SMS authentication and consent (scope staff)"),
         (name = "portal", description = "The portal backend (scope portal)"),
         (name = "gateways", description = "Provider webhooks, passed to the gateway plugin (no token)"),
         (name = "ops", description = "Health, readiness, metrics (no token)"))
)]
pub struct ApiDoc;

/// Every route of the daemon.
pub fn router(state: Shared) -> Router {
    Router::new()
        .merge(admin::routes().route_layer(middleware::from_fn_with_state(
            state.clone(),
            admin_writes_forget_users,
        )))
        .merge(deliveries::routes())
        .merge(staff::routes())
        .merge(notifications::routes())
        .merge(portal::routes())
        .merge(sms::routes())
        .merge(hooks::routes())
        .merge(ops::routes())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), standby::gate))
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .layer(CatchPanicLayer::custom(|_| {
            tracing::error!(
                "A request handler panicked; the request failed and the daemon goes on."
            );
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "The server failed; see its log.",
            )
            .into_response()
        }))
        .with_state(state)
}

/// Every admin request that may write forgets what is remembered of admin-owned rows
/// (the acting users, `access::Users`; the patient rows a conversation actor keeps)
/// when its handler has finished, however the request ends. The handler runs in a
/// task of its own, so a request cancelled by the request timeout does not cancel
/// the work: the forget comes after the handler's write has committed or failed,
/// never before a commit that would then make what is remembered stale.
async fn admin_writes_forget_users(
    State(state): State<Shared>,
    request: Request,
    next: Next,
) -> Response {
    if matches!(*request.method(), Method::GET | Method::HEAD) {
        return next.run(request).await;
    }
    let task_state = state.clone();
    let handler = tokio::spawn(async move {
        let response = next.run(request).await;
        task_state.users.forget_all();
        response
    });
    match handler.await {
        Ok(response) => response,
        Err(_) => {
            state.users.forget_all();
            tracing::error!(
                "An admin request's handler panicked; what was remembered is forgotten."
            );
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "The server failed; see its log.",
            )
            .into_response()
        }
    }
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "No such path.")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "This path does not take that method.",
    )
}

/// Counts requests in flight and responses, and bounds the time a handler may take
/// (the reloadable `server.request_timeout`; a streamed body is not counted once its
/// headers are out).
async fn observe(State(state): State<Shared>, request: Request, next: Next) -> Response {
    let method = request.method().to_string();
    let started = Instant::now();
    state.metrics.http_in_flight.inc();
    let limit = state.settings.load().server.request_timeout;
    let response = match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => {
            tracing::warn!(
                timeout_ms = limit.as_millis() as u64,
                "A request took too long and was cut off."
            );
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "timeout",
                "The request took too long; try again.",
            )
            .into_response()
        }
    };
    state.metrics.http_in_flight.dec();
    let status = format!("{}xx", response.status().as_u16() / 100);
    state
        .metrics
        .http_responses
        .get_or_create(&HttpLabels { method, status })
        .inc();
    tracing::debug!(
        status = response.status().as_u16(),
        took_ms = started.elapsed().as_millis() as u64,
        "Request handled."
    );
    response
}
