//! Simulated NAT boxes (RFC 4787 behaviours) for the hole-punching pair
//! matrix ([`crate::punch`]): the same four kinds the namespace harness
//! builds with nftables (`macula-cli/tests/common/netns.rs`), plus a
//! symmetric NAT that hands ports out in order (which the harness cannot
//! build) and no NAT at all.
//!
//! A box has one public IP. An outbound packet from a LAN socket to a
//! destination takes the socket's mapping (endpoint-independent: one per
//! socket, keeping its port; symmetric: one per destination IP and port,
//! a random or the next port) and records the destination as sent to, at
//! that time. An inbound packet to a mapped port passes when the
//! filtering allows its source given what the mapping had sent to *by its
//! arrival time* (endpoint-independent: any; address-dependent: an IP it
//! sent to; address-and-port-dependent: an IP and port it sent to). A
//! packet that does not pass leaves no state (the harness's routers drop
//! it before conntrack confirms it). Replies to a packet that passed go
//! back through the same mapping, which is what a connection tracker does.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use macula_wire::rng::Rng;
use macula_wire::time::Millis;

/// A router's behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum NatKind {
    /// No NAT: the node has a public address.
    Public,
    /// Endpoint-independent mapping and filtering.
    FullCone,
    /// Endpoint-independent mapping, address-dependent filtering.
    RestrictedCone,
    /// Endpoint-independent mapping, address-and-port-dependent filtering
    /// (Linux masquerade's default).
    PortRestricted,
    /// Address-and-port-dependent mapping with random ports
    /// (`masquerade fully-random`), address-and-port-dependent filtering.
    Symmetric,
    /// As [`NatKind::Symmetric`], but ports handed out one after the other
    /// (a sequential allocator: port prediction's case).
    SymmetricSequential,
}

impl NatKind {
    /// Every kind, in the order the matrix prints them.
    pub const ALL: [NatKind; 6] = [
        NatKind::Public,
        NatKind::FullCone,
        NatKind::RestrictedCone,
        NatKind::PortRestricted,
        NatKind::Symmetric,
        NatKind::SymmetricSequential,
    ];

    /// Short name for tables.
    pub fn name(self) -> &'static str {
        match self {
            NatKind::Public => "public",
            NatKind::FullCone => "full cone",
            NatKind::RestrictedCone => "restricted cone",
            NatKind::PortRestricted => "port-restricted",
            NatKind::Symmetric => "symmetric",
            NatKind::SymmetricSequential => "symmetric (sequential)",
        }
    }

    fn symmetric(self) -> bool {
        matches!(self, NatKind::Symmetric | NatKind::SymmetricSequential)
    }
}

/// One mapping of a LAN socket.
#[derive(Debug, Clone)]
struct Mapping {
    internal: SocketAddr,
    /// The destination it was made for (symmetric mappings only).
    dest: Option<SocketAddr>,
    external: SocketAddr,
    created: Millis,
    /// Destinations sent to (or answered), and when first.
    sent_to: Vec<(SocketAddr, Millis)>,
}

/// A NAT router (or, for [`NatKind::Public`], none).
#[derive(Debug, Clone)]
pub struct NatBox {
    kind: NatKind,
    public_ip: IpAddr,
    mappings: Vec<Mapping>,
    next_port: u16,
}

/// Mappings one box holds at most (a bound on the model's state).
pub const MAX_MAPPINGS: usize = 4096;

impl NatBox {
    /// A box of `kind` at `public_ip`; a sequential allocator starts at a
    /// drawn port.
    pub fn new(kind: NatKind, public_ip: Ipv4Addr, rng: &mut Rng) -> NatBox {
        NatBox {
            kind,
            public_ip: IpAddr::V4(public_ip),
            mappings: Vec::new(),
            next_port: rng.range_inclusive(20_000, 40_000) as u16,
        }
    }

    /// Its behaviour.
    pub fn kind(&self) -> NatKind {
        self.kind
    }

    /// Its public IP.
    pub fn public_ip(&self) -> IpAddr {
        self.public_ip
    }

    /// Mappings made so far.
    pub fn mappings(&self) -> usize {
        self.mappings.len()
    }

    /// A packet from `internal` to `dest` leaves at `now`: the source
    /// address the destination sees. `None` when the box holds
    /// [`MAX_MAPPINGS`] and a new one is needed (the packet is dropped).
    pub fn outbound(
        &mut self,
        internal: SocketAddr,
        dest: SocketAddr,
        now: Millis,
        rng: &mut Rng,
    ) -> Option<SocketAddr> {
        if self.kind == NatKind::Public {
            return Some(internal);
        }
        let per_dest = self.kind.symmetric();
        let found = self
            .mappings
            .iter()
            .position(|m| m.internal == internal && (!per_dest || m.dest == Some(dest)));
        let i = match found {
            Some(i) => i,
            None => {
                if self.mappings.len() >= MAX_MAPPINGS {
                    return None;
                }
                let port = self.new_port(internal.port(), rng);
                self.mappings.push(Mapping {
                    internal,
                    dest: per_dest.then_some(dest),
                    external: SocketAddr::new(self.public_ip, port),
                    created: now,
                    sent_to: Vec::new(),
                });
                self.mappings.len() - 1
            }
        };
        let m = &mut self.mappings[i];
        if !m.sent_to.iter().any(|(d, _)| *d == dest) {
            m.sent_to.push((dest, now));
        }
        Some(m.external)
    }

    fn new_port(&mut self, preferred: u16, rng: &mut Rng) -> u16 {
        let taken = |p: u16, ms: &[Mapping]| ms.iter().any(|m| m.external.port() == p);
        match self.kind {
            NatKind::Symmetric => {
                // Bounded: the box holds at most MAX_MAPPINGS of 64k ports.
                loop {
                    let p = rng.range_inclusive(1_024, 65_535) as u16;
                    if !taken(p, &self.mappings) {
                        return p;
                    }
                }
            }
            NatKind::SymmetricSequential => {
                let p = self.next_port;
                self.next_port = self.next_port.wrapping_add(1).max(1_024);
                p
            }
            _ if !taken(preferred, &self.mappings) => preferred,
            _ => {
                let mut p = preferred;
                while taken(p, &self.mappings) {
                    p = p.wrapping_add(1).max(1_024);
                }
                p
            }
        }
    }

    /// A packet from `from` to this box's port `port` arrives at `now`:
    /// the LAN socket it is forwarded to, if the mapping exists by then
    /// and the filtering lets `from` through. A packet that passes opens
    /// the mapping to `from` (the reply path).
    pub fn inbound(&mut self, from: SocketAddr, port: u16, now: Millis) -> Option<SocketAddr> {
        if self.kind == NatKind::Public {
            return None;
        }
        let kind = self.kind;
        let m = self
            .mappings
            .iter_mut()
            .find(|m| m.external.port() == port && m.created <= now)?;
        let before = |t: &Millis| *t <= now;
        let passes = match kind {
            NatKind::FullCone => true,
            NatKind::RestrictedCone => m
                .sent_to
                .iter()
                .any(|(d, t)| d.ip() == from.ip() && before(t)),
            _ => m.sent_to.iter().any(|(d, t)| *d == from && before(t)),
        };
        if !passes {
            return None;
        }
        if !m.sent_to.iter().any(|(d, _)| *d == from) {
            m.sent_to.push((from, now));
        }
        Some(m.internal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn filtering_follows_the_kind() {
        let lan = a("198.19.0.2:4433");
        let peer = a("198.18.9.1:4433");
        let same_ip_other_port = a("198.18.9.1:5000");
        let stranger = a("198.18.9.2:4433");
        for (kind, want) in [
            (NatKind::FullCone, [true, true, true]),
            (NatKind::RestrictedCone, [true, true, false]),
            (NatKind::PortRestricted, [true, false, false]),
            (NatKind::Symmetric, [true, false, false]),
        ] {
            let mut rng = Rng::new(1);
            let mut b = NatBox::new(kind, Ipv4Addr::new(198, 18, 0, 1), &mut rng);
            let ext = b.outbound(lan, peer, Millis(10), &mut rng).unwrap();
            if kind != NatKind::Symmetric {
                assert_eq!(ext.port(), 4433, "{kind:?} keeps the port");
            }
            // Before the outbound packet, nothing passes.
            assert_eq!(b.inbound(peer, ext.port(), Millis(5)), None, "{kind:?}");
            let got: Vec<bool> = [peer, same_ip_other_port, stranger]
                .iter()
                .map(|f| b.inbound(*f, ext.port(), Millis(20)).is_some())
                .collect();
            assert_eq!(got, want, "{kind:?}");
        }
    }

    #[test]
    fn symmetric_mappings_differ_per_destination() {
        let lan = a("198.19.0.2:4433");
        let mut rng = Rng::new(2);
        let mut seq = NatBox::new(
            NatKind::SymmetricSequential,
            Ipv4Addr::new(198, 18, 0, 1),
            &mut rng,
        );
        let p: Vec<u16> = (1..=3)
            .map(|i| {
                let d = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(198, 18, 9, i)), 4433);
                seq.outbound(lan, d, Millis(0), &mut rng).unwrap().port()
            })
            .collect();
        assert_eq!(p[1], p[0] + 1);
        assert_eq!(p[2], p[0] + 2);
        let mut cone = NatBox::new(
            NatKind::PortRestricted,
            Ipv4Addr::new(198, 18, 0, 2),
            &mut rng,
        );
        let d1 = cone.outbound(lan, a("198.18.9.1:1"), Millis(0), &mut rng);
        let d2 = cone.outbound(lan, a("198.18.9.2:2"), Millis(0), &mut rng);
        assert_eq!(d1, d2);
        assert_eq!(cone.mappings(), 1);
    }
}
