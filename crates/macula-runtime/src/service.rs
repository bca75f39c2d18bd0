//! Services: what plugs into the connection driver.
//!
//! A service (the DHT, pub/sub, RPC, dial-back, the gateway, the relay, the
//! relay tunnel, and whatever comes next) declares what it serves: message
//! types on the control stream, message types that open a bidirectional
//! stream of their own, and kind bytes of unidirectional streams. The
//! connection driver (`driver.rs`) looks each arriving frame or stream up in
//! a [`Services`] table and hands it over; it knows no service by name, and
//! no service module is imported by the driver or by `peer.rs`. Adding a
//! service is one module implementing [`Service`] and one line in the list
//! given to [`Services::new`] (`node.rs` for a node, `client.rs` for a
//! lightweight client).
//!
//! **Invariant:** one owner per message type and per stream kind;
//! `Services::new` refuses a table where two services claim the same one
//! (a programming error, caught by every test that starts a node).
//!
//! **Invariant:** `on_message` never blocks: it runs on the connection's
//! driver task, between two reads of the control stream. Work that waits
//! (I/O, locks held across awaits) is spawned by the service itself.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use macula_wire::{ErrorCode, Message, MessageType};

use crate::framed::{FrameReader, FrameWriter};
use crate::peer::Peer;

/// A stream a service took over, running until the stream is done.
pub(crate) type ServiceFuture = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// What a service takes from a connection.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Serves {
    /// Message types that arrive on the control stream.
    pub messages: &'static [MessageType],
    /// Message types that, as the first frame of a bidirectional stream the
    /// peer opened, hand the whole stream to the service.
    pub streams: &'static [MessageType],
    /// First bytes of unidirectional streams the peer opens.
    pub uni_kinds: &'static [u8],
}

/// A service's answer to a control-stream message.
#[derive(Debug)]
pub(crate) enum Answer {
    /// Nothing to send now (any answer follows later, from the service).
    Done,
    /// Send this on the control stream now. A send failure closes the
    /// connection.
    Reply(Message),
    /// The message was refused: the driver counts it and reports an ERROR
    /// frame with `code` and `reason`; the connection stays up.
    Refuse { code: ErrorCode, reason: String },
}

/// Why a connection a service saw come up has ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PeerDown {
    /// A duplicate connection closed; the node is still connected through
    /// the surviving one.
    Superseded,
    /// The connection closed (idle, an error, evicted); the node may still
    /// be up and reachable by dialing it again.
    Closed,
    /// The node left the mesh (it closed with `Shutdown`): treat it as gone
    /// until it shows up again.
    Left,
    /// The node stopped answering (the QUIC idle timeout expired despite
    /// keep-alives): crashed, or cut off by the network. Treated as gone
    /// like `Left`, but the DHT keeps probing it (a partition heals).
    Silent,
}

/// One service of a node or client. See the module docs.
pub(crate) trait Service: Send + Sync + 'static {
    /// A short name, for logs.
    fn name(&self) -> &'static str;

    /// What this service takes.
    fn serves(&self) -> Serves;

    /// A control-stream message of a type in `serves().messages`. Never
    /// blocks.
    fn on_message(&self, peer: &Peer, msg: Message) -> Answer {
        let _ = peer;
        Answer::Refuse {
            code: ErrorCode::UnexpectedMessage,
            reason: format!("{} is not served here", msg.msg_type().name()),
        }
    }

    /// A bidirectional stream the peer opened whose first frame (`first`)
    /// is of a type in `serves().streams`. The returned future owns the
    /// stream until it is done.
    fn on_stream(
        &self,
        peer: Peer,
        first: Message,
        reader: FrameReader,
        writer: FrameWriter,
    ) -> ServiceFuture {
        let _ = (peer, first, reader, writer);
        Box::pin(async {})
    }

    /// A unidirectional stream the peer opened whose kind byte (already
    /// read) is in `serves().uni_kinds`. The returned future reads it until
    /// it ends.
    fn on_uni_stream(&self, peer: Peer, kind: u8, reader: FrameReader) -> ServiceFuture {
        let _ = (peer, kind, reader);
        Box::pin(async {})
    }

    /// A connection came up: handshaken, admitted to the pool (or, for a
    /// client, attached to its gateway).
    fn peer_up(&self, peer: &Peer) {
        let _ = peer;
    }

    /// A connection `peer_up` announced has ended; `why` says what that
    /// means for the node behind it.
    fn peer_down(&self, peer: &Peer, why: PeerDown) {
        let _ = (peer, why);
    }
}

/// The dispatch table: which service serves each message type and stream
/// kind. Cheap to clone (one `Arc`); every connection's driver holds one.
#[derive(Clone)]
pub(crate) struct Services(Arc<Table>);

/// Index + 1 into `list` per message type / stream kind byte (0: none), so a
/// lookup is one array read.
struct Table {
    list: Vec<Arc<dyn Service>>,
    messages: [u8; 256],
    streams: [u8; 256],
    uni_kinds: [u8; 256],
}

impl std::fmt::Debug for Services {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<_> = self.0.list.iter().map(|s| s.name()).collect();
        f.debug_tuple("Services").field(&names).finish()
    }
}

impl Services {
    /// A table of `list`, in order.
    ///
    /// # Panics
    /// When two services claim the same message type or stream kind, or
    /// more than 255 services are given: both are programming errors.
    pub(crate) fn new(list: Vec<Arc<dyn Service>>) -> Services {
        assert!(list.len() < 256, "at most 255 services");
        let mut t = Table {
            list,
            messages: [0; 256],
            streams: [0; 256],
            uni_kinds: [0; 256],
        };
        for (i, s) in t.list.iter().enumerate() {
            let serves = s.serves();
            let slot = i as u8 + 1;
            let claim = |table: &mut [u8; 256], key: u8, what: &str| {
                let held = table[usize::from(key)];
                assert!(
                    held == 0,
                    "{} and {} both claim {what} {key:#04x}",
                    t.list[usize::from(held - 1)].name(),
                    s.name(),
                );
                table[usize::from(key)] = slot;
            };
            for m in serves.messages {
                claim(&mut t.messages, *m as u8, "message type");
            }
            for m in serves.streams {
                claim(&mut t.streams, *m as u8, "stream opener");
            }
            for k in serves.uni_kinds {
                claim(&mut t.uni_kinds, *k, "stream kind");
            }
        }
        Services(Arc::new(t))
    }

    fn at(&self, slot: u8) -> Option<&dyn Service> {
        let i = usize::from(slot.checked_sub(1)?);
        self.0.list.get(i).map(|s| s.as_ref())
    }

    /// Who serves control-stream messages of type `t`.
    pub(crate) fn for_message(&self, t: u8) -> Option<&dyn Service> {
        self.at(self.0.messages[usize::from(t)])
    }

    /// Who takes a bidirectional stream opened with a message of type `t`.
    pub(crate) fn for_stream(&self, t: u8) -> Option<&dyn Service> {
        self.at(self.0.streams[usize::from(t)])
    }

    /// Who reads unidirectional streams of kind `kind`.
    pub(crate) fn for_uni(&self, kind: u8) -> Option<&dyn Service> {
        self.at(self.0.uni_kinds[usize::from(kind)])
    }

    /// Tells every service that `peer` came up.
    pub(crate) fn peer_up(&self, peer: &Peer) {
        for s in &self.0.list {
            s.peer_up(peer);
        }
    }

    /// Tells every service that `peer`'s connection ended.
    pub(crate) fn peer_down(&self, peer: &Peer, why: PeerDown) {
        for s in &self.0.list {
            s.peer_down(peer, why);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake(&'static str, Serves);

    impl Service for Fake {
        fn name(&self) -> &'static str {
            self.0
        }
        fn serves(&self) -> Serves {
            self.1
        }
    }

    fn fake(name: &'static str, serves: Serves) -> Arc<dyn Service> {
        Arc::new(Fake(name, serves))
    }

    #[test]
    fn each_type_and_kind_finds_its_service() {
        let t = Services::new(vec![
            fake(
                "a",
                Serves {
                    messages: &[MessageType::RpcCall, MessageType::RpcReply],
                    ..Serves::default()
                },
            ),
            fake(
                "b",
                Serves {
                    messages: &[MessageType::DhtPing],
                    streams: &[MessageType::RelayConnect],
                    uni_kinds: &[0x01],
                },
            ),
        ]);
        let name = |s: Option<&dyn Service>| s.map(|s| s.name());
        assert_eq!(name(t.for_message(MessageType::RpcCall as u8)), Some("a"));
        assert_eq!(name(t.for_message(MessageType::RpcReply as u8)), Some("a"));
        assert_eq!(name(t.for_message(MessageType::DhtPing as u8)), Some("b"));
        assert_eq!(name(t.for_message(MessageType::Publish as u8)), None);
        assert_eq!(
            name(t.for_stream(MessageType::RelayConnect as u8)),
            Some("b")
        );
        assert_eq!(name(t.for_stream(MessageType::RpcCall as u8)), None);
        assert_eq!(name(t.for_uni(0x01)), Some("b"));
        assert_eq!(name(t.for_uni(0x02)), None);
        assert_eq!(name(t.for_uni(0x00)), None);
        assert_eq!(name(t.for_message(0xff)), None);
    }

    #[test]
    #[should_panic(expected = "a and b both claim message type 0x50")]
    fn two_owners_of_one_type_are_refused() {
        let rpc = Serves {
            messages: &[MessageType::RpcCall],
            ..Serves::default()
        };
        Services::new(vec![fake("a", rpc), fake("b", rpc)]);
    }

    #[test]
    #[should_panic(expected = "both claim stream kind 0x01")]
    fn two_owners_of_one_stream_kind_are_refused() {
        let data = Serves {
            uni_kinds: &[0x01],
            ..Serves::default()
        };
        Services::new(vec![fake("a", data), fake("b", data)]);
    }
}
