//! The pure core of Macula RPC: procedure names and their DHT rendezvous
//! names, choosing a provider (round robin, random, least latency,
//! weighted), a circuit breaker per provider, and retry backoff.
//!
//! **Invariant:** no I/O, no clock, no threads, no async, no global state.
//! Time is an argument ([`Millis`], milliseconds since any fixed origin the
//! caller chooses) and randomness comes from a seeded [`Rng`], so every
//! decision can be replayed in a test.
//!
//! **Invariant:** [`Balancer::pick`] only returns a candidate it was given,
//! never one in `exclude`, and never one whose breaker refuses traffic; when
//! it returns a provider whose breaker is half-open, that call is the single
//! probe until [`Balancer::record`] reports its outcome.
//!
//! **Invariant:** everything is bounded: providers tracked
//! ([`BalancerLimits::max_providers`]) and procedures with round-robin state
//! ([`BalancerLimits::max_procedures`]).
//!
//! # Code map
//! - [`name`]: procedure-name validation and DHT names.
//! - [`breaker`]: the per-provider circuit breaker state machine.
//! - [`balance`]: provider choice and per-provider latency/breaker state.
//! - [`backoff`]: exponential backoff with jitter between attempts.
//! - [`rng`]: the small seeded generator behind every random choice.

pub mod backoff;
pub mod balance;
pub mod breaker;
pub mod name;
pub mod rng;

pub use backoff::Backoff;
pub use balance::{Balancer, BalancerLimits, Outcome, Strategy};
pub use breaker::{Breaker, BreakerConfig, BreakerState};
pub use name::{ad_name, index_name, validate_procedure, NameError, MAX_PROCEDURE_LEN};
pub use rng::Rng;

/// Milliseconds since an origin of the caller's choosing.
pub type Millis = u64;
