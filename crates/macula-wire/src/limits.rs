//! Protocol limits shared by every implementation. Each is a named constant
//! with the reason for its value; runtime knobs may lower or raise the
//! configurable ones within the stated bounds.

/// The only protocol version this implementation speaks. Carried in every
/// frame header and in `HELLO`.
pub const PROTOCOL_VERSION: u8 = 1;

/// Default maximum frame body size: 1 MiB keeps one frame well inside QUIC
/// stream flow-control windows while fitting any control or DHT message.
pub const DEFAULT_MAX_FRAME_SIZE: u32 = 1 << 20;
/// Smallest configurable frame limit: every control message must still fit.
pub const MIN_MAX_FRAME_SIZE: u32 = 1024;
/// Largest configurable frame limit: bounds per-frame buffering at 16 MiB.
pub const MAX_MAX_FRAME_SIZE: u32 = 16 << 20;

/// Realm names are at most a DNS name long.
pub const MAX_REALM_LEN: usize = 253;
/// Capabilities a node may announce in `HELLO`; more is a malformed hello.
pub const MAX_CAPABILITIES: usize = 64;
/// Length of one capability string.
pub const MAX_CAPABILITY_LEN: usize = 64;
/// Listen addresses a node may announce; enough for every interface of a host.
pub const MAX_LISTEN_ADDRS: usize = 16;
/// Length of one announced address (`[ipv6%scope]:port` fits easily).
pub const MAX_ADDR_LEN: usize = 128;
/// Length of the free-text message in ERROR and DISCONNECT frames.
pub const MAX_REASON_LEN: usize = 1024;
/// Length of the agent string in `HELLO` (`macula/0.1.0` and friends).
pub const MAX_AGENT_LEN: usize = 128;
/// Length of the grant in `HELLO` (`macula_auth`'s own limit).
pub const MAX_GRANT_LEN: usize = 64 * 1024;
/// Length of a signed revocation list in `REVOCATIONS`: it fits the default
/// frame limit (about 60,000 revoked serials).
pub const MAX_REVOCATIONS_LEN: usize = 1_000_000;
/// Length of the API key in `HELLO` (a key is 32 bytes; room for a longer
/// format later).
pub const MAX_API_KEY_LEN: usize = 64;
