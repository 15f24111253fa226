//! A plugin whose declaration says it was built with `panic = "abort"`: the unwind
//! flag is cleared by hand, because Cargo cannot set `panic` for one package of a
//! workspace. The host judges by the flag, so it must refuse this plugin.

use caremsg_plugin_sdk::{Gateway, Host, Kind, Outbound, SendResult};

/// Would work, if the host accepted it.
#[derive(Debug)]
pub struct PanicAbort;

impl Gateway for PanicAbort {
    fn start(_config: &str, _host: Host) -> Result<Self, String> {
        Ok(PanicAbort)
    }

    fn send(&self, _message: &Outbound<'_>) -> SendResult {
        SendResult::sent("never")
    }
}

caremsg_plugin_sdk::__export_plugin_with!(
    PanicAbort,
    "panic-abort",
    env!("CARGO_PKG_VERSION"),
    Kind::Sms,
    caremsg_plugin_sdk::abi::ABI_MAJOR,
    0
);
