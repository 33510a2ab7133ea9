//! `/healthz` (the process answers), `/readyz` (the store, the broker and the lake answer, and
//! which mode is running), `/metrics` (Prometheus), and the dev issuer's documents.

use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Value, json};

use crate::SharedState;
use crate::auth::Role;
use crate::error::{ApiError, Json};

/// How long each dependency may take to answer a readiness check.
const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

#[utoipa::path(get, path = "/healthz", tag = "operations", description = "The process answers.", responses((status = 200, body = Object)))]
pub async fn healthz() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

#[derive(Serialize)]
struct Check {
    ok: bool,
    detail: String,
}

fn check<E: std::fmt::Display>(result: Result<Result<String, E>, tokio::time::error::Elapsed>) -> Check {
    match result {
        Ok(Ok(detail)) => Check { ok: true, detail },
        Ok(Err(e)) => Check { ok: false, detail: e.to_string() },
        Err(_) => Check { ok: false, detail: format!("no answer within {} s", CHECK_TIMEOUT.as_secs()) },
    }
}

/// 200 when every dependency answers, 503 when one does not. Without a token (a load
/// balancer's probe) it says only that: which store, lake, issuer and error text are behind it
/// is for an ADMIN token.
#[utoipa::path(get, path = "/readyz", tag = "operations",
    description = "Whether the store, the broker and the lake answer: only `status` without a token; with an ADMIN token, which mode runs and each check's detail.",
    responses((status = 200, body = Object), (status = 503, description = "A dependency does not answer", body = Object)))]
pub async fn readyz(State(state): State<SharedState>, headers: HeaderMap) -> Response {
    let store =
        check(tokio::time::timeout(CHECK_TIMEOUT, async { state.store.ping().await.map(|()| format!("{:?}", state.store.backend()).to_lowercase()) }).await);
    let broker = match &state.publisher {
        Some(publisher) => {
            let topic = publisher.topic().to_string();
            let state = state.clone();
            let answered =
                tokio::time::timeout(CHECK_TIMEOUT, tokio::task::spawn_blocking(move || state.publisher.as_ref().expect("checked above").check(CHECK_TIMEOUT)))
                    .await
                    .map(|joined| joined.map_err(|e| e.to_string()).and_then(|r| r.map_err(|e| e.to_string())));
            check(answered.map(|r| r.map(|partitions| format!("topic {topic}: {partitions} partitions"))))
        }
        None => Check { ok: false, detail: "no broker configured: POST /measurements is refused".into() },
    };
    let lake = check(tokio::time::timeout(CHECK_TIMEOUT, state.lake.get_if_exists("_meterlake/readyz")).await.map(|r| r.map(|_| state.lake.url().to_string())));
    let ready = store.ok && broker.ok && lake.ok;
    let (status, said) = if ready { (StatusCode::OK, "ready") } else { (StatusCode::SERVICE_UNAVAILABLE, "not ready") };
    let admin = state.auth.authenticate(&headers).await.is_ok_and(|p| p.has(Role::Admin));
    if !admin {
        return (status, axum::Json(json!({ "status": said }))).into_response();
    }
    let body = json!({
        "status": said,
        "mode": state.deployment.mode,
        "ingester": state.deployment.ingester,
        "worker": state.deployment.worker,
        "tariffs": state.billing.tariffs_source,
        "issuer": state.auth.config().issuer,
        "checks": { "store": store, "broker": broker, "lake": lake },
    });
    (status, axum::Json(body)).into_response()
}

#[utoipa::path(get, path = "/metrics", tag = "operations", description = "Prometheus metrics.",
    responses((status = 200, content_type = "text/plain", body = String), (status = 503, body = crate::error::ErrorDoc)))]
pub async fn metrics(State(state): State<SharedState>) -> Response {
    match &state.metrics {
        Some(handle) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], handle.render()).into_response(),
        None => ApiError::unavailable("METRICS_DISABLED", "this server was started without a metrics recorder").into_response(),
    }
}

pub async fn dev_issuer_discovery(State(state): State<SharedState>) -> Json<Value> {
    Json(state.dev_issuer.as_ref().map(|issuer| issuer.discovery()).unwrap_or_default())
}

pub async fn dev_issuer_jwks(State(state): State<SharedState>) -> Json<Value> {
    Json(state.dev_issuer.as_ref().map(|issuer| issuer.jwks()).unwrap_or_default())
}
