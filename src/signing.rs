//! Signatures of deliveries (CONTRACT §2): Standard Webhooks `webhook-signature` and Truto's
//! `x-truto-signature`.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

const PREFIX: &str = "whsec_";

/// A signing secret: `whsec_` + base64 of random bytes. `Debug` never prints it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    text: String,
    key: Vec<u8>,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

#[derive(Debug, thiserror::Error)]
#[error("a secret is `whsec_` followed by base64 of 24 to 64 bytes")]
pub struct BadSecret;

impl Secret {
    pub fn generate() -> Secret {
        let mut bytes = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut bytes);
        Secret {
            text: format!("{PREFIX}{}", B64.encode(bytes)),
            key: bytes.to_vec(),
        }
    }

    pub fn parse(text: &str) -> Result<Secret, BadSecret> {
        let b64 = text.strip_prefix(PREFIX).ok_or(BadSecret)?;
        let key = B64.decode(b64).map_err(|_| BadSecret)?;
        if !(24..=64).contains(&key.len()) {
            return Err(BadSecret);
        }
        Ok(Secret {
            text: text.to_string(),
            key,
        })
    }

    /// The secret as the user sees it (`whsec_…`): only for create/rotate responses and storage.
    pub fn expose(&self) -> &str {
        &self.text
    }

    /// Standard Webhooks: base64(HMAC-SHA256(decoded key, "{id}.{timestamp}.{body}")).
    pub fn standard_signature(&self, msg_id: &str, timestamp: i64, body: &[u8]) -> String {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("hmac takes any key length");
        mac.update(msg_id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        B64.encode(mac.finalize().into_bytes())
    }

    /// Truto: base64(HMAC-SHA256(secret string as UTF-8, body)).
    pub fn truto_signature(&self, body: &[u8]) -> String {
        let mut mac = HmacSha256::new_from_slice(self.text.as_bytes()).expect("any key length");
        mac.update(body);
        B64.encode(mac.finalize().into_bytes())
    }
}

/// The two signature headers for one attempt. During a rotation `secrets` holds the new secret
/// first and the previous one after it; each gets its own `v1,` entry, and Truto's header uses the
/// newest.
pub fn signature_headers(secrets: &[&Secret], msg_id: &str, timestamp: i64, body: &[u8]) -> (String, String) {
    let standard = secrets
        .iter()
        .map(|s| format!("v1,{}", s.standard_signature(msg_id, timestamp, body)))
        .collect::<Vec<_>>()
        .join(" ");
    let truto = format!("format=sha256,v={}", secrets[0].truto_signature(body));
    (standard, truto)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_webhooks_test_vector() {
        let s = Secret::parse("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD").unwrap();
        let sig = s.standard_signature(
            "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
            1649367553,
            br#"{"email":"test@example.com","username":"test_user"}"#,
        );
        assert_eq!(sig, "tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=");
    }

    #[test]
    fn generated_secrets_round_trip_and_differ() {
        let a = Secret::generate();
        let b = Secret::generate();
        assert_ne!(a.expose(), b.expose());
        assert_eq!(Secret::parse(a.expose()).unwrap(), a);
        assert!(a.expose().starts_with("whsec_"));
    }

    #[test]
    fn bad_secrets_are_refused() {
        for bad in ["", "whsec_", "abc", "whsec_!!!!", "whsec_AAAA"] {
            assert!(Secret::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn debug_never_prints_the_secret() {
        let s = Secret::generate();
        assert!(!format!("{s:?}").contains(&s.expose()[6..]));
    }

    #[test]
    fn rotation_signs_with_every_secret() {
        let new = Secret::generate();
        let old = Secret::generate();
        let (h, t) = signature_headers(&[&new, &old], "m", 1, b"{}");
        let parts: Vec<_> = h.split(' ').collect();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0], format!("v1,{}", new.standard_signature("m", 1, b"{}")));
        assert_eq!(parts[1], format!("v1,{}", old.standard_signature("m", 1, b"{}")));
        assert_eq!(t, format!("format=sha256,v={}", new.truto_signature(b"{}")));
    }
}
