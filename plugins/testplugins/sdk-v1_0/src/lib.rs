//! The one crate a caremsg gateway plugin depends on.
//!
//! A plugin is a `cdylib` that implements the safe [`Gateway`] trait and calls
//! [`export_plugin!`]. The macro generates the `#[repr(C)]` ABI v1 declaration (see
//! [`abi`]) and the `extern "C"` shims the daemon calls; every shim runs your code
//! inside `catch_unwind`, so a panic becomes a failed call, not a dead daemon.
//! Plugins must be built with `panic = "unwind"` (Cargo's default): the macro records
//! how the plugin was built, and the daemon refuses `panic = "abort"` builds.
//!
//! The daemon calls your plugin on blocking threads, several at once. It gives you a
//! [`Host`] with three services: [`Host::emit`] (events: inbound messages, delivery
//! receipts, opt-outs), [`Host::log`] (never PHI), and [`Host::http`] (the daemon's
//! own HTTP client, so a plugin carries no HTTP or TLS stack).
//!
//! # Webhooks
//! A provider's request to `/v1/hooks/{instance}` reaches
//! [`Gateway::handle_webhook`] with the configured public URL (what providers sign),
//! the peer address, the headers and the raw body. Emit the events it reports through
//! the call's [`WebhookEvents`], not through [`Host::emit`]: they go back to the
//! daemon together with your response, and the daemon commits them to its database
//! *before* it sends the response. So a provider only sees a 2xx once its message is
//! safe, and a retry after a crash is recognised by its provider message id. If an
//! emit returns [`EmitStatus::Busy`], answer with a status that makes the provider
//! retry (such as 503).
//!
//! # A complete minimal plugin
//! `Cargo.toml`:
//! ```toml
//! [package]
//! name = "sms-echo"
//! version = "0.1.0"
//! edition = "2024"
//!
//! [lib]
//! crate-type = ["cdylib", "rlib"]
//!
//! [dependencies]
//! caremsg-plugin-sdk = { path = "../sdk" }
//! ```
//! `src/lib.rs`:
//! ```
//! use caremsg_plugin_sdk::{
//!     Event, EmitStatus, Gateway, Host, Kind, Outbound, SendResult, WebhookEvents, WebhookRequest,
//!     WebhookResponse, export_plugin, sms,
//! };
//! use std::sync::atomic::{AtomicU64, Ordering};
//!
//! /// Pretends to send; a POST to its hook with a text body is an inbound message.
//! struct Echo {
//!     host: Host,
//!     next_id: AtomicU64,
//! }
//!
//! impl Gateway for Echo {
//!     fn start(config: &str, host: Host) -> Result<Self, String> {
//!         // A real plugin deserialises its settings here (serde_json) and refuses bad ones.
//!         if config.trim() != "{}" {
//!             return Err("sms-echo takes no settings: its config must be {}.".to_owned());
//!         }
//!         Ok(Echo { host, next_id: AtomicU64::new(1) })
//!     }
//!
//!     fn send(&self, message: &Outbound<'_>) -> SendResult {
//!         let id = format!("echo-{}", self.next_id.fetch_add(1, Ordering::Relaxed));
//!         let parts = sms::segments(message.body).count;
//!         // Ids and counts only: never the number or the body.
//!         self.host.info(&format!("Echo text {id} accepted, {parts} segment(s)."));
//!         SendResult::sent(id)
//!     }
//!
//!     fn handle_webhook(&self, request: &WebhookRequest<'_>, events: &mut WebhookEvents<'_>) -> WebhookResponse {
//!         if request.method != "POST" {
//!             return WebhookResponse::empty(405).with_header("allow", "POST");
//!         }
//!         let Ok(body) = std::str::from_utf8(request.body) else {
//!             return WebhookResponse::text(400, "The body must be UTF-8 text.");
//!         };
//!         let id = format!("echo-in-{}", self.next_id.fetch_add(1, Ordering::Relaxed));
//!         let event = Event::InboundMessage { from: "+15550100", to: "+15550199", body, provider_message_id: &id };
//!         match events.emit(&event) {
//!             EmitStatus::Accepted => WebhookResponse::empty(204),
//!             EmitStatus::Busy | EmitStatus::Rejected => WebhookResponse::empty(503).with_header("retry-after", "1"),
//!         }
//!     }
//! }
//!
//! export_plugin!(Echo, "sms-echo", env!("CARGO_PKG_VERSION"), Kind::Sms);
//! # fn main() {}
//! ```
//! Build it with `cargo build`, then run the conformance battery against the `.so`:
//! `caremsg-plugin-testkit target/debug/libsms_echo.so --config testkit.json`.
//!
//! # Helpers
//! [`sms::segments`] tells GSM-7 from UCS-2 and counts parts (the daemon rate-limits
//! in segments); [`verify::constant_time_eq`] compares signatures without timing leaks;
//! [`redact::scrub`] takes phone numbers and e-mail addresses out of a provider's error
//! text before it becomes a log line or a send result's reason.

pub mod abi;
mod ffi;
mod gateway;
pub mod headers;
pub mod redact;
pub mod sms;
pub mod verify;

pub use ffi::{Host, WebhookEvents};
pub use gateway::{
    EmitStatus, Event, Gateway, Health, HttpRequest, HttpResponse, Kind, Level, Outbound,
    ReceiptStatus, SendResult, WebhookRequest, WebhookResponse,
};
pub use headers::Headers;

/// Implementation details of [`export_plugin!`]; not part of the API.
#[doc(hidden)]
pub mod __private {
    pub use crate::abi::declaration;
    pub use crate::ffi::{entry, vtable};
}

/// Exports a [`Gateway`] as a caremsg plugin: `export_plugin!(Type, name, version, kind)`.
///
/// `name` and `version` are `&'static str`s (use `env!("CARGO_PKG_VERSION")`), `kind`
/// a [`Kind`]. Call it once per `cdylib`. It defines the entry symbol
/// `caremsg_gateway_v1`, the declaration and the vtable; every generated function
/// catches panics. It also records whether the crate was compiled with
/// `panic = "unwind"`, which the daemon requires.
#[macro_export]
macro_rules! export_plugin {
    ($gateway:ty, $name:expr, $version:expr, $kind:expr $(,)?) => {
        $crate::__export_plugin_with!(
            $gateway,
            $name,
            $version,
            $kind,
            $crate::abi::ABI_MAJOR,
            if cfg!(panic = "unwind") {
                $crate::abi::flags::BUILT_WITH_UNWIND
            } else {
                0
            }
        );
    };
}

/// [`export_plugin!`] with the ABI major version and the flags chosen by hand. Only
/// for test plugins that must be refused (a wrong major, a cleared unwind flag).
#[doc(hidden)]
#[macro_export]
macro_rules! __export_plugin_with {
    ($gateway:ty, $name:expr, $version:expr, $kind:expr, $abi_major:expr, $flags:expr $(,)?) => {
        const _: () = {
            static VTABLE: $crate::abi::PluginVTable = $crate::__private::vtable::<$gateway>();
            static DECLARATION: $crate::abi::PluginDeclaration = $crate::__private::declaration(
                $name,
                $version,
                $crate::Kind::as_u32($kind),
                $abi_major,
                $flags,
                &VTABLE,
            );

            /// The plugin's entry point (ABI v1).
            // `no_mangle` counts as unsafe code: the host finds this one symbol by name.
            #[allow(unsafe_code)]
            #[unsafe(no_mangle)]
            pub extern "C" fn caremsg_gateway_v1(
                host_major: u32,
                host_minor: u32,
            ) -> *const $crate::abi::PluginDeclaration {
                $crate::__private::entry(&DECLARATION, host_major, host_minor)
            }
        };
    };
}
