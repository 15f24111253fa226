//! Request extractors: credentials (bearer token, scopes, acting user) and JSON bodies
//! that fail with the JSON error contract instead of axum's plain-text rejections.

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use caremsg_config::Scope;
use caremsg_entities::user;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::error::ApiError;
use crate::state::Shared;

/// The API client that made the request, identified by its bearer token.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The client's configured name (for the audit log).
    pub client: String,
    /// What it may do.
    pub scopes: Vec<Scope>,
    /// The practices it serves (`clients[].practices`); `None`: every practice.
    pub practices: Option<Vec<String>>,
    /// The client's configured token hash: an event stream opened with this token
    /// ends when a reload no longer lists it (see `Events::revalidate`).
    pub token_sha256: String,
}

impl Caller {
    /// Whether this client may act about practice `practice_id`: outside its
    /// `practices`, a request is answered as for another practice (404).
    pub fn serves(&self, practice_id: &str) -> bool {
        self.practices
            .as_ref()
            .is_none_or(|list| list.iter().any(|p| p == practice_id))
    }

    /// 404 `not_found` (`what`) unless this client serves `practice_id`.
    pub fn require_practice(&self, practice_id: &str, what: &str) -> Result<(), ApiError> {
        if self.serves(practice_id) {
            Ok(())
        } else {
            Err(ApiError::not_found(what))
        }
    }

    /// 403 unless the client has `scope`.
    pub fn require(&self, scope: Scope) -> Result<(), ApiError> {
        if self.scopes.contains(&scope) {
            Ok(())
        } else {
            Err(ApiError::forbidden(
                "wrong_scope",
                format!("This token lacks the {} scope.", scope_name(scope)),
            ))
        }
    }
}

fn scope_name(scope: Scope) -> &'static str {
    match scope {
        Scope::Admin => "admin",
        Scope::Staff => "staff",
        Scope::Portal => "portal",
    }
}

/// Finds the client whose token hashes to the configured hash. Every configured
/// client is compared, in constant time, so timing reveals neither which client
/// matched nor how much of a hash did.
pub fn authenticate(clients: &[caremsg_config::ApiClient], token: &str) -> Option<Caller> {
    let presented = Sha256::digest(token.as_bytes());
    let mut found = None;
    for client in clients {
        let Ok(expected) = hex::decode(&client.token_sha256) else {
            continue;
        };
        if bool::from(expected.as_slice().ct_eq(&presented[..])) && found.is_none() {
            found = Some(Caller {
                client: client.name.clone(),
                scopes: client.scopes.clone(),
                practices: client.practices.clone(),
                token_sha256: client.token_sha256.clone(),
            });
        }
    }
    found
}

impl FromRequestParts<Shared> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Shared) -> Result<Self, ApiError> {
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(ApiError::unauthorized)?;
        let settings = state.settings.load();
        authenticate(&settings.clients, token).ok_or_else(ApiError::unauthorized)
    }
}

/// A caller with the `admin` scope (the platform's sync job).
#[derive(Debug, Clone)]
pub struct Admin(pub Caller);

impl FromRequestParts<Shared> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Shared) -> Result<Self, ApiError> {
        let caller = Caller::from_request_parts(parts, state).await?;
        caller.require(Scope::Admin)?;
        Ok(Self(caller))
    }
}

/// A caller with the `portal` scope (the portal backend).
#[derive(Debug, Clone)]
pub struct Portal(pub Caller);

impl FromRequestParts<Shared> for Portal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Shared) -> Result<Self, ApiError> {
        let caller = Caller::from_request_parts(parts, state).await?;
        caller.require(Scope::Portal)?;
        Ok(Self(caller))
    }
}

/// The header naming the acting staff user.
pub const USER_HEADER: &str = "x-caremsg-user";

/// A caller with the `staff` scope acting as an active staff user.
#[derive(Debug, Clone)]
pub struct Staff {
    /// The API client (the staff application).
    pub caller: Caller,
    /// The acting user, as named by `X-Caremsg-User`.
    pub user: user::Model,
}

impl FromRequestParts<Shared> for Staff {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &Shared) -> Result<Self, ApiError> {
        let caller = Caller::from_request_parts(parts, state).await?;
        caller.require(Scope::Staff)?;
        let mut named = parts.headers.get_all(USER_HEADER).iter();
        let first = named.next();
        if named.next().is_some() {
            // Proxies and clients disagree on which of two copies wins: refuse both.
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "repeated_header",
                "Name the acting user once: X-Caremsg-User appears more than once.",
            )
            .field("X-Caremsg-User"));
        }
        let user_id = first
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "missing_user",
                    "Staff requests must name the acting user in X-Caremsg-User.",
                )
                .field("X-Caremsg-User")
            })?;
        let user = crate::access::active_user(&state.db, user_id)
            .await?
            .ok_or_else(|| ApiError::forbidden("unknown_user", "The acting user is not known."))?;
        // A user of a practice this token does not serve is answered as a user of
        // another practice: 404, whatever the route.
        caller.require_practice(&user.practice_id, "user")?;
        Ok(Self { caller, user })
    }
}

/// A JSON body, parsed strictly: a syntax error is a 400 `invalid_json`, a missing,
/// unknown or mistyped field a 422 naming the field, a body over the configured size
/// a 413.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<Shared> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Shared) -> Result<Self, ApiError> {
        let is_json = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim_start().starts_with("application/json"));
        if !is_json {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "Send the body as JSON with Content-Type: application/json.",
            ));
        }
        let limit = state.settings.load().server.max_body_bytes;
        let bytes = axum::body::to_bytes(req.into_body(), limit)
            .await
            .map_err(|_| {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    format!("The request body is larger than {limit} bytes."),
                )
            })?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// Parses `bytes` as `T`, mapping failures to the error contract.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let deserializer = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(deserializer).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            return ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_json",
                "The body is not valid JSON.",
            );
        }
        // serde's own messages may quote the value sent ("invalid type: string \"...\""),
        // which can be PHI: say what was expected instead, never what was received.
        let (message, named) = describe(&inner.to_string());
        let field = match (path.as_str(), named) {
            (".", Some(named)) => named,
            (".", None) => String::new(),
            _ => path,
        };
        let mut error = ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_body", message);
        if !field.is_empty() {
            error = error.field(field);
        }
        error
    })
}

/// A client-safe sentence for a serde error, and the field it names, if any.
fn describe(serde_message: &str) -> (String, Option<String>) {
    let message = serde_message
        .split(" at line ")
        .next()
        .unwrap_or(serde_message);
    let ticked = |rest: &str| rest.split('`').next().map(str::to_owned);
    if let Some(rest) = message.strip_prefix("missing field `") {
        return ("This field is required.".to_owned(), ticked(rest));
    }
    if let Some(rest) = message.strip_prefix("unknown field `") {
        let name = ticked(rest);
        return (
            format!("Unknown field `{}`.", name.clone().unwrap_or_default()),
            name,
        );
    }
    if let Some((_, expected)) = message.split_once(", expected ") {
        return (format!("Expected {expected}."), None);
    }
    ("The value is not acceptable here.".to_owned(), None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        name: String,
        count: u32,
    }

    fn check(input: &str, status: StatusCode, field: Option<&str>) {
        let err = parse_json::<Body>(input.as_bytes()).unwrap_err();
        assert_eq!(err.status, status, "{input}: {err:?}");
        assert_eq!(err.field.as_deref(), field, "{input}: {err:?}");
    }

    #[test]
    fn json_errors_name_the_field() {
        check("{", StatusCode::BAD_REQUEST, None);
        check("not json", StatusCode::BAD_REQUEST, None);
        check(
            r#"{"name":"a"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("count"),
        );
        check(
            r#"{"name":"a","count":"x"}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("count"),
        );
        check(
            r#"{"name":"a","count":1,"extra":2}"#,
            StatusCode::UNPROCESSABLE_ENTITY,
            Some("extra"),
        );
    }

    #[test]
    fn mistyped_values_are_not_echoed() {
        let err = parse_json::<Body>(br#"{"name":"a","count":"Canary Secret"}"#).unwrap_err();
        assert!(!err.message.contains("Canary"), "{}", err.message);
    }
}
