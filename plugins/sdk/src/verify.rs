//! Webhook authentication helpers: timestamp windows, HMAC-SHA256/SHA1 and Ed25519
//! signatures (on `ring`, the crypto library the daemon's TLS already uses), base64
//! and hex decoding, and constant-time comparison.
//!
//! A typical provider check, in the order a plugin should do it:
//! ```
//! use std::time::{Duration, SystemTime};
//! use caremsg_plugin_sdk::verify;
//!
//! fn authentic(public_key: &[u8], timestamp: &str, signature_b64: &str, body: &[u8], now: SystemTime) -> bool {
//!     // 1. Fresh? (now comes from `Host::now()`, the daemon's injected clock.)
//!     if verify::check_timestamp(timestamp, now, Duration::from_secs(300)).is_err() {
//!         return false;
//!     }
//!     // 2. Signed over "{timestamp}|{body}"?
//!     let Some(signature) = verify::base64(signature_b64) else { return false };
//!     verify::ed25519(public_key, &[timestamp.as_bytes(), b"|", body], &signature)
//! }
//! # assert!(!authentic(&[0; 32], "1", "AA==", b"{}", SystemTime::now()));
//! ```
//!
//! Every `verify` function compares in constant time; messages are given as parts
//! (`&[&[u8]]`) so a plugin never copies a body to prepend a timestamp.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use ring::{hmac, signature};
use subtle::ConstantTimeEq;

/// Compares two byte strings in time that depends only on their lengths, never on
/// where they differ. Use it for every signature or secret comparison.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

/// Why a timestamp was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimestampError {
    /// Not a whole number of seconds since the Unix epoch.
    Malformed,
    /// Older than the window allows (a replay, or a request stuck somewhere).
    Stale,
    /// Further in the future than the window allows (a clock far off).
    Future,
}

impl std::fmt::Display for TimestampError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TimestampError::Malformed => "the timestamp is not a number of seconds",
            TimestampError::Stale => "the timestamp is too old",
            TimestampError::Future => "the timestamp is too far in the future",
        })
    }
}

impl std::error::Error for TimestampError {}

/// Checks a provider's timestamp (whole seconds since the Unix epoch, as text) against
/// `now` (pass [`crate::Host::now`]): it may be at most `window` old, and at most
/// `window` ahead (clocks differ). Returns the timestamp.
pub fn check_timestamp(
    timestamp: &str,
    now: SystemTime,
    window: Duration,
) -> Result<SystemTime, TimestampError> {
    let text = timestamp.trim();
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(TimestampError::Malformed);
    }
    let seconds: u64 = text.parse().map_err(|_| TimestampError::Malformed)?;
    let at = UNIX_EPOCH
        .checked_add(Duration::from_secs(seconds))
        .ok_or(TimestampError::Malformed)?;
    match now.duration_since(at) {
        Ok(age) if age > window => Err(TimestampError::Stale),
        Ok(_) => Ok(at),
        Err(ahead) if ahead.duration() > window => Err(TimestampError::Future),
        Err(_) => Ok(at),
    }
}

fn mac(algorithm: hmac::Algorithm, key: &[u8], message: &[&[u8]]) -> hmac::Tag {
    let key = hmac::Key::new(algorithm, key);
    let mut context = hmac::Context::with_key(&key);
    for part in message {
        context.update(part);
    }
    context.sign()
}

/// HMAC-SHA256 of the concatenated `message` parts.
pub fn hmac_sha256(key: &[u8], message: &[&[u8]]) -> Vec<u8> {
    mac(hmac::HMAC_SHA256, key, message).as_ref().to_vec()
}

/// HMAC-SHA1 of the concatenated `message` parts (legacy providers such as Twilio).
pub fn hmac_sha1(key: &[u8], message: &[&[u8]]) -> Vec<u8> {
    mac(hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, key, message)
        .as_ref()
        .to_vec()
}

/// Whether `signature` is the HMAC-SHA256 of `message` under `key` (constant time).
pub fn hmac_sha256_matches(key: &[u8], message: &[&[u8]], signature: &[u8]) -> bool {
    constant_time_eq(&hmac_sha256(key, message), signature)
}

/// Whether `signature` is the HMAC-SHA1 of `message` under `key` (constant time).
pub fn hmac_sha1_matches(key: &[u8], message: &[&[u8]], signature: &[u8]) -> bool {
    constant_time_eq(&hmac_sha1(key, message), signature)
}

/// Whether `signature` (64 bytes) is an Ed25519 signature of the concatenated
/// `message` parts under `public_key` (32 bytes).
pub fn ed25519(public_key: &[u8], message: &[&[u8]], signature: &[u8]) -> bool {
    let message = message.concat();
    signature::UnparsedPublicKey::new(&signature::ED25519, public_key)
        .verify(&message, signature)
        .is_ok()
}

/// Decodes standard base64, with or without padding; `None` when it is not base64.
pub fn base64(text: &str) -> Option<Vec<u8>> {
    let text = text.trim();
    STANDARD
        .decode(text)
        .or_else(|_| STANDARD_NO_PAD.decode(text))
        .ok()
}

/// Encodes standard base64 with padding.
pub fn to_base64(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

/// Decodes hex (either case); `None` when it is not hex.
pub fn hex(text: &str) -> Option<Vec<u8>> {
    ::hex::decode(text.trim()).ok()
}

/// Encodes lower-case hex.
pub fn to_hex(bytes: &[u8]) -> String {
    ::hex::encode(bytes)
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;

    #[test]
    fn compares() {
        let cases: [(&[u8], &[u8], bool); 5] = [
            (b"", b"", true),
            (b"abc", b"abc", true),
            (b"abc", b"abd", false),
            (b"abc", b"ab", false),
            (b"", b"a", false),
        ];
        for (a, b, expected) in cases {
            assert_eq!(constant_time_eq(a, b), expected, "{a:?} vs {b:?}");
        }
    }

    fn at(seconds: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(seconds)
    }

    #[test]
    fn timestamps() {
        let now = at(1_700_000_000);
        let window = Duration::from_secs(300);
        let check = |text: &str, expected: Result<u64, TimestampError>| {
            assert_eq!(
                check_timestamp(text, now, window),
                expected.map(at),
                "{text}"
            );
        };
        check("1700000000", Ok(1_700_000_000));
        check("1699999700", Ok(1_699_999_700));
        check("1699999699", Err(TimestampError::Stale));
        check("1700000300", Ok(1_700_000_300));
        check("1700000301", Err(TimestampError::Future));
        check("", Err(TimestampError::Malformed));
        check("-5", Err(TimestampError::Malformed));
        check("17e8", Err(TimestampError::Malformed));
        check("99999999999999999999999", Err(TimestampError::Malformed));
    }

    #[test]
    fn hmac_known_answers() {
        // RFC 4231 test case 2 and RFC 2202 test case 2.
        let sha256 = "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843";
        assert_eq!(
            to_hex(&hmac_sha256(
                b"Jefe",
                &[b"what do ya want ", b"for nothing?"]
            )),
            sha256
        );
        let sha1 = "effcdf6ae5eb2fa2d27416d5f184df9c259a7c79";
        assert_eq!(
            to_hex(&hmac_sha1(b"Jefe", &[b"what do ya want for nothing?"])),
            sha1
        );
        let good = hex(sha256).unwrap();
        assert!(hmac_sha256_matches(
            b"Jefe",
            &[b"what do ya want for nothing?"],
            &good
        ));
        assert!(!hmac_sha256_matches(
            b"Jefe",
            &[b"what do ya want for nothing!"],
            &good
        ));
        assert!(hmac_sha1_matches(
            b"Jefe",
            &[b"what do ya want for nothing?"],
            &hex(sha1).unwrap()
        ));
    }

    #[test]
    fn ed25519_known_answer() {
        // RFC 8032 section 7.1, test 2 (message 0x72).
        let public_key =
            hex("3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c").unwrap();
        let signature = hex("92a009a9f0d4cab8720e820b5f642540a2b27b5416503f8fb3762223ebdb69da085ac1e43e15996e458f3613d0f11d8c387b2eaeb4302aeeb00d291612bb0c00").unwrap();
        assert!(ed25519(&public_key, &[b"r"], &signature));
        assert!(!ed25519(&public_key, &[b"s"], &signature));
        assert!(!ed25519(&public_key[..31], &[b"r"], &signature));
        assert!(!ed25519(&public_key, &[b"r"], &signature[..63]));
    }

    #[test]
    fn encodings() {
        assert_eq!(base64("aGk="), Some(b"hi".to_vec()));
        assert_eq!(base64("aGk"), Some(b"hi".to_vec()));
        assert_eq!(base64("a!"), None);
        assert_eq!(to_base64(b"hi"), "aGk=");
        assert_eq!(hex("00fFa0"), Some(vec![0, 255, 160]));
        assert_eq!(hex("0"), None);
        assert_eq!(hex("zz"), None);
        assert_eq!(to_hex(&[0, 255]), "00ff");
    }
}
