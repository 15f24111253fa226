//! Request extractors: credentials (bearer token, scopes, acting user) and JSON bodies
//! that fail with the JSON error contract instead of axum's plain-text rejections.

use axum::body::Bytes;
use axum::extract::path::ErrorKind;
use axum::extract::rejection::{PathRejection, RawPathParamsRejection};
use axum::extract::{FromRequest, FromRequestParts, Path, RawPathParams, Request};
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
        let user = state
            .users
            .active(&state.db, user_id)
            .await?
            .ok_or_else(|| ApiError::forbidden("unknown_user", "The acting user is not known."))?;
        // A user of a practice this token does not serve is answered as a user of
        // another practice: 404, whatever the route.
        caller.require_practice(&user.practice_id, "user")?;
        Ok(Self { caller, user })
    }
}

/// A JSON body, parsed strictly: only `Content-Type: application/json` (parameters
/// such as `charset` allowed; anything else is a 415), a body over the configured size
/// a 413 (told by `Content-Length` before anything is read), a syntax error a 400
/// `invalid_json`, anything but a JSON object a 422, a missing, unknown or mistyped
/// field a 422 naming the field, and a string holding NUL or another control
/// character (other than newline and tab) a 422 naming the field.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<Shared> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Shared) -> Result<Self, ApiError> {
        let bytes = read_body(req, state, false).await?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// Like [`ApiJson`], for a body that may be left out: an empty body (or white space
/// only), whatever its content type, is `None`; anything else is checked as
/// [`ApiJson`] checks it.
#[derive(Debug)]
pub struct OptionalApiJson<T>(pub Option<T>);

impl<T: DeserializeOwned> FromRequest<Shared> for OptionalApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Shared) -> Result<Self, ApiError> {
        let bytes = read_body(req, state, true).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Self(None));
        }
        parse_json(&bytes).map(|value| Self(Some(value)))
    }
}

/// Whether a `Content-Type` value is `application/json`, with or without parameters.
pub fn is_json_content_type(value: &str) -> bool {
    let essence = value.split(';').next().unwrap_or_default().trim();
    essence.eq_ignore_ascii_case("application/json")
}

/// Reads a request body of at most `server.max_body_bytes`; unless `may_be_empty` and
/// the body is empty, its content type must be JSON.
async fn read_body(req: Request, state: &Shared, may_be_empty: bool) -> Result<Bytes, ApiError> {
    let headers = req.headers();
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(is_json_content_type);
    let limit = state.settings.load().server.max_body_bytes;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("The request body is larger than {limit} bytes."),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large());
    }
    let unsupported = || {
        ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "Send the body as JSON with Content-Type: application/json.",
        )
    };
    let may_be_empty_here = may_be_empty && declared.is_none_or(|n| n == 0);
    if !is_json && !may_be_empty_here {
        return Err(unsupported());
    }
    let bytes = axum::body::to_bytes(req.into_body(), limit)
        .await
        .map_err(|_| too_large())?;
    if !is_json && !bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(unsupported());
    }
    Ok(bytes)
}

/// Parses `bytes` as `T`, mapping failures to the error contract.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|_| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            "The body is not valid JSON.",
        )
    })?;
    if !value.is_object() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
            "The body must be a JSON object.",
        ));
    }
    if let Some(field) = control_character_at(&value, "") {
        let mut error = ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "control_character",
            "Must not contain NUL or control characters other than newline and tab.",
        );
        if !field.is_empty() {
            error = error.field(field);
        }
        return Err(error);
    }
    // Typed, from the bytes again rather than from `value`: a field given twice is
    // refused (a map keeps only the last).
    let deserializer = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(deserializer).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
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

/// Whether `text` holds a character no API text may hold: NUL, or a control
/// character other than newline and tab.
pub fn has_forbidden_control(text: &str) -> bool {
    text.chars()
        .any(|c| c.is_control() && c != '\n' && c != '\t')
}

/// The path (`a.b[2].c`) of the first string or key in `value` holding a forbidden
/// control character; `""` for the top level.
fn control_character_at(value: &serde_json::Value, path: &str) -> Option<String> {
    match value {
        serde_json::Value::String(text) => has_forbidden_control(text).then(|| path.to_owned()),
        serde_json::Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(i, item)| control_character_at(item, &format!("{path}[{i}]"))),
        serde_json::Value::Object(map) => map.iter().find_map(|(key, item)| {
            if has_forbidden_control(key) {
                return Some(path.to_owned());
            }
            let inner = if path.is_empty() {
                key.clone()
            } else {
                format!("{path}.{key}")
            };
            control_character_at(item, &inner)
        }),
        _ => None,
    }
}

/// A query string, parsed strictly into `T` (a struct with `deny_unknown_fields`).
/// Every failure is a 400 JSON error that never repeats what was sent: an unknown
/// parameter (the message lists the parameters the path takes), a repeated one, a
/// value of the wrong type, a value that is not UTF-8 once percent-decoded or that
/// holds a control character; the known parameter at fault is named in `field`.
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        parse_query(parts.uri.query().unwrap_or_default()).map(ApiQuery)
    }
}

/// Parses a raw query string as [`ApiQuery`] does.
pub fn parse_query<T: DeserializeOwned>(query: &str) -> Result<T, ApiError> {
    let invalid =
        |message: String| ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", message);
    let pairs = form_urlencoded::parse(query.as_bytes());
    let deserializer = serde_urlencoded::Deserializer::new(pairs);
    let value: T = serde_path_to_error::deserialize(deserializer).map_err(|err| {
        let path = err.path().to_string();
        let message = err.into_inner().to_string();
        if let Some(rest) = message.strip_prefix("unknown field `") {
            let expected = rest
                .split_once(", expected ")
                .map_or("no parameters", |(_, expected)| expected);
            return invalid(format!(
                "Unknown query parameter; this path takes {expected}."
            ))
            .with_code("unknown_parameter");
        }
        if let Some(rest) = message.strip_prefix("duplicate field `") {
            let name = rest.split('`').next().unwrap_or_default().to_owned();
            return invalid("A query parameter may be given once.".to_owned())
                .with_code("repeated_parameter")
                .field(name);
        }
        let (sentence, named) = describe(&message);
        let field = match (path.as_str(), named) {
            (".", Some(named)) => Some(named),
            (".", None) => None,
            _ => Some(path),
        };
        let error = invalid(if sentence.starts_with("Expected") {
            sentence
        } else {
            "The value of this query parameter is not acceptable.".to_owned()
        });
        match field {
            Some(field) => error.field(field),
            None => error,
        }
    })?;
    // Every name is one `T` knows (unknown ones were refused above): name it when its
    // value is not text.
    for (raw_name, raw_value) in raw_pairs(query) {
        let name = String::from_utf8_lossy(&raw_name).into_owned();
        match String::from_utf8(raw_value) {
            Ok(text) if !text.chars().any(char::is_control) => {}
            Ok(_) => {
                return Err(invalid(
                    "A query parameter must not contain control characters.".to_owned(),
                )
                .field(name));
            }
            Err(_) => {
                return Err(invalid(
                    "A query parameter must be UTF-8 once percent-decoded.".to_owned(),
                )
                .field(name));
            }
        }
    }
    Ok(value)
}

/// The query's name/value pairs, percent-decoded (`+` is a space) but not yet text.
fn raw_pairs(query: &str) -> impl Iterator<Item = (Vec<u8>, Vec<u8>)> + '_ {
    query.split('&').filter(|p| !p.is_empty()).map(|pair| {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(name), percent_decode(value))
    })
}

fn percent_decode(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                (Some(h), Some(l)) => {
                    out.push((h * 16 + l) as u8);
                    i += 2;
                }
                _ => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    out
}

/// Path parameters, parsed into `T` (a `String`, or a tuple of them): a segment that
/// is not UTF-8 once percent-decoded, or holds a control character, is a 400
/// `invalid_path` naming the parameter, without repeating it.
#[derive(Debug)]
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let invalid = |name: &str, message: &str| {
            ApiError::new(StatusCode::BAD_REQUEST, "invalid_path", message).field(name)
        };
        let raw = match RawPathParams::from_request_parts(parts, state).await {
            Ok(raw) => raw,
            Err(RawPathParamsRejection::InvalidUtf8InPathParam(err)) => {
                let text = err.body_text();
                let name = text.rsplit('`').nth(1).unwrap_or_default().to_owned();
                return Err(invalid(&name, "Must be UTF-8 once percent-decoded."));
            }
            Err(_) => return Err(ApiError::internal(&"path parameters missing")),
        };
        for (name, value) in raw.iter() {
            if value.is_empty() || value.chars().any(char::is_control) {
                return Err(invalid(
                    name,
                    "Must be a non-empty id without control characters.",
                ));
            }
        }
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(Self(value)),
            Err(PathRejection::FailedToDeserializePathParams(err)) => match err.into_kind() {
                ErrorKind::ParseErrorAtKey { key, .. }
                | ErrorKind::InvalidUtf8InPathParam { key }
                | ErrorKind::DeserializeError { key, .. } => {
                    Err(invalid(&key, "A path parameter is not acceptable."))
                }
                _ => Err(ApiError::internal(
                    &"path parameters of an unexpected shape",
                )),
            },
            Err(_) => Err(ApiError::internal(&"path parameters missing")),
        }
    }
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
