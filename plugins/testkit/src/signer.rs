//! Builds a webhook case's request at the moment it runs: `${NOW…}` and `${TS}` in
//! its headers and body, then its signature header (HMAC-SHA256, HMAC-SHA1 or
//! Ed25519 over the case's message template), so a committed suite never goes stale.

use std::time::{SystemTime, UNIX_EPOCH};

use caremsg_plugin_host::WebhookRequest;
use caremsg_plugin_sdk::verify;
use ring::signature::Ed25519KeyPair;

use crate::suite::{Algorithm, Encoding, Signer, WebhookCase, substitute_now};

/// Seconds since the Unix epoch, now.
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The request of `case`, with its placeholders and signature computed now (for a
/// plugin's own tests: the same request the battery sends).
pub fn request_of(case: &WebhookCase) -> Result<WebhookRequest, String> {
    let now = unix_now();
    let ts = substitute_now(&case.timestamp, now);
    let fill = |text: &str| substitute_now(text, now).replace("${TS}", &ts);
    let body = fill(&case.body);
    let mut headers: Vec<(String, Vec<u8>)> = case
        .headers
        .iter()
        .map(|(n, v)| (n.to_ascii_lowercase(), fill(v).into_bytes()))
        .collect();
    if let Some(signer) = &case.sign {
        let message = fill(&signer.message)
            .replace("${URL}", &case.public_url)
            .replace("${BODY}", &body);
        let value =
            sign(signer, message.as_bytes()).map_err(|e| format!("case {:?}: {e}", case.name))?;
        headers.retain(|(n, _)| !n.eq_ignore_ascii_case(&signer.header));
        headers.push((signer.header.to_ascii_lowercase(), value.into_bytes()));
    }
    Ok(WebhookRequest {
        method: case.method.clone(),
        public_url: case.public_url.clone(),
        remote_addr: case.remote_addr.as_deref().and_then(|a| a.parse().ok()),
        headers,
        body: body.into_bytes(),
    })
}

fn decode(text: &str, encoding: Encoding) -> Result<Vec<u8>, String> {
    match encoding {
        Encoding::Text => Ok(text.as_bytes().to_vec()),
        Encoding::Base64 => verify::base64(text).ok_or_else(|| "the key is not base64".to_owned()),
        Encoding::Hex => verify::hex(text).ok_or_else(|| "the key is not hex".to_owned()),
    }
}

/// The header value `signer` gives `message`.
pub(crate) fn sign(signer: &Signer, message: &[u8]) -> Result<String, String> {
    let key_encoding = signer.key_encoding.unwrap_or(match signer.algorithm {
        Algorithm::Ed25519 => Encoding::Base64,
        Algorithm::HmacSha256 | Algorithm::HmacSha1 => Encoding::Text,
    });
    let key = decode(&signer.key, key_encoding)?;
    let signature = match signer.algorithm {
        Algorithm::HmacSha256 => verify::hmac_sha256(&key, &[message]),
        Algorithm::HmacSha1 => verify::hmac_sha1(&key, &[message]),
        Algorithm::Ed25519 => Ed25519KeyPair::from_seed_unchecked(&key)
            .map_err(|_| "an Ed25519 key is a 32-byte seed".to_owned())?
            .sign(message)
            .as_ref()
            .to_vec(),
    };
    let encoded = match signer.encoding.unwrap_or(Encoding::Base64) {
        Encoding::Hex => verify::to_hex(&signature),
        Encoding::Base64 | Encoding::Text => verify::to_base64(&signature),
    };
    Ok(format!("{}{encoded}", signer.prefix))
}

/// The base64 public key of an Ed25519 seed written in base64: what a plugin's
/// configuration needs when a suite signs with that seed.
pub fn ed25519_public_key(seed_base64: &str) -> Result<String, String> {
    use ring::signature::KeyPair;
    let seed = decode(seed_base64, Encoding::Base64)?;
    let pair = Ed25519KeyPair::from_seed_unchecked(&seed)
        .map_err(|_| "an Ed25519 key is a 32-byte seed".to_owned())?;
    Ok(verify::to_base64(pair.public_key().as_ref()))
}

#[cfg(test)]
#[allow(clippy::expect_used, clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;
    use crate::suite::Suite;

    fn case(json: &str) -> WebhookCase {
        let suite =
            Suite::from_json(&format!(r#"{{"config":{{}},"webhooks":[{json}]}}"#)).expect("suite");
        suite.webhooks[0].clone()
    }

    #[test]
    fn signs_what_the_sdk_verifies() {
        // RFC 8032 test 2's seed, base64.
        let seed = verify::to_base64(
            &verify::hex("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb")
                .unwrap(),
        );
        let public = verify::base64(&ed25519_public_key(&seed).unwrap()).unwrap();
        assert_eq!(
            verify::to_hex(&public),
            "3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c"
        );
        let request = request_of(&case(&format!(
            r#"{{"name":"x","expect_status":200,"timestamp":"${{NOW-600}}",
                "headers":{{"t":"${{TS}}"}},"body":"{{\"at\":${{NOW}}}}",
                "sign":{{"algorithm":"ed25519","key":"{seed}","message":"${{TS}}|${{BODY}}","header":"Sig"}}}}"#
        )))
        .unwrap();
        let header = |name: &str| {
            request
                .headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| String::from_utf8(v.clone()).unwrap())
                .unwrap()
        };
        let ts = header("t");
        let now = unix_now();
        let ts_value: u64 = ts.parse().unwrap();
        assert!((now - 601..=now - 599).contains(&ts_value), "{ts} vs {now}");
        let body = String::from_utf8(request.body.clone()).unwrap();
        assert!(!body.contains("${"), "{body}");
        let signature = verify::base64(&header("sig")).unwrap();
        assert!(verify::ed25519(
            &public,
            &[ts.as_bytes(), b"|", body.as_bytes()],
            &signature
        ));
    }

    #[test]
    fn hmac_signers() {
        let request = request_of(&case(
            r#"{"name":"x","expect_status":200,"body":"b",
                "sign":{"algorithm":"hmac-sha256","key":"k","header":"x-sig","encoding":"hex","prefix":"sha256="}}"#,
        ))
        .unwrap();
        let expected = format!(
            "sha256={}",
            verify::to_hex(&verify::hmac_sha256(b"k", &[b"b"]))
        );
        assert_eq!(
            request.headers,
            vec![("x-sig".to_owned(), expected.into_bytes())]
        );
        let bad = case(
            r#"{"name":"x","expect_status":200,"sign":{"algorithm":"ed25519","key":"AA==","header":"s"}}"#,
        );
        assert!(request_of(&bad).is_err());
    }
}
