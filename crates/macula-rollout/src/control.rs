//! What the workload agents say to each other and to the operator's
//! tools: the control procedure's requests and answers, and the reports of
//! the admin API (`/admin/workloads`). JSON.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::manifest::Manifest;
use crate::records::{AppSpec, Placement, Rollout};

/// The control procedure every agent serves, only to calls addressed to
/// its node.
pub const CONTROL: &str = "_node.workloads";

/// A control request from any bytes.
pub fn decode_control(bytes: &[u8]) -> Result<Control, String> {
    serde_json::from_slice(bytes).map_err(|e| format!("bad control request: {e}"))
}

/// One workload on one node, as its agent reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalApp {
    pub app: String,
    pub version: String,
    pub hash: String,
    pub procedures: Vec<String>,
}

/// An agent's answer to `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReport {
    pub node: String,
    pub labels: BTreeMap<String, String>,
    pub apps: Vec<LocalApp>,
    pub artifacts: Vec<String>,
    /// This node is a member of group [`crate::records::GROUP`].
    pub group_member: bool,
    /// This node leads it (coordinates rollouts).
    pub coordinator: bool,
}

/// An app as the records have it, with its last rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppReport {
    pub spec: AppSpec,
    pub rollout: Option<Rollout>,
    pub versions: Vec<String>,
}

/// What `deploy` did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployReport {
    pub app: String,
    pub version: String,
    pub hash: String,
    pub size: u64,
    /// The rollout a first deployment started (a later version waits for
    /// `upgrade`).
    pub rollout: Option<Rollout>,
}

/// What `deploy` is asked for (besides the artifact).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployRequest {
    pub version: String,
    /// BLAKE3 (hex) of an artifact stored on this node.
    pub hash: String,
    #[serde(default)]
    pub config: Vec<(String, String)>,
    /// Placement of a first deployment (ignored afterwards).
    #[serde(default)]
    pub placement: Placement,
}

/// A request to an agent's control procedure (`_node.workloads`, JSON,
/// addressed to one node). `chunk` is answered with the chunk's bytes,
/// `apply` with a [`LocalApp`], `status` with a [`NodeReport`], `stop` and
/// `join` with nothing; a refusal is a handler error (400 malformed, 404
/// missing, 409 conflict, 500 failed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Control {
    /// Chunk `index` of the artifact `manifest` describes.
    Chunk { manifest: Manifest, index: u32 },
    /// Run `version` of `app` (the artifact from this node's store or
    /// fetched from `holders`) with `config`; idempotent.
    Apply {
        app: String,
        version: String,
        manifest: Manifest,
        config: Vec<(String, String)>,
        holders: Vec<String>,
    },
    /// Stop `app` here.
    Stop { app: String },
    /// What runs here.
    Status,
    /// Join the workloads group with these founding members.
    Join { members: Vec<String> },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_requests_round_trip_and_garbage_is_refused() {
        let m = Manifest::of(b"x");
        for c in [
            Control::Chunk {
                manifest: m.clone(),
                index: 0,
            },
            Control::Apply {
                app: "a".into(),
                version: "1".into(),
                manifest: m,
                config: vec![("k".into(), "v".into())],
                holders: vec!["n".into()],
            },
            Control::Stop { app: "a".into() },
            Control::Status,
            Control::Join {
                members: vec!["n".into()],
            },
        ] {
            let bytes = serde_json::to_vec(&c).unwrap();
            assert_eq!(decode_control(&bytes).unwrap(), c);
        }
        assert!(decode_control(b"{\"op\":\"reboot\"}").is_err());
        assert!(decode_control(b"\xff").is_err());
        assert_eq!(
            decode_control(br#"{"op":"status"}"#).unwrap(),
            Control::Status
        );
    }
}
