//! The caremsg plugin host: loads gateway plugins (ABI v1 of `caremsg-plugin-sdk`)
//! and calls them through safe, synchronous wrappers.
//!
//! ```text
//! load(path) ─► Plugin ─start(name, config, services)─► Instance
//!                                                       ├ send(&Outbound)          -> SendOutcome
//!                                                       ├ handle_webhook(&Request) -> WebhookOutcome {response, events}
//!                                                       ├ health()                 -> Health
//!                                                       └ stop()   (nothing is called after it)
//! ```
//!
//! **Architecture Invariant:** this crate's `ffi` module and the SDK's export shims
//! are the only `unsafe` code in caremsg. Everything else sees owned Rust types.
//!
//! **Architecture Invariant:** libraries are never unloaded. A new `.so` needs a
//! restart.
//!
//! - [`load`] refuses, with a message naming the file, anything it cannot run
//!   safely: no entry symbol, a wrong magic number or ABI major version, a newer
//!   minor version, structure sizes that break the append-only rule, and plugins
//!   built with `panic = "abort"`. [`inspect`] reports the same without refusing.
//! - [`Instance`] methods block: the daemon calls them on tokio's blocking pool
//!   (under its own per-instance concurrency limit), several at once. A plugin panic
//!   comes back as [`CallError::Panicked`]; the process is unaffected.
//! - The daemon implements [`HostServices`] (emit, log, http) for plugins;
//!   [`HyperHttp`] is the http part (plain HTTP only for now; TLS is not implemented).
//! - Webhooks: events a plugin emits while handling a webhook are not passed to
//!   [`HostServices::emit`]; they come back in [`WebhookOutcome::events`], so the
//!   daemon can commit them before it answers the provider.

mod compat;
mod error;
mod ffi;
mod http;
mod plugin;
mod types;

pub use compat::HOST_ABI;
pub use error::{CallError, LoadError, StartError};
pub use http::{DEFAULT_MAX_RESPONSE_BYTES, HttpError, HyperHttp};
pub use plugin::{DEFAULT_WEBHOOK_EVENT_LIMIT, Instance, Metadata, Plugin, inspect, load};
pub use types::{
    EmitOutcome, Event, Health, HostServices, HttpRequest, HttpResponse, Kind, Level, Outbound,
    ReceiptStatus, SendOutcome, WebhookOutcome, WebhookRequest, WebhookResponse,
};
