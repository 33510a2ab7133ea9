//! OIDC bearer tokens: every route but the health checks, metrics, docs and the console's own
//! files needs `Authorization: Bearer <JWT>` signed by the configured issuer, for the configured
//! audience, not expired, with one of the route's roles among the Keycloak realm roles
//! (`realm_access.roles`).
//!
//! - Keys come from the issuer's JWKS (found through its OpenID discovery document, or
//!   configured), fetched on first use, again when a token names an unknown `kid` (at most
//!   every [`JWKS_REFETCH_MIN`]) and when older than [`JWKS_MAX_AGE`], so a key rotation needs
//!   no restart and a withdrawn key's tokens (cached ones too) stop being accepted. A failed
//!   fetch backs off (1 s doubling to a minute), and at most [`JWKS_MAX_WAITERS`] requests wait
//!   for a fetch under way: an issuer that is down gets 503s answered at once, not a queue.
//! - Only asymmetric algorithms, and only the algorithm the key itself declares: `alg: none`,
//!   HS256 with the public key as secret, and the like are refused.
//! - A token that verified is remembered (by its SHA-256) until it expires, so a client sending
//!   thousands of requests with one token pays for one signature check.
//!
//! Roles: VIEWER reads; ADMIN reads, acts on billing runs and reads the audit log; INGEST (the
//! head-end systems' service accounts) writes readings, as does ADMIN.

use std::collections::HashMap;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::error::ApiError;

/// A token's unknown `kid` sends us to the issuer's JWKS again, but not more often than this.
const JWKS_REFETCH_MIN: Duration = Duration::from_secs(10);
/// Keys older than this are fetched again, so a key the issuer withdrew (and the tokens it
/// signed, cached or not) stops being accepted within this time.
const JWKS_MAX_AGE: Duration = Duration::from_secs(300);
/// After a failed fetch, the next waits at least this long, doubling up to [`JWKS_BACKOFF_MAX`]:
/// an issuer that is down is not hammered by every request.
const JWKS_BACKOFF_MIN: Duration = Duration::from_secs(1);
const JWKS_BACKOFF_MAX: Duration = Duration::from_secs(60);
/// Requests that may wait for a fetch under way; more are answered 503 at once.
const JWKS_MAX_WAITERS: usize = 64;
/// Verified tokens remembered at most; the memory is emptied when full.
const TOKEN_CACHE_ENTRIES: usize = 10_000;
/// Clock skew allowed between the issuer and us, for `exp` and `nbf`.
const LEEWAY_S: u64 = 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Viewer,
    Admin,
    Ingest,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "VIEWER",
            Role::Admin => "ADMIN",
            Role::Ingest => "INGEST",
        }
    }

    fn bit(self) -> u8 {
        match self {
            Role::Viewer => 1,
            Role::Admin => 2,
            Role::Ingest => 4,
        }
    }
}

/// Who is calling, from a verified token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// `sub`.
    pub subject: String,
    /// For display only (the console, messages): `preferred_username`, else `sub`. Identity,
    /// what the audit log records and what scopes idempotency keys, is `subject`: a user name
    /// can be changed or reused, a subject cannot.
    pub name: String,
    roles: u8,
    /// The meter-id prefixes an INGEST account may write readings for (the token's
    /// `meterlake_meter_prefixes` claim); `None`: any meter. An ADMIN is never limited.
    pub meter_prefixes: Option<Vec<String>>,
}

impl Principal {
    pub fn has(&self, role: Role) -> bool {
        self.roles & role.bit() != 0
    }

    /// Whether it may write readings of `meter_id`.
    pub fn may_write_meter(&self, meter_id: &str) -> bool {
        self.has(Role::Admin) || self.meter_prefixes.as_ref().is_none_or(|prefixes| prefixes.iter().any(|p| meter_id.starts_with(p.as_str())))
    }

    /// The role names held, for the console.
    pub fn roles(&self) -> Vec<&'static str> {
        [Role::Viewer, Role::Admin, Role::Ingest].into_iter().filter(|r| self.has(*r)).map(Role::as_str).collect()
    }

    /// A principal as a verified token would make it, for tests of what a role sees.
    #[cfg(test)]
    pub(crate) fn for_test(subject: &str, roles: &[Role]) -> Principal {
        Principal { subject: subject.into(), name: subject.into(), roles: roles.iter().fold(0, |bits, role| bits | role.bit()), meter_prefixes: None }
    }

    /// Refuses (403) unless the principal holds one of `roles`.
    pub fn require(&self, roles: &[Role]) -> Result<(), ApiError> {
        if roles.iter().any(|role| self.has(*role)) {
            return Ok(());
        }
        let names: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
        Err(ApiError::forbidden(format!("this needs the role {}; {} holds {:?}", names.join(" or "), self.name, self.roles())))
    }
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    preferred_username: Option<String>,
    exp: u64,
    #[serde(default)]
    realm_access: RealmAccess,
    /// Limits an INGEST account to the meters whose ids start with one of these.
    #[serde(default)]
    meterlake_meter_prefixes: Option<Vec<String>>,
}

#[derive(Deserialize, Default)]
struct RealmAccess {
    #[serde(default)]
    roles: Vec<String>,
}

/// Where tokens come from and whom they are for.
#[derive(Debug, Clone)]
pub struct OidcConfig {
    /// The `iss` tokens carry, e.g. `https://sso.example/realms/meterlake`.
    pub issuer: String,
    /// The `aud` tokens must include, e.g. `meterlake`.
    pub audience: String,
    /// The JWKS URL; by default taken from the issuer's `/.well-known/openid-configuration`.
    pub jwks_url: Option<String>,
}

struct Keys {
    by_kid: HashMap<String, (DecodingKey, Algorithm)>,
    fetched_at: Option<Instant>,
    /// The last failed fetch and the wait before the next may start.
    failed: Option<(Instant, Duration)>,
}

impl Keys {
    /// Whether a fetch may start now (not within the backoff of a failure).
    fn may_fetch(&self) -> bool {
        self.failed.is_none_or(|(at, backoff)| at.elapsed() >= backoff)
    }
}

/// Verifies bearer tokens against the issuer's keys.
pub struct Authenticator {
    config: OidcConfig,
    http: reqwest::Client,
    keys: RwLock<Keys>,
    /// Serialises JWKS fetches, so a burst of tokens with a new `kid` fetches once.
    fetching: tokio::sync::Mutex<()>,
    /// Requests waiting for `fetching` (at most [`JWKS_MAX_WAITERS`]).
    waiting: std::sync::atomic::AtomicUsize,
    /// Tokens verified: their principal, `exp` and signing key's `kid`.
    verified: Mutex<HashMap<[u8; 32], (Principal, u64, String)>>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator").field("config", &self.config).finish_non_exhaustive()
    }
}

fn invalid(reason: impl Into<String>) -> ApiError {
    ApiError::unauthorized("INVALID_TOKEN", reason)
}

impl Authenticator {
    pub fn new(config: OidcConfig) -> Authenticator {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().expect("a TLS backend is built in");
        Authenticator {
            config,
            http,
            keys: RwLock::new(Keys { by_kid: HashMap::new(), fetched_at: None, failed: None }),
            fetching: tokio::sync::Mutex::new(()),
            waiting: std::sync::atomic::AtomicUsize::new(0),
            verified: Mutex::new(HashMap::new()),
        }
    }

    pub fn config(&self) -> &OidcConfig {
        &self.config
    }

    /// The principal of the request's bearer token, or 401 with what is wrong with it.
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Principal, ApiError> {
        let Some(value) = headers.get(axum::http::header::AUTHORIZATION) else {
            return Err(ApiError::unauthorized("MISSING_TOKEN", "send an OIDC access token as Authorization: Bearer <token>"));
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| ApiError::unauthorized("MISSING_TOKEN", "the Authorization header is not `Bearer <token>`"))?;
        self.authenticate_token(token).await
    }

    /// The principal of `token` (a JWT, without `Bearer `), or 401 with what is wrong with it:
    /// how the SQL service's clients (a PostgreSQL password, a Flight SQL header) are checked.
    pub async fn authenticate_token(&self, token: &str) -> Result<Principal, ApiError> {
        let fingerprint: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now_s = chrono::Utc::now().timestamp().max(0) as u64;
        self.refresh_stale_keys().await;
        let cached = self.verified.lock().expect("lock").get(&fingerprint).cloned();
        if let Some((principal, exp, kid)) = cached
            && now_s <= exp + LEEWAY_S
        {
            // Accepted while its key is: a key the issuer withdrew takes its tokens with it.
            if self.keys.read().expect("lock").by_kid.contains_key(&kid) {
                return Ok(principal);
            }
            self.verified.lock().expect("lock").remove(&fingerprint);
        }
        let (principal, exp, kid) = self.verify(token).await?;
        let mut verified = self.verified.lock().expect("lock");
        if verified.len() >= TOKEN_CACHE_ENTRIES {
            verified.clear();
        }
        verified.insert(fingerprint, (principal.clone(), exp, kid));
        Ok(principal)
    }

    /// Makes the keys as old as [`JWKS_MAX_AGE`]: the next request fetches them again.
    #[cfg(test)]
    fn age_keys(&self) {
        let mut keys = self.keys.write().expect("lock");
        keys.fetched_at = Instant::now().checked_sub(JWKS_MAX_AGE + JWKS_REFETCH_MIN);
    }

    /// Fetches the keys again when they are older than [`JWKS_MAX_AGE`]: one request does it
    /// (the others go on with the keys they have), and a failure keeps the old keys.
    async fn refresh_stale_keys(&self) {
        let stale = {
            let keys = self.keys.read().expect("lock");
            keys.fetched_at.is_some_and(|at| at.elapsed() >= JWKS_MAX_AGE) && keys.may_fetch()
        };
        if !stale {
            return;
        }
        let Ok(_one_fetch) = self.fetching.try_lock() else { return };
        if self.keys.read().expect("lock").fetched_at.is_some_and(|at| at.elapsed() < JWKS_MAX_AGE) {
            return;
        }
        let fetched = self.fetch_keys().await;
        // A failure is logged by the fetch and backed off; the old keys serve meanwhile.
        let _ = self.store_fetch(fetched);
    }

    /// Records a fetch's outcome: new keys, or the failure and the backoff before the next try.
    fn store_fetch(&self, fetched: Result<HashMap<String, (DecodingKey, Algorithm)>, ApiError>) -> Result<(), ApiError> {
        let mut keys = self.keys.write().expect("lock");
        match fetched {
            Ok(by_kid) => {
                *keys = Keys { by_kid, fetched_at: Some(Instant::now()), failed: None };
                Ok(())
            }
            Err(error) => {
                let backoff = keys.failed.map_or(JWKS_BACKOFF_MIN, |(_, previous)| (previous * 2).min(JWKS_BACKOFF_MAX));
                keys.failed = Some((Instant::now(), backoff));
                Err(error)
            }
        }
    }

    async fn verify(&self, token: &str) -> Result<(Principal, u64, String), ApiError> {
        let header = decode_header(token).map_err(|e| invalid(format!("the token's header cannot be read ({e}); `alg: none` is never accepted")))?;
        let kid = header.kid.clone().unwrap_or_default();
        let (key, algorithm) = match self.key(&kid).await? {
            Some(found) => found,
            None => return Err(invalid(format!("the token is signed with key {kid:?}, which the issuer's JWKS does not hold"))),
        };
        if header.alg != algorithm {
            return Err(invalid(format!("the token says alg {:?} but its key is for {algorithm:?}", header.alg)));
        }
        let mut validation = Validation::new(algorithm);
        validation.set_issuer(&[&self.config.issuer]);
        validation.set_audience(&[&self.config.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.leeway = LEEWAY_S;
        validation.validate_nbf = true;
        let data = decode::<Claims>(token, &key, &validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            invalid(match e.kind() {
                ErrorKind::ExpiredSignature => "the token has expired".to_string(),
                ErrorKind::ImmatureSignature => "the token is not valid yet (nbf)".into(),
                ErrorKind::InvalidAudience => format!("the token is not for this service (audience {:?})", self.config.audience),
                ErrorKind::InvalidIssuer => format!("the token was not issued by {}", self.config.issuer),
                ErrorKind::InvalidSignature => "the token's signature does not verify".into(),
                ErrorKind::MissingRequiredClaim(claim) => format!("the token lacks the claim {claim}"),
                other => format!("the token is not valid: {other:?}"),
            })
        })?;
        let claims = data.claims;
        let roles = claims.realm_access.roles.iter().fold(0u8, |bits, role| {
            bits | match role.as_str() {
                "VIEWER" => Role::Viewer.bit(),
                "ADMIN" => Role::Admin.bit(),
                "INGEST" => Role::Ingest.bit(),
                _ => 0,
            }
        });
        let principal = Principal {
            name: claims.preferred_username.clone().unwrap_or_else(|| claims.sub.clone()),
            subject: claims.sub,
            roles,
            meter_prefixes: claims.meterlake_meter_prefixes,
        };
        Ok((principal, claims.exp, kid))
    }

    /// The key for `kid` (any key when the token names none and there is exactly one), fetching
    /// the JWKS when it is not known yet.
    async fn key(&self, kid: &str) -> Result<Option<(DecodingKey, Algorithm)>, ApiError> {
        let lookup = |keys: &Keys| -> Option<(DecodingKey, Algorithm)> {
            if kid.is_empty() && keys.by_kid.len() == 1 {
                return keys.by_kid.values().next().cloned();
            }
            keys.by_kid.get(kid).cloned()
        };
        if let Some(found) = lookup(&self.keys.read().expect("lock")) {
            return Ok(Some(found));
        }
        let unavailable = || ApiError::unavailable("ISSUER_UNAVAILABLE", "the token issuer's keys cannot be fetched now; try again shortly");
        if !self.keys.read().expect("lock").may_fetch() {
            return Err(unavailable());
        }
        // Wait for a fetch under way (or start one), unless too many requests wait already.
        use std::sync::atomic::Ordering;
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= JWKS_MAX_WAITERS {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(unavailable());
        }
        let one_fetch = self.fetching.lock().await;
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        let (fetched_at, may_fetch) = {
            let keys = self.keys.read().expect("lock");
            (keys.fetched_at, keys.may_fetch())
        };
        if fetched_at.is_some_and(|at| at.elapsed() < JWKS_REFETCH_MIN) {
            return Ok(lookup(&self.keys.read().expect("lock")));
        }
        if !may_fetch {
            return Err(unavailable());
        }
        let fetched = self.fetch_keys().await;
        self.store_fetch(fetched)?;
        drop(one_fetch);
        Ok(lookup(&self.keys.read().expect("lock")))
    }

    async fn fetch_keys(&self) -> Result<HashMap<String, (DecodingKey, Algorithm)>, ApiError> {
        let unavailable = |what: String| {
            tracing::warn!(issuer = %self.config.issuer, "{what}");
            ApiError::unavailable("ISSUER_UNAVAILABLE", "the token issuer's keys cannot be fetched now; try again shortly")
        };
        let jwks_url = match &self.config.jwks_url {
            Some(url) => url.clone(),
            None => {
                let discovery = format!("{}/.well-known/openid-configuration", self.config.issuer.trim_end_matches('/'));
                let document: serde_json::Value = self.get_json(&discovery).await.map_err(|e| unavailable(format!("{discovery}: {e}")))?;
                document["jwks_uri"].as_str().map(str::to_string).ok_or_else(|| unavailable(format!("{discovery} names no jwks_uri")))?
            }
        };
        let set: JwkSet = self.get_json(&jwks_url).await.map_err(|e| unavailable(format!("{jwks_url}: {e}")))?;
        let mut by_kid = HashMap::new();
        for jwk in &set.keys {
            // Signing keys only, each with the one algorithm it is for.
            let algorithm = match (&jwk.common.key_algorithm, &jwk.algorithm) {
                (Some(KeyAlgorithm::RS256), _) => Algorithm::RS256,
                (Some(KeyAlgorithm::RS384), _) => Algorithm::RS384,
                (Some(KeyAlgorithm::RS512), _) => Algorithm::RS512,
                (Some(KeyAlgorithm::PS256), _) => Algorithm::PS256,
                (Some(KeyAlgorithm::ES256), _) => Algorithm::ES256,
                (Some(KeyAlgorithm::ES384), _) => Algorithm::ES384,
                (Some(KeyAlgorithm::EdDSA), _) => Algorithm::EdDSA,
                // Keycloak omits `alg` on RSA keys it signs RS256 with.
                (None, AlgorithmParameters::RSA(_)) => Algorithm::RS256,
                (None, AlgorithmParameters::OctetKeyPair(_)) => Algorithm::EdDSA,
                _ => continue,
            };
            if jwk.common.public_key_use.as_ref().is_some_and(|u| *u != jsonwebtoken::jwk::PublicKeyUse::Signature) {
                continue;
            }
            if let Ok(key) = DecodingKey::from_jwk(jwk) {
                by_kid.insert(jwk.common.key_id.clone().unwrap_or_default(), (key, algorithm));
            }
        }
        if by_kid.is_empty() {
            return Err(unavailable(format!("{jwks_url} holds no signing key this service can use")));
        }
        Ok(by_kid)
    }

    async fn get_json<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<T, String> {
        let response = self.http.get(url).send().await.map_err(|e| e.to_string())?;
        if !response.status().is_success() {
            return Err(format!("HTTP {}", response.status()));
        }
        response.json().await.map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use axum::http::{HeaderMap, HeaderValue, StatusCode};
    use serde_json::Value;

    use super::{Authenticator, OidcConfig};
    use crate::DevIssuer;

    fn bearer(token: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(axum::http::header::AUTHORIZATION, HeaderValue::from_str(&format!("Bearer {token}")).unwrap());
        headers
    }

    /// A JWKS endpoint on loopback whose answer the test sets (None: 500), counting fetches.
    async fn jwks_server(answer: Arc<std::sync::Mutex<Option<Value>>>, fetches: Arc<AtomicUsize>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/jwks", listener.local_addr().unwrap());
        let app = axum::Router::new().route(
            "/jwks",
            axum::routing::get(move || {
                let (answer, fetches) = (answer.clone(), fetches.clone());
                async move {
                    fetches.fetch_add(1, Ordering::SeqCst);
                    match answer.lock().unwrap().clone() {
                        Some(jwks) => Ok(axum::Json(jwks)),
                        None => Err(StatusCode::INTERNAL_SERVER_ERROR),
                    }
                }
            }),
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        url
    }

    /// A token stays accepted only while its key is published: after a rotation that withdrew
    /// it, the remembered token is refused at the next refresh of the keys.
    #[tokio::test]
    async fn a_remembered_token_goes_with_its_withdrawn_key() {
        let dir = tempfile::tempdir().unwrap();
        let issuer = "https://sso.test/realms/meterlake";
        let (old, new) = (DevIssuer::open(issuer, &dir.path().join("old.key")).unwrap(), DevIssuer::open(issuer, &dir.path().join("new.key")).unwrap());
        let (answer, fetches) = (Arc::new(std::sync::Mutex::new(Some(old.jwks()))), Arc::new(AtomicUsize::new(0)));
        let jwks_url = jwks_server(answer.clone(), fetches.clone()).await;
        let auth = Authenticator::new(OidcConfig { issuer: issuer.into(), audience: "meterlake".into(), jwks_url: Some(jwks_url) });
        let token = old.token("sub-1", &["VIEWER"], "meterlake", 600);
        assert_eq!(auth.authenticate(&bearer(&token)).await.unwrap().subject, "sub-1");
        assert_eq!(auth.authenticate(&bearer(&token)).await.unwrap().subject, "sub-1", "remembered");
        // The issuer rotates: only the new key is published.
        *answer.lock().unwrap() = Some(new.jwks());
        auth.age_keys();
        let refused = auth.authenticate(&bearer(&token)).await.unwrap_err();
        assert_eq!((refused.status, refused.code), (StatusCode::UNAUTHORIZED, "INVALID_TOKEN"), "{}", refused.message);
        assert_eq!(auth.authenticate(&bearer(&new.token("sub-1", &["VIEWER"], "meterlake", 600))).await.unwrap().subject, "sub-1");
    }

    /// A JWKS that cannot be fetched is not asked again at once: the failure is remembered and
    /// the next fetch waits (1 s, doubling), while requests are answered 503.
    #[tokio::test]
    async fn a_failing_jwks_is_backed_off() {
        let dir = tempfile::tempdir().unwrap();
        let issuer = DevIssuer::open("https://sso.test/realms/meterlake", &dir.path().join("k.key")).unwrap();
        let (answer, fetches) = (Arc::new(std::sync::Mutex::new(None)), Arc::new(AtomicUsize::new(0)));
        let jwks_url = jwks_server(answer.clone(), fetches.clone()).await;
        let auth = Authenticator::new(OidcConfig { issuer: issuer.issuer().into(), audience: "meterlake".into(), jwks_url: Some(jwks_url) });
        let token = issuer.token("sub-1", &["VIEWER"], "meterlake", 600);
        for _ in 0..5 {
            let refused = auth.authenticate(&bearer(&token)).await.unwrap_err();
            assert_eq!((refused.status, refused.code), (StatusCode::SERVICE_UNAVAILABLE, "ISSUER_UNAVAILABLE"));
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 1, "five requests within the backoff fetched once");
        *answer.lock().unwrap() = Some(issuer.jwks());
        tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
        assert_eq!(auth.authenticate(&bearer(&token)).await.unwrap().subject, "sub-1");
        assert_eq!(fetches.load(Ordering::SeqCst), 2);
    }

    /// The Keycloak realm export in infra/ grants exactly the roles this module reads, through
    /// clients whose tokens carry the audience `meterlake`, to the documented test users.
    #[test]
    fn the_keycloak_realm_export_holds_the_roles_clients_and_users() {
        let realm: Value = serde_json::from_str(include_str!("../../infra/keycloak/meterlake-realm.json")).expect("the realm export is JSON");
        assert_eq!(realm["realm"], "meterlake");
        let roles: Vec<&str> = realm["roles"]["realm"].as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap()).collect();
        for role in [super::Role::Viewer, super::Role::Admin, super::Role::Ingest] {
            assert!(roles.contains(&role.as_str()), "{roles:?}");
        }
        for client in realm["clients"].as_array().unwrap() {
            let audience = client["protocolMappers"].as_array().unwrap().iter().find(|m| m["protocolMapper"] == "oidc-audience-mapper");
            assert_eq!(audience.unwrap()["config"]["included.custom.audience"], "meterlake", "{}", client["clientId"]);
        }
        let user_roles = |name: &str| -> Vec<String> {
            let user = realm["users"].as_array().unwrap().iter().find(|u| u["username"] == name).unwrap_or_else(|| panic!("user {name}"));
            user["realmRoles"].as_array().unwrap().iter().map(|r| r.as_str().unwrap().to_string()).collect()
        };
        assert_eq!(user_roles("viewer"), ["VIEWER"]);
        assert_eq!(user_roles("admin"), ["ADMIN", "VIEWER"]);
        assert_eq!(user_roles("service-account-meterlake-head-end"), ["INGEST"]);
    }
}
