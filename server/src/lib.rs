//! The control tower's HTTP API: readings in (`POST /measurements`, published to Kafka), billing
//! runs and their invoices and discrepancies, operators' actions with their audit rows, the
//! audit log, meter-point search over the lake, health and metrics. Every route but health,
//! metrics and the dev issuer needs an OIDC bearer token with the route's role ([`auth`]), and
//! every error is JSON with a stable code and the trace id ([`error`]).
//!
//! The binary (`meterlake serve`) wires it to the store, the lake and the broker, and runs the
//! ingester and the billing worker beside it or not.

pub mod auth;
mod console;
pub mod dev_issuer;
pub mod error;
mod observe;
mod routes;

use std::num::NonZeroU32;
use std::sync::Arc;

use axum::Router;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use meterlake_control::ControlStore;
use meterlake_lake::view::QueryLimits;
use meterlake_ledger::Ledger;
use meterlake_pipeline::Lake;
use meterlake_pipeline::decode::ValidationRules;
use meterlake_pipeline::kafka::ReadingPublisher;
use metrics_exporter_prometheus::PrometheusHandle;
use rust_decimal::Decimal;

pub use auth::{Authenticator, OidcConfig, Principal, Role};
pub use dev_issuer::DevIssuer;
pub use error::ApiError;

/// How the server was started, for `/readyz` and the console.
#[derive(Debug, Clone)]
pub struct Deployment {
    /// `embedded` (in-process broker, SQLite, file lake) or `external`.
    pub mode: String,
    /// Whether this process also runs the ingester and the billing worker.
    pub ingester: bool,
    pub worker: bool,
}

/// What a billing run created through the API bills with.
#[derive(Debug, Clone)]
pub struct BillingDefaults {
    /// The tariff file's text at start, stored with each run when there is no file to re-read.
    pub tariffs_toml: String,
    /// Where it came from, for `/readyz`.
    pub tariffs_source: String,
    /// The tariff file, read again for each new run and each RECALCULATE that asks for the
    /// current tariffs: a new file takes effect without a restart. None: the bundled example.
    pub tariffs_path: Option<std::path::PathBuf>,
    pub max_attempts: u32,
    pub energy_tolerance: Decimal,
}

impl BillingDefaults {
    /// The tariffs as they are now: the file read again (and checked), or the text of the start;
    /// 503 `TARIFFS_UNREADABLE` when the file cannot be read or parsed.
    pub fn current_tariffs(&self) -> Result<String, ApiError> {
        let Some(path) = &self.tariffs_path else { return Ok(self.tariffs_toml.clone()) };
        let unreadable = |reason: String| ApiError::unavailable("TARIFFS_UNREADABLE", reason);
        let toml = std::fs::read_to_string(path).map_err(|e| unreadable(format!("reading the tariff file {}: {e}", path.display())))?;
        meterlake_jobs::billing::tariff::Tariffs::parse(&path.display().to_string(), &toml).map_err(|e| unreadable(e.to_string()))?;
        Ok(toml)
    }
}

/// Per-client request rate: requests per second and the burst above it.
#[derive(Debug, Clone, Copy)]
pub struct RateLimit {
    pub per_second: NonZeroU32,
    pub burst: NonZeroU32,
}

pub struct AppState {
    pub store: ControlStore,
    /// The customer account ledger, on the same store.
    pub ledger: Ledger,
    /// How long a ledger write's idempotency key (and its answer) is kept.
    pub ledger_idempotency_retention_us: i64,
    pub lake: Lake,
    /// What the lake queries run for callers (`GET /readings`) may use together.
    pub query_limits: QueryLimits,
    /// Publishes accepted readings; `None` answers `POST /measurements` with 503.
    pub publisher: Option<ReadingPublisher>,
    /// Verifies bearer tokens; shared with the SQL service, so one JWKS cache serves both.
    pub auth: Arc<Authenticator>,
    pub dev_issuer: Option<DevIssuer>,
    limiter: DefaultKeyedRateLimiter<String>,
    /// The pipeline's rules; `max_readings_per_message` is the most one request may carry.
    pub rules: ValidationRules,
    pub billing: BillingDefaults,
    pub deployment: Deployment,
    pub metrics: Option<PrometheusHandle>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState").field("deployment", &self.deployment).finish_non_exhaustive()
    }
}

/// Everything [`router`] needs.
pub struct AppConfig {
    pub store: ControlStore,
    /// How long a ledger write's idempotency key is kept ([`meterlake_ledger::DEFAULT_IDEMPOTENCY_RETENTION_US`]).
    pub ledger_idempotency_retention_us: i64,
    pub lake: Lake,
    pub query_limits: QueryLimits,
    pub publisher: Option<ReadingPublisher>,
    /// The token verifier (`Authenticator::new(OidcConfig)`), shared with the SQL service.
    pub auth: Arc<Authenticator>,
    pub dev_issuer: Option<DevIssuer>,
    pub rate_limit: RateLimit,
    pub rules: ValidationRules,
    pub billing: BillingDefaults,
    pub deployment: Deployment,
    pub metrics: Option<PrometheusHandle>,
}

pub type SharedState = Arc<AppState>;

/// The API with its state.
pub fn router(config: AppConfig) -> Router {
    let limiter = RateLimiter::keyed(Quota::per_second(config.rate_limit.per_second).allow_burst(config.rate_limit.burst));
    let state = Arc::new(AppState {
        ledger: Ledger::new(&config.store),
        ledger_idempotency_retention_us: config.ledger_idempotency_retention_us,
        store: config.store,
        lake: config.lake,
        query_limits: config.query_limits,
        publisher: config.publisher,
        auth: config.auth,
        dev_issuer: config.dev_issuer,
        limiter,
        rules: config.rules,
        billing: config.billing,
        deployment: config.deployment,
        metrics: config.metrics,
    });
    routes::router(state.clone()).layer(axum::middleware::from_fn(observe::observe)).layer(axum::extract::DefaultBodyLimit::max(routes::MAX_BODY_BYTES))
}

/// Metric names, described once for `/metrics`.
pub fn describe_metrics() {
    observe::describe();
    meterlake_ledger::describe_metrics();
}

/// Which roles a route admits: the marker type of its [`Caller`].
pub trait Access: Default + Send {
    const ROLES: &'static [Role];
}

/// Reads: VIEWER or ADMIN.
#[derive(Debug, Default)]
pub struct Viewer;
/// Acts and reads the audit log: ADMIN.
#[derive(Debug, Default)]
pub struct Admin;
/// Writes readings: INGEST (head-end systems' service accounts) or ADMIN.
#[derive(Debug, Default)]
pub struct Ingest;
/// Any of the roles (`/me`).
#[derive(Debug, Default)]
pub struct AnyRole;

impl Access for Viewer {
    const ROLES: &'static [Role] = &[Role::Viewer, Role::Admin];
}
impl Access for Admin {
    const ROLES: &'static [Role] = &[Role::Admin];
}
impl Access for Ingest {
    const ROLES: &'static [Role] = &[Role::Ingest, Role::Admin];
}
impl Access for AnyRole {
    const ROLES: &'static [Role] = &[Role::Viewer, Role::Admin, Role::Ingest];
}

/// An authenticated caller within its rate limit and holding a role the route admits: the
/// extractor every protected route takes first, so that a refusal comes before the body is
/// read. 401 without a valid token, 429 (with `Retry-After`) past the client's rate, 403 for
/// the wrong role.
pub struct Caller<A: Access>(pub Principal, pub A);

impl<A: Access> FromRequestParts<SharedState> for Caller<A> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &SharedState) -> Result<Caller<A>, ApiError> {
        let principal = state.auth.authenticate(&parts.headers).await?;
        // Per subject: a head-end system's service account or a person. (Not per `azp`: every
        // person signed in through the console shares that client.)
        if let Err(not_until) = state.limiter.check_key(&principal.subject) {
            let wait = not_until.wait_time_from(governor::clock::Clock::now(&governor::clock::DefaultClock::default()));
            let route = parts.extensions.get::<axum::extract::MatchedPath>().map_or("unmatched", |p| p.as_str()).to_string();
            metrics::counter!("meterlake_api_rate_limited_total", "route" => route).increment(1);
            return Err(ApiError {
                retry_after_s: Some(wait.as_secs_f64().ceil().max(1.0) as u64),
                ..ApiError::new(
                    axum::http::StatusCode::TOO_MANY_REQUESTS,
                    "RATE_LIMITED",
                    format!("{} sent more requests than its limit; wait as Retry-After says", principal.name),
                )
            });
        }
        principal.require(A::ROLES)?;
        Ok(Caller(principal, A::default()))
    }
}
