//! The 'Text Messages' button and what follows: `GET .../sms`, `sms/start`,
//! `sms/resend`, `sms/opt-out`, for staff who may act on the patient.

use axum::extract::State;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use utoipa::ToSchema;

use super::error::{ApiError, ApiResult};
use super::extract::{ApiPath, OptionalApiJson, Staff};
use super::staff::staff_patient;
use crate::actors::conversation::Sms;
use crate::sms::auth::{SmsError, SmsOp, SmsView, view};
use crate::state::Shared;

/// The SMS routes.
pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/v1/staff/patients/{patient_id}/sms", get(status))
        .route("/v1/staff/patients/{patient_id}/sms/start", post(start))
        .route("/v1/staff/patients/{patient_id}/sms/resend", post(resend))
        .route("/v1/staff/patients/{patient_id}/sms/opt-out", post(opt_out))
}

impl From<SmsError> for ApiError {
    fn from(err: SmsError) -> Self {
        match err {
            SmsError::NotFound => ApiError::not_found("patient"),
            SmsError::SmsDisabled => {
                ApiError::conflict("sms_disabled", "The practice does not use text messaging.")
            }
            SmsError::BadPhone(message) => ApiError::invalid("mobile_phone", message),
            SmsError::PatientOptedOut => ApiError::conflict(
                "patient_opted_out",
                "The patient opted out by text; only the patient can opt back in, by texting START.",
            ),
            SmsError::NumberOptedOut => ApiError::conflict(
                "number_opted_out",
                "This number texted STOP to the practice; it can opt back in by texting START.",
            ),
            SmsError::PhoneInUse => ApiError::conflict(
                "phone_in_use",
                "This mobile number is already pending or enabled for another patient of the practice.",
            ),
            SmsError::NotPending => {
                ApiError::conflict("not_pending", "There is no pending SMS authentication.")
            }
            SmsError::AlreadyPending => ApiError::conflict(
                "already_pending",
                "An SMS authentication is already pending on this number; use resend.",
            ),
            SmsError::AlreadyOptedOut => {
                ApiError::conflict("already_opted_out", "The patient is already opted out.")
            }
            SmsError::Storage(cause) => ApiError::internal(&cause),
            SmsError::Unavailable(cause) => ApiError::from(cause),
        }
    }
}

/// `POST .../sms/start` may carry a mobile number, as the article's modal does.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartIn {
    /// Stored first (all or nothing: a refused start changes no number).
    #[serde(default)]
    pub mobile_phone: Option<String>,
}

async fn run(
    state: &Shared,
    staff: &Staff,
    patient_id: &str,
    op: SmsOp,
) -> ApiResult<Json<SmsView>> {
    let patient = staff_patient(state, staff, patient_id).await?.patient;
    state
        .conversations
        .send(
            &patient.id,
            Sms {
                client: staff.caller.client.clone(),
                op,
            },
        )
        .await??;
    let patient = staff_patient(state, staff, patient_id).await?.patient;
    Ok(Json(view(state, &patient).await?))
}

#[utoipa::path(get, path = "/v1/staff/patients/{patient_id}/sms", tag = "sms",
    params(("patient_id" = String, Path)),
    responses((status = 200, body = SmsView)), security(("bearer" = [])))]
/// The patient's SMS authentication: status, reason, attempts, window, history.
pub async fn status(
    State(state): State<Shared>,
    staff: Staff,
    ApiPath(patient_id): ApiPath<String>,
) -> ApiResult<Json<SmsView>> {
    let patient = staff_patient(&state, &staff, &patient_id).await?.patient;
    Ok(Json(view(&state, &patient).await?))
}

#[utoipa::path(post, path = "/v1/staff/patients/{patient_id}/sms/start", tag = "sms",
    params(("patient_id" = String, Path)), request_body(content = StartIn, description = "optional"),
    responses((status = 200, body = SmsView), (status = 409, body = super::error::ErrorBody),
        (status = 422, body = super::error::ErrorBody)), security(("bearer" = [])))]
/// The 'Text Messages' button: a new pending session and the opt-in text.
pub async fn start(
    State(state): State<Shared>,
    staff: Staff,
    ApiPath(patient_id): ApiPath<String>,
    OptionalApiJson(input): OptionalApiJson<StartIn>,
) -> ApiResult<Json<SmsView>> {
    let input = input.unwrap_or_default();
    let op = SmsOp::Start {
        staff: staff.user.clone(),
        mobile_phone: input.mobile_phone,
    };
    run(&state, &staff, &patient_id, op).await
}

#[utoipa::path(post, path = "/v1/staff/patients/{patient_id}/sms/resend", tag = "sms",
    params(("patient_id" = String, Path)),
    responses((status = 200, body = SmsView), (status = 409, body = super::error::ErrorBody)), security(("bearer" = [])))]
/// The same opt-in text again (pending only; attempts are not reset; the window
/// counts from this text).
pub async fn resend(
    State(state): State<Shared>,
    staff: Staff,
    ApiPath(patient_id): ApiPath<String>,
) -> ApiResult<Json<SmsView>> {
    let op = SmsOp::Resend {
        staff: staff.user.clone(),
    };
    run(&state, &staff, &patient_id, op).await
}

#[utoipa::path(post, path = "/v1/staff/patients/{patient_id}/sms/opt-out", tag = "sms",
    params(("patient_id" = String, Path)),
    responses((status = 200, body = SmsView), (status = 409, body = super::error::ErrorBody)), security(("bearer" = [])))]
/// 'Click here to opt patient out': opted out, no text.
pub async fn opt_out(
    State(state): State<Shared>,
    staff: Staff,
    ApiPath(patient_id): ApiPath<String>,
) -> ApiResult<Json<SmsView>> {
    let op = SmsOp::StaffOptOut {
        staff: staff.user.clone(),
    };
    run(&state, &staff, &patient_id, op).await
}
