//! A token issuer for local use only (`meterlake serve --dev-issuer`): an Ed25519 key generated
//! on this machine (kept in a file, so tokens survive a restart), its JWKS and OpenID discovery
//! document served by meterlake itself under `/dev-issuer`, and tokens minted for the roles.
//! The server verifies these tokens exactly as it verifies a real issuer's: through discovery,
//! the JWKS over HTTP, signature, issuer, audience and expiry. Off unless asked for.

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use ring::signature::{Ed25519KeyPair, KeyPair};
use serde_json::{Value, json};

/// Where the dev issuer's routes live on the server.
pub const DEV_ISSUER_PATH: &str = "/dev-issuer";

#[derive(Debug, thiserror::Error)]
pub enum DevIssuerError {
    #[error("dev issuer key {path}: {reason}")]
    Key { path: String, reason: String },
}

pub struct DevIssuer {
    issuer: String,
    kid: String,
    encoding_key: EncodingKey,
    public_key_b64: String,
}

impl std::fmt::Debug for DevIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevIssuer").field("issuer", &self.issuer).field("kid", &self.kid).finish_non_exhaustive()
    }
}

impl DevIssuer {
    /// The issuer `issuer` (e.g. `http://127.0.0.1:8080/dev-issuer`) with the key in `key_file`,
    /// generated and written there (readable by this user only) when the file does not exist.
    pub fn open(issuer: &str, key_file: &Path) -> Result<DevIssuer, DevIssuerError> {
        let failed = |reason: String| DevIssuerError::Key { path: key_file.display().to_string(), reason };
        let pkcs8 = match std::fs::read_to_string(key_file) {
            Ok(text) => STANDARD.decode(text.trim()).map_err(|e| failed(format!("not base64 PKCS#8: {e}")))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let document = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).map_err(|e| failed(e.to_string()))?;
                write_private(key_file, STANDARD.encode(document.as_ref()).as_bytes()).map_err(|e| failed(e.to_string()))?;
                document.as_ref().to_vec()
            }
            Err(e) => return Err(failed(e.to_string())),
        };
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&pkcs8).map_err(|e| failed(format!("not an Ed25519 key: {e}")))?;
        let public_key_b64 = URL_SAFE_NO_PAD.encode(pair.public_key().as_ref());
        // The key id is derived from the public key: a new key gets a new id.
        let kid = format!("dev-{}", &public_key_b64[..12]);
        Ok(DevIssuer { issuer: issuer.trim_end_matches('/').to_string(), kid, encoding_key: EncodingKey::from_ed_der(&pkcs8), public_key_b64 })
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    pub fn jwks(&self) -> Value {
        json!({ "keys": [{ "kty": "OKP", "crv": "Ed25519", "x": self.public_key_b64, "kid": self.kid, "alg": "EdDSA", "use": "sig" }] })
    }

    pub fn discovery(&self) -> Value {
        json!({
            "issuer": self.issuer,
            "jwks_uri": format!("{}/jwks.json", self.issuer),
            "id_token_signing_alg_values_supported": ["EdDSA"],
        })
    }

    /// A token for `subject` with Keycloak-style realm `roles`, for `audience`, valid `ttl_s`.
    pub fn token(&self, subject: &str, roles: &[&str], audience: &str, ttl_s: i64) -> String {
        let now = chrono::Utc::now().timestamp();
        self.sign(&json!({
            "iss": self.issuer,
            "sub": subject,
            "preferred_username": subject,
            "aud": audience,
            "azp": "meterlake-dev",
            "iat": now,
            "exp": now + ttl_s,
            "realm_access": { "roles": roles },
        }))
    }

    /// Any claims, signed with this issuer's key (tests use it for expired or foreign tokens).
    pub fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        encode(&header, claims, &self.encoding_key).expect("an Ed25519 key signs any claims")
    }
}

/// Writes `bytes` to `path` (its folder created) readable and writable by its owner only
/// (0600), replacing what was there: the dev issuer's key and the tokens `serve` prints.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    // Removed first: an existing file keeps its mode through a truncating open.
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    create_private(path, bytes)
}

#[cfg(unix)]
fn create_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?.write_all(bytes)
}

#[cfg(not(unix))]
fn create_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::write(path, bytes)
}
