//! MQTT topics and filters <-> mesh topics and patterns.
//!
//! MQTT levels are separated by `/`, mesh segments by `.`; MQTT's
//! single-level wildcard `+` is the mesh's `*` and its multi-level `#`
//! (always last) the mesh's `**` (which, like `#`, also matches the parent:
//! `a/#` matches `a`, and `a.**` matches `a`).
//!
//! A mesh segment may not be empty and may not contain `.`, `*`,
//! whitespace or control characters (`macula_pubsub::topic`); an MQTT level
//! may be empty and contain any of those. Each MQTT level is therefore
//! escaped, reversibly, the way URLs are:
//!
//! - `%`, `.`, `*`, and every whitespace or control character are written
//!   as `%XX`, each byte of their UTF-8 form in upper-case hex (`a.b` ->
//!   `a%2Eb`, `x y` -> `x%20y`, `%` -> `%25`);
//! - an empty level is written as a lone `%` (`/a` -> `%.a`, `a//b` ->
//!   `a.%.b`);
//! - everything else is kept as it is.
//!
//! So every MQTT topic name maps to exactly one mesh topic and back
//! ([`mqtt_to_mesh`], [`mesh_to_mqtt`]; property-tested). A mesh topic
//! that no MQTT topic maps to (one a native publisher named with a `/`,
//! `+` or `#` inside a segment, or a `%` that is not an escape written by
//! these rules) still reaches MQTT subscribers: such a segment is shown
//! with exactly those three characters written as `%2F`, `%2B`, `%23` and
//! nothing else changed (publishing back to that MQTT name reaches a
//! different mesh topic: it would be escaped again).
//!
//! The mesh's limits apply after escaping: at most
//! `macula_pubsub::topic::MAX_TOPIC_LEN` (256) bytes and `MAX_SEGMENTS`
//! (16) segments; a longer topic or filter is refused (`TopicNameInvalid`,
//! `TopicFilterInvalid`). MQTT's rule that wildcards do not match topics
//! that start with `$` is not applied: mesh patterns have no such rule.

use macula_pubsub::{Pattern, Topic, TopicError};

/// Why an MQTT topic or filter has no mesh form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MapError {
    /// `+` or `#` inside a topic name, or not a whole level of a filter,
    /// or `#` not last.
    #[error("wildcard misplaced: {0}")]
    Wildcard(&'static str),
    /// The escaped form breaks a mesh limit (length, segments).
    #[error("not a valid mesh topic once escaped: {0}")]
    Mesh(#[from] TopicError),
    /// Empty topic names and filters are not allowed.
    #[error("empty topic")]
    Empty,
}

fn needs_escape(c: char) -> bool {
    matches!(c, '%' | '.' | '*') || c.is_whitespace() || c.is_control()
}

/// Escapes one MQTT level into one mesh segment.
pub fn escape_level(level: &str, out: &mut String) {
    if level.is_empty() {
        out.push('%');
        return;
    }
    for c in level.chars() {
        if needs_escape(c) {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push('%');
                out.push(HEX[usize::from(b >> 4)] as char);
                out.push(HEX[usize::from(b & 15)] as char);
            }
        } else {
            out.push(c);
        }
    }
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// The MQTT level a mesh segment is the escape of, if it is one written
/// by [`escape_level`] (the canonical form); `None` otherwise.
pub fn unescape_segment(seg: &str) -> Option<String> {
    if seg == "%" {
        return Some(String::new());
    }
    let b = seg.as_bytes();
    let mut bytes = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hi = hex_val(*b.get(i + 1)?)?;
            let lo = hex_val(*b.get(i + 2)?)?;
            bytes.push(hi << 4 | lo);
            i += 3;
        } else {
            bytes.push(b[i]);
            i += 1;
        }
    }
    let s = String::from_utf8(bytes).ok()?;
    // Canonical only: escaping it again gives the same segment (rejects
    // `%41` for `A`, and raw characters that should have been escaped).
    let mut again = String::with_capacity(seg.len());
    escape_level(&s, &mut again);
    (again == seg && !s.contains(['/', '+', '#'])).then_some(s)
}

/// The mesh topic of an MQTT topic name (no wildcards).
pub fn mqtt_to_mesh(topic: &str) -> Result<Topic, MapError> {
    if topic.is_empty() {
        return Err(MapError::Empty);
    }
    if topic.contains(['+', '#']) {
        return Err(MapError::Wildcard("a topic name cannot contain + or #"));
    }
    let mut out = String::with_capacity(topic.len() + 8);
    for (i, level) in topic.split('/').enumerate() {
        if i > 0 {
            out.push('.');
        }
        escape_level(level, &mut out);
    }
    Ok(Topic::new(&out)?)
}

/// The mesh pattern of an MQTT topic filter.
pub fn filter_to_mesh(filter: &str) -> Result<Pattern, MapError> {
    if filter.is_empty() {
        return Err(MapError::Empty);
    }
    let levels: Vec<&str> = filter.split('/').collect();
    let mut out = String::with_capacity(filter.len() + 8);
    for (i, level) in levels.iter().enumerate() {
        if i > 0 {
            out.push('.');
        }
        match *level {
            "+" => out.push('*'),
            "#" if i + 1 == levels.len() => out.push_str("**"),
            "#" => return Err(MapError::Wildcard("# must be the last level")),
            l if l.contains(['+', '#']) => {
                return Err(MapError::Wildcard("+ and # must be whole levels"))
            }
            l => escape_level(l, &mut out),
        }
    }
    Ok(Pattern::new(&out)?)
}

/// The MQTT topic name a mesh topic is delivered under (see the module
/// docs for segments no MQTT name maps to).
pub fn mesh_to_mqtt(topic: &str) -> String {
    let mut out = String::with_capacity(topic.len());
    for (i, seg) in topic.split('.').enumerate() {
        if i > 0 {
            out.push('/');
        }
        match unescape_segment(seg) {
            Some(level) => out.push_str(&level),
            None => {
                for c in seg.chars() {
                    match c {
                        '/' => out.push_str("%2F"),
                        '+' => out.push_str("%2B"),
                        '#' => out.push_str("%23"),
                        c => out.push(c),
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn examples() {
        let t = |s: &str| mqtt_to_mesh(s).unwrap().as_str().to_string();
        assert_eq!(t("a/b/c"), "a.b.c");
        assert_eq!(t("/a"), "%.a");
        assert_eq!(t("a//b/"), "a.%.b.%");
        assert_eq!(t("v1.2/x y"), "v1%2E2.x%20y");
        assert_eq!(t("100%/*"), "100%25.%2A");
        assert_eq!(t("$SYS/ünï"), "$SYS.ünï");
        let f = |s: &str| filter_to_mesh(s).unwrap().as_str().to_string();
        assert_eq!(f("a/+/c"), "a.*.c");
        assert_eq!(f("a/#"), "a.**");
        assert_eq!(f("#"), "**");
        assert_eq!(f("+/+"), "*.*");
        assert!(filter_to_mesh("a/#/b").is_err());
        assert!(filter_to_mesh("a/b+").is_err());
        assert!(mqtt_to_mesh("a/+").is_err());
        assert!(mqtt_to_mesh("").is_err());
        assert_eq!(mesh_to_mqtt("a.b.c"), "a/b/c");
        assert_eq!(mesh_to_mqtt("%.a"), "/a");
        // Not canonical: shown with only / + # escaped.
        assert_eq!(mesh_to_mqtt("a/b.c+d.%41.%zz"), "a%2Fb/c%2Bd/%41/%zz");
    }

    #[test]
    fn mesh_limits_apply_after_escaping() {
        let long = "a/".repeat(16) + "a";
        assert!(matches!(mqtt_to_mesh(&long), Err(MapError::Mesh(_))));
        let wide = "%".repeat(100);
        assert!(matches!(mqtt_to_mesh(&wide), Err(MapError::Mesh(_))));
    }

    fn mqtt_topic() -> impl Strategy<Value = String> {
        // Levels of any characters but / + # and NUL (MQTT forbids U+0000).
        let level = proptest::collection::vec(
            prop_oneof![
                4 => proptest::char::range('a', 'z'),
                1 => Just('.'), 1 => Just('*'), 1 => Just('%'), 1 => Just(' '),
                1 => Just('\t'), 1 => Just('$'), 1 => Just('é'), 1 => Just('\u{7f}'),
                1 => Just('\u{2003}'), 1 => Just('2'), 1 => Just('F'),
                1 => any::<char>().prop_filter("no / + # NUL", |c| !matches!(c, '/' | '+' | '#' | '\0')),
            ],
            0..6,
        )
        .prop_map(|v| v.into_iter().collect::<String>());
        proptest::collection::vec(level, 1..5).prop_map(|v| v.join("/"))
    }

    proptest! {
        /// Every MQTT topic name within the mesh's limits maps to a valid
        /// mesh topic and back to itself.
        #[test]
        fn round_trip(t in mqtt_topic()) {
            match mqtt_to_mesh(&t) {
                Ok(mesh) => prop_assert_eq!(mesh_to_mqtt(mesh.as_str()), t),
                Err(MapError::Mesh(_)) => {}
                Err(MapError::Empty) => prop_assert!(t.is_empty()),
                Err(e) => prop_assert!(false, "{t:?}: {e}"),
            }
        }

        /// Distinct MQTT topics never share a mesh topic.
        #[test]
        fn injective(a in mqtt_topic(), b in mqtt_topic()) {
            if let (Ok(x), Ok(y)) = (mqtt_to_mesh(&a), mqtt_to_mesh(&b)) {
                prop_assert_eq!(x.as_str() == y.as_str(), a == b);
            }
        }

        /// A filter's mesh pattern matches a topic's mesh form exactly when
        /// the MQTT filter matches the MQTT topic.
        #[test]
        fn wildcards_match_alike(t in mqtt_topic(), mask in proptest::collection::vec(0u8..4, 1..6)) {
            let levels: Vec<&str> = t.split('/').collect();
            let mut f: Vec<String> = Vec::new();
            for (i, l) in levels.iter().enumerate() {
                match mask.get(i).copied().unwrap_or(0) {
                    1 => f.push("+".into()),
                    2 => { f.push("#".into()); break; }
                    3 => f.push(format!("{l}x")),
                    _ => f.push((*l).to_string()),
                }
            }
            let filter = f.join("/");
            let mqtt_match = mqtt_matches(&filter, &t);
            if let (Ok(p), Ok(topic)) = (filter_to_mesh(&filter), mqtt_to_mesh(&t)) {
                prop_assert_eq!(p.matches(&topic), mqtt_match, "{} {}", filter, t);
            }
        }

        /// Any mesh topic is shown as a valid MQTT topic name.
        #[test]
        fn any_mesh_topic_is_a_valid_mqtt_name(t in "[a-z/+#%.]{1,20}") {
            if let Ok(topic) = Topic::new(&t) {
                let m = mesh_to_mqtt(topic.as_str());
                prop_assert!(!m.contains(['+', '#']));
                prop_assert_eq!(m.split('/').count(), topic.n_segments());
            }
        }
    }

    /// The MQTT matching rules, written plainly (the reference).
    fn mqtt_matches(filter: &str, topic: &str) -> bool {
        let f: Vec<&str> = filter.split('/').collect();
        let t: Vec<&str> = topic.split('/').collect();
        for (i, fl) in f.iter().enumerate() {
            if *fl == "#" {
                return true;
            }
            match t.get(i) {
                None => return false,
                Some(tl) if *fl == "+" || fl == tl => {}
                Some(_) => return false,
            }
        }
        f.len() == t.len()
    }
}
