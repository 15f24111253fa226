//! Header blocks: how HTTP headers cross the ABI as one byte string.
//!
//! A header block is a sequence of lines `name: value\r\n`. Names are HTTP tokens
//! (lower-cased by the host), values are bytes without CR or LF. Because a name never
//! contains `:` and a value never contains a line break, the encoding is unambiguous.
//! [`encode`] drops headers that would break these rules rather than smuggle them.

/// Whether `name` is a non-empty HTTP token (RFC 9110 `tchar`s).
pub fn is_valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Whether `value` can travel in a header block (no CR, LF or NUL).
pub fn is_valid_value(value: &[u8]) -> bool {
    !value.iter().any(|b| matches!(b, b'\r' | b'\n' | 0))
}

/// Encodes headers into a block, skipping any with an invalid name or value.
pub fn encode<'a, I, V>(headers: I) -> Vec<u8>
where
    I: IntoIterator<Item = (&'a str, V)>,
    V: AsRef<[u8]>,
{
    let mut block = Vec::new();
    for (name, value) in headers {
        let value = value.as_ref();
        if is_valid_name(name) && is_valid_value(value) {
            block.extend_from_slice(name.as_bytes());
            block.extend_from_slice(b": ");
            block.extend_from_slice(value);
            block.extend_from_slice(b"\r\n");
        }
    }
    block
}

/// A borrowed, lazily parsed header block.
#[derive(Clone, Copy, Debug, Default)]
pub struct Headers<'a> {
    block: &'a [u8],
}

impl<'a> Headers<'a> {
    /// Wraps a header block.
    pub fn new(block: &'a [u8]) -> Self {
        Headers { block }
    }

    /// The raw block.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.block
    }

    /// Every well-formed `(name, value)` pair, in order; malformed lines are skipped.
    pub fn iter(&self) -> impl Iterator<Item = (&'a str, &'a [u8])> + 'a {
        self.block.split(|b| *b == b'\n').filter_map(parse_line)
    }

    /// The first value of `name` (compared case-insensitively).
    pub fn get(&self, name: &str) -> Option<&'a [u8]> {
        self.iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// The first value of `name` if it is UTF-8.
    pub fn get_str(&self, name: &str) -> Option<&'a str> {
        self.get(name).and_then(|v| core::str::from_utf8(v).ok())
    }

    /// Decodes into owned pairs, values made UTF-8 (invalid bytes replaced).
    pub fn to_owned_pairs(&self) -> Vec<(String, String)> {
        self.iter()
            .map(|(n, v)| (n.to_owned(), String::from_utf8_lossy(v).into_owned()))
            .collect()
    }
}

fn parse_line(line: &[u8]) -> Option<(&str, &[u8])> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let colon = line.iter().position(|b| *b == b':')?;
    let name = core::str::from_utf8(&line[..colon]).ok()?;
    if !is_valid_name(name) {
        return None;
    }
    let mut value = &line[colon + 1..];
    while let [b' ' | b'\t', rest @ ..] = value {
        value = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = value {
        value = rest;
    }
    Some((name, value))
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let block = encode([("content-type", "application/json"), ("x-a", "1")]);
        assert_eq!(block, b"content-type: application/json\r\nx-a: 1\r\n");
        let headers = Headers::new(&block);
        assert_eq!(headers.get_str("Content-Type"), Some("application/json"));
        assert_eq!(headers.get("x-a"), Some(&b"1"[..]));
        assert_eq!(headers.get("missing"), None);
        assert_eq!(headers.iter().count(), 2);
    }

    #[test]
    fn encode_drops_smuggling_attempts() {
        let block = encode([
            ("ok", "1"),
            ("bad name", "2"),
            ("x", "a\r\nset-cookie: y"),
            ("", "3"),
        ]);
        assert_eq!(block, b"ok: 1\r\n");
    }

    #[test]
    fn parse_skips_malformed_lines_and_trims() {
        let headers = Headers::new(b"no colon\r\nx:   padded  \r\n: empty\r\n");
        assert_eq!(
            headers.iter().collect::<Vec<_>>(),
            vec![("x", &b"padded"[..])]
        );
    }

    #[test]
    fn values_may_be_non_utf8() {
        let block = encode([("x", &[0xff, b'a'][..])]);
        let headers = Headers::new(&block);
        assert_eq!(headers.get("x"), Some(&[0xff, b'a'][..]));
        assert_eq!(headers.get_str("x"), None);
    }
}
