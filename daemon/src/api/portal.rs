//! The portal backend's API, acting for one patient at a time: the conversation (all
//! channels), sending, marking read, and a live event stream.
//!
//! Only for portal-enrolled patients of practices with portal chat: otherwise 409
//! `portal_disabled` (the practice's switch, which wins) or `portal_not_enrolled`.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use caremsg_entities::{patient, practice};

use super::conversation::{self as conv, MessageOut, Page, PageQuery, SendIn};
use super::error::{ApiError, ApiResult};
use super::extract::{ApiJson, ApiPath, ApiQuery, Caller, Portal};
use super::staff::ReadOut;
use crate::access::patient_for_portal;
use crate::actors::conversation::{Author, MarkRead, Reader, Rows, SendMessage};
use crate::audit::AuditEntry;
use crate::direct::StreamSocket;
use crate::events::{Event, Subscriber};
use crate::phi::Phi;
use crate::state::Shared;
use crate::writer::WriteUnit;

/// The portal routes.
pub fn routes() -> Router<Shared> {
    Router::new()
        .route(
            "/v1/portal/patients/{patient_id}/conversation",
            get(conversation),
        )
        .route("/v1/portal/patients/{patient_id}/messages", post(send))
        .route("/v1/portal/patients/{patient_id}/read", post(mark_read))
        .route("/v1/portal/patients/{patient_id}/events", get(events))
}

/// The patient, if the portal may act for it: active, of an active practice this
/// client serves (else 404, as for an unknown patient), with portal chat on and the
/// patient enrolled (else 409).
async fn portal_patient(
    state: &Shared,
    caller: &Caller,
    patient_id: &str,
) -> ApiResult<(patient::Model, practice::Model)> {
    let (patient, practice) = patient_for_portal(&state.db, patient_id)
        .await?
        .filter(|(_, practice)| caller.serves(&practice.id))
        .ok_or_else(|| ApiError::not_found("patient"))?;
    if !practice.portal_enabled {
        return Err(ApiError::conflict(
            "portal_disabled",
            "The practice has no portal chat.",
        ));
    }
    if !patient.portal_enrolled {
        return Err(ApiError::conflict(
            "portal_not_enrolled",
            "The patient is not enrolled in the portal.",
        ));
    }
    Ok((patient, practice))
}

#[utoipa::path(get, path = "/v1/portal/patients/{patient_id}/conversation", tag = "portal",
    params(("patient_id" = String, Path), PageQuery),
    responses((status = 200, body = Page), (status = 409, body = super::error::ErrorBody)),
    security(("bearer" = [])))]
/// The patient's conversation, all channels, newest page first.
pub async fn conversation(
    State(state): State<Shared>,
    Portal(caller): Portal,
    ApiPath(patient_id): ApiPath<String>,
    ApiQuery(query): ApiQuery<PageQuery>,
) -> ApiResult<Json<Page>> {
    let (patient, _) = portal_patient(&state, &caller, &patient_id).await?;
    let page = conv::page(&state, &patient.id, &query).await?;
    AuditEntry {
        client: &caller.client,
        actor_user_id: None,
        patient_id: Some(&patient.id),
        action: "portal.conversation.read",
        detail: Some(format!("messages={}", page.messages.len())),
    }
    .record(&state.writer, state.clock.now())
    .await?;
    Ok(Json(page))
}

#[utoipa::path(post, path = "/v1/portal/patients/{patient_id}/messages", tag = "portal",
    params(("patient_id" = String, Path)), request_body = SendIn,
    responses((status = 201, body = MessageOut), (status = 409, body = super::error::ErrorBody)),
    security(("bearer" = [])))]
/// A message from the patient (idempotent on `client_txn_id`).
pub async fn send(
    State(state): State<Shared>,
    Portal(caller): Portal,
    ApiPath(patient_id): ApiPath<String>,
    ApiJson(input): ApiJson<SendIn>,
) -> ApiResult<impl IntoResponse> {
    // A live actor remembers the patient's rows (or reads them) and checks what
    // `portal_patient` checks: active, of a practice this client serves, portal chat
    // on, enrolled. With none live, they are read here first, so that an id that is
    // no patient's starts no actor.
    let rows = if state.conversations.is_live(&patient_id) {
        None
    } else {
        let (patient, practice) = portal_patient(&state, &caller, &patient_id).await?;
        Some(Rows::of(patient, practice))
    };
    let stored = state
        .conversations
        .send(
            &patient_id,
            SendMessage {
                author: Author::Patient,
                client: caller.client,
                body: Phi::new(input.body),
                client_txn_id: input.client_txn_id,
                rows,
                serves: caller.practices,
            },
        )
        .await??;
    Ok((StatusCode::CREATED, Json(MessageOut::stored(stored))))
}

#[utoipa::path(post, path = "/v1/portal/patients/{patient_id}/read", tag = "portal",
    params(("patient_id" = String, Path)),
    responses((status = 200, body = ReadOut), (status = 409, body = super::error::ErrorBody,
        description = "`portal_disabled`, `portal_not_enrolled`")), security(("bearer" = [])))]
/// The patient has read the conversation up to its newest message; staff then see
/// `read_by_patient_at` on the staff messages it covers.
pub async fn mark_read(
    State(state): State<Shared>,
    Portal(caller): Portal,
    ApiPath(patient_id): ApiPath<String>,
) -> ApiResult<Json<ReadOut>> {
    let (patient, _) = portal_patient(&state, &caller, &patient_id).await?;
    let last_read_seq = state
        .conversations
        .send(
            &patient.id,
            MarkRead {
                reader: Reader::Patient,
                up_to: None,
                also: WriteUnit::new(),
            },
        )
        .await??;
    Ok(Json(ReadOut { last_read_seq }))
}

#[utoipa::path(get, path = "/v1/portal/patients/{patient_id}/events", tag = "portal",
    params(("patient_id" = String, Path)),
    responses((status = 200, content_type = "text/event-stream", body = super::conversation::PortalEventData,
        description = "Server-sent events, each `event: <name>` and one `data:` line of JSON: \
        `message` (a message of this conversation), `lagged` (events were missed: re-read \
        the conversation), and a last `end` (`{\"reason\"}`) when the daemon ends the stream. \
        Comments (`:`) every `server.sse_keepalive` keep it open. Under a burst, events within `events.coalesce` \
        of the last write wait for the end of that spell and are written together. No `id:` and no replay: \
        after a reconnect, re-read the conversation."),
        (status = 409, body = super::error::ErrorBody, description = "`portal_disabled`, `portal_not_enrolled`"),
        (status = 429, body = super::error::ErrorBody, description = "`too_many_streams`: this patient has `events.max_streams_per_subscriber` open"),
        (status = 503, body = super::error::ErrorBody, description = "`stream_capacity`: `events.max_streams` are open")),
    security(("bearer" = [])))]
/// Server-sent events: new messages of this patient's conversation. The stream ends
/// when the patient, or its practice, is deactivated or leaves the portal.
pub async fn events(
    State(state): State<Shared>,
    Portal(caller): Portal,
    ApiPath(patient_id): ApiPath<String>,
    StreamSocket(direct): StreamSocket,
) -> Response {
    let (patient, practice) = match portal_patient(&state, &caller, &patient_id).await {
        Ok(found) => found,
        Err(err) => return err.into_response(),
    };
    let who = Subscriber::Portal {
        patient_id: patient.id.clone(),
        practice_id: practice.id,
    };
    let subscription = match conv::open_stream(&state, &caller, who) {
        Ok(subscription) => subscription,
        Err(refused) => return refused.into_response(),
    };
    // Subscribed first, checked again after: see the staff stream.
    if let Err(err) = portal_patient(&state, &caller, &patient.id).await {
        return err.into_response();
    }
    conv::stream(&state, subscription, portal_event, direct)
}

/// Whether a portal stream shows an event: its patient's messages (the hub sends it
/// no other event).
fn portal_event(event: &Event) -> bool {
    matches!(event, Event::Message(_))
}
