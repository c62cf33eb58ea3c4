//! The web dashboard `kiln up` serves at `/`: one HTML page, a script and a style sheet, embedded
//! in the binary (no build step, no external request). The page draws everything from the JSON
//! API ([`super::views`] and the build routes), so it shows nothing a script could not read, and
//! follows it live over `GET /v1/events`. Its pages (`/`, `/builds/{id}`, `/images`, `/fleet`,
//! `/farm`) are paths the server answers with the same page, so each is a URL to share and the
//! browser's back button works.

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};

const PAGE: &str = include_str!("ui/index.html");
const SCRIPT: &str = include_str!("ui/app.js");
const STYLE: &str = include_str!("ui/app.css");
const ICON: &str = include_str!("ui/icon.svg");

/// Only this server: scripts, styles, images and connections from anywhere else are refused by
/// the browser, and the page cannot be framed.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                      connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut r = body.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(POLICY),
    );
    r
}

/// The page, for `/` and each of its paths.
pub(super) async fn page() -> Response {
    asset(PAGE, "text/html; charset=utf-8")
}

pub(super) async fn script() -> Response {
    asset(SCRIPT, "text/javascript; charset=utf-8")
}

pub(super) async fn style() -> Response {
    asset(STYLE, "text/css; charset=utf-8")
}

pub(super) async fn icon() -> Response {
    asset(ICON, "image/svg+xml")
}
