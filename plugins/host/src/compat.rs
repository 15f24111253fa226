//! Whether this host can run a plugin: magic, ABI version, structure sizes and build
//! flags, checked in that order. Pure functions over values read from the declaration.

use std::path::Path;

use caremsg_plugin_sdk::abi::{self, DeclarationHeader, StructSizes};

use crate::error::LoadError;

/// This host's ABI version.
pub const HOST_ABI: (u32, u32) = (abi::ABI_MAJOR, abi::ABI_MINOR);

/// Checks the frozen header: magic, major and minor version, declaration size.
pub(crate) fn check_header(path: &Path, header: &DeclarationHeader) -> Result<(), LoadError> {
    let (host_major, host_minor) = HOST_ABI;
    if header.magic != abi::MAGIC {
        return Err(LoadError::BadMagic {
            path: path.to_owned(),
            magic: header.magic,
        });
    }
    if header.abi_major != host_major {
        return Err(LoadError::AbiMajor {
            path: path.to_owned(),
            plugin_major: header.abi_major,
            plugin_minor: header.abi_minor,
            host_major,
            host_minor,
        });
    }
    if header.abi_minor > host_minor {
        return Err(LoadError::AbiMinor {
            path: path.to_owned(),
            plugin_major: header.abi_major,
            plugin_minor: header.abi_minor,
            host_major,
            host_minor,
        });
    }
    check_one(
        path,
        header.abi_minor,
        "PluginDeclaration",
        header.declaration_size,
        StructSizes::CURRENT.declaration,
    )
}

/// Checks every structure size against this host's (the append-only rule).
pub(crate) fn check_sizes(
    path: &Path,
    plugin_minor: u32,
    sizes: &StructSizes,
) -> Result<(), LoadError> {
    for ((structure, plugin_size), (_, host_size)) in
        sizes.named().into_iter().zip(StructSizes::CURRENT.named())
    {
        check_one(path, plugin_minor, structure, plugin_size, host_size)?;
    }
    Ok(())
}

/// A plugin of this host's minor version must match exactly; one of an older minor
/// may only be smaller (fields are appended, never removed), and the host then
/// reads and writes only the prefix that minor version defines.
fn check_one(
    path: &Path,
    plugin_minor: u32,
    structure: &'static str,
    plugin_size: u32,
    host_size: u32,
) -> Result<(), LoadError> {
    let (host_major, host_minor) = HOST_ABI;
    let fits = if plugin_minor == host_minor {
        plugin_size == host_size
    } else {
        plugin_size <= host_size
    };
    if fits {
        Ok(())
    } else {
        Err(LoadError::StructSize {
            path: path.to_owned(),
            structure,
            plugin_size,
            host_size,
            host_major,
            host_minor,
        })
    }
}

/// Checks the build flags: the plugin must have been built with unwinding.
pub(crate) fn check_flags(path: &Path, flags: u32) -> Result<(), LoadError> {
    if flags & abi::flags::BUILT_WITH_UNWIND == 0 {
        return Err(LoadError::PanicAbort {
            path: path.to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;

    fn header(magic: u64, major: u32, minor: u32, size: u32) -> DeclarationHeader {
        DeclarationHeader {
            magic,
            abi_major: major,
            abi_minor: minor,
            declaration_size: size,
            flags: 1,
        }
    }

    #[test]
    fn header_checks() {
        let path = Path::new("/x/libp.so");
        let size = StructSizes::CURRENT.declaration;
        let cases: [(DeclarationHeader, Option<&str>); 5] = [
            (header(abi::MAGIC, 1, 0, size), None),
            (header(0, 1, 0, size), Some("wrong magic")),
            (
                header(abi::MAGIC, 2, 0, size),
                Some("built for ABI 2.0, but this daemon speaks ABI 1.1"),
            ),
            (header(abi::MAGIC, 1, 7, size), Some("needs ABI 1.7")),
            (
                header(abi::MAGIC, 1, 0, size + 8),
                Some("declares PluginDeclaration as"),
            ),
        ];
        for (header, expected) in cases {
            let got = check_header(path, &header).err().map(|e| e.to_string());
            match (got, expected) {
                (None, None) => {}
                (Some(message), Some(fragment)) => {
                    assert!(
                        message.contains(fragment) && message.contains("/x/libp.so"),
                        "{message}"
                    );
                }
                (got, expected) => panic!("{header:?}: got {got:?}, expected {expected:?}"),
            }
        }
    }

    #[test]
    fn size_rule() {
        let path = Path::new("p.so");
        let minor = abi::ABI_MINOR;
        let same = StructSizes::CURRENT;
        assert!(check_sizes(path, minor, &same).is_ok());
        let mut bigger = same;
        bigger.outbound += 8;
        let message = check_sizes(path, minor, &bigger)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(message.contains("Outbound"), "{message}");
        let mut smaller = same;
        smaller.event -= 8;
        assert!(
            check_sizes(path, minor, &smaller).is_err(),
            "same minor must match exactly"
        );
        // An older minor declares the shorter structures of its day (ABI 1.0's
        // host-services table had no `hook_url` and `now_ms`): a prefix, accepted.
        let mut v1_0 = same;
        v1_0.host_services -= 16;
        assert!(check_sizes(path, 0, &v1_0).is_ok());
        assert!(check_sizes(path, 0, &bigger).is_err());
        assert!(check_one(path, 0, "X", 8, 8).is_ok());
    }

    #[test]
    fn flags_need_unwind() {
        let path = Path::new("abort.so");
        assert!(check_flags(path, abi::flags::BUILT_WITH_UNWIND).is_ok());
        let message = check_flags(path, 0)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            message.contains("abort.so") && message.contains("panic=abort"),
            "{message}"
        );
    }
}
