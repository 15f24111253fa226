//! Admin sync: the platform's main application upserts practices, programs, users and
//! patients by its own ids, and deletes them (a delete deactivates; history stays).
//!
//! Every rule refuses bad input with a 422 naming the field, before anything is
//! written; a unit then commits the whole change (rows, links, audit entry) at once.

use std::collections::{BTreeSet, HashMap};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::{Json, Router, routing::put};
use caremsg_config::GatewayKind;
use caremsg_entities::{
    CareTeamRole, SmsStatus, care_team_member, conversation, delivery, notification_settings,
    patient, patient_program, practice, practice_sms_number, program, sms_auth_session, user,
    user_program_restriction,
};
use chrono::{DateTime, NaiveDate, Utc};
use sea_orm::ActiveValue::Set;
use sea_orm::sea_query::Expr;
use sea_orm::{ColumnTrait, EntityTrait, QueryFilter, QuerySelect, QueryTrait};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ApiResult};
use super::extract::{Admin, ApiJson, ApiPath, Caller};
use crate::actors::conversation::Sms;
use crate::audit::AuditEntry;
use crate::events::AccessChange;
use crate::phi::Phi;
use crate::phone::{self, PhoneError};
use crate::sms::auth::{AdminUnit, ReplyOutcome, SmsOp};
use crate::state::Shared;
use crate::writer::{Expect, WriteUnit};

/// Longest name accepted for a practice, program, user or patient.
const MAX_NAME_CHARS: usize = 200;

/// The columns of an existing patient that the admin upsert writes: what the platform
/// owns. Not the SMS status and its reason (the conversation actor's), the number (it
/// changes in the actor, with what it does to texting), `last_activity_at` or
/// `created_at`.
const ADMIN_PATIENT_COLUMNS: &[patient::Column] = &[
    patient::Column::PracticeId,
    patient::Column::FirstName,
    patient::Column::LastName,
    patient::Column::SearchName,
    patient::Column::DateOfBirth,
    patient::Column::PortalEnrolled,
    patient::Column::Active,
    patient::Column::UpdatedAt,
];

/// The admin routes.
pub fn routes() -> Router<Shared> {
    Router::new()
        .route(
            "/v1/admin/practices/{practice_id}",
            put(put_practice).delete(delete_practice),
        )
        .route(
            "/v1/admin/practices/{practice_id}/programs/{program_id}",
            put(put_program),
        )
        .route(
            "/v1/admin/users/{user_id}",
            put(put_user).delete(delete_user),
        )
        .route(
            "/v1/admin/patients/{patient_id}",
            put(put_patient).delete(delete_patient),
        )
}

/// A practice's SMS sending number and the gateway instance that owns it.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SmsNumber {
    /// The number, national or international format; stored as E.164.
    #[schema(min_length = 1, max_length = 32)]
    pub number: String,
    /// Name of a configured `[[gateways]]` instance of kind `sms`.
    #[schema(min_length = 1, max_length = 128)]
    pub gateway: String,
}

/// `PUT /v1/admin/practices/{practice_id}`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PracticeIn {
    /// Display name, used verbatim in texts. 1 to 200 characters once trimmed; no
    /// control characters.
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]*[^\\s\\u0000-\\u001F\\u007F-\\u009F][^\\u0000-\\u001F\\u007F-\\u009F]*$"
    )]
    pub name: String,
    /// Whether the 'Text Messages' button exists for this practice.
    pub sms_enabled: bool,
    /// Whether 'Chat With My Care Team' exists for this practice.
    pub portal_enabled: bool,
    /// ISO 3166-1 alpha-2 country: the default region for phone numbers.
    #[schema(schema_with = country_schema)]
    pub country: String,
    /// IANA time zone, e.g. `America/New_York`.
    #[schema(schema_with = timezone_schema)]
    pub timezone: String,
    /// The practice's SMS sending numbers.
    #[serde(default)]
    #[schema(max_items = 100)]
    pub sms_numbers: Vec<SmsNumber>,
    /// Append the sender's display name to outbound SMS (default false).
    #[serde(default)]
    pub sign_outbound_sms: bool,
}

/// A practice as stored.
#[derive(Debug, Serialize, ToSchema)]
pub struct PracticeOut {
    /// The platform's id.
    pub id: String,
    /// Display name.
    pub name: String,
    /// SMS switch.
    pub sms_enabled: bool,
    /// Portal chat switch.
    pub portal_enabled: bool,
    /// Country (upper case).
    pub country: String,
    /// Time zone.
    pub timezone: String,
    /// Numbers, as E.164.
    pub sms_numbers: Vec<SmsNumber>,
    /// Signature option.
    pub sign_outbound_sms: bool,
}

/// `PUT /v1/admin/practices/{practice_id}/programs/{program_id}`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProgramIn {
    /// Program name, e.g. "CCM". 1 to 200 characters once trimmed; no control
    /// characters.
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]*[^\\s\\u0000-\\u001F\\u007F-\\u009F][^\\u0000-\\u001F\\u007F-\\u009F]*$"
    )]
    pub name: String,
}

/// A program as stored.
#[derive(Debug, Serialize, ToSchema)]
pub struct ProgramOut {
    /// The platform's id.
    pub id: String,
    /// Its practice.
    pub practice_id: String,
    /// Name.
    pub name: String,
}

/// `PUT /v1/admin/users/{user_id}`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UserIn {
    /// The user's practice; a user never moves between practices.
    #[schema(
        min_length = 1,
        max_length = 128,
        pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]+$"
    )]
    pub practice_id: String,
    /// Display name (signs outbound SMS when the practice asks for it). 1 to 200
    /// characters once trimmed; no control characters.
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]*[^\\s\\u0000-\\u001F\\u007F-\\u009F][^\\u0000-\\u001F\\u007F-\\u009F]*$"
    )]
    pub name: String,
    /// Where email notifications go (empty or absent: none).
    #[serde(default)]
    #[schema(format = Email, max_length = 254)]
    pub email: Option<String>,
    /// Programs of the practice this user may not see.
    #[serde(default)]
    pub restricted_programs: Vec<String>,
}

/// A user as stored.
#[derive(Debug, Serialize, ToSchema)]
pub struct UserOut {
    /// The platform's id.
    pub id: String,
    /// Practice.
    pub practice_id: String,
    /// Name.
    pub name: String,
    /// Email.
    pub email: Option<String>,
    /// Restricted programs.
    pub restricted_programs: Vec<String>,
}

/// `PUT /v1/admin/patients/{patient_id}`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PatientIn {
    /// The patient's practice; a patient never moves between practices.
    #[schema(
        min_length = 1,
        max_length = 128,
        pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]+$"
    )]
    pub practice_id: String,
    /// First name. 1 to 200 characters once trimmed; no control characters.
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]*[^\\s\\u0000-\\u001F\\u007F-\\u009F][^\\u0000-\\u001F\\u007F-\\u009F]*$"
    )]
    pub first_name: String,
    /// Last name. 1 to 200 characters once trimmed; no control characters.
    #[schema(
        min_length = 1,
        max_length = 200,
        pattern = "^[^\\u0000-\\u001F\\u007F-\\u009F]*[^\\s\\u0000-\\u001F\\u007F-\\u009F][^\\u0000-\\u001F\\u007F-\\u009F]*$"
    )]
    pub last_name: String,
    /// `YYYY-MM-DD`, a real calendar date, not in the future (in the practice's time
    /// zone), not before 1900.
    #[schema(format = Date)]
    pub date_of_birth: String,
    /// Mobile number in national or international format; stored as E.164. Empty or
    /// absent: none. Changing or removing the stored number turns text messaging off
    /// (`sms_status` `none`, reason `number_changed`) unless staff opted the patient
    /// out; the same number in another format changes nothing.
    #[serde(default)]
    #[schema(max_length = 32)]
    pub mobile_phone: Option<String>,
    /// Enrolled in the patient portal.
    pub portal_enrolled: bool,
    /// Programs of the practice the patient is enrolled in.
    #[serde(default)]
    pub programs: Vec<String>,
    /// Users documented on the chart as the care team.
    #[serde(default)]
    pub care_team: Vec<String>,
}

/// A patient as stored.
#[derive(Debug, Serialize, ToSchema)]
pub struct PatientOut {
    /// The platform's id.
    pub id: String,
    /// Practice.
    pub practice_id: String,
    /// First name.
    pub first_name: String,
    /// Last name.
    pub last_name: String,
    /// Date of birth.
    pub date_of_birth: NaiveDate,
    /// Mobile number as E.164.
    pub mobile_phone: Option<String>,
    /// Portal enrollment.
    pub portal_enrolled: bool,
    /// Programs.
    pub programs: Vec<String>,
    /// Care team members.
    pub care_team: Vec<String>,
    /// SMS authentication status, as committed.
    pub sms_status: String,
}

/// The schema of a practice's `country`: the ISO 3166-1 alpha-2 codes the phone
/// number library knows (upper case; lower case is accepted too).
fn country_schema() -> utoipa::openapi::Object {
    let codes: Vec<String> = (b'A'..=b'Z')
        .flat_map(|a| (b'A'..=b'Z').map(move |b| format!("{}{}", a as char, b as char)))
        .filter(|code| phone::country(code).is_some())
        .collect();
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::Type::String)
        .enum_values(Some(codes))
        .description(Some(
            "ISO 3166-1 alpha-2 country: the default region for phone numbers.",
        ))
        .build()
}

/// The schema of a practice's `timezone`: the IANA time zone names.
fn timezone_schema() -> utoipa::openapi::Object {
    utoipa::openapi::ObjectBuilder::new()
        .schema_type(utoipa::openapi::Type::String)
        .enum_values(Some(chrono_tz::TZ_VARIANTS.iter().map(|tz| tz.name())))
        .description(Some("IANA time zone, e.g. `America/New_York`."))
        .build()
}

/// A non-empty, trimmed name of at most [`MAX_NAME_CHARS`] characters, without
/// control characters (not even a newline or a tab).
fn name(field: &str, value: &str) -> ApiResult<String> {
    let value = value.trim();
    if value.is_empty() {
        return Err(ApiError::invalid(field, "Must not be empty."));
    }
    if value.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            field,
            "Must not contain control characters.",
        ));
    }
    if value.chars().count() > MAX_NAME_CHARS {
        return Err(ApiError::invalid(
            field,
            format!("Must be at most {MAX_NAME_CHARS} characters."),
        ));
    }
    Ok(value.to_owned())
}

/// A non-empty id of at most 128 characters without control characters.
fn id(field: &str, value: &str) -> ApiResult<String> {
    if value.is_empty() || value.len() > 128 || value.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            field,
            "Must be a non-empty id of at most 128 characters.",
        ));
    }
    Ok(value.to_owned())
}

/// The distinct ids of a list, each checked.
fn ids(field: &str, values: &[String]) -> ApiResult<BTreeSet<String>> {
    values.iter().map(|v| id(field, v)).collect()
}

/// A date of birth: `YYYY-MM-DD`, a real calendar date, not after `today`, not before 1900.
fn date_of_birth(value: &str, today: NaiveDate) -> ApiResult<NaiveDate> {
    const FIELD: &str = "date_of_birth";
    let well_formed = value.len() == 10
        && value.bytes().enumerate().all(|(i, b)| {
            if i == 4 || i == 7 {
                b == b'-'
            } else {
                b.is_ascii_digit()
            }
        });
    if !well_formed {
        return Err(ApiError::invalid(FIELD, "Must be a date as YYYY-MM-DD."));
    }
    let date = NaiveDate::parse_from_str(value, "%Y-%m-%d")
        .map_err(|_| ApiError::invalid(FIELD, "Must be a real calendar date."))?;
    if date > today {
        return Err(ApiError::invalid(FIELD, "Must not be in the future."));
    }
    if date < NaiveDate::from_ymd_opt(1900, 1, 1).unwrap_or(NaiveDate::MIN) {
        return Err(ApiError::invalid(FIELD, "Must not be before 1900."));
    }
    Ok(date)
}

fn email(value: Option<&str>) -> ApiResult<Option<String>> {
    let Some(value) = value.map(str::trim).filter(|v| !v.is_empty()) else {
        return Ok(None);
    };
    let valid = value.len() <= 254
        && !value.chars().any(|c| c.is_whitespace() || c.is_control())
        && value.split_once('@').is_some_and(|(local, domain)| {
            !local.is_empty()
                && domain.contains('.')
                && !domain.starts_with('.')
                && !domain.ends_with('.')
        });
    if valid {
        Ok(Some(value.to_owned()))
    } else {
        Err(ApiError::invalid("email", "Must be an email address."))
    }
}

/// The active practice `id`, or `None`.
async fn active_practice(state: &Shared, id: &str) -> ApiResult<Option<practice::Model>> {
    Ok(practice::Entity::find_by_id(id.to_owned())
        .one(&state.db)
        .await?
        .filter(|p| p.active))
}

/// Today's date in the practice's time zone.
fn today_in(practice: &practice::Model, now: DateTime<Utc>) -> NaiveDate {
    match practice.timezone.parse::<chrono_tz::Tz>() {
        Ok(tz) => now.with_timezone(&tz).date_naive(),
        Err(_) => now.date_naive(),
    }
}

#[utoipa::path(put, path = "/v1/admin/practices/{practice_id}", tag = "admin",
    params(("practice_id" = String, Path, description = "The platform's practice id")),
    request_body = PracticeIn,
    responses((status = 200, body = PracticeOut), (status = 409, body = super::error::ErrorBody,
        description = "`sms_number_in_use`: a number belongs to another practice"),
        (status = 422, body = super::error::ErrorBody)),
    security(("bearer" = [])))]
/// Creates or updates a practice (and reactivates a deleted one).
pub async fn put_practice(
    State(state): State<Shared>,
    Admin(caller): Admin,
    ApiPath(practice_id): ApiPath<String>,
    ApiJson(input): ApiJson<PracticeIn>,
) -> ApiResult<Json<PracticeOut>> {
    let practice_id = id("practice_id", &practice_id)?;
    caller.require_practice(&practice_id, "practice")?;
    let name = name("name", &input.name)?;
    let country = input.country.trim().to_ascii_uppercase();
    let region = (country.len() == 2)
        .then(|| phone::country(&country))
        .flatten()
        .ok_or_else(|| {
            ApiError::invalid("country", "Must be an ISO 3166-1 alpha-2 country code.")
        })?;
    if input.timezone.parse::<chrono_tz::Tz>().is_err() {
        return Err(ApiError::invalid(
            "timezone",
            "Must be an IANA time zone such as America/New_York.",
        ));
    }
    let settings = state.settings.load();
    let mut numbers: Vec<SmsNumber> = Vec::with_capacity(input.sms_numbers.len());
    for (i, entry) in input.sms_numbers.iter().enumerate() {
        let number = phone::parse_any(&entry.number, region)
            .map_err(|_| {
                ApiError::invalid(
                    format!("sms_numbers[{i}].number"),
                    "Must be a valid phone number.",
                )
            })?
            .into_inner();
        let known = settings
            .gateways
            .iter()
            .any(|g| g.name == entry.gateway && g.kind == GatewayKind::Sms);
        if !known {
            return Err(ApiError::invalid(
                format!("sms_numbers[{i}].gateway"),
                "Must name a configured SMS gateway instance.",
            ));
        }
        if numbers.iter().any(|n| n.number == number) {
            return Err(ApiError::invalid(
                format!("sms_numbers[{i}].number"),
                "Listed twice.",
            ));
        }
        numbers.push(SmsNumber {
            number,
            gateway: entry.gateway.clone(),
        });
    }
    for (i, n) in numbers.iter().enumerate() {
        let owner = practice_sms_number::Entity::find_by_id(n.number.clone())
            .one(&state.db)
            .await?;
        if owner.is_some_and(|o| o.practice_id != practice_id) {
            return Err(ApiError::conflict(
                "sms_number_in_use",
                "This number belongs to another practice.",
            )
            .field(format!("sms_numbers[{i}].number")));
        }
    }

    let now = state.clock.now();
    let existing = practice::Entity::find_by_id(practice_id.clone())
        .one(&state.db)
        .await?;
    let row = practice::ActiveModel {
        id: Set(practice_id.clone()),
        name: Set(name.clone()),
        sms_enabled: Set(input.sms_enabled),
        portal_enabled: Set(input.portal_enabled),
        country: Set(country.clone()),
        timezone: Set(input.timezone.clone()),
        sign_outbound_sms: Set(input.sign_outbound_sms),
        active: Set(true),
        created_at: Set(existing.as_ref().map_or(now, |p| p.created_at)),
        updated_at: Set(now),
    };
    let kept: Vec<String> = numbers.iter().map(|n| n.number.clone()).collect();
    let mut unit = WriteUnit::new().upsert(row, &[practice::Column::Id]).exec(
        practice_sms_number::Entity::delete_many()
            .filter(practice_sms_number::Column::PracticeId.eq(practice_id.clone()))
            .filter(practice_sms_number::Column::Number.is_not_in(kept))
            .into_query(),
        Expect::Any,
        "practice numbers replaced",
    );
    for n in &numbers {
        unit = unit.upsert(
            practice_sms_number::ActiveModel {
                number: Set(n.number.clone()),
                practice_id: Set(practice_id.clone()),
                gateway: Set(n.gateway.clone()),
            },
            &[practice_sms_number::Column::Number],
        );
    }
    let audit = AuditEntry {
        client: &caller.client,
        actor_user_id: None,
        patient_id: None,
        action: "admin.practice.upsert",
        detail: Some(format!("practice_id={practice_id}")),
    };
    state.writer.write(audit.add_to(unit, now)).await?;
    state.events.access_changed(AccessChange::Practice {
        id: &practice_id,
        active: true,
        portal_enabled: input.portal_enabled,
    });
    Ok(Json(PracticeOut {
        id: practice_id,
        name,
        sms_enabled: input.sms_enabled,
        portal_enabled: input.portal_enabled,
        country,
        timezone: input.timezone,
        sms_numbers: numbers,
        sign_outbound_sms: input.sign_outbound_sms,
    }))
}

#[utoipa::path(put, path = "/v1/admin/practices/{practice_id}/programs/{program_id}", tag = "admin",
    params(("practice_id" = String, Path), ("program_id" = String, Path)),
    request_body = ProgramIn,
    responses((status = 200, body = ProgramOut), (status = 404, body = super::error::ErrorBody),
        (status = 422, body = super::error::ErrorBody)),
    security(("bearer" = [])))]
/// Creates or updates a care program of a practice.
pub async fn put_program(
    State(state): State<Shared>,
    Admin(caller): Admin,
    ApiPath((practice_id, program_id)): ApiPath<(String, String)>,
    ApiJson(input): ApiJson<ProgramIn>,
) -> ApiResult<Json<ProgramOut>> {
    caller.require_practice(&practice_id, "practice")?;
    let program_id = id("program_id", &program_id)?;
    let name = name("name", &input.name)?;
    if active_practice(&state, &practice_id).await?.is_none() {
        return Err(ApiError::not_found("practice"));
    }
    let now = state.clock.now();
    let existing = program::Entity::find_by_id(program_id.clone())
        .one(&state.db)
        .await?;
    if existing
        .as_ref()
        .is_some_and(|p| p.practice_id != practice_id)
    {
        return Err(
            ApiError::invalid("practice_id", "A program never moves between practices.")
                .with_code("practice_change_refused"),
        );
    }
    let row = program::ActiveModel {
        id: Set(program_id.clone()),
        practice_id: Set(practice_id.clone()),
        name: Set(name.clone()),
        active: Set(true),
        created_at: Set(existing.as_ref().map_or(now, |p| p.created_at)),
        updated_at: Set(now),
    };
    let audit = AuditEntry {
        client: &caller.client,
        actor_user_id: None,
        patient_id: None,
        action: "admin.program.upsert",
        detail: Some(format!("program_id={program_id}")),
    };
    let unit = WriteUnit::new().upsert(row, &[program::Column::Id]);
    state.writer.write(audit.add_to(unit, now)).await?;
    Ok(Json(ProgramOut {
        id: program_id,
        practice_id,
        name,
    }))
}

/// Checks that every id in `wanted` is an active program of `practice_id`.
async fn check_programs(
    state: &Shared,
    practice_id: &str,
    wanted: &BTreeSet<String>,
    field: &str,
) -> ApiResult<()> {
    if wanted.is_empty() {
        return Ok(());
    }
    let found = program::Entity::find()
        .filter(program::Column::Id.is_in(wanted.iter().cloned()))
        .filter(program::Column::PracticeId.eq(practice_id))
        .filter(program::Column::Active.eq(true))
        .all(&state.db)
        .await?;
    if found.len() == wanted.len() {
        Ok(())
    } else {
        Err(ApiError::invalid(
            field,
            "Names a program that is not a program of this practice.",
        )
        .with_code("unknown_id"))
    }
}

#[utoipa::path(put, path = "/v1/admin/users/{user_id}", tag = "admin",
    params(("user_id" = String, Path)),
    request_body = UserIn,
    responses((status = 200, body = UserOut), (status = 422, body = super::error::ErrorBody)),
    security(("bearer" = [])))]
/// Creates or updates a staff user.
pub async fn put_user(
    State(state): State<Shared>,
    Admin(caller): Admin,
    ApiPath(user_id): ApiPath<String>,
    ApiJson(input): ApiJson<UserIn>,
) -> ApiResult<Json<UserOut>> {
    let user_id = id("user_id", &user_id)?;
    let name = name("name", &input.name)?;
    let email = email(input.email.as_deref())?;
    let restricted = ids("restricted_programs", &input.restricted_programs)?;
    caller.require_practice(&input.practice_id, "practice")?;
    if active_practice(&state, &input.practice_id).await?.is_none() {
        return Err(ApiError::invalid("practice_id", "No such practice.").with_code("unknown_id"));
    }
    let existing = user::Entity::find_by_id(user_id.clone())
        .one(&state.db)
        .await?;
    if let Some(existing) = &existing {
        caller.require_practice(&existing.practice_id, "user")?;
    }
    if existing
        .as_ref()
        .is_some_and(|u| u.practice_id != input.practice_id)
    {
        return Err(
            ApiError::invalid("practice_id", "A user never moves between practices.")
                .with_code("practice_change_refused"),
        );
    }
    check_programs(
        &state,
        &input.practice_id,
        &restricted,
        "restricted_programs",
    )
    .await?;

    let now = state.clock.now();
    let row = user::ActiveModel {
        id: Set(user_id.clone()),
        practice_id: Set(input.practice_id.clone()),
        name: Set(name.clone()),
        email: Set(email.clone()),
        active: Set(true),
        created_at: Set(existing.as_ref().map_or(now, |u| u.created_at)),
        updated_at: Set(now),
    };
    let mut unit = WriteUnit::new()
        .upsert(row, &[user::Column::Id])
        .insert_or_ignore(
            default_notification_settings(&user_id, now),
            &[notification_settings::Column::UserId],
        )
        .exec(
            user_program_restriction::Entity::delete_many()
                .filter(user_program_restriction::Column::UserId.eq(user_id.clone()))
                .into_query(),
            Expect::Any,
            "restrictions replaced",
        );
    for program_id in &restricted {
        unit = unit.insert(user_program_restriction::ActiveModel {
            user_id: Set(user_id.clone()),
            program_id: Set(program_id.clone()),
        });
    }
    let audit = AuditEntry {
        client: &caller.client,
        actor_user_id: None,
        patient_id: None,
        action: "admin.user.upsert",
        detail: Some(format!("user_id={user_id}")),
    };
    state.writer.write(audit.add_to(unit, now)).await?;
    state.events.access_changed(AccessChange::User {
        id: &user_id,
        active: true,
    });
    Ok(Json(UserOut {
        id: user_id,
        practice_id: input.practice_id,
        name,
        email,
        restricted_programs: restricted.into_iter().collect(),
    }))
}

/// SPEC's defaults: New Patient Message on (in-app), the reminder and Two-Way Texting off.
fn default_notification_settings(
    user_id: &str,
    now: DateTime<Utc>,
) -> notification_settings::ActiveModel {
    notification_settings::ActiveModel {
        user_id: Set(user_id.to_owned()),
        new_patient_message: Set(true),
        unread_reminder: Set(false),
        two_way_texting: Set(false),
        new_patient_message_in_app: Set(true),
        new_patient_message_email: Set(false),
        unread_reminder_in_app: Set(true),
        unread_reminder_email: Set(false),
        two_way_texting_in_app: Set(true),
        two_way_texting_email: Set(false),
        updated_at: Set(now),
    }
}

#[utoipa::path(put, path = "/v1/admin/patients/{patient_id}", tag = "admin",
    params(("patient_id" = String, Path)),
    request_body = PatientIn,
    responses((status = 200, body = PatientOut), (status = 422, body = super::error::ErrorBody)),
    security(("bearer" = [])))]
/// Creates or updates a patient (and reactivates a deleted one, with its history).
///
/// The SMS status is not the platform's: an update never writes it, except that a
/// changed or removed mobile number turns text messaging off in the same commit
/// (`none`, reason `number_changed`, a `system` message; a pending authentication
/// ends; nothing is texted to either number) — unless staff opted the patient out,
/// which stays.
pub async fn put_patient(
    State(state): State<Shared>,
    Admin(caller): Admin,
    ApiPath(patient_id): ApiPath<String>,
    ApiJson(input): ApiJson<PatientIn>,
) -> ApiResult<Json<PatientOut>> {
    let patient_id = id("patient_id", &patient_id)?;
    caller.require_practice(&input.practice_id, "practice")?;
    let Some(practice) = active_practice(&state, &input.practice_id).await? else {
        return Err(ApiError::invalid("practice_id", "No such practice.").with_code("unknown_id"));
    };
    let existing = patient::Entity::find_by_id(patient_id.clone())
        .one(&state.db)
        .await?;
    if let Some(existing) = &existing {
        caller.require_practice(&existing.practice_id, "patient")?;
    }
    if existing
        .as_ref()
        .is_some_and(|p| p.practice_id != practice.id)
    {
        return Err(
            ApiError::invalid("practice_id", "A patient never moves between practices.")
                .with_code("practice_change_refused"),
        );
    }
    let first_name = name("first_name", &input.first_name)?;
    let last_name = name("last_name", &input.last_name)?;
    let now = state.clock.now();
    let date_of_birth = date_of_birth(&input.date_of_birth, today_in(&practice, now))?;
    let mobile_phone = match input
        .mobile_phone
        .as_deref()
        .map(str::trim)
        .filter(|v| !v.is_empty())
    {
        None => None,
        Some(raw) => {
            let region = phone::country(&practice.country)
                .ok_or_else(|| ApiError::internal(&"a stored practice has an unknown country"))?;
            match phone::parse_mobile(raw, region) {
                Ok(number) => Some(number.into_inner()),
                Err(PhoneError::Invalid) => {
                    return Err(ApiError::invalid(
                        "mobile_phone",
                        "Must be a valid phone number.",
                    ));
                }
                Err(PhoneError::NotMobile) => {
                    return Err(ApiError::invalid(
                        "mobile_phone",
                        "Must be a mobile number that can receive texts.",
                    ));
                }
            }
        }
    };
    let programs = ids("programs", &input.programs)?;
    check_programs(&state, &practice.id, &programs, "programs").await?;
    let care_team = ids("care_team", &input.care_team)?;
    if !care_team.is_empty() {
        let found = user::Entity::find()
            .filter(user::Column::Id.is_in(care_team.iter().cloned()))
            .filter(user::Column::PracticeId.eq(practice.id.clone()))
            .filter(user::Column::Active.eq(true))
            .all(&state.db)
            .await?;
        if found.len() != care_team.len() {
            return Err(ApiError::invalid(
                "care_team",
                "Names a user who is not a user of this practice.",
            )
            .with_code("unknown_id"));
        }
    }

    let current_roles: HashMap<String, care_team_member::Model> = care_team_member::Entity::find()
        .filter(care_team_member::Column::PatientId.eq(patient_id.clone()))
        .all(&state.db)
        .await?
        .into_iter()
        .map(|m| (m.user_id.clone(), m))
        .collect();
    let search_name = format!("{} {}", first_name, last_name).to_lowercase();
    // A new patient's row. An existing one gets only the columns the platform owns
    // (`ADMIN_PATIENT_COLUMNS`): its SMS status is the conversation actor's and may
    // have changed since `existing` was read, and its number changes only together
    // with what a new number does to texting, in the actor (below).
    let row = patient::ActiveModel {
        id: Set(patient_id.clone()),
        practice_id: Set(practice.id.clone()),
        first_name: Set(first_name.clone()),
        last_name: Set(last_name.clone()),
        search_name: Set(search_name),
        date_of_birth: Set(date_of_birth),
        mobile_phone: Set(mobile_phone.clone()),
        portal_enrolled: Set(input.portal_enrolled),
        sms_status: Set(SmsStatus::None),
        sms_status_reason: Set(None),
        last_activity_at: Set(None),
        active: Set(true),
        created_at: Set(now),
        updated_at: Set(now),
    };
    let mut unit = WriteUnit::new()
        .upsert_columns(row, &[patient::Column::Id], ADMIN_PATIENT_COLUMNS)
        .insert_or_ignore(
            conversation::ActiveModel {
                patient_id: Set(patient_id.clone()),
                practice_id: Set(practice.id.clone()),
                last_seq: Set(0),
                last_message_at: Set(None),
                created_at: Set(now),
            },
            &[conversation::Column::PatientId],
        )
        .exec(
            patient_program::Entity::delete_many()
                .filter(patient_program::Column::PatientId.eq(patient_id.clone()))
                .into_query(),
            Expect::Any,
            "programs replaced",
        )
        .exec(
            care_team_member::Entity::delete_many()
                .filter(care_team_member::Column::PatientId.eq(patient_id.clone()))
                .filter(care_team_member::Column::Role.eq(CareTeamRole::Member))
                .filter(care_team_member::Column::UserId.is_not_in(care_team.iter().cloned()))
                .into_query(),
            Expect::Any,
            "care team replaced",
        );
    for program_id in &programs {
        unit = unit.insert(patient_program::ActiveModel {
            patient_id: Set(patient_id.clone()),
            program_id: Set(program_id.clone()),
        });
    }
    for user_id in &care_team {
        // A notification user who is now documented on the chart becomes a member.
        let since = current_roles.get(user_id).map_or(now, |m| m.created_at);
        unit = unit.upsert(
            care_team_member::ActiveModel {
                patient_id: Set(patient_id.clone()),
                user_id: Set(user_id.clone()),
                role: Set(CareTeamRole::Member),
                created_at: Set(since),
            },
            &[
                care_team_member::Column::PatientId,
                care_team_member::Column::UserId,
            ],
        );
    }
    let audit = AuditEntry {
        client: &caller.client,
        actor_user_id: None,
        patient_id: Some(&patient_id),
        action: if existing.as_ref().is_some_and(|p| !p.active) {
            "admin.patient.reactivate"
        } else {
            "admin.patient.upsert"
        },
        detail: None,
    };
    let unit = audit.add_to(unit, now);
    let number_changed = existing
        .as_ref()
        .is_some_and(|p| p.mobile_phone != mobile_phone);
    let sms_status = if number_changed {
        let op = SmsOp::AdminNumber {
            unit: AdminUnit(unit),
            mobile_phone: mobile_phone.clone().map(Phi::new),
        };
        let sms = Sms {
            client: caller.client.clone(),
            op,
        };
        match state.conversations.send(&patient_id, sms).await?? {
            ReplyOutcome::Status(status) => status,
            _ => return Err(ApiError::internal(&"the admin upsert got another answer")),
        }
    } else {
        state.writer.write(unit).await?;
        match &existing {
            // As committed: the actor may have changed it since `existing` was read.
            Some(_) => patient::Entity::find_by_id(patient_id.clone())
                .one(&state.db)
                .await?
                .map_or(SmsStatus::None, |p| p.sms_status),
            None => SmsStatus::None,
        }
    };
    state.events.access_changed(AccessChange::Patient {
        id: &patient_id,
        active: true,
        portal_enrolled: input.portal_enrolled,
    });
    Ok(Json(PatientOut {
        id: patient_id,
        practice_id: practice.id,
        first_name,
        last_name,
        date_of_birth,
        mobile_phone,
        portal_enrolled: input.portal_enrolled,
        programs: programs.into_iter().collect(),
        care_team: care_team.into_iter().collect(),
        sms_status: sms_status.as_str().to_owned(),
    }))
}

#[utoipa::path(delete, path = "/v1/admin/practices/{practice_id}", tag = "admin",
    params(("practice_id" = String, Path)),
    responses((status = 204), (status = 404, body = super::error::ErrorBody)), security(("bearer" = [])))]
/// Deactivates a practice: its patients and users disappear from every view, and
/// what deactivating a patient does is done for each of its patients — pending SMS
/// sessions end, their timers (windows, reminders) are cancelled, and no delivery
/// not yet handed to a provider is sent (the dispatcher's claim also refuses any
/// delivery of an inactive practice).
pub async fn delete_practice(
    State(state): State<Shared>,
    Admin(caller): Admin,
    ApiPath(practice_id): ApiPath<String>,
) -> ApiResult<impl IntoResponse> {
    deactivate(&state, &caller, Kind::Practice, &practice_id).await
}

#[utoipa::path(delete, path = "/v1/admin/users/{user_id}", tag = "admin",
    params(("user_id" = String, Path)),
    responses((status = 204), (status = 404, body = super::error::ErrorBody)), security(("bearer" = [])))]
/// Deactivates a user: the user can no longer act, and is notified of nothing.
pub async fn delete_user(
    State(state): State<Shared>,
    Admin(caller): Admin,
    ApiPath(user_id): ApiPath<String>,
) -> ApiResult<impl IntoResponse> {
    deactivate(&state, &caller, Kind::User, &user_id).await
}

#[utoipa::path(delete, path = "/v1/admin/patients/{patient_id}", tag = "admin",
    params(("patient_id" = String, Path)),
    responses((status = 204), (status = 404, body = super::error::ErrorBody)), security(("bearer" = [])))]
/// Deactivates a patient: gone from every view (404), nothing more is sent, pending
/// timers are cancelled; messages and the audit log are kept.
pub async fn delete_patient(
    State(state): State<Shared>,
    Admin(caller): Admin,
    ApiPath(patient_id): ApiPath<String>,
) -> ApiResult<impl IntoResponse> {
    deactivate(&state, &caller, Kind::Patient, &patient_id).await
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Practice,
    User,
    Patient,
}

async fn deactivate(
    state: &Shared,
    caller: &Caller,
    kind: Kind,
    id: &str,
) -> ApiResult<StatusCode> {
    let what = match kind {
        Kind::Practice => "practice",
        Kind::User => "user",
        Kind::Patient => "patient",
    };
    // A row of a practice this client does not serve is answered as unknown.
    let practice_id = match kind {
        Kind::Practice => Some(id.to_owned()),
        Kind::User => user::Entity::find_by_id(id.to_owned())
            .one(&state.db)
            .await?
            .map(|u| u.practice_id),
        Kind::Patient => patient::Entity::find_by_id(id.to_owned())
            .one(&state.db)
            .await?
            .map(|p| p.practice_id),
    };
    if let Some(practice_id) = &practice_id {
        caller.require_practice(practice_id, what)?;
    }
    let client = caller.client.as_str();
    let now = state.clock.now();
    let (unit, action, patient_id) = match kind {
        Kind::Practice => (deactivate_practice(id, now), "admin.practice.delete", None),
        Kind::User => (
            WriteUnit::new().exec(
                user::Entity::update_many()
                    .col_expr(user::Column::Active, Expr::value(false))
                    .col_expr(user::Column::UpdatedAt, Expr::value(now))
                    .filter(user::Column::Id.eq(id))
                    .filter(user::Column::Active.eq(true))
                    .into_query(),
                Expect::Exactly(1),
                "user exists",
            ),
            "admin.user.delete",
            None,
        ),
        Kind::Patient => (
            deactivate_patient(id, now),
            "admin.patient.delete",
            Some(id),
        ),
    };
    let audit = AuditEntry {
        client,
        actor_user_id: None,
        patient_id,
        action,
        detail: None,
    };
    match state.writer.write(audit.add_to(unit, now)).await {
        Ok(()) => {
            state.events.access_changed(match kind {
                Kind::Practice => AccessChange::Practice {
                    id,
                    active: false,
                    portal_enabled: false,
                },
                Kind::User => AccessChange::User { id, active: false },
                Kind::Patient => AccessChange::Patient {
                    id,
                    active: false,
                    portal_enrolled: false,
                },
            });
            Ok(StatusCode::NO_CONTENT)
        }
        Err(crate::writer::WriteError::Precondition(_)) => Err(ApiError::not_found(what)),
        Err(err) => Err(err.into()),
    }
}

/// The unit that deactivates a practice: the row, and for all its patients what
/// [`deactivate_patient`] does for one (sessions, timers, queued deliveries); the
/// patient rows themselves stay active, hidden by the practice's flag.
fn deactivate_practice(id: &str, now: DateTime<Utc>) -> WriteUnit {
    use caremsg_entities::{DeliveryStatus, SmsAuthStatus};
    let patients = patient::Entity::find()
        .select_only()
        .column(patient::Column::Id)
        .filter(patient::Column::PracticeId.eq(id))
        .into_query();
    WriteUnit::new()
        .exec(
            practice::Entity::update_many()
                .col_expr(practice::Column::Active, Expr::value(false))
                .col_expr(practice::Column::UpdatedAt, Expr::value(now))
                .filter(practice::Column::Id.eq(id))
                .filter(practice::Column::Active.eq(true))
                .into_query(),
            Expect::Exactly(1),
            "practice exists",
        )
        .merge(crate::timers::cancel_patients_where(patients, now))
        .exec(
            sms_auth_session::Entity::update_many()
                .col_expr(
                    sms_auth_session::Column::Status,
                    Expr::value(SmsAuthStatus::Superseded),
                )
                .col_expr(sms_auth_session::Column::EndedAt, Expr::value(now))
                .filter(sms_auth_session::Column::PracticeId.eq(id))
                .filter(sms_auth_session::Column::Status.eq(SmsAuthStatus::Pending))
                .into_query(),
            Expect::Any,
            "sessions ended",
        )
        .exec(
            delivery::Entity::update_many()
                .col_expr(
                    delivery::Column::Status,
                    Expr::value(DeliveryStatus::Refused),
                )
                .col_expr(
                    delivery::Column::ErrorCode,
                    Expr::value("practice_inactive"),
                )
                .col_expr(
                    delivery::Column::ErrorReason,
                    Expr::value("practice deactivated"),
                )
                .col_expr(delivery::Column::UpdatedAt, Expr::value(now))
                .filter(delivery::Column::PracticeId.eq(id))
                .filter(delivery::Column::Status.eq(DeliveryStatus::Queued))
                .into_query(),
            Expect::Any,
            "deliveries refused",
        )
}

/// The unit that deactivates a patient: the row, its pending SMS session and timers
/// (an equality match on the timers' patient column), and every delivery not yet
/// handed to a provider.
fn deactivate_patient(id: &str, now: DateTime<Utc>) -> WriteUnit {
    use caremsg_entities::DeliveryStatus;
    use caremsg_entities::SmsAuthStatus;
    WriteUnit::new()
        .exec(
            patient::Entity::update_many()
                .col_expr(patient::Column::Active, Expr::value(false))
                .col_expr(patient::Column::UpdatedAt, Expr::value(now))
                .filter(patient::Column::Id.eq(id))
                .filter(patient::Column::Active.eq(true))
                .into_query(),
            Expect::Exactly(1),
            "patient exists",
        )
        .merge(crate::timers::cancel_patient(id, now))
        .exec(
            sms_auth_session::Entity::update_many()
                .col_expr(
                    sms_auth_session::Column::Status,
                    Expr::value(SmsAuthStatus::Superseded),
                )
                .col_expr(sms_auth_session::Column::EndedAt, Expr::value(now))
                .filter(sms_auth_session::Column::PatientId.eq(id))
                .filter(sms_auth_session::Column::Status.eq(SmsAuthStatus::Pending))
                .into_query(),
            Expect::Any,
            "sessions ended",
        )
        .exec(
            delivery::Entity::update_many()
                .col_expr(
                    delivery::Column::Status,
                    Expr::value(DeliveryStatus::Refused),
                )
                .col_expr(
                    delivery::Column::ErrorReason,
                    Expr::value("patient deleted"),
                )
                .col_expr(delivery::Column::UpdatedAt, Expr::value(now))
                .filter(delivery::Column::PatientId.eq(id))
                .filter(delivery::Column::Status.eq(DeliveryStatus::Queued))
                .into_query(),
            Expect::Any,
            "deliveries refused",
        )
}
