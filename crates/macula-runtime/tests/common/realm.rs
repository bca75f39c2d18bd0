//! Members of a realm with an authority, for the end-to-end tests: nodes
//! admitted with a grant allowing everything, and clients attached through
//! a gateway with one.

use std::path::Path;

use ed25519_dalek::SigningKey;
use macula_auth::{Key, Subject};
use macula_runtime::config::Admission;
use macula_runtime::{
    Client, ClientConfig, Identity, IdentitySource, NodeConfig, NodeRuntime, PeerAddr,
};
use macula_wire::NodeId;

use super::{boot, config, joined, start, within, STEP};

pub const FAR: u64 = u64::MAX / 2;
pub const ALL: &str = "allow subscribe **\nallow publish **\nallow call **\nallow advertise **";

pub fn identity_in(dir: &Path) -> Identity {
    Identity::load_or_create(dir).expect("identity")
}

pub fn grant(authority: &SigningKey, serial: u8, subject: NodeId) -> Vec<u8> {
    super::signed_grant(authority, serial, Subject::Node(subject), ALL, 0, FAR)
}

pub async fn member(
    authority: &SigningKey,
    serial: u8,
    via: Option<&NodeRuntime>,
) -> (NodeRuntime, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("dir");
    let g = grant(authority, serial, identity_in(dir.path()).node_id());
    let node = start(NodeConfig {
        identity: IdentitySource::DataDir(dir.path().to_path_buf()),
        admission: Some(Admission::new(Key::of(authority), Some(g))),
        ..via.map(boot).unwrap_or_else(config)
    })
    .await;
    if via.is_some() {
        joined(&node).await;
    }
    (node, dir)
}

pub async fn client_of(
    gateway: &NodeRuntime,
    authority: &SigningKey,
    serial: u8,
) -> (Client, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("dir");
    let addr: PeerAddr = format!("{}@{}", gateway.node_id(), gateway.local_addr())
        .parse()
        .expect("address");
    let mut cfg = ClientConfig::new(vec![addr]);
    cfg.identity = IdentitySource::DataDir(dir.path().to_path_buf());
    cfg.grant = Some(grant(authority, serial, identity_in(dir.path()).node_id()));
    let c = within(STEP, "client attaches", Client::connect(cfg))
        .await
        .expect("client attaches");
    (c, dir)
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}
