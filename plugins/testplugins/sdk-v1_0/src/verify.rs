//! Signature checks: constant-time comparison for webhook signatures and tokens.

use subtle::ConstantTimeEq;

/// Compares two byte strings in time that depends only on their lengths, never on
/// where they differ. Use it for every signature or secret comparison.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
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
}
