//! Shared helpers for the binary's end-to-end tests: spawn `macula`
//! processes, collect their output lines, wait (bounded) for a line, stop
//! them with SIGTERM, and kill them on drop even when an assertion fails.
#![allow(dead_code)] // each test file uses a different subset

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub mod netns;

pub const BIN: &str = env!("CARGO_BIN_EXE_macula");
pub const WAIT: Duration = Duration::from_secs(20);

/// A `macula` process whose stdout and stderr lines are collected.
pub struct Proc {
    pub child: Child,
    pub lines: mpsc::Receiver<String>,
    pub seen: Vec<String>,
}

pub fn command(args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(args);
    prepare(&mut cmd);
    cmd
}

/// The admin token of every node [`start_args`] starts (from
/// [`admin_token_file`]); every command gets it as `MACULA_ADMIN_TOKEN`.
pub const ADMIN_TOKEN: &str = "cli-test-admin-token-0123456789abcdef";

/// A file (mode 0600, one per test process) holding [`ADMIN_TOKEN`].
pub fn admin_token_file() -> &'static str {
    static FILE: std::sync::OnceLock<(tempfile::TempPath, String)> = std::sync::OnceLock::new();
    &FILE
        .get_or_init(|| {
            let mut f = tempfile::NamedTempFile::new().expect("token file");
            std::io::Write::write_all(&mut f, ADMIN_TOKEN.as_bytes()).expect("write token");
            let path = f.into_temp_path();
            let text = path.to_str().expect("UTF-8 temp path").to_string();
            (path, text)
        })
        .1
}

/// What every spawned process gets: info logs, piped output, no stdin, no
/// `MACULA_*` settings inherited from the environment, and the test nodes'
/// admin token (`MACULA_ADMIN_TOKEN`).
pub fn prepare(cmd: &mut Command) {
    cmd.env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, _) in std::env::vars() {
        if k.starts_with("MACULA_") {
            cmd.env_remove(k);
        }
    }
    cmd.env("MACULA_ADMIN_TOKEN", ADMIN_TOKEN);
}

impl Proc {
    pub fn spawn(args: &[&str]) -> Proc {
        Self::spawn_cmd(command(args))
    }

    pub fn spawn_cmd(mut cmd: Command) -> Proc {
        let mut child = cmd.spawn().expect("spawn macula");
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().expect("stdout");
        let err = child.stderr.take().expect("stderr");
        for pipe in [
            Box::new(out) as Box<dyn std::io::Read + Send>,
            Box::new(err),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        Proc {
            child,
            lines: rx,
            seen: Vec::new(),
        }
    }

    /// A line containing every needle, waiting at most `limit` for it.
    pub fn poll_for(&mut self, needles: &[&str], limit: std::time::Duration) -> Option<String> {
        let hit = |l: &String| needles.iter().all(|n| l.contains(n));
        if let Some(l) = self.seen.iter().find(|l| hit(l)) {
            return Some(l.clone());
        }
        let deadline = Instant::now() + limit;
        while let Ok(line) = self
            .lines
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            self.seen.push(line.clone());
            if hit(&line) {
                return Some(line);
            }
        }
        None
    }

    /// Waits for a line containing every needle; returns it.
    pub fn wait_for(&mut self, needles: &[&str]) -> String {
        if let Some(l) = self
            .seen
            .iter()
            .find(|l| needles.iter().all(|n| l.contains(n)))
        {
            return l.clone();
        }
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    let hit = needles.iter().all(|n| line.contains(n));
                    self.seen.push(line.clone());
                    if hit {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no line with {needles:?} within {WAIT:?}; output so far:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// The value of a `key: value` line on stdout.
    pub fn field(&mut self, key: &str) -> String {
        let prefix = format!("{key}: ");
        let line = self.wait_for(&[&prefix]);
        line[line.find(&prefix).unwrap() + prefix.len()..]
            .trim()
            .to_string()
    }

    /// The next output line (stdout or stderr) that arrives before
    /// `deadline`, or `None` when the deadline passes or the process closed
    /// both pipes. The line is not added to `seen`.
    pub fn next_line(&mut self, deadline: Instant) -> Option<String> {
        let left = deadline.saturating_duration_since(Instant::now());
        self.lines.recv_timeout(left).ok()
    }

    /// Waits (at most `limit`) for the process to exit by itself.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then the exit code (bounded wait).
    pub fn terminate(&mut self) -> Option<i32> {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("process did not exit within {WAIT:?} of SIGTERM");
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a command to completion (bounded) and returns (code, stdout+stderr).
pub fn run(cmd: Command) -> (Option<i32>, String) {
    let mut p = Proc::spawn_cmd(cmd);
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(Some(status)) = p.child.try_wait() {
            // Drain what is left.
            std::thread::sleep(Duration::from_millis(50));
            let mut all = std::mem::take(&mut p.seen);
            all.extend(p.lines.try_iter());
            return (status.code(), all.join("\n"));
        }
        assert!(Instant::now() < deadline, "command did not finish");
        while let Ok(l) = p.lines.try_recv() {
            p.seen.push(l);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `macula start` on loopback with ephemeral QUIC and admin ports, in
/// `realm`, with the test admin token.
pub fn start_args<'a>(realm: &'a str, dir: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["start"];
    if !extra.contains(&"--listen") {
        v.extend_from_slice(&["--listen", "127.0.0.1:0"]);
    }
    if !extra.contains(&"--http") {
        v.extend_from_slice(&["--http", "127.0.0.1:0"]);
    }
    if !extra.contains(&"--admin-token-file") {
        v.extend_from_slice(&["--admin-token-file", admin_token_file()]);
    }
    v.extend_from_slice(&["--realm", realm, "--data-dir", dir.to_str().unwrap()]);
    v.extend_from_slice(extra);
    v
}

/// One HTTP/1.1 request to the admin API with the test token: (status, body).
pub fn admin_http(
    addr: &str,
    method: &str,
    path: &str,
    body: &str,
) -> std::io::Result<(u16, String)> {
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    use std::io::{Read, Write};
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status in {out:?}")))?;
    let body = out
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Ok((status, body))
}

/// The example WebAssembly workload (crates/macula-wasm/guests/example),
/// built from source for `wasm32-wasip2` into this build's target dir.
pub fn example() -> std::path::PathBuf {
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../macula-wasm/guests/example/Cargo.toml");
    let target_dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("guests");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let out = std::process::Command::new(cargo)
        .args([
            "build",
            "--release",
            "--locked",
            "--target",
            "wasm32-wasip2",
        ])
        .arg("--manifest-path")
        .arg(&manifest)
        .env("CARGO_TARGET_DIR", &target_dir)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .output()
        .expect("running cargo to build the example workload");
    assert!(
        out.status.success(),
        "building the example workload failed (`rustup target add wasm32-wasip2`?):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    target_dir.join("wasm32-wasip2/release/macula_example_workload.wasm")
}

/// `macula start` nodes in `realm`, one per data dir: the first is the
/// others' bootstrap peer; each has joined the DHT when this returns.
pub struct Mesh {
    pub procs: Vec<Proc>,
    pub ids: Vec<String>,
    pub https: Vec<String>,
    pub listens: Vec<String>,
}

impl Mesh {
    pub fn start(realm: &str, dirs: &[tempfile::TempDir]) -> Mesh {
        let mut first = Proc::spawn(&start_args(realm, dirs[0].path(), &[]));
        let seed = first.field("listen");
        let mut procs = vec![first];
        for d in &dirs[1..] {
            let mut p = Proc::spawn(&start_args(realm, d.path(), &["--bootstrap", &seed]));
            p.wait_for(&["joined the DHT"]);
            procs.push(p);
        }
        let ids = procs.iter_mut().map(|p| p.field("node_id")).collect();
        let https = procs.iter_mut().map(|p| p.field("http")).collect();
        let listens = procs.iter_mut().map(|p| p.field("listen")).collect();
        Mesh {
            procs,
            ids,
            https,
            listens,
        }
    }
}
