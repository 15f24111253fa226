//! The push's signature: `X-Caremsg-Signature: sha256=<hex>`, the lower-case hex
//! HMAC-SHA256 of `"<timestamp>.<body>"` keyed with the configured secret, where
//! `<timestamp>` is the `X-Caremsg-Timestamp` header (Unix seconds) and `<body>` the
//! exact bytes of the request body.
//!
//! A portal backend checks it by recomputing the HMAC over the raw body (before any
//! JSON parsing), comparing in constant time ([`verify`] does both), and refusing
//! timestamps more than a few minutes away from its own clock, which stops replays.

use caremsg_plugin_sdk::verify::{self, constant_time_eq};

/// The header holding the signature.
pub const SIGNATURE_HEADER: &str = "x-caremsg-signature";
/// The header holding the timestamp the signature covers.
pub const TIMESTAMP_HEADER: &str = "x-caremsg-timestamp";

/// `sha256=<hex HMAC-SHA256 of "<timestamp>.<body>">`.
pub fn sign(secret: &[u8], timestamp: &str, body: &[u8]) -> Option<String> {
    let mac = verify::hmac_sha256(secret, &[timestamp.as_bytes(), b".", body]);
    Some(format!("sha256={}", verify::to_hex(&mac)))
}

/// Whether `signature` is the signature of `timestamp` and `body` (the check a portal
/// backend makes; it must also bound the timestamp's age itself).
pub fn verify(secret: &[u8], timestamp: &str, body: &[u8], signature: &str) -> bool {
    sign(secret, timestamp, body)
        .is_some_and(|expected| constant_time_eq(expected.as_bytes(), signature.as_bytes()))
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;

    #[test]
    fn known_answer() {
        // printf '%s' '1700000000.{"event":"message"}' \
        //   | openssl dgst -sha256 -hmac 'portal-secret-0123456789'
        assert_eq!(
            sign(
                b"portal-secret-0123456789",
                "1700000000",
                br#"{"event":"message"}"#
            )
            .as_deref(),
            Some("sha256=f65bcc55032b324eeacae39a854c54402f2914fff7bf7a4be95b0b99a2b7b968")
        );
    }

    #[test]
    fn verify_needs_everything_to_match() {
        let (secret, ts, body) = (b"s".as_slice(), "1700000000", b"{}".as_slice());
        let good = sign(secret, ts, body).expect("signed");
        assert!(verify(secret, ts, body, &good));
        assert!(!verify(b"t", ts, body, &good));
        assert!(!verify(secret, "1700000001", body, &good));
        assert!(!verify(secret, ts, b"{ }", &good));
        assert!(!verify(secret, ts, body, &good.to_uppercase()));
        assert!(!verify(
            secret,
            ts,
            body,
            good.trim_start_matches("sha256=")
        ));
    }
}
