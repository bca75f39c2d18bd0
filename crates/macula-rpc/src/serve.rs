//! What this node serves: its own handlers and, on a gateway, procedures
//! served by attached clients; and the admission decision for each request.
//!
//! Admission is where a provider says no without running anything, so the
//! caller can fail over at once: shutting down, a malformed name, a
//! procedure not served here (`NotFound`), or a handler at its concurrency
//! limit (`Overloaded`). An admitted request holds a [`Slot`] until the
//! driver gives it back with [`ServeTable::release`]; that is how the limit
//! counts requests being handled, not requests received.
//!
//! **Invariant:** a handler never has more admitted requests than its limit;
//! a slot given back after its procedure was withdrawn (or re-advertised)
//! changes nothing.

use std::collections::HashMap;

use macula_wire::rpc::RpcErrorKind;
use macula_wire::time::Millis;

use crate::name::{validate_procedure, NameError};

/// Identifies one advertisement: a procedure withdrawn and advertised again
/// gets a new token, so a stale registration cannot remove its successor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Token(pub u64);

/// Identifies one connection of the driver (a client's link to this
/// gateway): a client that reconnects is a new connection.
pub type ConnId = u64;

/// An admitted request (or a local call) on one handler. Give it back with
/// [`ServeTable::release`] (or `RpcCore::release`) when the handler is done.
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a slot must be released when the handler finishes"]
pub struct Slot {
    pub(crate) procedure: String,
    pub(crate) token: Token,
    /// Also holds one of the caller's in-flight calls (a local call).
    pub(crate) call: bool,
}

impl Slot {
    pub fn procedure(&self) -> &str {
        &self.procedure
    }
}

/// An advertisement of this node's own handler.
#[derive(Debug, Clone)]
pub struct Advert<H> {
    pub handler: H,
    pub weight: u32,
    pub metadata: Vec<(String, String)>,
    /// Concurrent requests (default: the table's `handler_concurrency`).
    pub max_concurrent: Option<usize>,
}

/// Why an advertisement was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AdvertiseError {
    #[error("invalid procedure name: {0}")]
    InvalidProcedure(#[from] NameError),
    #[error("this node is shutting down")]
    ShuttingDown,
    #[error("already advertised by this node")]
    AlreadyAdvertised,
    #[error("this node already advertises {max} procedures")]
    TooManyAdvertised { max: usize },
}

/// What a gateway's advertisement for a client did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAd {
    /// The first client of this procedure: publish the advertisement.
    Created(Token),
    /// Another client joined an existing advertisement (or a client that
    /// reconnected replaced its old connection).
    Joined,
}

/// Who answers a served procedure.
#[derive(Debug, Clone)]
pub(crate) enum By<K, H> {
    /// This node's handler.
    Handler(H),
    /// Attached clients (this node is their gateway), in round-robin order.
    Clients {
        clients: Vec<(K, ConnId)>,
        next: u64,
    },
}

#[derive(Debug, Clone)]
pub(crate) struct Served<K, H> {
    pub(crate) by: By<K, H>,
    weight: u32,
    metadata: Vec<(String, String)>,
    limit: usize,
    in_use: usize,
    token: Token,
}

/// The decision on one incoming request.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission<H> {
    /// Run `handler` until `deadline`; release `slot` when it finishes.
    Serve {
        handler: H,
        slot: Slot,
        deadline: Millis,
    },
    /// Call onward (a gateway: to the attached clients serving it, or into
    /// the mesh for an attached client) with `start_call`, within `timeout`,
    /// and answer with that call's outcome.
    Forward { timeout: Millis },
    /// Answer at once with CALL_ERROR of this kind.
    Refuse { kind: RpcErrorKind, message: String },
}

/// The procedures this node serves.
#[derive(Debug, Clone)]
pub struct ServeTable<K, H> {
    pub(crate) served: HashMap<String, Served<K, H>>,
    handler_concurrency: usize,
    max_advertised: usize,
    next_token: u64,
    shutting_down: bool,
}

impl<K: Clone + PartialEq, H: Clone> ServeTable<K, H> {
    pub fn new(handler_concurrency: usize, max_advertised: usize) -> ServeTable<K, H> {
        ServeTable {
            served: HashMap::new(),
            handler_concurrency,
            max_advertised,
            next_token: 1,
            shutting_down: false,
        }
    }

    fn check_new(&self, procedure: &str) -> Result<(), AdvertiseError> {
        validate_procedure(procedure)?;
        if self.shutting_down {
            return Err(AdvertiseError::ShuttingDown);
        }
        if self.served.contains_key(procedure) {
            return Err(AdvertiseError::AlreadyAdvertised);
        }
        if self.served.len() >= self.max_advertised {
            return Err(AdvertiseError::TooManyAdvertised {
                max: self.max_advertised,
            });
        }
        Ok(())
    }

    fn insert(
        &mut self,
        procedure: &str,
        by: By<K, H>,
        weight: u32,
        meta: Vec<(String, String)>,
        limit: usize,
    ) -> Token {
        let token = Token(self.next_token);
        self.next_token += 1;
        self.served.insert(
            procedure.to_string(),
            Served {
                by,
                weight,
                metadata: meta,
                limit: limit.max(1),
                in_use: 0,
                token,
            },
        );
        token
    }

    /// Serves `procedure` with this node's handler.
    pub fn advertise(&mut self, procedure: &str, ad: Advert<H>) -> Result<Token, AdvertiseError> {
        self.check_new(procedure)?;
        let limit = ad.max_concurrent.unwrap_or(self.handler_concurrency);
        Ok(self.insert(
            procedure,
            By::Handler(ad.handler),
            ad.weight,
            ad.metadata,
            limit,
        ))
    }

    /// A gateway serves `procedure` for attached client `client` on
    /// connection `conn`: the first client creates the advertisement, later
    /// ones join it (a client's earlier connection is replaced).
    pub fn advertise_for_client(
        &mut self,
        procedure: &str,
        client: K,
        conn: ConnId,
        weight: u32,
        metadata: Vec<(String, String)>,
    ) -> Result<ClientAd, AdvertiseError> {
        if let Some(s) = self.served.get_mut(procedure) {
            if let By::Clients { clients, .. } = &mut s.by {
                clients.retain(|(k, _)| *k != client);
                clients.push((client, conn));
                return Ok(ClientAd::Joined);
            }
        }
        self.check_new(procedure)?;
        let by = By::Clients {
            clients: vec![(client, conn)],
            next: 0,
        };
        let limit = self.handler_concurrency;
        Ok(ClientAd::Created(self.insert(
            procedure,
            by,
            weight.max(1),
            metadata,
            limit,
        )))
    }

    /// Connection `conn` no longer serves `procedure` (`None`: anything; the
    /// client left). Returns the advertisements left without a client, now
    /// removed: withdraw them from the mesh.
    pub fn withdraw_client(
        &mut self,
        conn: ConnId,
        procedure: Option<&str>,
    ) -> Vec<(String, Token)> {
        let mut gone = Vec::new();
        self.served.retain(|name, s| {
            let By::Clients { clients, .. } = &mut s.by else {
                return true;
            };
            if procedure.is_some_and(|p| p != name) {
                return true;
            }
            clients.retain(|(_, c)| *c != conn);
            if clients.is_empty() {
                gone.push((name.clone(), s.token));
                return false;
            }
            true
        });
        gone.sort();
        gone
    }

    /// Stops serving `procedure` if `token` is still its advertisement.
    pub fn withdraw(&mut self, procedure: &str, token: Token) -> bool {
        match self.served.get(procedure) {
            Some(s) if s.token == token => self.served.remove(procedure).is_some(),
            _ => false,
        }
    }

    /// Refuses requests and advertisements from now on; returns every
    /// advertisement, now removed, to withdraw from the mesh.
    pub fn begin_shutdown(&mut self) -> Vec<(String, Token)> {
        self.shutting_down = true;
        let mut all: Vec<(String, Token)> =
            self.served.drain().map(|(k, s)| (k, s.token)).collect();
        all.sort();
        all
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down
    }

    /// Weight and metadata of `procedure`'s advertisement.
    pub fn advertisement(&self, procedure: &str) -> Option<(u32, Vec<(String, String)>)> {
        self.served
            .get(procedure)
            .map(|s| (s.weight, s.metadata.clone()))
    }

    /// Served procedures, sorted, with weight and free slots.
    pub fn advertised(&self) -> Vec<(String, u32, usize)> {
        let mut v: Vec<_> = self
            .served
            .iter()
            .map(|(k, s)| (k.clone(), s.weight, s.limit.saturating_sub(s.in_use)))
            .collect();
        v.sort();
        v
    }

    pub fn len(&self) -> usize {
        self.served.len()
    }

    pub fn is_empty(&self) -> bool {
        self.served.is_empty()
    }

    /// Takes a slot on `procedure`'s handler: `Ok(Some)` with the handler,
    /// `Ok(None)` if it is not a handler of this node, `Err(())` at its
    /// limit.
    pub(crate) fn acquire(&mut self, procedure: &str, call: bool) -> Result<Option<(H, Slot)>, ()> {
        let Some(s) = self.served.get_mut(procedure) else {
            return Ok(None);
        };
        let By::Handler(h) = &s.by else {
            return Ok(None);
        };
        if s.in_use >= s.limit {
            return Err(());
        }
        s.in_use += 1;
        let slot = Slot {
            procedure: procedure.to_string(),
            token: s.token,
            call,
        };
        Ok(Some((h.clone(), slot)))
    }

    /// Gives back an admitted request's slot.
    pub fn release(&mut self, slot: Slot) {
        if let Some(s) = self.served.get_mut(&slot.procedure) {
            if s.token == slot.token {
                s.in_use = s.in_use.saturating_sub(1);
            }
        }
    }

    /// The attached clients serving `procedure`, starting with the next in
    /// turn (empty if it is not served by clients).
    pub(crate) fn rotation(&mut self, procedure: &str) -> Option<Vec<(K, ConnId)>> {
        let s = self.served.get_mut(procedure)?;
        let By::Clients { clients, next } = &mut s.by else {
            return None;
        };
        if clients.is_empty() {
            return Some(Vec::new());
        }
        let start = (*next % clients.len() as u64) as usize;
        *next = next.wrapping_add(1);
        Some(
            clients[start..]
                .iter()
                .chain(&clients[..start])
                .cloned()
                .collect(),
        )
    }

    pub(crate) fn is_served_by_clients(&self, procedure: &str) -> bool {
        matches!(
            self.served.get(procedure).map(|s| &s.by),
            Some(By::Clients { .. })
        )
    }

    /// Decides on a request for `procedure` with `timeout_ms` left, from a
    /// peer that is an attached client (`from_client`) or not. `forwards`:
    /// this node forwards its clients' calls into the mesh (a full node).
    pub fn admit(
        &mut self,
        now: Millis,
        procedure: &str,
        timeout_ms: u32,
        from_client: bool,
        forwards: bool,
    ) -> Admission<H> {
        let refuse = |kind, message: String| Admission::Refuse { kind, message };
        if self.shutting_down {
            return refuse(RpcErrorKind::ShuttingDown, "node is shutting down".into());
        }
        if let Err(e) = validate_procedure(procedure) {
            return refuse(RpcErrorKind::Invalid, e.to_string());
        }
        let timeout = Millis(u64::from(timeout_ms));
        if self.is_served_by_clients(procedure) {
            return Admission::Forward { timeout };
        }
        match self.acquire(procedure, false) {
            Ok(Some((handler, slot))) => Admission::Serve {
                handler,
                slot,
                deadline: now.saturating_add(timeout),
            },
            Ok(None) if from_client && forwards => Admission::Forward { timeout },
            Ok(None) => refuse(
                RpcErrorKind::NotFound,
                format!("{procedure} is not served by this node"),
            ),
            Err(()) => refuse(
                RpcErrorKind::Overloaded,
                format!("{procedure} is at its concurrency limit"),
            ),
        }
    }
}
