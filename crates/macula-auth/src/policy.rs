//! Permissions: rules of allow or deny on an action and a pattern, and the
//! decision for one request.
//!
//! A rule names an [`Action`] and a pattern in the topic syntax (`*` one
//! segment, `**` zero or more; see `macula_pubsub::topic`), in which
//! `{{subject}}` stands for the principal's own ID (`inbox.{{subject}}.**`).
//! A request is an action on a resource: a topic to publish, a procedure to
//! call or advertise (literal names), or a pattern to subscribe to.
//!
//! **Deny wins, and nothing is allowed by default**: a request is allowed by
//! a rule set when no deny rule can touch it and an allow rule covers it.
//! For a literal resource "touch" and "cover" both mean "matches". For a
//! subscription pattern `P`, an allow rule `R` covers it when every topic
//! `P` matches, `R` matches too ([`covers`]); a deny rule `D` touches it when
//! some topic matches both ([`overlaps`]): subscribing to `orders.**` under
//! `deny orders.secret.*` is refused, not silently narrowed. A principal
//! holds one rule set per grant in its chain (its own, and its signer's
//! scope): a request must be allowed by every one of them.

use std::fmt;
use std::str::FromStr;

use macula_pubsub::topic::{Pattern, Segment, Topic};
use serde::{Deserialize, Serialize};

/// What a principal may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Publish on a topic.
    Publish,
    /// Subscribe to a pattern.
    Subscribe,
    /// Call a procedure.
    Call,
    /// Advertise (serve) a procedure.
    Advertise,
    /// Relay for other nodes.
    Relay,
    /// Use the admin API's mutating endpoints (the resource names them).
    Admin,
}

impl Action {
    pub const ALL: [Action; 6] = [
        Action::Publish,
        Action::Subscribe,
        Action::Call,
        Action::Advertise,
        Action::Relay,
        Action::Admin,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Action::Publish => "publish",
            Action::Subscribe => "subscribe",
            Action::Call => "call",
            Action::Advertise => "advertise",
            Action::Relay => "relay",
            Action::Admin => "admin",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Action {
    type Err = PolicyError;
    fn from_str(s: &str) -> Result<Self, PolicyError> {
        Action::ALL
            .into_iter()
            .find(|a| a.name() == s)
            .ok_or_else(|| PolicyError::Action(s.to_string()))
    }
}

/// Allow or deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Effect {
    Allow,
    Deny,
}

/// One rule: `allow publish orders.*`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Rule {
    pub effect: Effect,
    pub action: Action,
    /// A pattern in the topic syntax; may contain `{{subject}}`.
    pub pattern: String,
}

/// The placeholder for the principal's own ID in a rule's pattern.
pub const SUBJECT_TEMPLATE: &str = "{{subject}}";

/// Most rules in one grant.
pub const MAX_RULES: usize = 1024;

/// Why a rule or a request is malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("unknown action {0:?} (publish, subscribe, call, advertise, relay, admin)")]
    Action(String),
    #[error("a rule is `allow|deny ACTION PATTERN`, got {0:?}")]
    Syntax(String),
    #[error("bad pattern {pattern:?}: {reason}")]
    Pattern { pattern: String, reason: String },
    #[error("bad resource {resource:?}: {reason}")]
    Resource { resource: String, reason: String },
    #[error("{n} rules, over the limit of {max}")]
    TooManyRules { n: usize, max: usize },
}

impl Rule {
    /// `allow publish orders.*` / `deny subscribe **`. The pattern is
    /// checked (with `{{subject}}` standing for a plain segment).
    pub fn parse(s: &str) -> Result<Rule, PolicyError> {
        let parts: Vec<&str> = s.split_whitespace().collect();
        let [effect, action, pattern] = parts.as_slice() else {
            return Err(PolicyError::Syntax(s.to_string()));
        };
        let effect = match *effect {
            "allow" => Effect::Allow,
            "deny" => Effect::Deny,
            _ => return Err(PolicyError::Syntax(s.to_string())),
        };
        let rule = Rule {
            effect,
            action: action.parse()?,
            pattern: pattern.to_string(),
        };
        rule.check()?;
        Ok(rule)
    }

    /// Checks the pattern, with a stand-in for `{{subject}}`.
    pub fn check(&self) -> Result<(), PolicyError> {
        self.pattern_for("subject").map(drop)
    }

    /// The pattern with `{{subject}}` replaced by `subject`.
    fn pattern_for(&self, subject: &str) -> Result<Pattern, PolicyError> {
        let text = self.pattern.replace(SUBJECT_TEMPLATE, subject);
        Pattern::from_str(&text).map_err(|e| PolicyError::Pattern {
            pattern: self.pattern.clone(),
            reason: e.to_string(),
        })
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let effect = match self.effect {
            Effect::Allow => "allow",
            Effect::Deny => "deny",
        };
        write!(f, "{effect} {} {}", self.action, self.pattern)
    }
}

/// What a request asks for: an action on a literal name, or a subscription
/// to a pattern.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Request {
    pub action: Action,
    resource: Pattern,
}

impl Request {
    /// `resource` is a pattern for [`Action::Subscribe`], a literal name
    /// (topic, procedure, endpoint) for every other action.
    pub fn new(action: Action, resource: &str) -> Result<Request, PolicyError> {
        let bad = |reason: String| PolicyError::Resource {
            resource: resource.to_string(),
            reason,
        };
        let resource = if action == Action::Subscribe {
            Pattern::from_str(resource).map_err(|e| bad(e.to_string()))?
        } else {
            let topic = Topic::from_str(resource).map_err(|e| bad(e.to_string()))?;
            Pattern::from_str(topic.as_str()).map_err(|e| bad(e.to_string()))?
        };
        Ok(Request { action, resource })
    }

    pub fn resource(&self) -> &str {
        self.resource.as_str()
    }
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.action, self.resource.as_str())
    }
}

/// The outcome for one request, with the reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Allowed by this rule (of the principal's own grant).
    Allow { rule: Rule },
    /// Refused.
    Deny(Denial),
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow { .. })
    }
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    /// A deny rule touches the request; `scope` is the grant it is in (0:
    /// the principal's own, 1: its signer's).
    DeniedBy { rule: Rule, scope: usize },
    /// No allow rule covers it in grant `scope`.
    NotAllowed { scope: usize },
}

impl Denial {
    /// A short name for metrics and error kinds.
    pub fn kind(&self) -> &'static str {
        match self {
            Denial::DeniedBy { .. } => "denied_by_rule",
            Denial::NotAllowed { scope: 0 } => "not_allowed",
            Denial::NotAllowed { .. } => "outside_signer_scope",
        }
    }
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Denial::DeniedBy { rule, scope: 0 } => write!(f, "denied by `{rule}`"),
            Denial::DeniedBy { rule, .. } => write!(f, "denied by the signer's `{rule}`"),
            Denial::NotAllowed { scope: 0 } => f.write_str("no rule allows it"),
            Denial::NotAllowed { .. } => f.write_str("outside the scope the signer was given"),
        }
    }
}

/// Decides `req` for the principal `subject` holding `scopes` (its own rules
/// first, then its signer's scope, if any).
pub fn decide(scopes: &[&[Rule]], subject: &str, req: &Request) -> Decision {
    let mut allowed_by = None;
    for (scope, rules) in scopes.iter().enumerate() {
        let mut allow = None;
        for rule in rules.iter().filter(|r| r.action == req.action) {
            // A rule that does not parse with this subject allows nothing
            // and denies everything it might have meant: refuse.
            let Ok(pattern) = rule.pattern_for(subject) else {
                if rule.effect == Effect::Deny {
                    return Decision::Deny(Denial::DeniedBy {
                        rule: rule.clone(),
                        scope,
                    });
                }
                continue;
            };
            match rule.effect {
                Effect::Deny if overlaps(&pattern, &req.resource) => {
                    return Decision::Deny(Denial::DeniedBy {
                        rule: rule.clone(),
                        scope,
                    });
                }
                Effect::Allow if allow.is_none() && covers(&pattern, &req.resource) => {
                    allow = Some(rule);
                }
                _ => {}
            }
        }
        match allow {
            None => return Decision::Deny(Denial::NotAllowed { scope }),
            Some(rule) if scope == 0 => allowed_by = Some(rule.clone()),
            Some(_) => {}
        }
    }
    match allowed_by {
        Some(rule) => Decision::Allow { rule },
        None => Decision::Deny(Denial::NotAllowed { scope: 0 }),
    }
}

/// Whether every topic `inner` matches, `outer` matches too. Sound (never
/// true wrongly); it may say false for exotic pairs of `**` a human would
/// call covered, which only refuses.
pub fn covers(outer: &Pattern, inner: &Pattern) -> bool {
    let o: Vec<Segment<'_>> = outer.segments().collect();
    let i: Vec<Segment<'_>> = inner.segments().collect();
    covers_at(&o, &i)
}

fn covers_at(o: &[Segment<'_>], i: &[Segment<'_>]) -> bool {
    match o.split_first() {
        None => i.is_empty(),
        // `**` takes any run of the inner pattern's segments, wildcards too.
        Some((Segment::DoubleStar, rest)) => (0..=i.len()).any(|k| covers_at(rest, &i[k..])),
        Some((Segment::Star, rest)) => match i.split_first() {
            Some((Segment::Literal(_) | Segment::Star, irest)) => covers_at(rest, irest),
            _ => false,
        },
        Some((Segment::Literal(lit), rest)) => match i.split_first() {
            Some((Segment::Literal(l), irest)) if l == lit => covers_at(rest, irest),
            _ => false,
        },
    }
}

/// Whether some topic matches both patterns.
pub fn overlaps(a: &Pattern, b: &Pattern) -> bool {
    let a: Vec<Segment<'_>> = a.segments().collect();
    let b: Vec<Segment<'_>> = b.segments().collect();
    overlaps_at(&a, &b)
}

fn overlaps_at(a: &[Segment<'_>], b: &[Segment<'_>]) -> bool {
    match (a.split_first(), b.split_first()) {
        (None, None) => true,
        // `**` matches nothing here, or takes one more segment of a topic
        // that the other side matches with its first segment.
        (Some((Segment::DoubleStar, arest)), _) => {
            overlaps_at(arest, b)
                || match b.split_first() {
                    None => false,
                    Some((Segment::DoubleStar, _)) => overlaps_at(a, &b[1..]),
                    Some(_) => overlaps_at(a, &b[1..]),
                }
        }
        (_, Some((Segment::DoubleStar, _))) => overlaps_at(b, a),
        (None, Some(_)) | (Some(_), None) => false,
        (Some((x, arest)), Some((y, brest))) => {
            let one = match (x, y) {
                (Segment::Literal(p), Segment::Literal(q)) => p == q,
                _ => true,
            };
            one && overlaps_at(arest, brest)
        }
    }
}

/// Parses rules, one per line or `;`-separated; blank ones skipped.
pub fn parse_rules(text: &str) -> Result<Vec<Rule>, PolicyError> {
    let rules = text
        .split(['\n', ';'])
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(Rule::parse)
        .collect::<Result<Vec<_>, _>>()?;
    if rules.len() > MAX_RULES {
        return Err(PolicyError::TooManyRules {
            n: rules.len(),
            max: MAX_RULES,
        });
    }
    Ok(rules)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn rules(text: &str) -> Vec<Rule> {
        parse_rules(text).expect("rules")
    }

    fn ask(rs: &[Rule], action: Action, resource: &str) -> Decision {
        decide(
            &[rs],
            "me",
            &Request::new(action, resource).expect("request"),
        )
    }

    #[test]
    fn deny_wins_and_nothing_is_allowed_by_default() {
        let rs = rules("allow publish orders.*; deny publish orders.secret; allow subscribe orders.**; deny subscribe orders.audit.*");
        assert!(ask(&rs, Action::Publish, "orders.new").is_allowed());
        assert_eq!(
            ask(&rs, Action::Publish, "orders.secret"),
            Decision::Deny(Denial::DeniedBy {
                rule: Rule::parse("deny publish orders.secret").expect("rule"),
                scope: 0
            })
        );
        assert_eq!(
            ask(&rs, Action::Publish, "payments.x"),
            Decision::Deny(Denial::NotAllowed { scope: 0 })
        );
        assert!(!ask(&rs, Action::Call, "orders.new").is_allowed());
        // A subscription the deny rule could touch is refused whole.
        assert!(!ask(&rs, Action::Subscribe, "orders.**").is_allowed());
        assert!(ask(&rs, Action::Subscribe, "orders.*").is_allowed());
        assert!(ask(&rs, Action::Subscribe, "orders.new.*").is_allowed());
        assert!(!ask(&rs, Action::Subscribe, "orders.audit.x").is_allowed());
        assert!(!ask(&rs, Action::Subscribe, "**").is_allowed());
    }

    #[test]
    fn the_subject_template_names_the_principal() {
        let rs = rules("allow subscribe inbox.{{subject}}.**");
        let sub = |who: &str, p: &str| {
            decide(
                &[&rs],
                who,
                &Request::new(Action::Subscribe, p).expect("req"),
            )
            .is_allowed()
        };
        assert!(sub("alice", "inbox.alice.*"));
        assert!(sub("alice", "inbox.alice"));
        assert!(!sub("alice", "inbox.bob.*"));
        assert!(!sub("alice", "inbox.*.x"));
    }

    #[test]
    fn every_scope_must_allow() {
        let own = rules("allow publish **");
        let signer = rules("allow publish orders.**");
        let req = Request::new(Action::Publish, "orders.a").expect("req");
        assert!(decide(&[&own, &signer], "me", &req).is_allowed());
        let req = Request::new(Action::Publish, "payments.a").expect("req");
        let d = decide(&[&own, &signer], "me", &req);
        assert_eq!(d, Decision::Deny(Denial::NotAllowed { scope: 1 }));
        if let Decision::Deny(denial) = d {
            assert_eq!(denial.kind(), "outside_signer_scope");
        }
    }

    #[test]
    fn rules_parse_and_print() {
        for text in [
            "allow publish a.b",
            "deny subscribe **",
            "allow call svc.*.get",
            "allow advertise inbox.{{subject}}",
        ] {
            assert_eq!(Rule::parse(text).expect("parse").to_string(), text);
        }
        for bad in [
            "allow",
            "maybe publish a",
            "allow shout a",
            "allow publish a..b",
            "allow publish a b",
            "allow publish x*",
        ] {
            assert!(Rule::parse(bad).is_err(), "{bad}");
        }
        assert!(Request::new(Action::Publish, "a.*").is_err());
        assert!(Request::new(Action::Subscribe, "a.*").is_ok());
    }

    fn segment() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => prop::sample::select(vec!["a", "b", "c"]).prop_map(String::from),
            1 => Just("*".to_string()),
            1 => Just("**".to_string()),
        ]
    }

    fn pattern() -> impl Strategy<Value = Pattern> {
        prop::collection::vec(segment(), 1..5)
            .prop_filter_map("valid", |segs| Pattern::from_str(&segs.join(".")).ok())
    }

    /// Every topic of up to 5 segments over `a`, `b`, `c`, `d`.
    fn topics() -> Vec<Topic> {
        let mut out = Vec::new();
        let mut frontier = vec![String::new()];
        for _ in 0..5 {
            let mut next = Vec::new();
            for t in &frontier {
                for s in ["a", "b", "c", "d"] {
                    let t = if t.is_empty() {
                        s.to_string()
                    } else {
                        format!("{t}.{s}")
                    };
                    out.push(Topic::from_str(&t).expect("topic"));
                    next.push(t);
                }
            }
            frontier = next;
        }
        out
    }

    proptest! {
        /// `covers` never says yes wrongly, `overlaps` is exact, against
        /// every short topic (patterns of up to 4 segments match topics of
        /// up to 5 whenever they match any longer one).
        #[test]
        fn covers_and_overlaps_agree_with_the_matcher(a in pattern(), b in pattern()) {
            let all = topics();
            let cover = covers(&a, &b);
            let truth_cover = all.iter().all(|t| !b.matches(t) || a.matches(t));
            prop_assert!(!cover || truth_cover, "{} covers {} wrongly", a.as_str(), b.as_str());
            // Complete for patterns without `**` in the outer one.
            if !a.as_str().split('.').any(|s| s == "**") {
                prop_assert_eq!(cover, truth_cover, "{} / {}", a.as_str(), b.as_str());
            }
            let truth_overlap = all.iter().any(|t| a.matches(t) && b.matches(t));
            prop_assert_eq!(overlaps(&a, &b), truth_overlap, "{} / {}", a.as_str(), b.as_str());
            prop_assert_eq!(overlaps(&a, &b), overlaps(&b, &a));
        }
    }
}
