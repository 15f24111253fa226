//! Why a plugin could not be loaded, started or called.

use std::path::PathBuf;

/// Why [`crate::load`] refused a file. Every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be opened as a shared library.
    #[error("cannot load plugin {}: {reason}", .path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// The dynamic loader's message.
        reason: String,
    },
    /// The library has no ABI v1 entry symbol.
    #[error("{} is not a caremsg ABI 1 plugin: it exports no `caremsg_gateway_v1`{hint}", .path.display())]
    NoEntry {
        /// The file.
        path: PathBuf,
        /// What it exports instead, if recognisable (starts with "; ").
        hint: String,
    },
    /// The entry point returned null for this host's ABI version.
    #[error(
        "plugin {} refused to run under ABI {host_major}.{host_minor}: it was built for another ABI major version",
        .path.display()
    )]
    Refused {
        /// The file.
        path: PathBuf,
        /// This host's ABI major version.
        host_major: u32,
        /// This host's ABI minor version.
        host_minor: u32,
    },
    /// The declaration does not start with the magic number.
    #[error("{} is not a caremsg plugin: its declaration has the wrong magic number {magic:#018x}", .path.display())]
    BadMagic {
        /// The file.
        path: PathBuf,
        /// What was found.
        magic: u64,
    },
    /// The plugin speaks another ABI major version.
    #[error(
        "plugin {} was built for ABI {plugin_major}.{plugin_minor}, but this daemon speaks ABI {host_major}.{host_minor}; rebuild it against caremsg-plugin-sdk for ABI {host_major}",
        .path.display()
    )]
    AbiMajor {
        /// The file.
        path: PathBuf,
        /// The plugin's ABI major version.
        plugin_major: u32,
        /// The plugin's ABI minor version.
        plugin_minor: u32,
        /// This host's ABI major version.
        host_major: u32,
        /// This host's ABI minor version.
        host_minor: u32,
    },
    /// The plugin needs a newer minor version than this host provides.
    #[error(
        "plugin {} needs ABI {plugin_major}.{plugin_minor}, newer than this daemon's ABI {host_major}.{host_minor}; upgrade caremsgd",
        .path.display()
    )]
    AbiMinor {
        /// The file.
        path: PathBuf,
        /// The plugin's ABI major version.
        plugin_major: u32,
        /// The plugin's ABI minor version.
        plugin_minor: u32,
        /// This host's ABI major version.
        host_major: u32,
        /// This host's ABI minor version.
        host_minor: u32,
    },
    /// A structure's declared size breaks the append-only rule.
    #[error(
        "plugin {} declares {structure} as {plugin_size} bytes where this daemon's ABI {host_major}.{host_minor} has {host_size}; it was built for another platform or by a broken SDK",
        .path.display()
    )]
    StructSize {
        /// The file.
        path: PathBuf,
        /// The structure.
        structure: &'static str,
        /// What the plugin declares.
        plugin_size: u32,
        /// What this host has.
        host_size: u32,
        /// This host's ABI major version.
        host_major: u32,
        /// This host's ABI minor version.
        host_minor: u32,
    },
    /// The plugin was built with `panic = "abort"`.
    #[error(
        "plugin {} was built with panic=abort; caremsgd refuses it because any panic in it would abort the whole daemon. Rebuild it with panic = \"unwind\" (Cargo's default)",
        .path.display()
    )]
    PanicAbort {
        /// The file.
        path: PathBuf,
    },
    /// The declaration is malformed.
    #[error("plugin {} has a malformed declaration: {what}", .path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        what: String,
    },
}

/// Why a call into a started instance failed. None of these carries PHI.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The plugin panicked; the SDK caught it and the process is fine. The outcome of
    /// a `send` that panicked is unknown: the message may or may not have gone out.
    #[error("the plugin panicked in {call}; the panic was contained")]
    Panicked {
        /// The call.
        call: &'static str,
    },
    /// The plugin found the input malformed.
    #[error("the plugin rejected the input of {call} as malformed")]
    InvalidInput {
        /// The call.
        call: &'static str,
    },
    /// The instance was stopped; nothing is called after `stop`.
    #[error("the instance is stopped")]
    Stopped,
    /// The plugin broke the ABI in its answer.
    #[error("the plugin's answer to {call} is malformed: {what}")]
    BadOutput {
        /// The call.
        call: &'static str,
        /// What is wrong.
        what: String,
    },
}

/// Why [`crate::Plugin::start`] failed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StartError {
    /// The plugin refused its configuration; the message is the plugin's.
    #[error("the plugin refused to start: {0}")]
    Refused(String),
    /// The call failed (panic, malformed input or output).
    #[error(transparent)]
    Call(#[from] CallError),
}
