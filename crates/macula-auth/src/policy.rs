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

/// A pattern's segment, owned (compiled rules and requests keep theirs).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Seg {
    Lit(Box<str>),
    Star,
    Double,
}

fn segs(p: &Pattern) -> Vec<Seg> {
    p.segments()
        .map(|s| match s {
            Segment::Literal(l) => Seg::Lit(l.into()),
            Segment::Star => Seg::Star,
            Segment::DoubleStar => Seg::Double,
        })
        .collect()
}
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
    segs: Vec<Seg>,
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
        let segs = segs(&resource);
        Ok(Request {
            action,
            resource,
            segs,
        })
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
/// first, then its signer's scope, if any). Compiles the rules each time:
/// hold a [`Policy`] to decide many requests.
pub fn decide(scopes: &[&[Rule]], subject: &str, req: &Request) -> Decision {
    Policy::new(scopes, subject).decide(req)
}

/// One rule, compiled for a subject.
#[derive(Debug, Clone)]
enum Compiled {
    Rule {
        effect: Effect,
        segs: Vec<Seg>,
        index: usize,
    },
    /// A deny rule whose pattern does not parse with this subject: it
    /// denies every request of its action (never a silent allow).
    BrokenDeny { index: usize },
}

/// One scope's rules for one action, indexed by their first segment: a
/// request whose first segment is a literal is checked against the rules
/// that start with it and those that start with a wildcard, in rule order.
#[derive(Debug, Clone, Default)]
struct Bucket {
    rules: Vec<Compiled>,
    /// Positions in `rules` by first literal segment.
    by_first: std::collections::HashMap<Box<str>, Vec<usize>>,
    /// Positions of rules that start with `*` or `**` (or deny everything).
    wild: Vec<usize>,
}

impl Bucket {
    fn push(&mut self, c: Compiled) {
        let at = self.rules.len();
        match &c {
            Compiled::Rule { segs, .. } => match segs.first() {
                Some(Seg::Lit(l)) => self.by_first.entry(l.clone()).or_default().push(at),
                _ => self.wild.push(at),
            },
            Compiled::BrokenDeny { .. } => self.wild.push(at),
        }
        self.rules.push(c);
    }

    /// The rules that may touch `req`, in rule order.
    fn candidates<'a>(&'a self, req: &Request) -> Box<dyn Iterator<Item = &'a Compiled> + 'a> {
        match req.segs.first() {
            Some(Seg::Lit(l)) => {
                let own = self.by_first.get(l).map_or(&[][..], Vec::as_slice);
                // Merge the two sorted position lists.
                let (mut a, mut b) = (own.iter().peekable(), self.wild.iter().peekable());
                Box::new(std::iter::from_fn(move || {
                    let next = match (a.peek(), b.peek()) {
                        (Some(x), Some(y)) if x < y => a.next(),
                        (_, Some(_)) => b.next(),
                        (Some(_), None) => a.next(),
                        (None, None) => None,
                    };
                    next.map(|i| &self.rules[*i])
                }))
            }
            _ => Box::new(self.rules.iter()),
        }
    }
}

/// A principal's rules compiled once for its subject: patterns parsed, rules
/// grouped by action and indexed by first segment. Decisions are what
/// [`decide`] says.
#[derive(Debug, Clone)]
pub struct Policy {
    rules: Vec<Vec<Rule>>,
    /// Per scope, per action (in [`Action::ALL`] order).
    compiled: Vec<[Bucket; 6]>,
}

fn slot(a: Action) -> usize {
    a as usize
}

impl Policy {
    pub fn new(scopes: &[&[Rule]], subject: &str) -> Policy {
        let compiled = scopes
            .iter()
            .map(|rules| {
                let mut by_action: [Bucket; 6] = Default::default();
                for (index, rule) in rules.iter().enumerate() {
                    let c = match (rule.pattern_for(subject), rule.effect) {
                        (Ok(pattern), effect) => Compiled::Rule {
                            effect,
                            segs: segs(&pattern),
                            index,
                        },
                        (Err(_), Effect::Deny) => Compiled::BrokenDeny { index },
                        (Err(_), Effect::Allow) => continue,
                    };
                    by_action[slot(rule.action)].push(c);
                }
                by_action
            })
            .collect();
        Policy {
            rules: scopes.iter().map(|r| r.to_vec()).collect(),
            compiled,
        }
    }

    /// The decision for `req`: deny wins, every scope must allow.
    pub fn decide(&self, req: &Request) -> Decision {
        let mut allowed_by = None;
        for (scope, by_action) in self.compiled.iter().enumerate() {
            let mut allow = None;
            for c in by_action[slot(req.action)].candidates(req) {
                match c {
                    Compiled::BrokenDeny { index } => {
                        return self.denied(scope, *index);
                    }
                    Compiled::Rule {
                        effect: Effect::Deny,
                        segs,
                        index,
                    } if overlaps_at(segs, &req.segs) => {
                        return self.denied(scope, *index);
                    }
                    Compiled::Rule {
                        effect: Effect::Allow,
                        segs,
                        index,
                    } if allow.is_none() && covers_at(segs, &req.segs) => {
                        allow = Some(*index);
                    }
                    Compiled::Rule { .. } => {}
                }
            }
            match allow {
                None => return Decision::Deny(Denial::NotAllowed { scope }),
                Some(index) if scope == 0 => allowed_by = Some(index),
                Some(_) => {}
            }
        }
        match allowed_by {
            Some(index) => Decision::Allow {
                rule: self.rules[0][index].clone(),
            },
            None => Decision::Deny(Denial::NotAllowed { scope: 0 }),
        }
    }

    fn denied(&self, scope: usize, index: usize) -> Decision {
        Decision::Deny(Denial::DeniedBy {
            rule: self.rules[scope][index].clone(),
            scope,
        })
    }

    /// How many rules it holds, over every scope.
    pub fn len(&self) -> usize {
        self.rules.iter().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Recent decisions of one [`Policy`], by action and resource: a bounded
/// FIFO (a hit writes nothing; the oldest goes first when full). Drop it
/// with the policy it caches (a new grant or revocation list means a new
/// policy).
#[derive(Debug)]
pub struct DecisionCache {
    capacity: usize,
    /// Per action (in [`Action::ALL`] order), so a lookup borrows `&str`.
    maps: [std::collections::HashMap<Box<str>, Decision>; 6],
    order: std::collections::VecDeque<(Action, Box<str>)>,
    pub hits: u64,
    pub misses: u64,
}

/// Decisions cached per principal by default.
pub const DECISION_CACHE_CAPACITY: usize = 4096;

impl DecisionCache {
    pub fn new(capacity: usize) -> DecisionCache {
        DecisionCache {
            capacity,
            maps: Default::default(),
            order: std::collections::VecDeque::new(),
            hits: 0,
            misses: 0,
        }
    }

    /// `policy`'s decision for `action` on `resource`, from the cache when
    /// it was asked before. A malformed resource is an error, not cached.
    pub fn decide(
        &mut self,
        policy: &Policy,
        action: Action,
        resource: &str,
    ) -> Result<Decision, PolicyError> {
        if let Some(d) = self.maps[slot(action)].get(resource) {
            self.hits += 1;
            return Ok(d.clone());
        }
        self.misses += 1;
        let d = policy.decide(&Request::new(action, resource)?);
        if self.capacity > 0 {
            if self.order.len() >= self.capacity {
                if let Some((a, old)) = self.order.pop_front() {
                    self.maps[slot(a)].remove(&old);
                }
            }
            let key: Box<str> = Box::from(resource);
            self.order.push_back((action, key.clone()));
            self.maps[slot(action)].insert(key, d.clone());
        }
        Ok(d)
    }

    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

/// Whether every topic `inner` matches, `outer` matches too. Sound (never
/// true wrongly); it may say false for exotic pairs of `**` a human would
/// call covered, which only refuses.
pub fn covers(outer: &Pattern, inner: &Pattern) -> bool {
    covers_at(&segs(outer), &segs(inner))
}

fn covers_at(o: &[Seg], i: &[Seg]) -> bool {
    match o.split_first() {
        None => i.is_empty(),
        // `**` takes any run of the inner pattern's segments, wildcards too.
        Some((Seg::Double, rest)) => (0..=i.len()).any(|k| covers_at(rest, &i[k..])),
        Some((Seg::Star, rest)) => match i.split_first() {
            Some((Seg::Lit(_) | Seg::Star, irest)) => covers_at(rest, irest),
            _ => false,
        },
        Some((Seg::Lit(lit), rest)) => match i.split_first() {
            Some((Seg::Lit(l), irest)) if l == lit => covers_at(rest, irest),
            _ => false,
        },
    }
}

/// Whether some topic matches both patterns.
pub fn overlaps(a: &Pattern, b: &Pattern) -> bool {
    overlaps_at(&segs(a), &segs(b))
}

fn overlaps_at(a: &[Seg], b: &[Seg]) -> bool {
    match (a.split_first(), b.split_first()) {
        (None, None) => true,
        // `**` matches nothing here, or takes one more segment of a topic
        // that the other side matches with its first segment (or the other
        // side's `**` takes nothing).
        (Some((Seg::Double, arest)), _) => {
            overlaps_at(arest, b) || (!b.is_empty() && overlaps_at(a, &b[1..]))
        }
        (_, Some((Seg::Double, _))) => overlaps_at(b, a),
        (None, Some(_)) | (Some(_), None) => false,
        (Some((x, arest)), Some((y, brest))) => {
            let one = match (x, y) {
                (Seg::Lit(p), Seg::Lit(q)) => p == q,
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
    fn overlaps_finds_witnesses_longer_than_either_pattern() {
        let p = |s: &str| Pattern::from_str(s).expect("pattern");
        // `a.a.a.c.a.a` is matched by both (found by proptest in CI, when
        // the oracle only knew topics of up to 5 segments).
        assert!(overlaps(&p("**.c.a.a"), &p("a.a.a.**")));
        assert!(!overlaps(&p("**.c.a.a"), &p("a.a.a.b")));
        assert!(covers(&p("a.**"), &p("a.*.**")));
        assert!(!covers(&p("a.*"), &p("a.**")));
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
    fn the_cache_answers_as_the_policy_and_stays_bounded() {
        let rs = rules("allow publish a.*; deny publish a.x");
        let p = Policy::new(&[&rs], "me");
        let mut c = DecisionCache::new(2);
        for t in ["a.b", "a.x", "b.c", "a.b", "a.x"] {
            let want = p.decide(&Request::new(Action::Publish, t).expect("req"));
            assert_eq!(
                c.decide(&p, Action::Publish, t).expect("decide"),
                want,
                "{t}"
            );
            assert!(c.len() <= 2);
        }
        // a.b, a.x, b.c miss; a.b was evicted by b.c, a.x too by a.b.
        assert_eq!((c.hits, c.misses), (0, 5));
        assert!(c.decide(&p, Action::Publish, "a.*").is_err());
        let mut c = DecisionCache::new(8);
        for _ in 0..3 {
            assert!(c
                .decide(&p, Action::Publish, "a.b")
                .expect("decide")
                .is_allowed());
        }
        assert_eq!((c.hits, c.misses), (2, 1));
        // A deny rule that cannot be read for this subject denies all.
        let broken = vec![Rule {
            effect: Effect::Deny,
            action: Action::Publish,
            pattern: "a.{{subject}}".into(),
        }];
        let allow = rules("allow publish **");
        let p = Policy::new(&[&[allow, broken].concat()], "x y");
        assert!(!p
            .decide(&Request::new(Action::Publish, "z").expect("req"))
            .is_allowed());
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

    /// Patterns of up to 3 segments: a topic both of two of them match, or
    /// one matches and the other does not, has at most 6 segments if any
    /// has (each side's literals and `*` take one segment each; `**` can
    /// take none), so [`topics`] is a complete oracle for them.
    fn short_pattern() -> impl Strategy<Value = Pattern> {
        prop::collection::vec(segment(), 1..4)
            .prop_filter_map("valid", |segs| Pattern::from_str(&segs.join(".")).ok())
    }

    /// Every topic of up to 6 segments over `a`, `b`, `c`, `d` (built once).
    fn topics() -> &'static [Topic] {
        static ALL: std::sync::OnceLock<Vec<Topic>> = std::sync::OnceLock::new();
        ALL.get_or_init(all_topics)
    }

    fn all_topics() -> Vec<Topic> {
        let mut out = Vec::new();
        let mut frontier = vec![String::new()];
        for _ in 0..6 {
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

    /// The reference: every rule in order, no index.
    fn naive(rules: &[Rule], req: &Request) -> Decision {
        let mut allow = None;
        for rule in rules.iter().filter(|r| r.action == req.action) {
            let p = rule.pattern_for("me").expect("pattern");
            match rule.effect {
                Effect::Deny if overlaps(&p, &req.resource) => {
                    return Decision::Deny(Denial::DeniedBy {
                        rule: rule.clone(),
                        scope: 0,
                    })
                }
                Effect::Allow if allow.is_none() && covers(&p, &req.resource) => {
                    allow = Some(rule.clone())
                }
                _ => {}
            }
        }
        match allow {
            Some(rule) => Decision::Allow { rule },
            None => Decision::Deny(Denial::NotAllowed { scope: 0 }),
        }
    }

    fn rule() -> impl Strategy<Value = Rule> {
        (any::<bool>(), any::<bool>(), pattern()).prop_map(|(allow, publish, p)| Rule {
            effect: if allow { Effect::Allow } else { Effect::Deny },
            action: if publish {
                Action::Publish
            } else {
                Action::Subscribe
            },
            pattern: p.as_str().to_string(),
        })
    }

    proptest! {
        /// The compiled, indexed policy decides as the plain reading of the
        /// rules does.
        #[test]
        fn the_indexed_policy_decides_as_the_rules_read(
            rules in prop::collection::vec(rule(), 0..12),
            requests in prop::collection::vec((any::<bool>(), pattern()), 1..12),
        ) {
            let policy = Policy::new(&[&rules], "me");
            for (publish, p) in requests {
                let action = if publish { Action::Publish } else { Action::Subscribe };
                let Ok(req) = Request::new(action, p.as_str()) else { continue };
                prop_assert_eq!(policy.decide(&req), naive(&rules, &req), "{}", req);
            }
        }

        /// `covers` never says yes wrongly, `overlaps` is exact, against
        /// every topic that could tell (see [`short_pattern`]).
        #[test]
        fn covers_and_overlaps_agree_with_the_matcher(a in short_pattern(), b in short_pattern()) {
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
