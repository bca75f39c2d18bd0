//! The admin API's credentials against real nodes on 127.0.0.1, over real
//! TCP with a hand-written HTTP/1.1 client: the bearer token (given, and
//! created in the data directory), admin grants with signed requests, every
//! refusal reason, the failure rate limit, and the audit trail entry of a
//! refusal.

mod common;

use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use common::{config, start, within, ADMIN_TOKEN, STEP};
use ed25519_dalek::SigningKey;
use macula_auth::policy::parse_rules;
use macula_auth::{sign, Grant, GrantBody, Key, Subject};
use macula_runtime::admin::{self, ErrorReport, HealthReport};
use macula_runtime::config::Admission;
use macula_runtime::{NodeConfig, NodeRuntime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

struct Admin {
    addr: SocketAddr,
    _stop: oneshot::Sender<()>,
}

async fn serve(node: &NodeRuntime) -> Admin {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind admin listener");
    let addr = listener.local_addr().expect("admin addr");
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(admin::serve(listener, node.clone(), async move {
        let _ = rx.await;
    }));
    Admin { addr, _stop: tx }
}

#[derive(Debug)]
struct Reply {
    status: u16,
    head: String,
    body: String,
}

impl Reply {
    fn kind(&self) -> String {
        let e: ErrorReport = serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not an ErrorReport ({e}): {}", self.body));
        e.kind.unwrap_or_default()
    }

    fn has_header(&self, name: &str) -> bool {
        self.head
            .lines()
            .any(|l| l.to_ascii_lowercase().starts_with(&format!("{name}:")))
    }
}

impl Admin {
    async fn req(&self, method: &str, path: &str, auth: Option<&str>) -> Reply {
        let addr = self.addr;
        within(STEP, path, async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let auth = auth.map_or(String::new(), |a| format!("Authorization: {a}\r\n"));
            let req = format!(
                "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
            );
            s.write_all(req.as_bytes()).await.expect("send");
            let mut raw = Vec::new();
            s.read_to_end(&mut raw).await.expect("read");
            let text = String::from_utf8(raw).expect("UTF-8");
            let (head, body) = text.split_once("\r\n\r\n").expect("header end");
            let status = head
                .split(' ')
                .nth(1)
                .and_then(|c| c.parse().ok())
                .expect("status");
            Reply {
                status,
                head: head.to_string(),
                body: body.to_string(),
            }
        })
        .await
    }

    async fn get(&self, path: &str, auth: Option<&str>) -> Reply {
        self.req("GET", path, auth).await
    }

    /// The value of one series in `/metrics` (fetched from loopback, so
    /// without credentials).
    async fn sample(&self, series: &str) -> f64 {
        let m = self.get("/metrics", None).await;
        assert_eq!(m.status, 200, "{}", m.body);
        m.body
            .lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("no {series} in /metrics"))
    }
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

fn unauthorized(reason: &str) -> String {
    format!("macula_admin_unauthorized_total{{reason=\"{reason}\"}}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_token_opens_the_admin_api_and_nothing_else_does() {
    common::init_tracing();
    let mut cfg = config();
    cfg.admin_auth.max_failures = 100;
    let node = start(cfg).await;
    let admin = serve(&node).await;
    // Probes stay open.
    for path in ["/live", "/ready", "/health"] {
        assert_eq!(admin.get(path, None).await.status, 200, "{path}");
    }
    let health: HealthReport =
        serde_json::from_str(&admin.get("/health", None).await.body).expect("health");
    assert!(health.admin_auth);
    assert_eq!(health.admin_auth_methods, ["token"]);
    // No credentials, wrong token, unknown scheme.
    let r = admin.get("/admin/peers", None).await;
    assert_eq!(
        (r.status, r.kind().as_str()),
        (401, "missing"),
        "{}",
        r.body
    );
    assert!(r.has_header("www-authenticate"), "{}", r.head);
    let r = admin
        .get("/admin/peers", Some(&bearer("not-the-token")))
        .await;
    assert_eq!((r.status, r.kind().as_str()), (401, "bad_token"));
    let r = admin
        .get("/admin/routing", Some("Basic dXNlcjpwYXNz"))
        .await;
    assert_eq!((r.status, r.kind().as_str()), (401, "missing"));
    // Reads and writes alike, and paths that do not exist.
    let r = admin.req("PUT", "/admin/raft/g/kv/a", None).await;
    assert_eq!(r.status, 401);
    assert_eq!(admin.get("/nope", None).await.status, 401);
    // The token works everywhere.
    let ok = admin.get("/admin/peers", Some(&bearer(ADMIN_TOKEN))).await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(
        admin.get("/nope", Some(&bearer(ADMIN_TOKEN))).await.status,
        404
    );
    // `/metrics` from loopback needs none; every refusal is counted.
    assert_eq!(admin.sample(&unauthorized("missing")).await, 4.0);
    assert_eq!(admin.sample(&unauthorized("bad_token")).await, 1.0);
    assert_eq!(admin.sample(&unauthorized("rate_limited")).await, 0.0);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_failures_from_one_address_are_answered_429() {
    let node = start(config()).await;
    let admin = serve(&node).await;
    for i in 0..5 {
        let r = admin.get("/admin/peers", Some(&bearer("guess"))).await;
        assert_eq!(r.status, 401, "attempt {i}");
    }
    // Over the limit: even the right token waits for the window to end.
    let r = admin.get("/admin/peers", Some(&bearer(ADMIN_TOKEN))).await;
    assert_eq!(
        (r.status, r.kind().as_str()),
        (429, "rate_limited"),
        "{}",
        r.body
    );
    assert!(r.has_header("retry-after"), "{}", r.head);
    assert_eq!(admin.sample(&unauthorized("rate_limited")).await, 1.0);
    assert_eq!(admin.sample(&unauthorized("bad_token")).await, 5.0);
    // Probes are not limited.
    assert_eq!(admin.get("/health", None).await.status, 200);
    node.shutdown().await;
}

fn key(n: u8) -> SigningKey {
    SigningKey::from_bytes(&[n; 32])
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

/// A grant by `authority` for client `who` with `rules`, valid from
/// `from_ms` to `to_ms`.
fn grant(
    authority: &SigningKey,
    who: &SigningKey,
    rules: &str,
    from_ms: u64,
    to_ms: u64,
) -> Vec<u8> {
    let body = GrantBody {
        realm: Key::of(authority),
        issuer: Key::of(authority),
        id: [9; 16],
        subject: Subject::Client(Key::of(who)),
        rules: parse_rules(rules).expect("rules"),
        roles: vec!["ops".into()],
        not_before_ms: from_ms,
        expires_ms: to_ms,
    };
    Grant {
        grant: sign(&body, authority).expect("sign"),
        signer: None,
    }
    .to_bytes()
    .expect("encode")
}

fn signed(grant: &[u8], who: &SigningKey, method: &str, path: &str, at_ms: u64) -> String {
    admin::sign_request(grant, who, method, path, at_ms)
}

fn realm_node(authority: &SigningKey) -> NodeConfig {
    let mut cfg = config();
    cfg.admission = Some(Admission::new(Key::of(authority), None));
    // Many refusals from one address in this test: keep the limit out of it.
    cfg.admin_auth.max_failures = 1000;
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_grants_with_signed_requests() {
    let authority = key(1);
    let ops = key(2);
    let node = start(realm_node(&authority)).await;
    let admin = serve(&node).await;
    let health: HealthReport =
        serde_json::from_str(&admin.get("/health", None).await.body).expect("health");
    assert_eq!(health.admin_auth_methods, ["token", "grant"]);
    let now = now_ms();
    let day = 86_400_000;
    let all = grant(
        &authority,
        &ops,
        "allow admin admin.**",
        now - day,
        now + day,
    );

    // A good grant and signature: in.
    let r = admin
        .get(
            "/admin/peers",
            Some(&signed(&all, &ops, "GET", "/admin/peers", now_ms())),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    // The query is signed too; a write goes through the same check.
    let path = "/admin/raft/orders/kv?prefix=a";
    let r = admin
        .get(path, Some(&signed(&all, &ops, "GET", path, now_ms())))
        .await;
    assert_ne!(r.status, 401, "{}", r.body);

    let check = |r: Reply, want: &str| {
        assert_eq!((r.status, r.kind()), (401, want.to_string()), "{}", r.body);
    };
    // The same signature again: a replay.
    let header = signed(&all, &ops, "GET", "/admin/routing", now_ms());
    assert_eq!(admin.get("/admin/routing", Some(&header)).await.status, 200);
    check(admin.get("/admin/routing", Some(&header)).await, "replayed");
    // Signed for another path or method.
    let header = signed(&all, &ops, "GET", "/admin/peers", now_ms());
    check(
        admin.get("/admin/routing", Some(&header)).await,
        "bad_grant:bad_signature",
    );
    // Signed by another key than the grant's subject.
    let header = signed(&all, &key(3), "GET", "/admin/peers", now_ms());
    check(
        admin.get("/admin/peers", Some(&header)).await,
        "bad_grant:bad_signature",
    );
    // Stamped a minute ago (the window is 30 s).
    let header = signed(&all, &ops, "GET", "/admin/peers", now_ms() - 60_000);
    check(admin.get("/admin/peers", Some(&header)).await, "stale");
    // An expired grant.
    let old = grant(
        &authority,
        &ops,
        "allow admin admin.**",
        now - 2 * day,
        now - day,
    );
    let header = signed(&old, &ops, "GET", "/admin/peers", now_ms());
    check(
        admin.get("/admin/peers", Some(&header)).await,
        "bad_grant:expired",
    );
    // A grant of another realm.
    let other = grant(&key(4), &ops, "allow admin admin.**", now - day, now + day);
    let header = signed(&other, &ops, "GET", "/admin/peers", now_ms());
    check(
        admin.get("/admin/peers", Some(&header)).await,
        "bad_grant:wrong_realm",
    );
    // A grant without admin permission.
    let publish = grant(&authority, &ops, "allow publish **", now - day, now + day);
    // (Signed at one stamp with the next request: a signature is bound to
    // its grant, so the other grant's is no replay of this one.)
    let at = now_ms();
    let header = signed(&publish, &ops, "GET", "/admin/peers", at);
    check(admin.get("/admin/peers", Some(&header)).await, "denied");
    // A grant for one endpoint only.
    let peers_only = grant(
        &authority,
        &ops,
        "allow admin admin.peers",
        now - day,
        now + day,
    );
    let header = signed(&peers_only, &ops, "GET", "/admin/peers", at);
    assert_eq!(admin.get("/admin/peers", Some(&header)).await.status, 200);
    let header = signed(&peers_only, &ops, "GET", "/admin/routing", now_ms());
    check(admin.get("/admin/routing", Some(&header)).await, "denied");
    // Garbage.
    check(
        admin.get("/admin/peers", Some("Macula-Grant abc")).await,
        "bad_grant:malformed",
    );

    // Revoked through the realm's list: refused from then on.
    let list = macula_auth::RevocationList::sign(
        &macula_auth::RevocationBody {
            realm: Key::of(&authority),
            version: 1,
            issued_ms: now,
            grants: vec![[9; 16]],
            subjects: vec![],
        },
        &authority,
    )
    .expect("sign")
    .to_bytes()
    .expect("encode");
    node.realm_service().install(&list).expect("adopted");
    let header = signed(&all, &ops, "GET", "/admin/peers", now_ms());
    check(
        admin.get("/admin/peers", Some(&header)).await,
        "bad_grant:revoked",
    );

    assert_eq!(admin.sample(&unauthorized("bad_grant")).await, 6.0);
    assert_eq!(admin.sample(&unauthorized("denied")).await, 2.0);
    assert_eq!(admin.sample(&unauthorized("stale")).await, 1.0);
    assert_eq!(admin.sample(&unauthorized("replayed")).await, 1.0);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_an_authority_takes_no_grants() {
    let node = start(config()).await;
    let admin = serve(&node).await;
    let now = now_ms();
    let g = grant(
        &key(1),
        &key(2),
        "allow admin admin.**",
        now - 1000,
        now + 60_000,
    );
    let r = admin
        .get(
            "/admin/peers",
            Some(&signed(&g, &key(2), "GET", "/admin/peers", now)),
        )
        .await;
    assert_eq!(
        (r.status, r.kind().as_str()),
        (401, "bad_grant:no_authority")
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_node_makes_its_token_and_audits_refusals() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = NodeConfig {
        identity: macula_runtime::IdentitySource::DataDir(dir.path().to_path_buf()),
        ..common::config()
    };
    let mut cfg = cfg;
    cfg.admin_auth.token_file = None;
    let node = start(cfg.clone()).await;
    let path = dir.path().join(admin::TOKEN_FILE);
    let token = std::fs::read_to_string(&path).expect("admin-token created");
    let token = token.trim().to_string();
    assert_eq!(token.len(), 64);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let admin = serve(&node).await;
    assert_eq!(
        admin
            .get("/admin/peers", Some(&bearer(&token)))
            .await
            .status,
        200
    );
    assert_eq!(
        admin
            .get("/admin/peers", Some(&bearer(ADMIN_TOKEN)))
            .await
            .status,
        401
    );
    let audit = node.audit().expect("an audit log").clone();
    let a = audit.clone();
    tokio::task::spawn_blocking(move || a.flush())
        .await
        .expect("flush");
    let log = std::fs::read_to_string(dir.path().join("audit/audit.log")).expect("audit.log");
    let denied: Vec<&str> = log.lines().filter(|l| l.contains("admin_denied")).collect();
    assert_eq!(denied.len(), 1, "{log}");
    assert!(
        denied[0].contains("127.0.0.1 GET /admin/peers: bad_token"),
        "{log}"
    );
    node.shutdown().await;
    // Closed with a checkpoint signed by the node's key.
    let log = std::fs::read_to_string(dir.path().join("audit/audit.log")).expect("audit.log");
    let id = macula_runtime::Identity::load(&dir.path().join("node.key")).expect("node key");
    let vk = ed25519_dalek::VerifyingKey::from_bytes(&id.public_key()).expect("key");
    let (_, checkpoints) =
        macula_auth::audit::verify(log.lines(), None, Some(&vk)).expect("intact");
    assert_eq!(checkpoints, 1);
    // The token is reused after a restart.
    drop(admin);
    let node = start(cfg).await;
    let again = std::fs::read_to_string(&path).expect("admin-token");
    assert_eq!(again.trim(), token);
    let admin = serve(&node).await;
    assert_eq!(
        admin
            .get("/admin/peers", Some(&bearer(&token)))
            .await
            .status,
        200
    );
    node.shutdown().await;
}
