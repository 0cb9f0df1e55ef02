//! `/tokens`: long-lived API tokens for automation. Each signed-in user manages their own; an
//! admin sees and revokes everyone's. The token is in the creation answer only.

use actix_web::{web, HttpResponse};
use iotgate_store::ApiTokenRecord;
use serde_json::{json, Value};

use super::AppState;
use crate::audit::AuditEvent;
use crate::auth::Viewer;
use crate::error::{parse_json, ApiError};

pub fn configure(config: &mut web::ServiceConfig) {
    config
        .route("/tokens", web::get().to(list))
        .route("/tokens", web::post().to(create))
        .route("/tokens/{id}", web::delete().to(revoke));
}

fn view(token: &ApiTokenRecord) -> Value {
    json!({
        "id": token.id,
        "name": token.name,
        "userName": token.user_name,
        "role": token.role,
        "createdAt": token.created_at,
        "expiresAt": token.expires_at,
        "lastUsedAt": token.last_used_at,
    })
}

async fn list(state: web::Data<AppState>, user: Viewer) -> Result<HttpResponse, ApiError> {
    let tokens = state.accounts.list_tokens(&user).await?;
    Ok(HttpResponse::Ok().json(json!({"items": tokens.iter().map(view).collect::<Vec<_>>()})))
}

async fn create(
    state: web::Data<AppState>,
    user: Viewer,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let body = parse_json(&body)?;
    let (record, token) = state.accounts.create_token(&user, &body).await?;
    state
        .audit
        .record(
            AuditEvent::by(&user, "token.create")
                .target("token", &record.id)
                .details(json!({"name": record.name, "role": record.role, "expiresAt": record.expires_at})),
        )
        .await;
    let mut answer = view(&record);
    answer["token"] = json!(token);
    Ok(HttpResponse::Created()
        .insert_header(("Location", format!("/api/v1/tokens/{}", record.id)))
        .json(answer))
}

async fn revoke(
    state: web::Data<AppState>,
    user: Viewer,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let token = state.accounts.revoke_token(&user, &id).await?;
    state
        .audit
        .record(
            AuditEvent::by(&user, "token.revoke")
                .target("token", &token.id)
                .details(json!({"name": token.name, "owner": token.user_name})),
        )
        .await;
    Ok(HttpResponse::NoContent().finish())
}
