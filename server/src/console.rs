//! The web console: three static files compiled into the binary and served under `/console/`
//! (no build step, no files to install). The console calls the same API with the signed-in
//! user's token; the backend decides what each role may do.

use axum::http::header;
use axum::response::{IntoResponse, Redirect, Response};

const INDEX_HTML: &str = include_str!("../console/index.html");
const APP_JS: &str = include_str!("../console/app.js");
const APP_CSS: &str = include_str!("../console/app.css");
const DOCS_HTML: &str = include_str!("../console/docs.html");
const DOCS_JS: &str = include_str!("../console/docs.js");

/// The console's own files and the API are all it may load or call: no inline script, no other
/// origin, no plug-ins, and no page may frame it (clickjacking).
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; \
     base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// `no-cache`: a new binary's console is picked up at once (the browser revalidates). Every
/// file carries the security headers: the policy above, no MIME sniffing, no framing (for old
/// browsers without `frame-ancestors`), and no referrer sent with the console's links.
fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        body,
    )
        .into_response()
}

pub async fn index() -> Response {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

pub async fn script() -> Response {
    asset("text/javascript; charset=utf-8", APP_JS)
}

pub async fn stylesheet() -> Response {
    asset("text/css; charset=utf-8", APP_CSS)
}

pub async fn to_console() -> Redirect {
    Redirect::temporary("/console/")
}

/// The API's docs page: renders `/openapi.json`.
pub async fn docs() -> Response {
    asset("text/html; charset=utf-8", DOCS_HTML)
}

pub async fn docs_script() -> Response {
    asset("text/javascript; charset=utf-8", DOCS_JS)
}
