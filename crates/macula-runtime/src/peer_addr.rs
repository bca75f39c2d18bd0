//! Peer addresses as users write them: on the command line (`--bootstrap`),
//! in `MACULA_BOOTSTRAP_PEERS`, in a config file or in `Node::builder()`.
//!
//! Accepted forms, optionally prefixed by `quic://`:
//!
//! | form                       | example                                   |
//! | -------------------------- | ----------------------------------------- |
//! | `HOST:PORT`                | `192.0.2.7:4433`, `seed.example.org:4433` |
//! | `[IPV6]:PORT`              | `[::1]:4433`                              |
//! | `NODEID@HOST:PORT`         | `ab…7q@192.0.2.7:4433`                    |
//! | `quic://NODEID@HOST:PORT`  | `quic://ab…7q@[2001:db8::1]:4433`         |
//!
//! `NODEID` is the 52-character base32 text form of [`NodeId`]; when present,
//! the dialer must reject a peer that proves any other identity.
//!
//! This module only parses and formats. It must not do I/O: no DNS lookups,
//! no sockets, no clock. Resolving `host` is the dialer's job.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use macula_wire::{NodeId, ParseNodeIdError};

/// The only URL scheme accepted in front of a peer address.
pub const SCHEME: &str = "quic";

/// The forms accepted, quoted in every error message.
const EXPECTED: &str = "expected HOST:PORT, [IPV6]:PORT, NODEID@HOST:PORT, \
                        optionally prefixed by quic://";

/// Longest host name accepted (a DNS name's limit).
const MAX_HOST_LEN: usize = 253;
/// Longest label of a host name (a DNS label's limit).
const MAX_LABEL_LEN: usize = 63;

/// A peer to dial: where it is and, optionally, who it must prove to be.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerAddr {
    /// A DNS name, an IPv4 address, or an IPv6 address *without* brackets.
    pub host: String,
    /// The UDP port (never 0).
    pub port: u16,
    /// The node ID the peer must prove in the TLS handshake, if the user gave one.
    pub expected: Option<NodeId>,
}

impl PeerAddr {
    /// A peer address with no expected node ID.
    pub fn new(host: impl Into<String>, port: u16) -> Self {
        PeerAddr {
            host: host.into(),
            port,
            expected: None,
        }
    }

    /// The same address, requiring the peer to prove `id`.
    #[must_use]
    pub fn with_expected(mut self, id: NodeId) -> Self {
        self.expected = Some(id);
        self
    }

    /// `HOST:PORT` (IPv6 hosts bracketed), ready for a resolver such as
    /// `tokio::net::lookup_host`. Leaves out the node ID.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// The socket address when `host` is an IP literal; `None` for a DNS name
    /// (which must be resolved by the caller).
    pub fn socket_addr(&self) -> Option<SocketAddr> {
        self.host
            .parse::<IpAddr>()
            .ok()
            .map(|ip| SocketAddr::new(ip, self.port))
    }
}

impl From<SocketAddr> for PeerAddr {
    fn from(addr: SocketAddr) -> Self {
        PeerAddr::new(addr.ip().to_string(), addr.port())
    }
}

/// Why a string is not a peer address. Every message says what is wrong and
/// shows the accepted form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PeerAddrError {
    /// Nothing (or only whitespace) was given.
    #[error("empty peer address: {EXPECTED}")]
    Empty,
    /// A scheme other than `quic://`.
    #[error("unsupported scheme \"{0}://\": only quic:// is supported ({EXPECTED})")]
    UnsupportedScheme(String),
    /// No `:PORT` after the host.
    #[error("missing port in \"{0}\": {EXPECTED}, e.g. 192.0.2.7:4433")]
    MissingPort(String),
    /// The port is not a number from 1 to 65535.
    #[error("invalid port \"{0}\": expected a number from 1 to 65535, as in HOST:4433")]
    InvalidPort(String),
    /// The host part is empty or has characters a host name cannot have.
    #[error(
        "invalid host \"{host}\": {reason}; expected a DNS name, an IPv4 address \
         or a bracketed IPv6 address, as in [::1]:4433"
    )]
    InvalidHost {
        /// The host as given.
        host: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An IPv6 address without brackets (its colons make the port ambiguous).
    #[error("IPv6 address \"{0}\" must be in brackets: expected [IPV6]:PORT, e.g. [::1]:4433")]
    UnbracketedIpv6(String),
    /// Text in brackets that is not an IPv6 address.
    #[error("invalid IPv6 address \"[{0}]\": expected [IPV6]:PORT, e.g. [2001:db8::1]:4433")]
    InvalidIpv6(String),
    /// The part before `@` is not a node ID.
    #[error(
        "invalid node ID \"{id}\" before '@': {source}; expected NODEID@HOST:PORT \
         with NODEID as printed by `macula identity`"
    )]
    InvalidNodeId {
        /// The text before `@`.
        id: String,
        /// Why it is not a node ID.
        source: ParseNodeIdError,
    },
    /// More than one `@`.
    #[error("more than one '@' in \"{0}\": expected NODEID@HOST:PORT")]
    ExtraAt(String),
    /// An empty item in a comma-separated list (`a,,b`, a trailing comma).
    #[error(
        "empty item {0} in peer list: expected comma-separated addresses \
         such as 192.0.2.7:4433,quic://[::1]:4433"
    )]
    EmptyListItem(usize),
}

impl FromStr for PeerAddr {
    type Err = PeerAddrError;

    /// Parses one address; surrounding whitespace is ignored.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() {
            return Err(PeerAddrError::Empty);
        }
        let rest = match s.split_once("://") {
            Some((scheme, rest)) => {
                if !scheme.eq_ignore_ascii_case(SCHEME) {
                    return Err(PeerAddrError::UnsupportedScheme(scheme.to_string()));
                }
                rest
            }
            None => s,
        };
        let (expected, hostport) = match rest.split_once('@') {
            Some((id, hostport)) => {
                if hostport.contains('@') {
                    return Err(PeerAddrError::ExtraAt(s.to_string()));
                }
                let node_id =
                    id.parse::<NodeId>()
                        .map_err(|source| PeerAddrError::InvalidNodeId {
                            id: id.to_string(),
                            source,
                        })?;
                (Some(node_id), hostport)
            }
            None => (None, rest),
        };
        let (host, port) = split_host_port(hostport)?;
        Ok(PeerAddr {
            host,
            port: parse_port(port)?,
            expected,
        })
    }
}

/// Splits `HOST:PORT` / `[IPV6]:PORT` and validates the host.
fn split_host_port(s: &str) -> Result<(String, &str), PeerAddrError> {
    if let Some(inner) = s.strip_prefix('[') {
        let Some((ip, after)) = inner.split_once(']') else {
            return Err(PeerAddrError::InvalidIpv6(inner.to_string()));
        };
        if ip.parse::<Ipv6Addr>().is_err() {
            return Err(PeerAddrError::InvalidIpv6(ip.to_string()));
        }
        let Some(port) = after.strip_prefix(':') else {
            return Err(PeerAddrError::MissingPort(s.to_string()));
        };
        return Ok((ip.to_string(), port));
    }
    let Some((host, port)) = s.rsplit_once(':') else {
        if s.parse::<Ipv6Addr>().is_ok() {
            return Err(PeerAddrError::UnbracketedIpv6(s.to_string()));
        }
        return Err(PeerAddrError::MissingPort(s.to_string()));
    };
    if host.contains(':') {
        // `::1:4433` or `2001:db8::1`: an IPv6 literal without brackets.
        return Err(PeerAddrError::UnbracketedIpv6(s.to_string()));
    }
    validate_host(host)?;
    Ok((host.to_string(), port))
}

/// A DNS name or IPv4 literal: labels of ASCII letters, digits, `-` and `_`.
fn validate_host(host: &str) -> Result<(), PeerAddrError> {
    let bad = |reason| {
        Err(PeerAddrError::InvalidHost {
            host: host.to_string(),
            reason,
        })
    };
    if host.is_empty() {
        return bad("the host is empty");
    }
    if host.len() > MAX_HOST_LEN {
        return bad("a host name has at most 253 characters");
    }
    for label in host.split('.') {
        if label.is_empty() {
            return bad(
                "a host name cannot have an empty label (\"..\" or a leading/trailing dot)",
            );
        }
        if label.len() > MAX_LABEL_LEN {
            return bad("a host name label has at most 63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return bad("a host name has only letters, digits, '-', '_' and '.'");
        }
    }
    Ok(())
}

fn parse_port(port: &str) -> Result<u16, PeerAddrError> {
    // `u16::from_str` accepts a leading '+'; a port is digits only.
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return Err(PeerAddrError::InvalidPort(port.to_string()));
    }
    match port.parse::<u16>() {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(PeerAddrError::InvalidPort(port.to_string())),
    }
}

impl fmt::Display for PeerAddr {
    /// The canonical form, without scheme: `[NODEID@]HOST:PORT`, IPv6 bracketed.
    /// Parsing the output gives back an equal `PeerAddr`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(id) = &self.expected {
            write!(f, "{id}@")?;
        }
        f.write_str(&self.authority())
    }
}

/// Parses a comma-separated list such as `a:1, quic://b:2,NODEID@c:3`.
///
/// Whitespace around items is ignored. An empty item (`a,,b`, a trailing
/// comma) is an error; a string that is empty or only whitespace is the empty
/// list.
pub fn parse_list(s: &str) -> Result<Vec<PeerAddr>, PeerAddrError> {
    if s.trim().is_empty() {
        return Ok(Vec::new());
    }
    s.split(',')
        .enumerate()
        .map(|(i, item)| {
            if item.trim().is_empty() {
                Err(PeerAddrError::EmptyListItem(i + 1))
            } else {
                item.parse()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(n: u8) -> NodeId {
        NodeId::from_bytes([n; 32])
    }

    #[test]
    fn parses_every_form() {
        let nid = id(9);
        let cases: Vec<(String, PeerAddr)> = vec![
            ("127.0.0.1:4433".into(), PeerAddr::new("127.0.0.1", 4433)),
            (
                "quic://127.0.0.1:4433".into(),
                PeerAddr::new("127.0.0.1", 4433),
            ),
            (
                "QUIC://seed.example.org:1".into(),
                PeerAddr::new("seed.example.org", 1),
            ),
            ("[::1]:4433".into(), PeerAddr::new("::1", 4433)),
            (
                "quic://[2001:db8::1]:65535".into(),
                PeerAddr::new("2001:db8::1", 65535),
            ),
            (
                format!("{nid}@198.18.0.1:4433"),
                PeerAddr::new("198.18.0.1", 4433).with_expected(nid),
            ),
            (
                format!("quic://{nid}@[::1]:4433"),
                PeerAddr::new("::1", 4433).with_expected(nid),
            ),
            (
                format!("  {}@node-1.local:9 ", nid.to_string().to_uppercase()),
                PeerAddr::new("node-1.local", 9).with_expected(nid),
            ),
        ];
        for (text, want) in cases {
            assert_eq!(text.parse::<PeerAddr>(), Ok(want), "{text}");
        }
    }

    #[test]
    fn display_is_canonical() {
        let nid = id(1);
        let p: PeerAddr = format!("quic://{nid}@[::1]:4433").parse().unwrap();
        assert_eq!(p.to_string(), format!("{nid}@[::1]:4433"));
        assert_eq!(p.authority(), "[::1]:4433");
        assert_eq!(p.socket_addr(), Some("[::1]:4433".parse().unwrap()));
        let q: PeerAddr = "quic://example.org:80".parse().unwrap();
        assert_eq!(q.to_string(), "example.org:80");
        assert_eq!(q.socket_addr(), None);
        let sa: SocketAddr = "192.0.2.1:7".parse().unwrap();
        assert_eq!(PeerAddr::from(sa).socket_addr(), Some(sa));
    }

    #[test]
    fn rejects_with_a_helpful_message() {
        use PeerAddrError as E;
        let cases: &[(&str, E)] = &[
            ("", E::Empty),
            ("   ", E::Empty),
            ("tcp://a:1", E::UnsupportedScheme("tcp".into())),
            ("://a:1", E::UnsupportedScheme("".into())),
            ("localhost", E::MissingPort("localhost".into())),
            ("[::1]", E::MissingPort("[::1]".into())),
            ("a:", E::InvalidPort("".into())),
            ("a:0", E::InvalidPort("0".into())),
            ("a:65536", E::InvalidPort("65536".into())),
            ("a:+1", E::InvalidPort("+1".into())),
            ("quic://a:1/path", E::InvalidPort("1/path".into())),
            ("::1", E::UnbracketedIpv6("::1".into())),
            ("::1:4433", E::UnbracketedIpv6("::1:4433".into())),
            ("[zz]:1", E::InvalidIpv6("zz".into())),
            ("[::1:1", E::InvalidIpv6("::1:1".into())),
            ("a@b@c:1", E::ExtraAt("a@b@c:1".into())),
        ];
        for (text, want) in cases {
            let got = text.parse::<PeerAddr>().unwrap_err();
            assert_eq!(&got, want, "{text:?}");
            let msg = got.to_string();
            assert!(
                msg.contains("expected") || msg.contains("only quic://"),
                "{text:?}: message should show the expected form: {msg}"
            );
        }
        for host in [":1", "a..b:1", ".a:1", "a b:1", "a/b:1", "é:1"] {
            let err = host.parse::<PeerAddr>().unwrap_err();
            assert!(matches!(err, E::InvalidHost { .. }), "{host:?}: {err:?}");
        }
        let long = format!("{}:1", "a.".repeat(127) + "a");
        assert!(matches!(
            long.parse::<PeerAddr>(),
            Err(E::InvalidHost { .. })
        ));
        let err = "abc@h:1".parse::<PeerAddr>().unwrap_err();
        assert!(matches!(err, E::InvalidNodeId { ref id, .. } if id == "abc"));
        let msg = err.to_string();
        assert!(
            msg.contains("\"abc\"") && msg.contains("NODEID@HOST:PORT"),
            "{msg}"
        );
    }

    #[test]
    fn lists() {
        let nid = id(3);
        let got = parse_list(&format!(" a:1 ,quic://b:2,\t{nid}@[::1]:3 ")).unwrap();
        assert_eq!(
            got,
            vec![
                PeerAddr::new("a", 1),
                PeerAddr::new("b", 2),
                PeerAddr::new("::1", 3).with_expected(nid),
            ]
        );
        assert_eq!(parse_list(""), Ok(vec![]));
        assert_eq!(parse_list("  "), Ok(vec![]));
        assert_eq!(parse_list("a:1,,b:2"), Err(PeerAddrError::EmptyListItem(2)));
        assert_eq!(parse_list("a:1, "), Err(PeerAddrError::EmptyListItem(2)));
        assert_eq!(parse_list(",a:1"), Err(PeerAddrError::EmptyListItem(1)));
        assert_eq!(
            parse_list("a:1,b"),
            Err(PeerAddrError::MissingPort("b".into()))
        );
    }

    fn host_strategy() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<[u8; 4]>().prop_map(|o| std::net::Ipv4Addr::from(o).to_string()),
            any::<[u8; 16]>().prop_map(|o| Ipv6Addr::from(o).to_string()),
            "[a-zA-Z0-9_]([a-zA-Z0-9_-]{0,20}[a-zA-Z0-9_])?(\\.[a-z0-9]{1,12}){0,4}",
        ]
    }

    fn peer_strategy() -> impl Strategy<Value = PeerAddr> {
        (
            host_strategy(),
            1u16..,
            proptest::option::of(any::<[u8; 32]>()),
        )
            .prop_map(|(host, port, id)| PeerAddr {
                host,
                port,
                expected: id.map(NodeId::from_bytes),
            })
    }

    proptest! {
        #[test]
        fn display_round_trips(p in peer_strategy()) {
            let text = p.to_string();
            prop_assert_eq!(text.parse::<PeerAddr>(), Ok(p.clone()));
            prop_assert_eq!(format!("quic://{text}").parse::<PeerAddr>(), Ok(p.clone()));
            prop_assert_eq!(format!(" {text}\t").parse::<PeerAddr>(), Ok(p));
        }

        #[test]
        fn list_round_trips(ps in proptest::collection::vec(peer_strategy(), 1..6)) {
            let text = ps.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(" , ");
            prop_assert_eq!(parse_list(&text), Ok(ps));
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,120}") {
            let _ = s.parse::<PeerAddr>();
            let _ = parse_list(&s);
        }

        #[test]
        fn parse_never_panics_on_near_misses(
            s in "(quic://|[a-z]{0,5}://)?([a-z2-7]{0,60}@)?\\[?[0-9a-f:.\\[\\]@,]{0,50}(:[0-9+\\-]{0,7})?"
        ) {
            if let Ok(p) = s.parse::<PeerAddr>() {
                // Anything accepted must round-trip through its canonical form.
                prop_assert_eq!(p.to_string().parse::<PeerAddr>(), Ok(p));
            }
            let _ = parse_list(&s);
        }
    }
}
