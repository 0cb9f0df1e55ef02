//! `/users`: people who sign in, with their roles (admin only), and `/users/me/password` (every
//! signed-in user, for themselves).

use actix_web::{web, HttpResponse};
use iotgate_store::UserRecord;
use serde_json::{json, Value};

use super::AppState;
use crate::audit::{diff, no_secrets, AuditEvent};
use crate::auth::{Admin, Viewer};
use crate::error::{parse_json, ApiError};

pub fn configure(config: &mut web::ServiceConfig) {
    config
        .route("/users", web::get().to(list))
        .route("/users", web::post().to(create))
        .route("/users/me/password", web::post().to(change_own_password))
        .route("/users/{user_name}", web::get().to(get))
        .route("/users/{user_name}", web::patch().to(update))
        .route("/users/{user_name}", web::delete().to(delete));
}

fn view(user: &UserRecord) -> Value {
    json!({"userName": user.user_name, "role": user.role, "createdAt": user.created_at})
}

async fn list(state: web::Data<AppState>, _: Admin) -> Result<HttpResponse, ApiError> {
    let users = state.accounts.list_users().await?;
    Ok(HttpResponse::Ok().json(json!({"items": users.iter().map(view).collect::<Vec<_>>()})))
}

async fn create(
    state: web::Data<AppState>,
    admin: Admin,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let body = parse_json(&body)?;
    let user = state.accounts.create_user(&body).await?;
    state
        .audit
        .record(
            AuditEvent::by(&admin, "user.create")
                .target("user", &user.user_name)
                .details(json!({"role": user.role})),
        )
        .await;
    Ok(HttpResponse::Created()
        .insert_header(("Location", format!("/api/v1/users/{}", user.user_name)))
        .json(view(&user)))
}

async fn get(
    state: web::Data<AppState>,
    _: Admin,
    user_name: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    Ok(HttpResponse::Ok().json(view(&state.accounts.get_user(&user_name).await?)))
}

async fn update(
    state: web::Data<AppState>,
    admin: Admin,
    user_name: web::Path<String>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let body = parse_json(&body)?;
    let change = state.accounts.update_user(&user_name, &body).await?;
    let mut details = diff(&view(&change.before), &view(&change.after), no_secrets);
    if change.password_changed {
        details["password"] = json!("reset");
    }
    state
        .audit
        .record(
            AuditEvent::by(&admin, "user.update")
                .target("user", &user_name)
                .details(details),
        )
        .await;
    Ok(HttpResponse::Ok().json(view(&change.after)))
}

async fn delete(
    state: web::Data<AppState>,
    admin: Admin,
    user_name: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let user = state.accounts.delete_user(&user_name).await?;
    state
        .audit
        .record(
            AuditEvent::by(&admin, "user.delete")
                .target("user", &user_name)
                .details(json!({"role": user.role})),
        )
        .await;
    Ok(HttpResponse::NoContent().finish())
}

async fn change_own_password(
    state: web::Data<AppState>,
    user: Viewer,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let body = parse_json(&body)?;
    let result = state.accounts.change_own_password(&user, &body).await;
    let event = AuditEvent::by(&user, "user.password_change").target("user", &user.user_name);
    match result {
        Ok(()) => {
            state.audit.record(event).await;
            Ok(HttpResponse::NoContent().finish())
        }
        Err(error) => {
            if matches!(&error, crate::accounts::AccountError::Invalid(p) if p.iter().any(|p| p.pointer == "/currentPassword"))
            {
                state
                    .audit
                    .record(
                        event
                            .details(json!({"reason": "wrong_current_password"}))
                            .failed(),
                    )
                    .await;
            }
            Err(error.into())
        }
    }
}
