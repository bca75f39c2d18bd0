//! The workload agent's admin API, served beside the node's own
//! (`macula::admin::serve_with_routes`, same credentials check). The CLI's
//! `macula deploy` and `macula upgrade` use it.
//!
//! - `PUT /admin/workloads/artifacts`: body = a component file; stores it
//!   here; answers its manifest (`{hash, size, chunk_size, chunks}`).
//! - `GET /admin/workloads`: every app with its last rollout.
//! - `GET /admin/workloads/node`: this node's workloads and artifacts.
//! - `GET /admin/workloads/agents`: the same for every agent in reach.
//! - `GET /admin/workloads/apps/{app}`: one app.
//! - `POST /admin/workloads/apps/{app}/deploy`: `DeployRequest`.
//! - `POST /admin/workloads/apps/{app}/upgrade`: `UpgradeRequest`.
//! - `POST /admin/workloads/apps/{app}/promote` and `.../abort`.
//! - `GET /admin/workloads/apps/{app}/history`: ended rollouts.
//!
//! Errors are `{"error": "..."}` with 400 (bad request), 404, 409
//! (conflict), 413 (too large), 503 (records or nodes unreachable), 500.

use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use bytes::Bytes;

use crate::agent::{Agent, AgentError, DeployRequest};
use crate::artifact::ArtifactError;
use crate::rollout::UpgradeRequest;

/// The routes, over `agent`.
pub fn routes(agent: Agent) -> Router {
    let limit = agent.max_artifact_bytes();
    Router::new()
        .route(
            "/admin/workloads/artifacts",
            put(artifact).layer(DefaultBodyLimit::max(limit)),
        )
        .route("/admin/workloads", get(list))
        .route("/admin/workloads/node", get(node))
        .route("/admin/workloads/agents", get(agents))
        .route("/admin/workloads/apps/{app}", get(one))
        .route("/admin/workloads/apps/{app}/deploy", post(deploy))
        .route("/admin/workloads/apps/{app}/upgrade", post(upgrade))
        .route("/admin/workloads/apps/{app}/promote", post(promote))
        .route("/admin/workloads/apps/{app}/abort", post(abort))
        .route("/admin/workloads/apps/{app}/history", get(history))
        .with_state(agent)
}

struct Failure(AgentError);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let status = match &self.0 {
            AgentError::BadRequest(_) => StatusCode::BAD_REQUEST,
            AgentError::NotFound(_) => StatusCode::NOT_FOUND,
            AgentError::Conflict(_) => StatusCode::CONFLICT,
            AgentError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            AgentError::Artifact(ArtifactError::Manifest(_)) => StatusCode::PAYLOAD_TOO_LARGE,
            AgentError::Artifact(ArtifactError::Missing(_)) => StatusCode::NOT_FOUND,
            AgentError::Artifact(_) => StatusCode::INTERNAL_SERVER_ERROR,
            AgentError::Wasm(e) => match e.kind() {
                "too_large" => StatusCode::PAYLOAD_TOO_LARGE,
                "hash_mismatch" | "invalid" | "init_failed" | "already_running"
                | "too_many_workloads" => StatusCode::BAD_REQUEST,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            },
        };
        let body = serde_json::json!({ "error": self.0.to_string() });
        (status, Json(body)).into_response()
    }
}

impl From<AgentError> for Failure {
    fn from(e: AgentError) -> Failure {
        Failure(e)
    }
}

type Answer<T> = Result<Json<T>, Failure>;

async fn artifact(
    State(agent): State<Agent>,
    body: Bytes,
) -> Result<(StatusCode, Json<crate::artifact::Manifest>), Failure> {
    let store = agent.clone();
    let manifest = tokio::task::spawn_blocking(move || store.store_artifact(&body))
        .await
        .map_err(|e| Failure(AgentError::Unavailable(e.to_string())))??;
    Ok((StatusCode::CREATED, Json(manifest)))
}

async fn list(State(agent): State<Agent>) -> Answer<Vec<crate::agent::AppReport>> {
    Ok(Json(agent.status(None).await?))
}

async fn node(State(agent): State<Agent>) -> Json<crate::agent::NodeReport> {
    Json(agent.local().await)
}

async fn agents(State(agent): State<Agent>) -> Json<Vec<crate::agent::NodeReport>> {
    Json(agent.agents().await)
}

async fn one(
    State(agent): State<Agent>,
    Path(app): Path<String>,
) -> Answer<crate::agent::AppReport> {
    let mut v = agent.status(Some(&app)).await?;
    v.pop()
        .map(Json)
        .ok_or_else(|| Failure(AgentError::NotFound(format!("no app {app}"))))
}

async fn deploy(
    State(agent): State<Agent>,
    Path(app): Path<String>,
    Json(req): Json<DeployRequest>,
) -> Answer<crate::agent::DeployReport> {
    Ok(Json(agent.deploy(&app, req).await?))
}

async fn upgrade(
    State(agent): State<Agent>,
    Path(app): Path<String>,
    Json(req): Json<UpgradeRequest>,
) -> Answer<crate::rollout::Rollout> {
    Ok(Json(agent.upgrade(&app, req).await?))
}

async fn promote(
    State(agent): State<Agent>,
    Path(app): Path<String>,
) -> Answer<crate::rollout::Rollout> {
    Ok(Json(agent.promote(&app).await?))
}

async fn abort(
    State(agent): State<Agent>,
    Path(app): Path<String>,
) -> Answer<crate::rollout::Rollout> {
    Ok(Json(agent.abort(&app).await?))
}

async fn history(
    State(agent): State<Agent>,
    Path(app): Path<String>,
) -> Answer<Vec<crate::rollout::Rollout>> {
    Ok(Json(agent.history(&app).await?))
}
