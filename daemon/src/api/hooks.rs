//! Provider webhooks: `/v1/hooks/{gateway_instance}`, handed to the instance's plugin.
//!
//! No bearer token: the plugin authenticates the provider (a signature over the
//! configured public URL and the body, or, for `sms-loopback`, the peer address). The
//! body is limited to `server.max_body_bytes`. The plugin sees the method, the public
//! URL of the hook (`server.public_url` + path + query: what providers sign), the
//! peer address, the headers and the raw body, on the blocking pool. The events it
//! reports are committed before its response is sent; if they cannot be, the provider
//! gets 503 and retries (a retried text is recognised by its provider id).

use std::net::SocketAddr;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use caremsg_plugin_host::{CallError, WebhookRequest, WebhookResponse};

use super::error::ApiError;
use super::extract::ApiPath;
use crate::gateways::inbound;
use crate::state::Shared;

/// The webhook route.
pub fn routes() -> Router<Shared> {
    Router::new().route("/v1/hooks/{gateway_instance}", any(hook))
}

#[utoipa::path(post, path = "/v1/hooks/{gateway_instance}", tag = "gateways",
    params(("gateway_instance" = String, Path, description = "The `name` of a `[[gateways]]` instance")),
    request_body(description = "The provider's request, as the instance's plugin expects it: \
        JSON (`sms-loopback`: `{from, to, body, id}`; `portal-webhook`) or a form (Twilio's \
        `application/x-www-form-urlencoded` callbacks, signed with X-Twilio-Signature)",
        content(("application/json"), ("application/x-www-form-urlencoded"))),
    responses(
        (status = 200, description = "The plugin's answer (its own body and content type, e.g. TwiML), once the events it reported are committed"),
        (status = 400, description = "The plugin refused the request as malformed (its own body)"),
        (status = 401, description = "The plugin refused the request's signature or peer (its own body)"),
        (status = 403, description = "The plugin refused the request's signature or peer (its own body)"),
        (status = 404, body = super::error::ErrorBody, description = "`not_found`: no such gateway instance"),
        (status = 405, description = "The plugin does not take this method (its own body)"),
        (status = 413, body = super::error::ErrorBody, description = "`body_too_large`: larger than server.max_body_bytes"),
        (status = 415, description = "The plugin does not take this content type (its own body)"),
        (status = 500, body = super::error::ErrorBody, description = "`gateway_failed`: the plugin failed"),
        (status = 503, body = super::error::ErrorBody, description = "`unavailable`, `gateway_failed`, `timeout`: the events could not be stored, or the plugin is stopping; retry (Retry-After)"),
    ))]
/// A provider's webhook (inbound texts, delivery receipts, opt-outs), passed to the
/// plugin of the named instance. Any method is passed on; providers use POST.
pub async fn hook(
    State(state): State<Shared>,
    ApiPath(name): ApiPath<String>,
    request: Request,
) -> Response {
    let Some(gateway) = state.gateways.instance(&name).cloned() else {
        return ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "No such gateway instance.",
        )
        .into_response();
    };
    let limit = state.settings.load().server.max_body_bytes;
    // The same URL the plugin is told (`Host::hook_url`), plus the query: what
    // providers sign.
    let public_url = format!(
        "{}{}",
        crate::gateways::hook_url(&state.settings.load().server.public_url, gateway.name()),
        request
            .uri()
            .query()
            .map(|q| format!("?{q}"))
            .unwrap_or_default()
    );
    let remote_addr = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|info| info.0);
    let method = request.method().as_str().to_owned();
    let headers = request
        .headers()
        .iter()
        .map(|(name, value)| (name.as_str().to_owned(), value.as_bytes().to_vec()))
        .collect();
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("The body is larger than {limit} bytes."),
        )
        .into_response()
    };
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return too_large();
    }
    let Ok(body) = axum::body::to_bytes(request.into_body(), limit).await else {
        return too_large();
    };
    let webhook = WebhookRequest {
        method,
        public_url,
        remote_addr,
        headers,
        body: body.to_vec(),
    };
    let outcome = match gateway
        .call(move |instance| instance.handle_webhook(&webhook))
        .await
    {
        Ok(outcome) => outcome,
        Err(error) => {
            tracing::error!(gateway = %gateway.name(), %error, "A webhook failed in the gateway plugin.");
            let status = if error == CallError::Stopped {
                StatusCode::SERVICE_UNAVAILABLE
            } else {
                StatusCode::INTERNAL_SERVER_ERROR
            };
            return ApiError::new(
                status,
                "gateway_failed",
                "The gateway plugin could not handle the request.",
            )
            .into_response();
        }
    };
    if !outcome.events.is_empty()
        && let Err(error) = inbound::commit(&state, &gateway, outcome.events).await
    {
        tracing::error!(gateway = %gateway.name(), %error, "A webhook's events could not be stored; the provider is asked to retry.");
        // Whatever failed, the provider retries: 503 with Retry-After, never 500.
        return ApiError::storage_unavailable(&error).into_response();
    }
    if (400..500).contains(&outcome.response.status) {
        state
            .metrics
            .webhook_reject(gateway.name(), outcome.response.status);
    }
    plugin_response(outcome.response)
}

/// The plugin's answer as an HTTP response (headers HTTP cannot carry are dropped).
fn plugin_response(answer: WebhookResponse) -> Response {
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (status, Body::from(answer.body)).into_response();
    for (name, value) in answer.headers {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            response.headers_mut().append(name, value);
        }
    }
    response
}
