//! What every operation of the OpenAPI document shares, added in one place rather
//! than on each handler: the bearer token and `X-Caremsg-User` header where they are
//! required, and the error answers the extractors and middleware give (400 for a bad
//! query, path or JSON syntax, 401, 403, 404 for an id, 413, 415 and 422 for a
//! body, 503 for a request cut off by `server.request_timeout` or a storage fault).
//!
//! **Architecture Invariant:** the document is the contract: `tests/tests/openapi.rs`
//! compares its operations with the router's routes both ways, and schemathesis
//! (`.ci/run`) checks that answers keep to it.

use utoipa::openapi::path::{Operation, ParameterBuilder, ParameterIn};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{
    ContentBuilder, ObjectBuilder, OpenApi, Ref, RefOr, Required, ResponseBuilder, Type,
};

use super::extract::USER_HEADER;

/// The modifier that completes the generated document.
pub struct Contract;

impl utoipa::Modify for Contract {
    fn modify(&self, openapi: &mut OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        for (path, item) in openapi.paths.paths.iter_mut() {
            for operation in [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ]
            .into_iter()
            .flatten()
            {
                complete(path, operation);
            }
        }
    }
}

/// The credentials a path needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Credential {
    None,
    Token,
    StaffUser,
}

fn credential(path: &str) -> Credential {
    if path.starts_with("/v1/staff/") {
        Credential::StaffUser
    } else if path.starts_with("/v1/admin/") || path.starts_with("/v1/portal/") {
        Credential::Token
    } else {
        Credential::None
    }
}

fn complete(path: &str, operation: &mut Operation) {
    let credential = credential(path);
    let has_path_params = path.contains('{');
    let parameters = operation.parameters.get_or_insert_with(Vec::new);
    let has_query = parameters
        .iter()
        .any(|p| p.parameter_in == ParameterIn::Query);
    for parameter in parameters.iter_mut() {
        if parameter.parameter_in == ParameterIn::Path {
            parameter.schema = Some(id_schema().into());
        }
    }
    if credential == Credential::StaffUser
        && !parameters
            .iter()
            .any(|p| p.name.eq_ignore_ascii_case(USER_HEADER))
    {
        parameters.push(
            ParameterBuilder::new()
                .name("X-Caremsg-User")
                .parameter_in(ParameterIn::Header)
                .required(Required::True)
                .description(Some(
                    "The platform's id of the staff user the request acts for (an active \
                     user; once, not repeated).",
                ))
                .schema(Some(id_schema()))
                .build(),
        );
    }
    let has_body = operation.request_body.is_some();
    let responses = &mut operation.responses.responses;
    let mut add = |status: &str, description: &str| {
        responses
            .entry(status.to_owned())
            .or_insert_with(|| error_response(description));
    };
    if has_path_params || has_query || has_body || credential == Credential::StaffUser {
        add(
            "400",
            match (credential, has_body) {
                (Credential::StaffUser, true) => {
                    "`missing_user`: no X-Caremsg-User; `invalid_json`: the body is not JSON; \
                     `invalid_path`, `invalid_query`, `unknown_parameter`, \
                     `repeated_parameter`: a parameter is not acceptable"
                }
                (Credential::StaffUser, false) => {
                    "`missing_user`: no X-Caremsg-User; `invalid_path`, `invalid_query`, \
                     `unknown_parameter`, `repeated_parameter`: a parameter is not acceptable"
                }
                (_, true) => {
                    "`invalid_json`: the body is not JSON; `invalid_path`: a path parameter \
                     is not acceptable"
                }
                _ => {
                    "`invalid_path`, `invalid_query`, `unknown_parameter`, \
                     `repeated_parameter`: a parameter is not acceptable"
                }
            },
        );
    }
    if credential != Credential::None {
        add("401", "`unauthorized`: no bearer token, or an unknown one");
        add(
            "403",
            if credential == Credential::StaffUser {
                "`wrong_scope`: the token lacks the scope; `unknown_user`: the acting user is \
                 not an active user; `access_restricted`: the user is restricted from every \
                 program the patient is enrolled in"
            } else {
                "`wrong_scope`: the token lacks the scope"
            },
        );
    }
    if has_path_params {
        add(
            "404",
            "`not_found`: no such id, deleted, or of another practice",
        );
    }
    if has_body {
        add(
            "413",
            "`body_too_large`: larger than `server.max_body_bytes`",
        );
        add(
            "415",
            "`unsupported_media_type`: the body is not `application/json`",
        );
    }
    if has_body || has_query {
        add(
            "422",
            "`invalid_body`, `invalid_field`, `control_character`: a field is missing, \
             unknown or not acceptable (`field` names it)",
        );
    }
    if credential != Credential::None {
        add(
            "503",
            "`timeout`: cut off by `server.request_timeout`; `shutting_down`; \
             `storage_unavailable` / `unavailable`: the database cannot take the write now \
             (retry)",
        );
    }
}

/// An id without control characters (what the path and header extractors accept).
pub const NO_CONTROL_ID: &str = "^[^\\u0000-\\u001F\\u007F-\\u009F]+$";

/// A platform id: 1 to 128 characters, no control characters.
fn id_schema() -> utoipa::openapi::Object {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .min_length(Some(1))
        .max_length(Some(128))
        .pattern(Some(NO_CONTROL_ID))
        .build()
}

fn error_response(description: &str) -> RefOr<utoipa::openapi::Response> {
    ResponseBuilder::new()
        .description(description)
        .content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(Ref::from_schema_name("ErrorBody")))
                .build(),
        )
        .build()
        .into()
}
