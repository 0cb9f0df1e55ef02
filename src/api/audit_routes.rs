//! `/audit`: the audit log, newest first, keyset-paged (admin only).

use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::json;

use super::{parse_query, AppState};
use crate::auth::Admin;
use crate::error::ApiError;

pub fn configure(config: &mut web::ServiceConfig) {
    config.route("/audit", web::get().to(page));
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct AuditParameters {
    from: Option<String>,
    to: Option<String>,
    actor: Option<String>,
    action: Option<String>,
    limit: Option<i64>,
    cursor: Option<String>,
}

async fn page(
    state: web::Data<AppState>,
    _: Admin,
    request: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let query: AuditParameters = parse_query(&request)?;
    let limit = query.limit.unwrap_or(50).clamp(1, 500);
    let page = state
        .audit
        .page(
            query.from.as_deref(),
            query.to.as_deref(),
            query.actor.as_deref(),
            query.action.as_deref(),
            limit,
            query.cursor.as_deref(),
        )
        .await?;
    Ok(HttpResponse::Ok().json(json!({"items": page.items, "nextCursor": page.next_cursor})))
}
