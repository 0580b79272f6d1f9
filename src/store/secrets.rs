//! Secrets at rest: webhook secrets (current and previous) and the generated callback secret are
//! stored encrypted with `store.encryption_key` (XChaCha20-Poly1305, RustCrypto's
//! `chacha20poly1305`). The one place that seals and opens them, for every backend: the
//! [`Store`](super::Store) handle calls it on the way in and out, the backends only ever see
//! the sealed text.
//!
//! Sealed form: `enc:v1:<key id>:<base64(nonce ‖ ciphertext)>`, where the key id is the first 8
//! hex digits of SHA-256 of the key (so a value names the key that sealed it, and a wrong key is
//! told apart from a damaged value), the nonce is 24 random bytes (XChaCha's nonce is large
//! enough to be drawn at random for every value) and the associated data is the value's place
//! (`webhook:<id>:secret`, `kv:callbacks.secret`), so a sealed value copied into another row does
//! not open there.
//!
//! Rotation: values sealed with one of `store.previous_encryption_keys` still open; at start
//! every value not sealed with the current key (plaintext from before encryption, or an older
//! key) is re-sealed with it ([`Sealer::is_current`]). Without a current key, values are stored
//! as plaintext (and sealed values re-written as plaintext when a previous key opens them).

use anyhow::{anyhow, bail, Context};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::config::StoreSettings;

const PREFIX: &str = "enc:v1:";
const NONCE: usize = 24;

/// One encryption key and its id.
struct Key {
    id: String,
    aead: XChaCha20Poly1305,
}

impl Key {
    /// A key given as base64 of 32 bytes (`openssl rand -base64 32`).
    fn parse(b64: &str) -> anyhow::Result<Key> {
        let bytes = B64
            .decode(b64.trim())
            .map_err(|_| anyhow!("must be base64 of 32 bytes"))?;
        if bytes.len() != 32 {
            bail!("must be base64 of 32 bytes (it holds {})", bytes.len());
        }
        let id = Sha256::digest(&bytes)[..4].iter().map(|b| format!("{b:02x}")).collect();
        Ok(Key {
            id,
            aead: XChaCha20Poly1305::new_from_slice(&bytes).expect("32-byte key"),
        })
    }
}

/// Seals and opens secrets with the configured keys.
#[derive(Default)]
pub struct Sealer {
    current: Option<Key>,
    previous: Vec<Key>,
}

/// Is `b64` a usable key? (For configuration checks; the message never quotes the value.)
pub fn check_key(b64: &str) -> Result<(), String> {
    Key::parse(b64).map(|_| ()).map_err(|e| e.to_string())
}

impl Sealer {
    /// The keys `store.encryption_key` and `store.previous_encryption_keys` name (none: values
    /// are stored as they are).
    pub fn from_settings(s: &StoreSettings) -> anyhow::Result<Sealer> {
        let current = if s.encryption_key.is_empty() {
            None
        } else {
            Some(Key::parse(&s.encryption_key).context("store.encryption_key")?)
        };
        let previous = s
            .previous_encryption_keys
            .iter()
            .enumerate()
            .map(|(i, k)| Key::parse(k).with_context(|| format!("store.previous_encryption_keys[{i}]")))
            .collect::<anyhow::Result<_>>()?;
        Ok(Sealer { current, previous })
    }

    /// Is there a key to seal with?
    pub fn encrypts(&self) -> bool {
        self.current.is_some()
    }

    /// `plain` as it is to be stored at `place`: sealed with the current key, or as it is.
    pub fn seal(&self, place: &str, plain: &str) -> String {
        let Some(key) = &self.current else {
            return plain.to_string();
        };
        let mut nonce = [0u8; NONCE];
        rand::thread_rng().fill_bytes(&mut nonce);
        let sealed = key
            .aead
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plain.as_bytes(),
                    aad: place.as_bytes(),
                },
            )
            .expect("XChaCha20-Poly1305 encrypts any length we store");
        let mut blob = nonce.to_vec();
        blob.extend_from_slice(&sealed);
        format!("{PREFIX}{}:{}", key.id, B64.encode(blob))
    }

    /// The plaintext of a value stored at `place`: opened with the key that sealed it, or as it
    /// is when it was stored before encryption was turned on.
    pub fn open(&self, place: &str, stored: &str) -> anyhow::Result<String> {
        let Some(rest) = stored.strip_prefix(PREFIX) else {
            return Ok(stored.to_string());
        };
        let (id, b64) = rest.split_once(':').context("a sealed secret is damaged")?;
        let key = self
            .current
            .iter()
            .chain(&self.previous)
            .find(|k| k.id == id)
            .ok_or_else(|| {
                anyhow!(
                    "a stored secret is encrypted with key {id}, which is neither store.encryption_key nor one of \
                     store.previous_encryption_keys"
                )
            })?;
        let blob = B64.decode(b64).map_err(|_| anyhow!("a sealed secret is damaged"))?;
        if blob.len() < NONCE {
            bail!("a sealed secret is damaged");
        }
        let (nonce, sealed) = blob.split_at(NONCE);
        let plain = key
            .aead
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: place.as_bytes(),
                },
            )
            .map_err(|_| anyhow!("a sealed secret does not open with key {id} (damaged or moved)"))?;
        String::from_utf8(plain).map_err(|_| anyhow!("a sealed secret is damaged"))
    }

    /// Is `stored` in the form it should have now (sealed with the current key; as it is when
    /// there is no key)? Values that are not are re-sealed at start.
    pub fn is_current(&self, stored: &str) -> bool {
        match (&self.current, stored.strip_prefix(PREFIX)) {
            (None, None) => true,
            (None, Some(_)) => false,
            (Some(_), None) => false,
            (Some(k), Some(rest)) => rest.split_once(':').is_some_and(|(id, _)| id == k.id),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8) -> String {
        B64.encode([n; 32])
    }

    fn sealer(current: Option<u8>, previous: &[u8]) -> Sealer {
        Sealer {
            current: current.map(|n| Key::parse(&key(n)).unwrap()),
            previous: previous.iter().map(|n| Key::parse(&key(*n)).unwrap()).collect(),
        }
    }

    #[test]
    fn sealed_values_open_only_with_their_key_and_place() {
        let s = sealer(Some(1), &[]);
        let sealed = s.seal("webhook:w1:secret", "whsec_abc");
        assert!(sealed.starts_with("enc:v1:") && !sealed.contains("whsec_abc"));
        assert_ne!(
            sealed,
            s.seal("webhook:w1:secret", "whsec_abc"),
            "a fresh nonce each time"
        );
        assert_eq!(s.open("webhook:w1:secret", &sealed).unwrap(), "whsec_abc");
        assert!(s.is_current(&sealed));
        // Another row's place, another key, a damaged value: refused, never garbage.
        assert!(s.open("webhook:w2:secret", &sealed).is_err());
        assert!(sealer(Some(2), &[]).open("webhook:w1:secret", &sealed).is_err());
        let mut damaged = sealed.clone();
        damaged.pop();
        damaged.push(if sealed.ends_with('A') { 'B' } else { 'A' });
        assert!(s.open("webhook:w1:secret", &damaged).is_err());
        // Plaintext from before encryption opens as it is and is not current.
        assert_eq!(s.open("p", "whsec_old").unwrap(), "whsec_old");
        assert!(!s.is_current("whsec_old"));
    }

    #[test]
    fn rotation_keeps_old_values_readable_and_marks_them_for_resealing() {
        let old = sealer(Some(1), &[]);
        let sealed = old.seal("kv:callbacks.secret", "whsec_cb");
        let rotated = sealer(Some(2), &[1]);
        assert_eq!(rotated.open("kv:callbacks.secret", &sealed).unwrap(), "whsec_cb");
        assert!(!rotated.is_current(&sealed));
        // Turning encryption off: a previous key opens, the value is written back as it is.
        let off = sealer(None, &[1]);
        assert_eq!(off.open("kv:callbacks.secret", &sealed).unwrap(), "whsec_cb");
        assert!(!off.is_current(&sealed) && off.is_current("whsec_cb"));
        assert_eq!(off.seal("x", "whsec_cb"), "whsec_cb");
    }

    #[test]
    fn keys_must_be_32_bytes_of_base64() {
        assert!(check_key(&key(1)).is_ok());
        assert!(check_key("c2hvcnQ=").is_err());
        assert!(check_key("not base64!").is_err());
    }
}
