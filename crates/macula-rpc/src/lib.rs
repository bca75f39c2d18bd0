//! The pure core of Macula RPC: the call lifecycle, serve admission and a
//! gateway's forwarding as one deterministic state machine ([`RpcCore`]),
//! built on procedure names and their DHT rendezvous names, provider choice
//! (round robin, random, least latency, weighted), a circuit breaker per
//! provider, retry backoff and a provider cache.
//!
//! **Invariant:** no I/O, no clock, no threads, no async, no global state.
//! Time is an argument ([`Millis`], the caller's monotonic clock) and
//! randomness comes from a seeded [`Rng`], so every decision can be
//! replayed in a test or the simulator.
//!
//! # Driving an [`RpcCore`]
//!
//! The driver (the runtime's `rpc` module, or a simulator) does all I/O:
//! DHT lookups, reaching providers, sending frames, running handlers,
//! timers. The core says what to do and decides everything else.
//!
//! **A call.** [`RpcCore::start_call`] either refuses at once (this node's
//! in-flight limit, its own handler at its limit, no provider possible),
//! admits a local call ([`Started::Local`]: run the handler in process,
//! then [`RpcCore::release`] the slot), or returns a [`CallId`]. Then, in
//! a loop:
//! 1. Drain [`RpcCore::poll_call`] (it first applies the timers due at
//!    `now`) and do each [`Action`]: `Lookup`, `Connect`/`ConnectClient`,
//!    `AwaitGateway`, `Send` (CALL with the wire ID and time left),
//!    `Probe` (a liveness ping), `Close` (the provider failed its probe),
//!    `Cancel` (CANCEL to the provider), `Retrying` (metrics only), until
//!    `Done` ends the call.
//! 2. Feed back what happened: [`RpcCore::handle_providers`],
//!    [`RpcCore::handle_connected`], [`RpcCore::handle_gateway`],
//!    [`RpcCore::handle_link_failed`], [`RpcCore::handle_pong`],
//!    [`RpcCore::handle_probe_failed`]; answers from any connection go to
//!    [`RpcCore::handle_answer`], which names the call to wake.
//! 3. With nothing to do, wait for an input or until
//!    [`RpcCore::poll_timeout`], then go to 1.
//!
//! A caller that gives up calls [`RpcCore::drop_call`] and sends the CANCEL
//! it returns.
//!
//! **A request.** [`RpcCore::admit`] decides on each incoming CALL:
//! [`Admission::Refuse`] (shutting down, invalid name, `NotFound`,
//! `Overloaded` at the handler's limit), [`Admission::Serve`] (run the
//! handler until the deadline the caller sent, then release the slot), or
//! [`Admission::Forward`]: a gateway calls onward with `start_call` and
//! answers with that call's outcome (to the attached clients serving the
//! procedure, or into the mesh for an attached client).
//!
//! # Roles
//! One core, three [`Role`]s, chosen at construction: `Node` (providers from
//! discovery, reached directly; forwards its clients' calls), `Client` (every
//! call goes through the gateway; only the gateway's loss is retried, on the
//! next gateway), `Alone` (in process only). A gateway's attached clients
//! serving a procedure are advertised by it
//! ([`RpcCore::advertise_for_client`]) and called in turn, moving on while a
//! client's connection is lost.
//!
//! # Decisions
//! - One deadline covers the whole call, retries and backoff included; at
//!   it the call ends with `Timeout` and a CALL out is cancelled.
//! - Retryable failures (overloaded, not served, shutting down: the
//!   handler did not run; unreachable: it may have, if the CALL went out
//!   before the connection died, so retries are at-least-once) go to a
//!   different provider after [`Backoff`], up to `retries` times; handler
//!   errors, panics and timeouts are final (the handler may have run).
//! - An unreachable provider is dropped from the [`ProviderCache`].
//! - The [`Balancer`] learns every direct attempt: an answer (reply or
//!   handler error) is a success with its latency, anything else a failure,
//!   a call given up nothing. Latency has the clock's 1 ms resolution.
//! - A provider silent for `probe_after` is probed; no answer within
//!   `probe_timeout` fails the attempt and closes the connection.
//! - A CALL out on a *replaceable* connection (the driver says so in
//!   [`RpcCore::handle_reached`]: relayed, or direct by hole punching) whose
//!   connection dies is re-sent with the same wire ID to the same provider
//!   over a new route (`Resending`, `Connect`, `Send`), at most
//!   `max_resends` times; the provider remembers calls that came on such
//!   connections ([`RecentCalls`]) and runs each once, so the caller never
//!   sees the path change.
//!
//! # Invariants (property-tested)
//! - A call never outlives its deadline: polled at or after it, it is done.
//! - A mesh call never sends to a provider it already tried, nor to one
//!   whose breaker is open; a half-open breaker lets exactly one probe call
//!   through until its outcome is recorded.
//! - An answer completes only the call whose current attempt sent that
//!   wire ID to that provider; anything else is ignored.
//! - Everything is bounded: calls in flight, providers tracked, procedures
//!   cached, procedures served and each handler's concurrency.
//!
//! # Code map
//! - [`core`]: [`RpcCore`], the state machine tying the rest together.
//! - [`serve`]: the served-procedures table and admission.
//! - [`recent`]: a provider's recent calls on replaceable connections (re-sent calls run once).
//! - [`cache`]: providers by procedure, with a TTL.
//! - [`name`]: procedure-name validation and DHT names.
//! - [`breaker`]: the per-provider circuit breaker state machine.
//! - [`balance`]: provider choice and per-provider latency/breaker state.
//! - [`Backoff`] (from `macula_wire::backoff`): exponential backoff with jitter between attempts.

pub mod balance;
pub mod breaker;
pub mod cache;
pub mod core;
pub mod name;
pub mod recent;
pub mod serve;

pub use crate::core::{
    remote_failure, Action, Answer, CallFailure, CallId, CallSpec, Config, Key, Role, RpcCore,
    Started,
};
pub use balance::{Balancer, BalancerLimits, Outcome, Strategy};
pub use breaker::{Breaker, BreakerConfig, BreakerState};
pub use cache::{ProviderCache, ProviderInfo};
pub use macula_wire::backoff::Backoff;
pub use macula_wire::rng::Rng;
pub use macula_wire::time::Millis;
pub use name::{ad_name, index_name, validate_procedure, NameError, MAX_PROCEDURE_LEN};
pub use recent::{Full as RecentFull, RecentCalls, RecentLimits, Seen};
pub use serve::{Admission, Advert, AdvertiseError, ClientAd, ConnId, ServeTable, Slot, Token};
