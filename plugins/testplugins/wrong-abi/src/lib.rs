//! A plugin that declares ABI major version 2 under the v1 entry symbol; the host
//! must refuse it with a message naming the file and both versions.

use caremsg_plugin_sdk::{Gateway, Host, Kind, Outbound, SendResult, abi};

/// Would work, if the host accepted it.
#[derive(Debug)]
pub struct WrongAbi;

impl Gateway for WrongAbi {
    fn start(_config: &str, _host: Host) -> Result<Self, String> {
        Ok(WrongAbi)
    }

    fn send(&self, _message: &Outbound<'_>) -> SendResult {
        SendResult::sent("never")
    }
}

caremsg_plugin_sdk::__export_plugin_with!(
    WrongAbi,
    "wrong-abi",
    env!("CARGO_PKG_VERSION"),
    Kind::Sms,
    2,
    abi::flags::BUILT_WITH_UNWIND
);
