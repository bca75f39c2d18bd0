//! End-to-end tests of the `macula` binary: real processes, real QUIC on
//! 127.0.0.1, real files. Every wait is bounded; every process is killed on
//! drop even when an assertion fails.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use common::*;

fn start_args<'a>(dir: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    common::start_args("test.e2e", dir, extra)
}

#[test]
fn two_nodes_bootstrap_and_see_each_other() {
    let d1 = tempfile::tempdir().unwrap();
    let d2 = tempfile::tempdir().unwrap();
    let mut a = Proc::spawn(&start_args(d1.path(), &[]));
    let a_id = a.field("node_id");
    let a_addr = a.field("listen");
    let boot = format!("{a_id}@{a_addr}");
    let mut b = Proc::spawn(&start_args(d2.path(), &["--bootstrap", &boot]));
    let b_id = b.field("node_id");
    assert_ne!(a_id, b_id);
    // Each logs the other's node ID: the IDs come from the mutually
    // authenticated TLS handshake (B even required A's ID up front).
    b.wait_for(&["peer connected", &a_id, "outbound"]);
    a.wait_for(&["peer connected", &b_id, "inbound"]);
    // Graceful stop: exit 0, and the peer notices.
    assert_eq!(b.terminate(), Some(0));
    a.wait_for(&["peer disconnected", &b_id]);
    assert_eq!(a.terminate(), Some(0));
}

#[test]
fn identity_is_stable_across_restarts() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().to_str().unwrap();
    let (code, first) = run(command(&["identity", "--data-dir", dir]));
    assert_eq!(code, Some(0), "{first}");
    let (_, second) = run(command(&["identity", "--data-dir", dir]));
    assert_eq!(first.trim(), second.trim());
    assert_eq!(first.trim().len(), 52);
    let key = d.path().join("node.key");
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let mut node = Proc::spawn(&start_args(d.path(), &[]));
    assert_eq!(node.field("node_id"), first.trim());
    assert_eq!(node.terminate(), Some(0));
}

#[test]
fn wrong_bootstrap_node_id_is_an_identity_error() {
    let d1 = tempfile::tempdir().unwrap();
    let d2 = tempfile::tempdir().unwrap();
    let mut a = Proc::spawn(&start_args(d1.path(), &[]));
    let a_addr = a.field("listen");
    let wrong = "a".repeat(52);
    let boot = format!("{wrong}@{a_addr}");
    let mut b = Proc::spawn(&start_args(d2.path(), &["--bootstrap", &boot]));
    b.wait_for(&["identity error", &wrong]);
    assert!(!b.seen.iter().any(|l| l.contains("peer connected")));
}

#[test]
fn corrupt_key_file_stops_the_node_and_is_not_touched() {
    let d = tempfile::tempdir().unwrap();
    let key = d.path().join("node.key");
    std::fs::write(&key, b"-----BEGIN PRIVATE KEY-----\ngarbage\n").unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let before = std::fs::read(&key).unwrap();
    let (code, out) = run(command(&start_args(d.path(), &[])));
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(key.to_str().unwrap()),
        "error names the file: {out}"
    );
    assert_eq!(
        std::fs::read(&key).unwrap(),
        before,
        "key file must not change"
    );
}

#[test]
fn world_readable_key_file_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().to_str().unwrap();
    let (code, _) = run(command(&["identity", "--data-dir", dir]));
    assert_eq!(code, Some(0));
    let key = d.path().join("node.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let before = std::fs::read(&key).unwrap();
    let (code, out) = run(command(&start_args(d.path(), &[])));
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("chmod 600") && out.contains(key.to_str().unwrap()),
        "{out}"
    );
    assert_eq!(std::fs::read(&key).unwrap(), before);
}

#[test]
fn bad_config_values_name_key_and_value() {
    let d = tempfile::tempdir().unwrap();
    let (code, out) = run(command(&start_args(d.path(), &["--listen", "nowhere"])));
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("--listen") && out.contains("nowhere"), "{out}");

    let mut cmd = command(&["start", "--data-dir", d.path().to_str().unwrap()]);
    cmd.env("MACULA_REALM", "Bad_Realm");
    let (code, out) = run(cmd);
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("MACULA_REALM") && out.contains("Bad_Realm"),
        "{out}"
    );

    let cfg = d.path().join("macula.toml");
    std::fs::write(&cfg, "[limits]\nmax_frame_size = 7\n").unwrap();
    let (code, out) = run(command(&start_args(
        d.path(),
        &["--config", cfg.to_str().unwrap()],
    )));
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("limits.max_frame_size") && out.contains('7'),
        "{out}"
    );
    // No identity was created by a run that failed on configuration.
    assert!(!d.path().join("node.key").exists());
}

#[test]
fn a_second_process_on_the_same_data_directory_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let mut first = Proc::spawn(&start_args(d.path(), &[]));
    let id = first.field("node_id");
    // The same directory again: refused at once, naming the directory and
    // the process that holds it; the first one runs on untouched.
    let (code, out) = run(command(&start_args(d.path(), &[])));
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains(&d.path().display().to_string()), "{out}");
    assert!(out.contains("in use by another process"), "{out}");
    assert!(out.contains(&format!("pid {}", first.child.id())), "{out}");
    assert!(!out.contains(&id), "the second never started: {out}");
    // Killed (kill -9), the first leaves no lock behind: a restart works.
    first.child.kill().expect("SIGKILL the first");
    let _ = first.child.wait();
    let mut again = Proc::spawn(&start_args(d.path(), &[]));
    assert_eq!(again.field("node_id"), id);
    assert_eq!(again.terminate(), Some(0));
}

#[test]
fn a_cli_in_another_realm_is_told_why_with_the_realms_the_right_way_round() {
    let d = tempfile::tempdir().unwrap();
    let mut a = Proc::spawn(&start_args(d.path(), &[]));
    let addr = a.field("listen");
    let want = "you are in \"test.elsewhere\", this node is in \"test.e2e\"";
    // As a short-lived full node (the DHT commands) and as a client.
    for args in [
        vec![
            "dht",
            "get",
            "some-key",
            "--realm",
            "test.elsewhere",
            "--connect",
            &addr,
        ],
        vec![
            "sub",
            "x.*",
            "--count",
            "1",
            "--realm",
            "test.elsewhere",
            "--connect",
            &addr,
        ],
    ] {
        let (code, out) = run(command(&args));
        assert_ne!(code, Some(0), "{args:?}: {out}");
        assert!(out.contains("realm mismatch"), "{args:?}: {out}");
        assert!(out.contains(want), "{args:?}: {out}");
    }
    assert_eq!(a.terminate(), Some(0));
}

#[test]
fn port_in_use_is_a_clear_error() {
    let d = tempfile::tempdir().unwrap();
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = sock.local_addr().unwrap().to_string();
    let (code, out) = run(command(&start_args(d.path(), &["--listen", &addr])));
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains(&format!("cannot listen on {addr}")), "{out}");
    assert!(out.to_lowercase().contains("in use"), "{out}");
}

#[test]
fn help_is_complete() {
    let (code, out) = run(command(&["start", "--help"]));
    assert_eq!(code, Some(0));
    for flag in [
        "--listen",
        "--realm",
        "--bootstrap",
        "--data-dir",
        "--http",
        "--config",
        "--tls-mode",
    ] {
        assert!(out.contains(flag), "{flag} missing from help:\n{out}");
    }
    let (code, out) = run(command(&["--help"]));
    assert_eq!(code, Some(0));
    for sub in ["start", "identity", "bench"] {
        assert!(out.contains(sub), "{sub} missing from help:\n{out}");
    }
}

/// A test CA issuing certificates for node keys (serverAuth + clientAuth).
struct Ca {
    cert: rcgen::Certificate,
    key: rcgen::KeyPair,
}

impl Ca {
    fn new() -> Ca {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "macula test CA");
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    /// Creates the node's identity in `dir` (through the binary) and writes
    /// `dir/node.crt`, issued by this CA for that key.
    fn issue_for(&self, dir: &Path) -> std::path::PathBuf {
        let (code, out) = run(command(&["identity", "--data-dir", dir.to_str().unwrap()]));
        assert_eq!(code, Some(0), "{out}");
        let id = macula::Identity::load(&dir.join("node.key")).unwrap();
        let pem = std::fs::read_to_string(dir.join("node.key")).unwrap();
        let node_key = rcgen::KeyPair::from_pem(&pem).unwrap();
        let mut params =
            rcgen::CertificateParams::new(vec![format!("{}.id.macula", id.node_id())]).unwrap();
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&node_key, &self.cert, &self.key).unwrap();
        let path = dir.join("node.crt");
        std::fs::write(&path, cert.pem()).unwrap();
        path
    }
}

#[test]
fn ca_mode_admits_issued_nodes_and_refuses_self_signed_ones() {
    let ca = Ca::new();
    let root = tempfile::tempdir().unwrap();
    let ca_file = root.path().join("ca.pem");
    std::fs::write(&ca_file, ca.cert.pem()).unwrap();
    let (da, db, dc) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    let cert_a = ca.issue_for(da.path());
    let cert_b = ca.issue_for(db.path());
    let ca_arg = ca_file.to_str().unwrap();

    let mut a = Proc::spawn(&start_args(
        da.path(),
        &[
            "--tls-mode",
            "ca",
            "--tls-ca-cert-file",
            ca_arg,
            "--tls-cert-file",
            cert_a.to_str().unwrap(),
        ],
    ));
    let a_id = a.field("node_id");
    let a_addr = a.field("listen");

    // B: issued by the same CA, configured through the environment.
    let mut cmd = command(&start_args(db.path(), &["--bootstrap", &a_addr]));
    cmd.env("MACULA_TLS_MODE", "ca")
        .env("MACULA_TLS_CACERTFILE", &ca_file)
        .env("MACULA_TLS_CERTFILE", &cert_b);
    let mut b = Proc::spawn_cmd(cmd);
    let b_id = b.field("node_id");
    b.wait_for(&["peer connected", &a_id]);
    a.wait_for(&["peer connected", &b_id]);

    // C: self-signed (default mode). A refuses it in the TLS handshake.
    let mut c = Proc::spawn(&start_args(dc.path(), &["--bootstrap", &a_addr]));
    let c_id = c.field("node_id");
    c.wait_for(&["cannot reach bootstrap peer"]);
    a.wait_for(&["inbound handshake failed"]);
    assert!(!a
        .seen
        .iter()
        .any(|l| l.contains("peer connected") && l.contains(&c_id)));
    assert!(!c.seen.iter().any(|l| l.contains("peer connected")));
}
