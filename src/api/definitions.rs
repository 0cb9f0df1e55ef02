//! CRUD of listeners, sentinels, routes and downstreams, and listener status.

use actix_web::{web, HttpResponse};
use iotgate_core::DefinitionKind;

use super::{require_admin, AppState};
use crate::auth::PresentedToken;
use crate::error::{parse_json, ApiError};

pub fn configure(config: &mut web::ServiceConfig) {
    for kind in DefinitionKind::ALL {
        let collection = format!("/{}", kind.collection());
        let item = format!("/{}/{{key}}", kind.collection());
        config
            .service(
                web::resource(collection)
                    .app_data(web::Data::new(kind))
                    .route(web::get().to(list))
                    .route(web::post().to(create)),
            )
            .service(
                web::resource(item)
                    .app_data(web::Data::new(kind))
                    .route(web::get().to(get))
                    .route(web::put().to(update))
                    .route(web::delete().to(delete)),
            );
    }
    config
        .route("/listeners/{key}/status", web::get().to(listener_status))
        .route("/status/listeners", web::get().to(all_listener_statuses));
}

async fn list(
    state: web::Data<AppState>,
    token: PresentedToken,
    kind: web::Data<DefinitionKind>,
) -> Result<HttpResponse, ApiError> {
    require_admin(&state, &token).await?;
    Ok(HttpResponse::Ok().json(state.supervisor.list(**kind).await))
}

#[tracing::instrument(name = "create_definition", skip_all, fields(kind = %**kind))]
async fn create(
    state: web::Data<AppState>,
    token: PresentedToken,
    kind: web::Data<DefinitionKind>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    require_admin(&state, &token).await?;
    let document = parse_json(&body)?;
    let created = state.supervisor.create(**kind, document).await?;
    let key = created
        .get("key")
        .and_then(|k| k.as_str())
        .unwrap_or_default()
        .to_owned();
    Ok(HttpResponse::Created()
        .insert_header(("Location", format!("/api/v1/{}/{key}", kind.collection())))
        .json(created))
}

async fn get(
    state: web::Data<AppState>,
    token: PresentedToken,
    kind: web::Data<DefinitionKind>,
    key: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    require_admin(&state, &token).await?;
    Ok(HttpResponse::Ok().json(state.supervisor.get(**kind, &key).await?))
}

#[tracing::instrument(name = "update_definition", skip_all, fields(kind = %**kind, key = %*key))]
async fn update(
    state: web::Data<AppState>,
    token: PresentedToken,
    kind: web::Data<DefinitionKind>,
    key: web::Path<String>,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    require_admin(&state, &token).await?;
    let document = parse_json(&body)?;
    Ok(HttpResponse::Ok().json(state.supervisor.update(**kind, &key, document).await?))
}

#[tracing::instrument(name = "delete_definition", skip_all, fields(kind = %**kind, key = %*key))]
async fn delete(
    state: web::Data<AppState>,
    token: PresentedToken,
    kind: web::Data<DefinitionKind>,
    key: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    require_admin(&state, &token).await?;
    state.supervisor.delete(**kind, &key).await?;
    Ok(HttpResponse::NoContent().finish())
}

async fn listener_status(
    state: web::Data<AppState>,
    token: PresentedToken,
    key: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    require_admin(&state, &token).await?;
    // A stored listener always has a status; an unknown key is 404.
    state.supervisor.get(DefinitionKind::Listener, &key).await?;
    let status = state
        .supervisor
        .listener_status(&key)
        .ok_or_else(|| ApiError::NotFound(format!("listener {key} has no status yet")))?;
    Ok(HttpResponse::Ok().json(status))
}

async fn all_listener_statuses(
    state: web::Data<AppState>,
    token: PresentedToken,
) -> Result<HttpResponse, ApiError> {
    require_admin(&state, &token).await?;
    Ok(HttpResponse::Ok().json(state.supervisor.listener_statuses()))
}
