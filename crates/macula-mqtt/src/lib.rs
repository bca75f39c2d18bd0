//! The MQTT bridge's pure core (issue 24): MQTT 3.1.1 and 5.0 clients on a
//! node publish into and subscribe from the mesh.
//!
//! - [`topic`]: MQTT topics and filters <-> mesh topics and patterns
//!   (`/` <-> `.`, `+` <-> `*`, `#` <-> `**`, reversible escaping).
//! - [`broker`]: sessions, keep-alive, QoS 0/1 (and inbound QoS 2),
//!   inflight windows, redelivery, retained messages, last wills, limits:
//!   a deterministic state machine, time as an argument.
//! - [`codec`]: packets through `rmqtt-codec`, translated to and from the
//!   core's version-neutral ones.
//!
//! No I/O, no clock, no threads; the runtime's `mqtt` module drives it.

pub mod broker;
pub mod codec;
pub mod topic;

pub use broker::{
    AckCode, Broker, ConnId, Connect, Delivery, Event, Forward, Limits, Msg, Out, Outcome, Planned,
    Publish, Reason, Refusal, RestoredSubs, SavedMsg, SavedSession, SessionId, Stats, SubCode,
    Version, Will,
};
pub use codec::{Codec, In, ServerInfo};
pub use macula_wire::Millis;
pub use topic::{filter_to_mesh, mesh_to_mqtt, mqtt_to_mesh, MapError};
