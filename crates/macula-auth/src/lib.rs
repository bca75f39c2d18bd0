//! Realm admission and authorization for Macula (issue 18), as a pure core:
//! no I/O and no clock (time is an argument), so the runtime, the CLI and
//! the simulator all decide the same way.
//!
//! * [`grant`]: a realm with an authority is named by the authority's
//!   Ed25519 key; a [`Grant`] (signed by the authority, or by a signer it
//!   delegated to) says who a principal is and what it may do, and every
//!   node verifies it offline.
//! * [`revocation`]: signed, versioned lists of revoked grants and
//!   principals, spread through the mesh.
//! * [`policy`]: rules (`allow publish orders.*`, `deny subscribe **`) and
//!   decisions; deny wins, nothing is allowed by default.
//! * [`audit`]: the hash chain of the audit trail, with signed checkpoints.
//!
//! The wiring (grants in the handshake, enforcement where a request enters
//! the mesh and where it is delivered, the CLI, the audit trail) is built on
//! top of this crate by the runtime.

pub mod audit;
pub mod grant;
pub mod keys;
pub mod origin;
pub mod policy;
pub mod revocation;
mod types;

pub use grant::{sign, Grant, GrantBody, GrantError, Verified};
pub use policy::{
    Action, Decision, DecisionCache, Denial, Effect, Policy, PolicyError, Request, Rule,
};
pub use revocation::{RevocationBody, RevocationError, RevocationList, Revocations};
pub use types::{BadKey, GrantId, Key, Signed, Subject};

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use crate::grant::tests::{body, key};
    use crate::grant::{fuzz_grant, sign};
    use crate::revocation::fuzz_revocations;
    use crate::{Grant, Subject};

    proptest! {
        /// The decoders the fuzz targets drive take any bytes, and any
        /// damage to a real grant, without a panic.
        #[test]
        fn decoders_take_any_bytes(
            junk in prop::collection::vec(any::<u8>(), 0..512),
            flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..=255), 0..4),
        ) {
            fuzz_grant(&junk);
            fuzz_revocations(&junk);
            let auth = key(7);
            let g = Grant {
                grant: sign(&body(&auth, &auth, Subject::Client(crate::Key::of(&key(9))), "allow publish a.*"), &auth)
                    .expect("sign"),
                signer: None,
            };
            let mut bytes = g.to_bytes().expect("encode");
            for (at, x) in flips {
                let i = at.index(bytes.len());
                bytes[i] ^= x;
            }
            fuzz_grant(&bytes);
        }
    }
}
