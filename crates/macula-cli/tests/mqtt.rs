//! The MQTT bridge (issue 24) with clients nobody here wrote: Debian's
//! `mosquitto_pub`/`mosquitto_sub` and PyPI's `paho-mqtt`, against two real
//! `macula start` daemons on 127.0.0.1, beside native `macula pub`/`sub`.
//!
//! Without the tools these tests say so on stderr and return (skipped),
//! unless `MACULA_TEST_REQUIRE_MQTT=1` (set by `.ci/run`, which installs
//! them) makes that a failure.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const REALM: &str = "test.mqtt";
const REQUIRE_ENV: &str = "MACULA_TEST_REQUIRE_MQTT";

/// Why the MQTT client tools are missing, if they are.
fn missing() -> Option<String> {
    for (tool, pkg) in [
        ("mosquitto_pub", "mosquitto-clients"),
        ("mosquitto_sub", "mosquitto-clients"),
    ] {
        if Command::new(tool).arg("--help").output().is_err() {
            return Some(format!("{tool} not found (Debian package {pkg})"));
        }
    }
    let paho = Command::new("python3")
        .args(["-c", "import paho.mqtt.client"])
        .output();
    if !paho.is_ok_and(|o| o.status.success()) {
        return Some("python3 with paho-mqtt not found (pip install paho-mqtt)".into());
    }
    None
}

/// True when the test must return early: says why, loudly. Panics instead
/// under `MACULA_TEST_REQUIRE_MQTT=1`.
fn skip() -> bool {
    let Some(why) = missing() else {
        return false;
    };
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("test");
    if std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1") {
        panic!("{test}: MQTT clients missing: {why} ({REQUIRE_ENV}=1)");
    }
    eprintln!("SKIPPED {test}: MQTT client tools missing: {why}");
    true
}

struct Node {
    /// Killed on drop.
    _proc: Proc,
    quic: String,
    mqtt: String,
    http: String,
    _dir: tempfile::TempDir,
}

fn node(bootstrap: Option<&str>, extra: &[&str]) -> Node {
    let dir = tempfile::tempdir().unwrap();
    let mut args = vec!["--mqtt", "127.0.0.1:0"];
    if let Some(b) = bootstrap {
        args.extend_from_slice(&["--bootstrap", b]);
    }
    args.extend_from_slice(extra);
    let mut proc = Proc::spawn(&start_args(REALM, dir.path(), &args));
    let quic = proc.field("listen");
    let http = proc.field("http");
    let mqtt = proc.field("mqtt_addr");
    if bootstrap.is_some() {
        proc.wait_for(&["joined the DHT"]);
    }
    Node {
        _proc: proc,
        quic,
        mqtt,
        http,
        _dir: dir,
    }
}

fn two_nodes(extra: &[&str]) -> (Node, Node) {
    let a = node(None, extra);
    let b = node(Some(&a.quic.clone()), extra);
    (a, b)
}

fn host_port(addr: &str) -> (&str, &str) {
    addr.rsplit_once(':').expect("HOST:PORT")
}

/// `mosquitto_sub` in the background, printing `topic payload` lines.
fn mosquitto_sub(addr: &str, args: &[&str]) -> Proc {
    let (h, p) = host_port(addr);
    let mut cmd = Command::new("mosquitto_sub");
    cmd.args(["-h", h, "-p", p, "-v"]).args(args);
    prepare(&mut cmd);
    Proc::spawn_cmd(cmd)
}

fn mosquitto_pub(addr: &str, args: &[&str]) -> (Option<i32>, String) {
    let (h, p) = host_port(addr);
    let mut cmd = Command::new("mosquitto_pub");
    cmd.args(["-h", h, "-p", p]).args(args);
    prepare(&mut cmd);
    run(cmd)
}

/// Publishes with `publish` every 300 ms until `wait` sees a line with
/// every needle (the mesh learns of a new subscriber within its 1 s
/// interest bound), at most 20 s.
fn until_seen(waiter: &mut Proc, needles: &[&str], mut publish: impl FnMut()) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        publish();
        if let Some(l) = waiter.poll_for(needles, Duration::from_millis(300)) {
            return l;
        }
    }
    panic!(
        "no line with {needles:?}; output:\n{}",
        waiter.seen.join("\n")
    )
}

fn python(script: &str, args: &[&str]) -> Proc {
    let mut cmd = Command::new("python3");
    cmd.args(["-u", "-c", script]).args(args);
    prepare(&mut cmd);
    Proc::spawn_cmd(cmd)
}

/// The node's `/metrics` text (loopback clients need no token).
fn metrics(http: &str) -> String {
    let mut s = TcpStream::connect(http).expect("admin HTTP");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {http}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

fn metric(http: &str, line_start: &str) -> f64 {
    let text = metrics(http);
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no metric {line_start} in:\n{text}"))
}

#[test]
fn mosquitto_paho_and_native_clients_exchange_messages_across_two_nodes() {
    if skip() {
        return;
    }
    let (a, b) = two_nodes(&[]);

    // Native publisher through A -> mosquitto_sub on B, MQTT wildcard `+`.
    let mut sub = mosquitto_sub(&b.mqtt, &["-t", "sensor/+/temp", "-q", "1"]);
    until_seen(&mut sub, &["sensor/room1/temp 21.5"], || {
        let (code, out) = run(command(&[
            "pub",
            "sensor.room1.temp",
            "21.5",
            "--realm",
            REALM,
            "--connect",
            &a.quic,
        ]));
        assert_eq!(code, Some(0), "{out}");
    });

    // mosquitto_pub on A -> native subscriber on B, mesh wildcard `**`;
    // an MQTT level with a dot and a space arrives escaped.
    let mut native = Proc::spawn(&[
        "sub",
        "plant.**",
        "--json",
        "--realm",
        REALM,
        "--connect",
        &b.quic,
    ]);
    native.wait_for(&["subscribed to plant.**"]);
    let line = until_seen(
        &mut native,
        &["\"topic\":\"plant.line%201.v1%2E2\""],
        || {
            let (code, out) =
                mosquitto_pub(&a.mqtt, &["-t", "plant/line 1/v1.2", "-m", "ok", "-q", "1"]);
            assert_eq!(code, Some(0), "{out}");
        },
    );
    assert!(line.contains("\"payload\":\"ok\""), "{line}");

    // MQTT 5 (paho) publisher on B -> mosquitto_sub (MQTT 5) on A with `#`.
    let mut sub5 = mosquitto_sub(&a.mqtt, &["-t", "fleet/#", "-V", "mqttv5"]);
    let pub5 = r#"
import sys, time
import paho.mqtt.client as mqtt
host, port = sys.argv[1], int(sys.argv[2])
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="paho-pub", protocol=mqtt.MQTTv5)
c.connect(host, port)
c.loop_start()
for i in range(60):
    c.publish("fleet/truck7/gps", f"fix {i}", qos=1).wait_for_publish(5)
    time.sleep(0.3)
c.disconnect()
c.loop_stop()
"#;
    let (h, p) = host_port(&b.mqtt);
    let _paho = python(pub5, &[h, p]);
    sub5.wait_for(&["fleet/truck7/gps fix"]);

    // paho (3.1.1) subscriber on A <- native publisher through B.
    let sub311 = r#"
import sys
import paho.mqtt.client as mqtt
host, port = sys.argv[1], int(sys.argv[2])
def on_connect(c, u, f, rc, p=None):
    c.subscribe("alarm/#", qos=1)
def on_subscribe(c, u, mid, rc, p=None):
    print("subscribed", flush=True)
def on_message(c, u, m):
    print("got", m.topic, m.payload.decode(), m.qos, flush=True)
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="paho-sub", protocol=mqtt.MQTTv311)
c.on_connect, c.on_subscribe, c.on_message = on_connect, on_subscribe, on_message
c.connect(host, port)
c.loop_forever()
"#;
    let (h, p) = host_port(&a.mqtt);
    let mut paho_sub = python(sub311, &[h, p]);
    paho_sub.wait_for(&["subscribed"]);
    until_seen(&mut paho_sub, &["got alarm/fire/hall1 smoke 1"], || {
        let (code, out) = run(command(&[
            "pub",
            "alarm.fire.hall1",
            "smoke",
            "--realm",
            REALM,
            "--connect",
            &b.quic,
        ]));
        assert_eq!(code, Some(0), "{out}");
    });
    assert!(metric(&a.http, "macula_mqtt_connects_total") >= 2.0);
}

#[test]
fn retained_message_and_last_will() {
    if skip() {
        return;
    }
    let (a, b) = two_nodes(&[]);
    // Retained on A: a later subscriber on A gets it at once, flagged.
    let (code, out) = mosquitto_pub(
        &a.mqtt,
        &["-t", "status/dev1", "-m", "online", "-r", "-q", "1"],
    );
    assert_eq!(code, Some(0), "{out}");
    let mut sub = mosquitto_sub(
        &a.mqtt,
        &["-t", "status/#", "-C", "1", "-F", "%t %p retain=%r"],
    );
    sub.wait_for(&["status/dev1 online retain=1"]);

    // Last will: a paho client on A dies without DISCONNECT; its will
    // reaches a subscriber on B through the mesh.
    let mut wills = mosquitto_sub(&b.mqtt, &["-t", "lwt/#"]);
    // The subscriber's interest needs a moment to reach A: retry with new
    // dying clients until one will arrives.
    let dying = r#"
import sys, os, time
import paho.mqtt.client as mqtt
host, port = sys.argv[1], int(sys.argv[2])
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="dying-" + str(os.getpid()), protocol=mqtt.MQTTv311)
c.will_set("lwt/dev9", "gone", qos=1)
c.connect(host, port, keepalive=30)
c.loop_start()
time.sleep(0.3)
print("connected", flush=True)
os._exit(0)
"#;
    let (h, p) = host_port(&a.mqtt);
    until_seen(&mut wills, &["lwt/dev9 gone"], || {
        let mut d = python(dying, &[h, p]);
        d.wait_for(&["connected"]);
        let _ = d.wait_exit(Duration::from_secs(10));
    });
    assert!(metric(&a.http, "macula_mqtt_wills_total") >= 1.0);
    // A client that disconnects cleanly sends no will.
    let (code, out) = mosquitto_pub(
        &a.mqtt,
        &[
            "-t",
            "x/y",
            "-m",
            "1",
            "--will-topic",
            "lwt/clean",
            "--will-payload",
            "bad",
        ],
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(wills
        .poll_for(&["lwt/clean"], Duration::from_secs(2))
        .is_none());
}

/// A hand-made MQTT 3.1.1 client for what the tools cannot do on purpose:
/// not acknowledging, and sending bad packets.
struct Raw(TcpStream);

fn string(s: &str) -> Vec<u8> {
    let mut v = (s.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(s.as_bytes());
    v
}

fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![first];
    let mut n = body.len();
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        v.push(b);
        if n == 0 {
            break;
        }
    }
    v.extend_from_slice(body);
    v
}

impl Raw {
    fn connect(addr: &str, client_id: &str, clean: bool, level: u8) -> (Raw, Vec<u8>) {
        let s = TcpStream::connect(addr).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut r = Raw(s);
        let mut body = string("MQTT");
        body.push(level);
        body.push(if clean { 0x02 } else { 0x00 });
        body.extend_from_slice(&60u16.to_be_bytes());
        if level == 5 {
            body.push(0); // no properties
        }
        body.extend_from_slice(&string(client_id));
        r.send(&packet(0x10, &body));
        let connack = r.read_packet().expect("CONNACK");
        (r, connack)
    }

    fn send(&mut self, bytes: &[u8]) {
        self.0.write_all(bytes).unwrap();
    }

    /// One whole packet (first byte, then the body), or `None` at close.
    fn read_packet(&mut self) -> Option<Vec<u8>> {
        let mut first = [0u8; 1];
        self.0.read_exact(&mut first).ok()?;
        let (mut len, mut shift) = (0usize, 0);
        loop {
            let mut b = [0u8; 1];
            self.0.read_exact(&mut b).ok()?;
            len |= usize::from(b[0] & 0x7f) << shift;
            shift += 7;
            if b[0] & 0x80 == 0 {
                break;
            }
        }
        let mut body = vec![0u8; len];
        self.0.read_exact(&mut body).ok()?;
        let mut v = first.to_vec();
        v.extend(body);
        Some(v)
    }

    fn subscribe(&mut self, filter: &str, qos: u8) {
        let mut body = 1u16.to_be_bytes().to_vec();
        body.extend_from_slice(&string(filter));
        body.push(qos);
        self.send(&packet(0x82, &body));
        let suback = self.read_packet().expect("SUBACK");
        assert_eq!(suback[0], 0x90, "{suback:?}");
    }

    /// True when the server closed the connection (within 10 s).
    fn closed(&mut self) -> bool {
        let mut buf = [0u8; 256];
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            match self.0.read(&mut buf) {
                Ok(0) | Err(_) => return true,
                Ok(_) => {}
            }
        }
        false
    }
}

#[test]
fn qos1_message_is_redelivered_after_the_client_reconnects() {
    if skip() {
        return;
    }
    let (a, b) = two_nodes(&[]);
    // A persistent session on B takes a QoS 1 message and does not
    // acknowledge it, then drops the connection.
    let (mut raw, connack) = Raw::connect(&b.mqtt, "raw-redeliver", false, 4);
    assert_eq!(connack, vec![0x20, 0, 0], "CONNACK, no session yet");
    raw.subscribe("jobs/#", 1);
    raw.0
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let first = loop {
        assert!(
            Instant::now() < deadline,
            "no PUBLISH reached the raw client"
        );
        let (code, out) = mosquitto_pub(&a.mqtt, &["-t", "jobs/42", "-m", "build", "-q", "1"]);
        assert_eq!(code, Some(0), "{out}");
        if let Some(p) = raw.read_packet() {
            break p;
        }
    };
    assert_eq!(first[0] & 0xf6, 0x32, "PUBLISH QoS 1: {first:?}");
    assert_eq!(first[0] & 0x08, 0, "not DUP the first time");
    drop(raw);

    // paho, same client ID, clean_session off: the unacknowledged message
    // comes again (DUP), and so does anything queued meanwhile.
    let (code, out) = mosquitto_pub(&a.mqtt, &["-t", "jobs/43", "-m", "test", "-q", "1"]);
    assert_eq!(code, Some(0), "{out}");
    let resume = r#"
import sys, time
import paho.mqtt.client as mqtt
host, port = sys.argv[1], int(sys.argv[2])
def on_connect(c, u, f, rc, p=None):
    print("session_present", f.session_present, flush=True)
def on_message(c, u, m):
    print("got", m.topic, m.payload.decode(), "dup", m.dup, "qos", m.qos, flush=True)
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="raw-redeliver", clean_session=False, protocol=mqtt.MQTTv311)
c.on_connect, c.on_message = on_connect, on_message
c.connect(host, port)
c.loop_start()
time.sleep(15)
"#;
    let (h, p) = host_port(&b.mqtt);
    let mut paho = python(resume, &[h, p]);
    paho.wait_for(&["session_present True"]);
    paho.wait_for(&["got jobs/42 build dup True qos 1"]);
    paho.wait_for(&["got jobs/43 test"]);
    assert!(metric(&b.http, "macula_mqtt_redelivered_total") >= 1.0);
}

/// A persistent session survives a restart of its node (SIGTERM, and
/// kill -9 after the periodic save): its subscription keeps receiving
/// after the restart, the unacknowledged QoS 1 message comes again (DUP),
/// then what was queued while the client was away, and what was published
/// after the restart; paho sees the session present.
#[test]
fn persistent_session_survives_a_node_restart() {
    if skip() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let start = |dir: &std::path::Path| {
        let mut p = Proc::spawn(&start_args(REALM, dir, &["--mqtt", "127.0.0.1:0"]));
        let mqtt = p.field("mqtt_addr");
        let http = p.field("http");
        (p, mqtt, http)
    };
    let (mut n, mqtt, _) = start(dir.path());
    let (mut raw, connack) = Raw::connect(&mqtt, "restart-1", false, 4);
    assert_eq!(connack, vec![0x20, 0, 0], "CONNACK, no session yet");
    raw.subscribe("jobs/#", 1);
    raw.0
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let first = loop {
        assert!(Instant::now() < deadline, "no PUBLISH reached the client");
        let (code, out) = mosquitto_pub(&mqtt, &["-t", "jobs/1", "-m", "one", "-q", "1"]);
        assert_eq!(code, Some(0), "{out}");
        if let Some(p) = raw.read_packet() {
            break p;
        }
    };
    assert_eq!(first[0] & 0xf6, 0x32, "PUBLISH QoS 1: {first:?}");
    // Not acknowledged; the client goes away, and one more is queued.
    drop(raw);
    let (code, out) = mosquitto_pub(&mqtt, &["-t", "jobs/2", "-m", "two", "-q", "1"]);
    assert_eq!(code, Some(0), "{out}");
    // Late copies of jobs/1 from the retries above may queue too; wait
    // for the once-a-second save, then kill -9: the file must hold it.
    std::thread::sleep(Duration::from_millis(2500));
    drop(n);
    let (n2, mqtt, http) = start(dir.path());
    n = n2;
    assert_eq!(metric(&http, "macula_mqtt_sessions_restored_total"), 1.0);
    // Published after the restart, before the client is back: the restored
    // subscription takes it.
    let (code, out) = mosquitto_pub(&mqtt, &["-t", "jobs/3", "-m", "three", "-q", "1"]);
    assert_eq!(code, Some(0), "{out}");
    // SIGTERM (the shutdown save), and back once more.
    assert_eq!(n.terminate(), Some(0));
    let (_n3, mqtt, http) = start(dir.path());
    assert_eq!(metric(&http, "macula_mqtt_sessions_restored_total"), 1.0);
    let (code, out) = mosquitto_pub(&mqtt, &["-t", "jobs/4", "-m", "four", "-q", "1"]);
    assert_eq!(code, Some(0), "{out}");
    let resume = r#"
import sys, time
import paho.mqtt.client as mqtt
host, port = sys.argv[1], int(sys.argv[2])
def on_connect(c, u, f, rc, p=None):
    print("session_present", f.session_present, flush=True)
def on_message(c, u, m):
    print("got", m.topic, m.payload.decode(), "dup", m.dup, "qos", m.qos, flush=True)
c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="restart-1", clean_session=False, protocol=mqtt.MQTTv311)
c.on_connect, c.on_message = on_connect, on_message
c.connect(host, port)
c.loop_start()
time.sleep(15)
"#;
    let (h, p) = host_port(&mqtt);
    let mut paho = python(resume, &[h, p]);
    paho.wait_for(&["session_present True"]);
    paho.wait_for(&["got jobs/1 one dup True qos 1"]);
    paho.wait_for(&["got jobs/2 two dup"]);
    paho.wait_for(&["got jobs/3 three"]);
    paho.wait_for(&["got jobs/4 four"]);
}

#[test]
fn malformed_and_oversized_packets_close_only_that_client() {
    if skip() {
        return;
    }
    let n = node(None, &["--mqtt-max-packet-size", "1KiB"]);
    let mut healthy = mosquitto_sub(&n.mqtt, &["-t", "ok/#", "-V", "mqttv5"]);

    // Malformed: a PUBLISH whose remaining length never ends.
    let (mut bad, connack) = Raw::connect(&n.mqtt, "raw-bad", true, 4);
    assert_eq!(connack[0], 0x20);
    bad.send(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x7f]);
    assert!(bad.closed(), "malformed packet: connection not closed");

    // Oversized (MQTT 5): DISCONNECT 0x95 (packet too large), then closed.
    let (mut big, connack) = Raw::connect(&n.mqtt, "raw-big", true, 5);
    assert_eq!(connack[0], 0x20);
    let mut body = string("ok/big");
    body.push(0); // properties
    body.extend(vec![b'x'; 4096]);
    big.send(&packet(0x30, &body));
    let disconnect = big.read_packet().expect("DISCONNECT");
    assert_eq!(disconnect[0], 0xe0, "{disconnect:?}");
    assert_eq!(disconnect[1], 0x95, "packet too large: {disconnect:?}");
    assert!(big.closed());

    // The other client is unaffected.
    until_seen(&mut healthy, &["ok/fine still here"], || {
        let (code, out) = mosquitto_pub(&n.mqtt, &["-t", "ok/fine", "-m", "still here"]);
        assert_eq!(code, Some(0), "{out}");
    });
    assert_eq!(
        metric(
            &n.http,
            "macula_mqtt_disconnects_total{reason=\"packet_too_large\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &n.http,
            "macula_mqtt_disconnects_total{reason=\"malformed_packet\"}"
        ),
        1.0
    );
    assert!(metric(&n.http, "macula_mqtt_clients") >= 1.0);
}

#[test]
fn tls_listener_with_a_configured_certificate() {
    if skip() {
        return;
    }
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};
    let files = tempfile::tempdir().unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // Distinct names: a leaf named like its issuer looks self-signed.
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "macula test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    params
        .subject_alt_names
        .push(SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    let path = |n: &str| files.path().join(n).to_str().unwrap().to_string();
    std::fs::write(path("ca.pem"), ca.pem()).unwrap();
    std::fs::write(path("cert.pem"), cert.pem()).unwrap();
    std::fs::write(path("key.pem"), key.serialize_pem()).unwrap();
    let (cert_file, key_file, ca_file) = (path("cert.pem"), path("key.pem"), path("ca.pem"));
    let n = node(
        None,
        &[
            "--mqtt-tls",
            "on",
            "--mqtt-cert-file",
            &cert_file,
            "--mqtt-key-file",
            &key_file,
        ],
    );
    let mut sub = mosquitto_sub(&n.mqtt, &["--cafile", &ca_file, "-t", "secure/#"]);
    until_seen(&mut sub, &["secure/a sealed"], || {
        let (code, out) = mosquitto_pub(
            &n.mqtt,
            &["--cafile", &ca_file, "-t", "secure/a", "-m", "sealed"],
        );
        assert_eq!(code, Some(0), "{out}");
    });
    // A plain-TCP client gets nowhere.
    let (code, _) = mosquitto_pub(&n.mqtt, &["-t", "secure/a", "-m", "plain"]);
    assert_ne!(code, Some(0));
    assert!(sub
        .poll_for(&["plain"], Duration::from_millis(500))
        .is_none());
}

#[test]
fn bench_mqtt_runs_both_brokers_side_by_side() {
    if skip() {
        return;
    }
    let mosquitto = ["/usr/sbin/mosquitto", "mosquitto"]
        .into_iter()
        .find(|m| Command::new(m).arg("-h").output().is_ok());
    let Some(mosquitto) = mosquitto else {
        if std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1") {
            panic!("mosquitto (Debian package mosquitto) not found ({REQUIRE_ENV}=1)");
        }
        eprintln!("SKIPPED bench_mqtt_runs_both_brokers_side_by_side: mosquitto not found");
        return;
    };
    let mut cmd = command(&[
        "bench",
        "mqtt",
        "--count",
        "2000",
        "--rtt-count",
        "50",
        "--idle",
        "50",
        "--mosquitto",
        mosquitto,
        "--json",
    ]);
    cmd.env("RUST_LOG", "warn");
    let mut p = Proc::spawn_cmd(cmd);
    let line = p
        .poll_for(&["{\"benchmark\":\"mqtt\""], Duration::from_secs(240))
        .unwrap_or_else(|| panic!("no JSON figures; output:\n{}", p.seen.join("\n")));
    let status = p.wait_exit(Duration::from_secs(30)).expect("bench exits");
    assert!(status.success(), "{status:?}");
    let v: serde_json::Value = serde_json::from_str(&line).expect("one JSON object");
    let results = v["results"].as_array().expect("results");
    let brokers: Vec<&str> = results
        .iter()
        .filter_map(|r| r["broker"].as_str())
        .collect();
    assert_eq!(brokers, ["macula", "mosquitto"]);
    for r in results {
        assert_eq!(r["qos1_received"], 2000, "{r}");
        assert!(
            r["qos0_msgs_per_s"].as_f64().is_some_and(|x| x > 0.0),
            "{r}"
        );
        assert!(r["rtt"]["p50_us"].as_f64().is_some_and(|x| x > 0.0), "{r}");
        assert!(r["rss_after_bytes"].as_u64().is_some_and(|x| x > 0), "{r}");
    }
}
