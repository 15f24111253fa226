//! `X-Twilio-Signature`: HMAC-SHA1, keyed with the account's auth token, over the
//! exact public URL of the webhook followed by every POST parameter's name and value
//! (sorted by name, no separators), base64-encoded.
//!
//! Twilio signs the URL as it was configured on its side, which may or may not name
//! the scheme's default port; [`url_variants`] gives both spellings and [`verify`]
//! accepts either. Comparison is constant-time.

use caremsg_plugin_sdk::verify::{self, constant_time_eq};

/// The signature Twilio would send for `url` and the POST `params` (any order).
/// Repeated names are ordered by value, as Twilio's own libraries do.
pub fn sign(auth_token: &str, url: &str, params: &[(String, String)]) -> Option<String> {
    let mut sorted: Vec<&(String, String)> = params.iter().collect();
    sorted.sort();
    let mut message: Vec<&[u8]> = vec![url.as_bytes()];
    for (name, value) in sorted {
        message.push(name.as_bytes());
        message.push(value.as_bytes());
    }
    Some(verify::to_base64(&verify::hmac_sha1(
        auth_token.as_bytes(),
        &message,
    )))
}

/// Whether `signature` is Twilio's signature of `url` (in either of its
/// [`url_variants`]) and `params`.
pub fn verify(auth_token: &str, url: &str, params: &[(String, String)], signature: &str) -> bool {
    // Check every variant (no early exit) so the time taken does not say which matched.
    url_variants(url)
        .iter()
        .filter_map(|candidate| sign(auth_token, candidate, params))
        .fold(false, |ok, expected| {
            constant_time_eq(expected.as_bytes(), signature.as_bytes()) | ok
        })
}

/// `url` as given, then (for `http` and `https`) the same URL with the scheme's default
/// port added when it has none, or removed when it names it (`:443`, `:80`).
pub fn url_variants(url: &str) -> Vec<String> {
    let mut variants = vec![url.to_owned()];
    let Some(scheme_end) = url.find("://") else {
        return variants;
    };
    let default_port = match url[..scheme_end].to_ascii_lowercase().as_str() {
        "https" => "443",
        "http" => "80",
        _ => return variants,
    };
    let authority_start = scheme_end + 3;
    let authority_end = url[authority_start..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| authority_start + i);
    let authority = &url[authority_start..authority_end];
    // The host starts after any `user:password@`.
    let host_start = authority.rfind('@').map_or(0, |i| i + 1);
    let host_port = &authority[host_start..];
    // An IPv6 literal (`[::1]`) holds colons of its own: a port follows the bracket.
    let port_colon = match host_port.find(']') {
        Some(bracket) => host_port[bracket..].find(':').map(|c| bracket + c),
        None => host_port.find(':'),
    };
    let host_port_start = authority_start + host_start;
    match port_colon {
        None => {
            if !host_port.is_empty() {
                variants.push(format!(
                    "{}:{default_port}{}",
                    &url[..authority_end],
                    &url[authority_end..]
                ));
            }
        }
        Some(colon) => {
            if &host_port[colon + 1..] == default_port {
                variants.push(format!(
                    "{}{}",
                    &url[..host_port_start + colon],
                    &url[authority_end..]
                ));
            }
        }
    }
    variants
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect()
    }

    /// The worked example of Twilio's webhook-security documentation: auth token
    /// `12345`, this URL, these five parameters. The documentation has printed it with
    /// three different caller numbers over the years, each with its own signature;
    /// every pair below was also checked independently with
    /// `openssl dgst -sha1 -hmac 12345 -binary | base64`.
    const DOC_URL: &str = "https://mycompany.com/myapp.php?foo=1&bar=2";

    fn doc_params(caller: &str) -> Vec<(String, String)> {
        // Deliberately out of order: the signature sorts them.
        params(&[
            ("To", "+18005551212"),
            ("From", caller),
            ("Digits", "1234"),
            ("Caller", caller),
            ("CallSid", "CA1234567890ABCDE"),
        ])
    }

    #[test]
    fn twilios_published_examples() {
        for (caller, expected) in [
            ("+14158675310", "GvWf1cFY/Q7PnoempGyD5oXAezc="),
            ("+12349013030", "0/KCTR6DLpKmkAf8muzZqo1nDgQ="),
            ("+14158675309", "RSOYDt4T1cUTdK1PDd93/VVr8B8="),
        ] {
            let p = doc_params(caller);
            assert_eq!(sign("12345", DOC_URL, &p).as_deref(), Some(expected));
            assert!(verify("12345", DOC_URL, &p, expected), "{caller}");
        }
    }

    #[test]
    fn anything_changed_fails() {
        let p = doc_params("+14158675310");
        let good = "GvWf1cFY/Q7PnoempGyD5oXAezc=";
        let mut tampered = p.clone();
        tampered[2].1 = "9999".to_owned();
        let mut extra = p.clone();
        extra.push(("Body".to_owned(), "hi".to_owned()));
        type Case<'a> = (&'a str, &'a str, &'a [(String, String)], &'a str);
        let cases: [Case<'_>; 7] = [
            ("12345", DOC_URL, &tampered, good),
            ("12345", DOC_URL, &extra, good),
            ("54321", DOC_URL, &p, good),
            (
                "12345",
                "http://mycompany.com/myapp.php?foo=1&bar=2",
                &p,
                good,
            ),
            ("12345", "https://mycompany.com/myapp.php?foo=1", &p, good),
            ("12345", DOC_URL, &p, "GvWf1cFY/Q7PnoempGyD5oXAezc"),
            ("12345", DOC_URL, &p, ""),
        ];
        for (token, url, p, signature) in cases {
            assert!(
                !verify(token, url, p, signature),
                "{token} {url} {signature}"
            );
        }
    }

    #[test]
    fn default_port_is_optional_both_ways() {
        let p = doc_params("+14158675310");
        let good = "GvWf1cFY/Q7PnoempGyD5oXAezc=";
        // Twilio signed the URL without a port; the daemon's public URL names :443.
        assert!(verify(
            "12345",
            "https://mycompany.com:443/myapp.php?foo=1&bar=2",
            &p,
            good
        ));
        // Twilio signed it with :443; the public URL has no port.
        let with_port = sign(
            "12345",
            "https://mycompany.com:443/myapp.php?foo=1&bar=2",
            &p,
        )
        .expect("signed");
        assert!(verify("12345", DOC_URL, &p, &with_port));
        // Another port is another URL.
        assert!(!verify(
            "12345",
            "https://mycompany.com:8443/myapp.php?foo=1&bar=2",
            &p,
            good
        ));
    }

    fn check_variants(url: &str, expected: &[&str]) {
        assert_eq!(url_variants(url), expected, "{url}");
    }

    #[test]
    fn variants() {
        check_variants(
            "https://a.example/x?y=1",
            &["https://a.example/x?y=1", "https://a.example:443/x?y=1"],
        );
        check_variants(
            "https://a.example:443/x",
            &["https://a.example:443/x", "https://a.example/x"],
        );
        check_variants(
            "http://a.example",
            &["http://a.example", "http://a.example:80"],
        );
        check_variants(
            "http://a.example:80",
            &["http://a.example:80", "http://a.example"],
        );
        check_variants(
            "HTTPS://A.example?q",
            &["HTTPS://A.example?q", "HTTPS://A.example:443?q"],
        );
        check_variants("http://a.example:8080/x", &["http://a.example:8080/x"]);
        check_variants("https://a.example:80/x", &["https://a.example:80/x"]);
        check_variants(
            "https://u:p@a.example/x",
            &["https://u:p@a.example/x", "https://u:p@a.example:443/x"],
        );
        check_variants(
            "https://u:p@a.example:443/x",
            &["https://u:p@a.example:443/x", "https://u:p@a.example/x"],
        );
        check_variants(
            "http://[::1]/hook",
            &["http://[::1]/hook", "http://[::1]:80/hook"],
        );
        check_variants(
            "http://[::1]:80/hook",
            &["http://[::1]:80/hook", "http://[::1]/hook"],
        );
        check_variants("ftp://a.example/x", &["ftp://a.example/x"]);
        check_variants("", &[""]);
        check_variants("https://", &["https://"]);
        check_variants("not a url", &["not a url"]);
        check_variants(
            "https://ü.example/ä",
            &["https://ü.example/ä", "https://ü.example:443/ä"],
        );
    }

    #[test]
    fn repeated_names_sort_by_value() {
        let a = params(&[("MediaUrl", "b"), ("MediaUrl", "a")]);
        let b = params(&[("MediaUrl", "a"), ("MediaUrl", "b")]);
        assert_eq!(sign("t", "https://x/", &a), sign("t", "https://x/", &b));
    }
}
