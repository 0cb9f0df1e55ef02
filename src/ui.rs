//! The admin UI: the files of `admin-ui/public/`, embedded in the binary at compile time (no Node
//! toolchain is needed to run iotgate) and served at `/` and `/assets/*` on the main port, with
//! a Content-Security-Policy that allows only our own scripts, styles and connections.

use actix_web::http::header;
use actix_web::{web, HttpResponse};

#[derive(rust_embed::Embed)]
#[folder = "admin-ui/public/"]
struct UiFiles;

/// No inline script or style, no third-party origin, no framing.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'";

pub fn configure(config: &mut web::ServiceConfig) {
    config
        .service(
            web::resource("/")
                .route(web::get().to(index))
                .route(web::head().to(index)),
        )
        .service(
            web::resource("/assets/{file:.*}")
                .route(web::get().to(asset))
                .route(web::head().to(asset)),
        );
}

fn serve(path: &str) -> HttpResponse {
    let Some(file) = UiFiles::get(path) else {
        return HttpResponse::NotFound().json(serde_json::json!({"error": {
            "code": "not_found", "message": format!("no UI file {path}")}}));
    };
    HttpResponse::Ok()
        .content_type(file.metadata.mimetype())
        .insert_header((header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((header::REFERRER_POLICY, "same-origin"))
        // The files change only with the binary; revalidate so an upgrade shows at once.
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .body(file.data.into_owned())
}

async fn index() -> HttpResponse {
    serve("index.html")
}

async fn asset(file: web::Path<String>) -> HttpResponse {
    serve(&format!("assets/{file}"))
}
