//! The web console: a single page (plain HTML, CSS and JavaScript modules under
//! `crates/dispatch/console/`, built into the binary) served at `/` and `/console/...`.
//!
//! The pages hold no data, so they are served without a token (`--allow-client` still
//! applies); the console then calls the API with the same bearer tokens as any client,
//! from `fetch` with an `Authorization` header (the event stream too: it reads the SSE
//! stream itself instead of using `EventSource`, which cannot send that header). See
//! docs/CONSOLE.md.

use crate::api::AppState;
use crate::error::ApiError;
use axum::extract::Path;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use polaris_ops_wire::codes::Code;

/// Self only: no inline script or style, no other origin, no framing.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
     img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The assets under `/console/`: name, content type, bytes.
pub const ASSETS: &[(&str, &str, &str)] = &[
    ("app.js", "text/javascript; charset=utf-8", include_str!("../console/app.js")),
    ("api.js", "text/javascript; charset=utf-8", include_str!("../console/api.js")),
    ("sse.js", "text/javascript; charset=utf-8", include_str!("../console/sse.js")),
    ("style.css", "text/css; charset=utf-8", include_str!("../console/style.css")),
    ("favicon.svg", "image/svg+xml", include_str!("../console/favicon.svg")),
];

const INDEX_HTML: &str = include_str!("../console/index.html");

/// `GET /` and `GET /console/{file}`.
pub(crate) fn routes() -> Router<AppState> {
    Router::new().route("/", get(index)).route("/console/:file", get(asset))
}

fn page(content_type: &str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            // The names carry no version, so a browser asks again (cheaply) each time.
            (header::CACHE_CONTROL, "no-cache"),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::X_FRAME_OPTIONS, "DENY"),
        ],
        body,
    )
        .into_response()
}

async fn index() -> Response {
    page("text/html; charset=utf-8", INDEX_HTML)
}

async fn asset(Path(file): Path<String>) -> Result<Response, ApiError> {
    ASSETS
        .iter()
        .find(|(name, _, _)| *name == file)
        .map(|(_, content_type, body)| page(content_type, body))
        .ok_or_else(|| ApiError::general(Code::NoSuchEndpoint, format!("no such endpoint: GET /console/{file}")))
}
