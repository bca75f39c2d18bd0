//! `macula realm` and `macula authz check`, as a user runs them: a realm
//! authority, a grant, decisions with their exit codes, revocation.

use std::path::Path;
use std::process::{Command, Output};

fn macula(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_macula"))
        .args(args)
        .env_remove("MACULA_DATA_DIR")
        .output()
        .expect("run macula")
}

fn ok(args: &[&str]) -> String {
    let out = macula(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_string()
}

fn code(out: &Output) -> i32 {
    out.status.code().expect("exit code")
}

#[test]
fn a_realm_grants_decides_and_revokes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path().to_str().expect("path");
    let realm = ok(&["realm", "init", "acme", "--data-dir", d]);
    assert_eq!(realm.len(), 52, "{realm}");
    // Init again: the same key, never replaced.
    assert_eq!(ok(&["realm", "init", "acme", "--data-dir", d]), realm);
    assert_eq!(ok(&["realm", "key", "acme", "--data-dir", d]), realm);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let key = Path::new(d).join("realms/acme/authority.key");
        let mode = std::fs::metadata(key).expect("key").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let node = ok(&["identity", "--data-dir", &format!("{d}/n1")]);
    let subject = format!("node:{node}");
    let token = ok(&[
        "realm",
        "grant",
        "acme",
        "--data-dir",
        d,
        "--subject",
        &subject,
        "--allow",
        "publish orders.*",
        "--deny",
        "publish orders.secret",
        "--allow",
        "subscribe inbox.{{subject}}.**",
        "--ttl",
        "1d",
    ]);
    let check = |action: &str, resource: &str, revocations: Option<&str>| {
        let mut args = vec!["authz", "check", "--grant", &token, "--realm", &realm];
        if let Some(r) = revocations {
            args.extend(["--revocations", r]);
        }
        args.extend([action, resource]);
        macula(&args)
    };
    assert_eq!(code(&check("publish", "orders.new", None)), 0);
    let denied = check("publish", "payments.x", None);
    assert_eq!(code(&denied), 1);
    assert!(String::from_utf8_lossy(&denied.stderr).contains("not_allowed"));
    let denied = check("publish", "orders.secret", None);
    assert!(String::from_utf8_lossy(&denied.stderr).contains("deny publish orders.secret"));
    assert_eq!(
        code(&check("subscribe", &format!("inbox.{node}.*"), None)),
        0
    );
    assert_eq!(code(&check("subscribe", "inbox.*.x", None)), 1);
    assert_eq!(code(&check("call", "orders.new", None)), 1);
    // A bad action or resource is a usage error.
    assert_eq!(code(&check("shout", "x", None)), 2);
    assert_eq!(code(&check("publish", "a..b", None)), 2);
    // Another realm's key: the grant is not valid there.
    let other = ok(&["realm", "init", "other", "--data-dir", d]);
    let out = macula(&[
        "authz",
        "check",
        "--grant",
        &token,
        "--realm",
        &other,
        "publish",
        "orders.new",
    ]);
    assert_eq!(code(&out), 1);
    assert!(String::from_utf8_lossy(&out.stderr).contains("wrong_realm"));
    let out = macula(&["realm", "inspect", &token, "--realm", &other]);
    assert_eq!(code(&out), 1);
    assert!(ok(&["realm", "inspect", &token, "--realm", &realm]).contains("verdict:    valid"));
    // A token with one character changed does not pass.
    let mut chars: Vec<char> = token.chars().collect();
    let i = chars.len() / 2;
    chars[i] = if chars[i] == 'A' { 'B' } else { 'A' };
    let forged: String = chars.into_iter().collect();
    let out = macula(&[
        "authz",
        "check",
        "--grant",
        &forged,
        "--realm",
        &realm,
        "publish",
        "orders.new",
    ]);
    assert_ne!(code(&out), 0);
    // Listed, then revoked: the list says so and decisions follow it.
    let listed = ok(&["realm", "list", "acme", "--data-dir", d, "--json"]);
    let line: serde_json::Value = serde_json::from_str(&listed).expect("json");
    assert_eq!(line["state"], "valid");
    let serial = line["serial"].as_str().expect("serial").to_string();
    let list = ok(&[
        "realm",
        "revoke",
        "acme",
        "--data-dir",
        d,
        "--grant",
        &serial,
    ]);
    let line: serde_json::Value =
        serde_json::from_str(&ok(&["realm", "list", "acme", "--data-dir", d, "--json"]))
            .expect("json");
    assert_eq!(line["state"], "revoked");
    let out = check("publish", "orders.new", Some(&list));
    assert_eq!(code(&out), 1);
    assert!(String::from_utf8_lossy(&out.stderr).contains("revoked"));
    // The realm's own audit trail holds the grant and the revocation, its
    // checkpoints signed with the authority key.
    let trail = format!("{d}/realms/acme/audit/audit.log");
    let text = std::fs::read_to_string(&trail).expect("the realm's audit trail");
    assert!(
        text.contains("\"kind\":\"grant\"") && text.contains(&serial),
        "{text}"
    );
    assert!(text.contains("\"kind\":\"revocation\""), "{text}");
    let out = ok(&["audit", "verify", &trail, "--key", &realm]);
    assert!(out.contains("intact"), "{out}");
    // Without an authority, nothing can be granted.
    let out = macula(&[
        "realm",
        "grant",
        "nobody",
        "--data-dir",
        d,
        "--subject",
        &subject,
        "--allow",
        "publish x",
    ]);
    assert_eq!(code(&out), 1);
    assert!(String::from_utf8_lossy(&out.stderr).contains("realm init"));
    // A grant that allows nothing is refused.
    let out = macula(&[
        "realm",
        "grant",
        "acme",
        "--data-dir",
        d,
        "--subject",
        &subject,
    ]);
    assert_eq!(code(&out), 2);
}

#[test]
fn audit_verify_names_the_broken_line() {
    use macula::auth::audit::Chain;
    let dir = tempfile::tempdir().expect("tempdir");
    let key = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
    let pubkey = macula::auth::Key(key.verifying_key().to_bytes()).to_string();
    let mut c = Chain::default();
    let mut first: Vec<String> = (0..3)
        .map(|i| c.append(i, "admission", &format!("node {i}")))
        .collect();
    first.push(c.checkpoint(10, &key));
    let second: Vec<String> = (0..2).map(|i| c.append(20 + i, "denial", "x")).collect();
    let a = dir.path().join("audit.1.log");
    let b = dir.path().join("audit.2.log");
    std::fs::write(&a, first.join("\n")).expect("write");
    std::fs::write(&b, second.join("\n")).expect("write");
    let (a, b) = (a.to_str().expect("path"), b.to_str().expect("path"));
    let out = ok(&["audit", "verify", a, b, "--key", &pubkey]);
    assert!(
        out.contains("intact: 6 entries, 1 checkpoints verified"),
        "{out}"
    );
    // Alone, a later file verifies from its own first entry.
    assert!(ok(&["audit", "verify", b]).contains("intact: 2 entries"));
    // Files out of order, an edit, and another node's key are all caught.
    let out = macula(&["audit", "verify", b, a]);
    assert_eq!(code(&out), 1);
    let mut edited = first.clone();
    edited[1] = edited[1].replace("node 1", "node 7");
    std::fs::write(a, edited.join("\n")).expect("write");
    let out = macula(&["audit", "verify", a, b]);
    assert_eq!(code(&out), 1);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 2") && err.contains("edited"), "{err}");
    std::fs::write(a, first.join("\n")).expect("write");
    let other = macula::auth::Key(
        ed25519_dalek::SigningKey::from_bytes(&[8; 32])
            .verifying_key()
            .to_bytes(),
    )
    .to_string();
    let out = macula(&["audit", "verify", a, "--key", &other]);
    assert_eq!(code(&out), 1);
    assert!(String::from_utf8_lossy(&out.stderr).contains("checkpoint"));
}
