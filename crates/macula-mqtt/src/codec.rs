//! Packets on the wire: `rmqtt-codec` (3.1, 3.1.1 and 5.0, version
//! negotiated from the CONNECT) decodes and encodes; this module only
//! translates its packets to and from the core's version-neutral ones.
//! No hand-written packet parsing.

use std::num::{NonZeroU16, NonZeroU32};

use bytes::BytesMut;
use bytestring::ByteString;
use rmqtt_codec::types::QoS;
use rmqtt_codec::{v3, v5, version::ProtocolVersion, MqttCodec, MqttPacket};
use tokio_util::codec::{Decoder, Encoder};

use crate::broker::{AckCode, Connect, Out, Publish, Reason, Refusal, SubCode, Version, Will};

pub use rmqtt_codec::error::{DecodeError, EncodeError};

/// A packet from a client, version-neutral.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum In {
    Connect(Connect),
    Publish(Publish),
    PubAck(u16),
    PubRec(u16),
    PubRel(u16),
    PubComp(u16),
    Subscribe {
        id: u16,
        filters: Vec<(String, u8)>,
    },
    Unsubscribe {
        id: u16,
        filters: Vec<String>,
    },
    PingReq,
    /// `with_will`: 5.0 reason 0x04 (send the will anyway).
    Disconnect {
        with_will: bool,
    },
    /// A packet only a server sends, or AUTH (not supported): a protocol
    /// error.
    Unexpected(&'static str),
}

/// Why decoding failed, mapped to how the connection ends.
pub fn decode_reason(e: &DecodeError) -> Reason {
    match e {
        DecodeError::MaxSizeExceeded { .. } => Reason::PacketTooLarge,
        DecodeError::InvalidProtocol
        | DecodeError::UnsupportedProtocolLevel
        | DecodeError::ConnectReservedFlagSet
        | DecodeError::InvalidConnectFlags
        | DecodeError::ConnAckReservedFlagSet
        | DecodeError::PacketIdRequired
        | DecodeError::UnsupportedPacketType => Reason::Protocol,
        _ => Reason::Malformed,
    }
}

/// What the server announces to 5.0 clients in CONNACK.
#[derive(Debug, Clone, Copy)]
pub struct ServerInfo {
    pub receive_max: u16,
    pub max_packet_size: u32,
}

/// One connection's codec: negotiates the version from the CONNECT.
pub struct Codec {
    inner: MqttCodec,
    max_packet_size: u32,
    info: ServerInfo,
}

impl std::fmt::Debug for Codec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Codec")
            .field("version", &self.version())
            .finish()
    }
}

fn qos(q: QoS) -> u8 {
    q.value()
}

fn to_qos(q: u8) -> QoS {
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

fn pid(id: u16) -> NonZeroU16 {
    NonZeroU16::new(id).unwrap_or(NonZeroU16::MIN)
}

impl Codec {
    /// A codec refusing packets whose remaining length is over
    /// `max_packet_size` (`DecodeError::MaxSizeExceeded`).
    pub fn new(info: ServerInfo) -> Codec {
        Codec {
            inner: MqttCodec::Version(rmqtt_codec::version::VersionCodec),
            max_packet_size: info.max_packet_size,
            info,
        }
    }

    /// The codec of a connection whose CONNECT was seen (`version`), as
    /// it is between packets: for a connection whose reading resumes after
    /// it was parked (its decoder held no partial packet then).
    pub fn connected(info: ServerInfo, version: Version, client_max: u32) -> Codec {
        let mut c = Codec::new(info);
        c.inner = match version {
            Version::V3 => MqttCodec::V3(v3::Codec::new(info.max_packet_size)),
            Version::V5 => MqttCodec::V5(v5::Codec::new(info.max_packet_size, 0)),
        };
        if client_max != u32::MAX {
            c.set_client_max(client_max);
        }
        c
    }

    /// The version, once the CONNECT was seen.
    pub fn version(&self) -> Option<Version> {
        match self.inner {
            MqttCodec::V3(_) => Some(Version::V3),
            MqttCodec::V5(_) => Some(Version::V5),
            MqttCodec::Version(_) => None,
        }
    }

    /// Limits what is sent to a 5.0 client to the maximum packet size it
    /// announced.
    pub fn set_client_max(&mut self, max: u32) {
        if let MqttCodec::V5(c) = &mut self.inner {
            c.set_max_outbound_size(max);
        }
    }

    /// The next whole packet in `buf`, if there is one.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<In>, DecodeError> {
        loop {
            let Some((packet, _)) = self.inner.decode(buf)? else {
                return Ok(None);
            };
            match packet {
                MqttPacket::Version(ProtocolVersion::MQTT3) => {
                    self.inner = MqttCodec::V3(v3::Codec::new(self.max_packet_size));
                }
                MqttPacket::Version(ProtocolVersion::MQTT5) => {
                    self.inner = MqttCodec::V5(v5::Codec::new(self.max_packet_size, 0));
                }
                MqttPacket::V3(p) => return Ok(Some(from_v3(p))),
                MqttPacket::V5(p) => return Ok(Some(from_v5(p))),
            }
        }
    }

    /// Appends `out` to `buf`. 3.1.1 has no DISCONNECT from the server:
    /// nothing is written for it.
    pub fn encode(&mut self, out: Out, buf: &mut BytesMut) -> Result<(), EncodeError> {
        let info = self.info;
        match &mut self.inner {
            MqttCodec::V3(c) => match to_v3(out) {
                Some(p) => c.encode(p, buf),
                None => Ok(()),
            },
            MqttCodec::V5(c) => c.encode(to_v5(out, info), buf),
            MqttCodec::Version(_) => Err(EncodeError::UnsupportedVersion),
        }
    }

    /// Appends the CONNACK refusing a CONNECT.
    pub fn encode_refusal(&mut self, r: Refusal, buf: &mut BytesMut) -> Result<(), EncodeError> {
        match &mut self.inner {
            MqttCodec::V3(c) => c.encode(
                v3::Packet::ConnectAck(v3::ConnectAck {
                    session_present: false,
                    return_code: match r {
                        Refusal::ClientIdRejected => v3::ConnectAckReason::IdentifierRejected,
                        Refusal::BadCredentials => v3::ConnectAckReason::BadUserNameOrPassword,
                        Refusal::NotAuthorized => v3::ConnectAckReason::NotAuthorized,
                        Refusal::ServerBusy | Refusal::RateLimited => {
                            v3::ConnectAckReason::ServiceUnavailable
                        }
                    },
                }),
                buf,
            ),
            MqttCodec::V5(c) => c.encode(
                v5::Packet::ConnectAck(Box::new(v5::ConnectAck {
                    reason_code: match r {
                        Refusal::ClientIdRejected => v5::ConnectAckReason::ClientIdentifierNotValid,
                        Refusal::BadCredentials => v5::ConnectAckReason::BadUserNameOrPassword,
                        Refusal::NotAuthorized => v5::ConnectAckReason::NotAuthorized,
                        Refusal::ServerBusy => v5::ConnectAckReason::ServerBusy,
                        Refusal::RateLimited => v5::ConnectAckReason::ConnectionRateExceeded,
                    },
                    ..Default::default()
                })),
                buf,
            ),
            MqttCodec::Version(_) => Err(EncodeError::UnsupportedVersion),
        }
    }
}

fn from_v3(p: v3::Packet) -> In {
    match p {
        v3::Packet::Connect(c) => {
            let c = *c;
            In::Connect(Connect {
                client_id: c.client_id.to_string(),
                clean_start: c.clean_session,
                keep_alive: c.keep_alive,
                session_expiry: None,
                receive_max: None,
                max_packet_size: None,
                will: c.last_will.map(|w| Will {
                    topic: w.topic.to_string(),
                    payload: w.message,
                    qos: qos(w.qos),
                    retain: w.retain,
                }),
                username: c.username.map(|u| u.to_string()),
                password: c.password,
            })
        }
        v3::Packet::Publish(p) => In::Publish(Publish {
            topic: p.topic.to_string(),
            payload: p.payload,
            qos: qos(p.qos),
            retain: p.retain,
            dup: p.dup,
            packet_id: p.packet_id.map(|i| i.get()),
        }),
        v3::Packet::PublishAck { packet_id } => In::PubAck(packet_id.get()),
        v3::Packet::PublishReceived { packet_id } => In::PubRec(packet_id.get()),
        v3::Packet::PublishRelease { packet_id } => In::PubRel(packet_id.get()),
        v3::Packet::PublishComplete { packet_id } => In::PubComp(packet_id.get()),
        v3::Packet::Subscribe {
            packet_id,
            topic_filters,
        } => In::Subscribe {
            id: packet_id.get(),
            filters: topic_filters
                .into_iter()
                .map(|(f, q)| (f.to_string(), qos(q)))
                .collect(),
        },
        v3::Packet::Unsubscribe {
            packet_id,
            topic_filters,
        } => In::Unsubscribe {
            id: packet_id.get(),
            filters: topic_filters.into_iter().map(|f| f.to_string()).collect(),
        },
        v3::Packet::PingRequest => In::PingReq,
        v3::Packet::Disconnect => In::Disconnect { with_will: false },
        v3::Packet::ConnectAck(_)
        | v3::Packet::SubscribeAck { .. }
        | v3::Packet::UnsubscribeAck { .. }
        | v3::Packet::PingResponse => In::Unexpected("a server's packet"),
    }
}

fn from_v5(p: v5::Packet) -> In {
    match p {
        v5::Packet::Connect(c) => {
            let c = *c;
            In::Connect(Connect {
                client_id: c.client_id.to_string(),
                clean_start: c.clean_start,
                keep_alive: c.keep_alive,
                session_expiry: Some(c.session_expiry_interval_secs),
                receive_max: c.receive_max.map(|r| r.get()),
                max_packet_size: c.max_packet_size.map(NonZeroU32::get),
                will: c.last_will.map(|w| Will {
                    topic: w.topic.to_string(),
                    payload: w.message,
                    qos: qos(w.qos),
                    retain: w.retain,
                }),
                username: c.username.map(|u| u.to_string()),
                password: c.password,
            })
        }
        v5::Packet::Publish(p) => {
            if p.properties
                .as_ref()
                .is_some_and(|x| x.topic_alias.is_some())
            {
                // The CONNACK announced no topic aliases.
                return In::Unexpected("a topic alias");
            }
            In::Publish(Publish {
                topic: p.topic.to_string(),
                payload: p.payload,
                qos: qos(p.qos),
                retain: p.retain,
                dup: p.dup,
                packet_id: p.packet_id.map(|i| i.get()),
            })
        }
        v5::Packet::PublishAck(a) => In::PubAck(a.packet_id.get()),
        v5::Packet::PublishReceived(a) => In::PubRec(a.packet_id.get()),
        v5::Packet::PublishRelease(a) => In::PubRel(a.packet_id.get()),
        v5::Packet::PublishComplete(a) => In::PubComp(a.packet_id.get()),
        v5::Packet::Subscribe(s) => In::Subscribe {
            id: s.packet_id.get(),
            filters: s
                .topic_filters
                .into_iter()
                .map(|(f, o)| (f.to_string(), qos(o.qos)))
                .collect(),
        },
        v5::Packet::Unsubscribe(u) => In::Unsubscribe {
            id: u.packet_id.get(),
            filters: u.topic_filters.into_iter().map(|f| f.to_string()).collect(),
        },
        v5::Packet::PingRequest => In::PingReq,
        v5::Packet::Disconnect(d) => In::Disconnect {
            with_will: d.reason_code == v5::DisconnectReasonCode::DisconnectWithWillMessage,
        },
        v5::Packet::Auth(_) => In::Unexpected("AUTH (enhanced authentication is not supported)"),
        v5::Packet::ConnectAck(_)
        | v5::Packet::SubscribeAck(_)
        | v5::Packet::UnsubscribeAck(_)
        | v5::Packet::PingResponse => In::Unexpected("a server's packet"),
    }
}

fn to_v3(out: Out) -> Option<v3::Packet> {
    Some(match out {
        Out::ConnAck {
            session_present, ..
        } => v3::Packet::ConnectAck(v3::ConnectAck {
            session_present,
            return_code: v3::ConnectAckReason::ConnectionAccepted,
        }),
        Out::Publish {
            msg,
            packet_id,
            dup,
        } => v3::Packet::Publish(Box::new(rmqtt_codec::types::Publish {
            dup,
            retain: msg.retain,
            qos: to_qos(msg.qos),
            topic: ByteString::from(msg.topic),
            packet_id: packet_id.map(pid),
            payload: msg.payload,
            properties: None,
        })),
        Out::PubAck { id, .. } => v3::Packet::PublishAck { packet_id: pid(id) },
        Out::PubRec { id, .. } => v3::Packet::PublishReceived { packet_id: pid(id) },
        Out::PubComp { id, .. } => v3::Packet::PublishComplete { packet_id: pid(id) },
        Out::SubAck { id, codes } => v3::Packet::SubscribeAck {
            packet_id: pid(id),
            status: codes
                .into_iter()
                .map(|c| match c {
                    SubCode::Granted(q) => v3::SubscribeReturnCode::Success(to_qos(q)),
                    _ => v3::SubscribeReturnCode::Failure,
                })
                .collect(),
        },
        Out::UnsubAck { id, .. } => v3::Packet::UnsubscribeAck { packet_id: pid(id) },
        Out::PingResp => v3::Packet::PingResponse,
        Out::Disconnect(_) => return None,
    })
}

fn ack_reason(code: AckCode) -> v5::PublishAckReason {
    match code {
        AckCode::Success => v5::PublishAckReason::Success,
        AckCode::NotAuthorized => v5::PublishAckReason::NotAuthorized,
        AckCode::TopicInvalid => v5::PublishAckReason::TopicNameInvalid,
        AckCode::Unspecified => v5::PublishAckReason::UnspecifiedError,
    }
}

fn disconnect_reason(r: Reason) -> v5::DisconnectReasonCode {
    use v5::DisconnectReasonCode as D;
    match r {
        Reason::Normal | Reason::Gone => D::NormalDisconnection,
        Reason::KeepAlive => D::KeepAliveTimeout,
        Reason::Malformed => D::MalformedPacket,
        Reason::PacketTooLarge => D::PacketTooLarge,
        Reason::Protocol => D::ProtocolError,
        Reason::TakenOver => D::SessionTakenOver,
        Reason::ReceiveMaxExceeded => D::ReceiveMaximumExceeded,
        Reason::NotAuthorized => D::NotAuthorized,
        Reason::TopicInvalid => D::TopicNameInvalid,
        Reason::ShuttingDown => D::ServerShuttingDown,
    }
}

fn to_v5(out: Out, info: ServerInfo) -> v5::Packet {
    match out {
        Out::ConnAck {
            session_present,
            assigned_client_id,
        } => v5::Packet::ConnectAck(Box::new(v5::ConnectAck {
            session_present,
            assigned_client_id: assigned_client_id.map(ByteString::from),
            receive_max: NonZeroU16::new(info.receive_max).unwrap_or(NonZeroU16::MIN),
            max_packet_size: Some(info.max_packet_size),
            topic_alias_max: 0,
            retain_available: true,
            wildcard_subscription_available: true,
            subscription_identifiers_available: false,
            shared_subscription_available: false,
            ..Default::default()
        })),
        Out::Publish {
            msg,
            packet_id,
            dup,
        } => v5::Packet::Publish(Box::new(rmqtt_codec::types::Publish {
            dup,
            retain: msg.retain,
            qos: to_qos(msg.qos),
            topic: ByteString::from(msg.topic),
            packet_id: packet_id.map(pid),
            payload: msg.payload,
            properties: Some(v5::PublishProperties::default()),
        })),
        Out::PubAck { id, code } => v5::Packet::PublishAck(v5::PublishAck {
            packet_id: pid(id),
            reason_code: ack_reason(code),
            ..Default::default()
        }),
        Out::PubRec { id, code } => v5::Packet::PublishReceived(v5::PublishAck {
            packet_id: pid(id),
            reason_code: ack_reason(code),
            ..Default::default()
        }),
        Out::PubComp { id, found } => v5::Packet::PublishComplete(v5::PublishAck2 {
            packet_id: pid(id),
            reason_code: if found {
                v5::PublishAck2Reason::Success
            } else {
                v5::PublishAck2Reason::PacketIdNotFound
            },
            ..Default::default()
        }),
        Out::SubAck { id, codes } => v5::Packet::SubscribeAck(v5::SubscribeAck {
            packet_id: pid(id),
            properties: Vec::new(),
            reason_string: None,
            status: codes
                .into_iter()
                .map(|c| match c {
                    SubCode::Granted(0) => v5::SubscribeAckReason::GrantedQos0,
                    SubCode::Granted(1) => v5::SubscribeAckReason::GrantedQos1,
                    SubCode::Granted(_) => v5::SubscribeAckReason::GrantedQos2,
                    SubCode::NotAuthorized => v5::SubscribeAckReason::NotAuthorized,
                    SubCode::FilterInvalid => v5::SubscribeAckReason::TopicFilterInvalid,
                    SubCode::Quota => v5::SubscribeAckReason::QuotaExceeded,
                    SubCode::Failed => v5::SubscribeAckReason::UnspecifiedError,
                })
                .collect(),
        }),
        Out::UnsubAck { id, found } => v5::Packet::UnsubscribeAck(v5::UnsubscribeAck {
            packet_id: pid(id),
            properties: Vec::new(),
            reason_string: None,
            status: found
                .into_iter()
                .map(|f| {
                    if f {
                        v5::UnsubscribeAckReason::Success
                    } else {
                        v5::UnsubscribeAckReason::NoSubscriptionExisted
                    }
                })
                .collect(),
        }),
        Out::PingResp => v5::Packet::PingResponse,
        Out::Disconnect(r) => v5::Packet::Disconnect(v5::Disconnect {
            reason_code: disconnect_reason(r),
            ..Default::default()
        }),
    }
}

/// Decodes `data` as a client's byte stream until it ends or fails (the
/// fuzz target: must never panic).
pub fn fuzz_stream(data: &[u8]) {
    let mut codec = Codec::new(ServerInfo {
        receive_max: 32,
        max_packet_size: 64 * 1024,
    });
    let mut buf = BytesMut::from(data);
    let mut out = BytesMut::new();
    while let Ok(Some(p)) = codec.decode(&mut buf) {
        if let In::Publish(p) = p {
            let _ = crate::topic::mqtt_to_mesh(&p.topic);
            let _ = codec.encode(
                Out::Publish {
                    msg: crate::broker::Msg {
                        topic: p.topic,
                        payload: p.payload,
                        qos: p.qos.min(1),
                        retain: p.retain,
                    },
                    packet_id: p.packet_id,
                    dup: false,
                },
                &mut out,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CONNECT_311: &[u8] = b"\x10\x10\x00\x04MQTT\x04\x02\x00\x3c\x00\x04abcd";
    const CONNECT_5: &[u8] = b"\x10\x11\x00\x04MQTT\x05\x02\x00\x3c\x00\x00\x04abcd";

    fn codec() -> Codec {
        Codec::new(ServerInfo {
            receive_max: 8,
            max_packet_size: 1024,
        })
    }

    #[test]
    fn negotiates_both_versions_and_round_trips_publish() {
        for (bytes, version) in [(CONNECT_311, Version::V3), (CONNECT_5, Version::V5)] {
            let mut c = codec();
            let mut buf = BytesMut::from(bytes);
            match c.decode(&mut buf).unwrap() {
                Some(In::Connect(k)) => assert_eq!(k.client_id, "abcd"),
                other => panic!("{other:?}"),
            }
            assert_eq!(c.version(), Some(version));
            let mut out = BytesMut::new();
            let msg = crate::broker::Msg {
                topic: "a/b".into(),
                payload: bytes::Bytes::from_static(b"hi"),
                qos: 1,
                retain: false,
            };
            c.encode(
                Out::Publish {
                    msg,
                    packet_id: Some(7),
                    dup: false,
                },
                &mut out,
            )
            .unwrap();
            // A client's PUBLISH has the same form: decode it back.
            match c.decode(&mut out).unwrap() {
                Some(In::Publish(p)) => {
                    assert_eq!((p.topic.as_str(), p.qos, p.packet_id), ("a/b", 1, Some(7)));
                    assert_eq!(&p.payload[..], b"hi");
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn oversized_packet_is_refused_before_its_body() {
        let mut c = codec();
        let mut buf = BytesMut::from(CONNECT_311);
        c.decode(&mut buf).unwrap();
        // A PUBLISH announcing 2,000 bytes, none of them sent yet.
        let mut buf = BytesMut::from(&b"\x30\xd0\x0f"[..]);
        let e = c.decode(&mut buf).unwrap_err();
        assert_eq!(decode_reason(&e), Reason::PacketTooLarge);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            fuzz_stream(&data);
        }

        #[test]
        fn bytes_after_a_connect_never_panic(
            v5 in any::<bool>(),
            data in proptest::collection::vec(any::<u8>(), 0..512),
        ) {
            let mut all = if v5 { CONNECT_5.to_vec() } else { CONNECT_311.to_vec() };
            all.extend(data);
            fuzz_stream(&all);
        }
    }
}
