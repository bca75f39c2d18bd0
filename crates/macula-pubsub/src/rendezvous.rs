//! Where interest is registered in the DHT, so that publishers can find
//! subscribers without flooding the mesh.
//!
//! A subscription registers under the name derived from its pattern's first
//! segment when that segment is literal (`sensor.*.room1` -> `ps:R:sensor`):
//! every topic it can match starts with that segment, so a publisher of
//! `sensor.temp.room1` finds it by looking up `ps:R:sensor`. A pattern that
//! starts with a wildcard (`*.alarm`, `**.alarm`, `**`) can match a topic
//! with *any* first segment, so it registers under the realm-wide name
//! `ps:R:*`, and every publisher must also consult that name. Spreading
//! interest by first segment keeps one hot prefix from concentrating all
//! interest records on the same DHT nodes; the realm-wide name is the price
//! of leading wildcards (which should therefore be rare).
//!
//! Names cannot collide: `*` is never a literal segment (topics reject it),
//! and a DHT holds one realm only (peers of other realms are refused in
//! HELLO), so the realm prefix never has to be parsed back.
//!
//! It must only name things: hashing the names into DHT keys, TTLs and
//! refreshes belong to the runtime.

use crate::topic::{Pattern, Topic};

/// Prefix of every pub/sub rendezvous name (keeps them apart from other DHT
/// users of the same realm).
pub const PREFIX: &str = "ps";

/// The last part of the realm-wide name. Cannot be a topic segment.
pub const REALM_WIDE: &str = "*";

/// The DHT name under which a subscription with `pattern` registers interest.
pub fn interest_name(realm: &str, pattern: &Pattern) -> String {
    name(realm, pattern.first_literal().unwrap_or(REALM_WIDE))
}

/// The DHT names a publisher of `topic` must look up, in this order: the one
/// of its first segment, then the realm-wide one (subscribers whose pattern
/// starts with a wildcard may match it too).
pub fn lookup_names(realm: &str, topic: &Topic) -> [String; 2] {
    [name(realm, topic.first_segment()), name(realm, REALM_WIDE)]
}

fn name(realm: &str, last: &str) -> String {
    format!("{PREFIX}:{realm}:{last}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[track_caller]
    fn check_interest(pattern: &str, expected: &str) {
        let p = Pattern::new(pattern).unwrap_or_else(|e| panic!("{pattern:?}: {e}"));
        assert_eq!(interest_name("io.example", &p), expected, "{pattern}");
    }

    #[test]
    fn interest_by_first_literal_else_realm_wide() {
        check_interest("sensor.*.room1", "ps:io.example:sensor");
        check_interest("sensor.**", "ps:io.example:sensor");
        check_interest("sensor", "ps:io.example:sensor");
        check_interest("*.alarm", "ps:io.example:*");
        check_interest("**.alarm", "ps:io.example:*");
        check_interest("**", "ps:io.example:*");
    }

    #[test]
    fn publishers_look_up_first_segment_and_realm_wide() {
        let t = Topic::new("sensor.temp.room1").expect("valid");
        assert_eq!(
            lookup_names("r", &t),
            ["ps:r:sensor".to_owned(), "ps:r:*".to_owned()]
        );
        let t = Topic::new("alarm").expect("valid");
        assert_eq!(
            lookup_names("r", &t),
            ["ps:r:alarm".to_owned(), "ps:r:*".to_owned()]
        );
    }
}
