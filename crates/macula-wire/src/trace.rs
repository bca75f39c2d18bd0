//! W3C Trace Context (<https://www.w3.org/TR/trace-context/>) as carried in
//! PUBLISH and CALL headers, and the sampling decision of a node.
//!
//! A message that is part of a trace carries a `traceparent` header
//! (`00-<32 hex trace id>-<16 hex parent span id>-<2 hex flags>`) and may
//! carry a `tracestate` header (vendor data, passed on unchanged). Both are
//! plain header pairs: the pub/sub and RPC cores carry them as data, and a
//! node that does not trace forwards them untouched.
//!
//! Pure: no clock, no randomness (the caller hands in the random bits), no
//! allocation except `Display`.

use std::fmt;

/// Header carrying the trace and parent span (W3C `traceparent`).
pub const TRACEPARENT: &str = "traceparent";
/// Header carrying vendor trace state (W3C `tracestate`), passed on as is.
pub const TRACESTATE: &str = "tracestate";
/// Length of a version-00 `traceparent` value.
pub const TRACEPARENT_LEN: usize = 55;
/// `trace-flags` bit: the caller recorded (sampled) its span.
pub const FLAG_SAMPLED: u8 = 0x01;

/// A parsed `traceparent`: trace ID, parent span ID, flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceParent {
    pub trace_id: [u8; 16],
    pub parent_id: [u8; 8],
    pub flags: u8,
}

/// Why a `traceparent` value was refused (the header is then ignored: a
/// message with a bad trace context is delivered as one with none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TraceParentError {
    #[error("traceparent is {0} bytes, expected 55 (or more for a later version)")]
    Length(usize),
    #[error("traceparent is not `version-traceid-parentid-flags`")]
    Layout,
    #[error("traceparent has a character that is not lowercase hex")]
    Hex,
    #[error("traceparent version ff is invalid")]
    Version,
    #[error("traceparent trace id or parent id is all zeros")]
    Zero,
}

impl TraceParent {
    /// Parses a `traceparent` value. Version `00` must be exactly 55 bytes;
    /// a later version may be longer (its extra fields, after a `-`, are
    /// ignored, as the specification asks).
    pub fn parse(s: &str) -> Result<TraceParent, TraceParentError> {
        let b = s.as_bytes();
        if b.len() < TRACEPARENT_LEN {
            return Err(TraceParentError::Length(b.len()));
        }
        if b[2] != b'-' || b[35] != b'-' || b[52] != b'-' {
            return Err(TraceParentError::Layout);
        }
        let version = hex_byte(&b[0..2])?;
        if version == 0xff {
            return Err(TraceParentError::Version);
        }
        if b.len() > TRACEPARENT_LEN && (version == 0 || b[TRACEPARENT_LEN] != b'-') {
            return Err(TraceParentError::Length(b.len()));
        }
        let mut trace_id = [0u8; 16];
        hex_into(&b[3..35], &mut trace_id)?;
        let mut parent_id = [0u8; 8];
        hex_into(&b[36..52], &mut parent_id)?;
        let flags = hex_byte(&b[53..55])?;
        if trace_id == [0; 16] || parent_id == [0; 8] {
            return Err(TraceParentError::Zero);
        }
        Ok(TraceParent {
            trace_id,
            parent_id,
            flags,
        })
    }

    /// Whether the caller sampled (recorded) its span.
    pub fn sampled(&self) -> bool {
        self.flags & FLAG_SAMPLED != 0
    }

    /// The trace ID as 32 lowercase hex characters.
    pub fn trace_id_hex(&self) -> String {
        let mut b = [0u8; 32];
        hex_to(&self.trace_id, &mut b);
        std::str::from_utf8(&b)
            .map(str::to_owned)
            .unwrap_or_default()
    }

    /// The same trace with `span` as the parent: what a node passes on
    /// after it recorded a span of its own (a gateway's forwarding span).
    pub fn with_parent(self, span: [u8; 8]) -> TraceParent {
        TraceParent {
            parent_id: span,
            ..self
        }
    }
}

impl TraceParent {
    /// The version-00 `traceparent` value (55 bytes): one allocation, no
    /// formatter (what `to_string` gives, for the hot path).
    pub fn encode(&self) -> String {
        // Written as bytes, then one copy: every traced message's headers
        // get one.
        let mut b = [b'-'; TRACEPARENT_LEN];
        b[..2].copy_from_slice(b"00");
        hex_to(&self.trace_id, &mut b[3..35]);
        hex_to(&self.parent_id, &mut b[36..52]);
        hex_to(&[self.flags], &mut b[53..55]);
        // Only ASCII was written.
        std::str::from_utf8(&b)
            .map(str::to_owned)
            .unwrap_or_default()
    }
}

/// Formats as a version-00 `traceparent` (55 bytes).
impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.encode())
    }
}

/// The `traceparent` among `headers`, if there is one and it parses (the
/// first, matched without regard to case, as HTTP header names are).
/// Costs nothing on a message without headers.
pub fn find<'a, I>(headers: I) -> Option<TraceParent>
where
    I: IntoIterator<Item = (&'a str, &'a str)>,
{
    headers
        .into_iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(TRACEPARENT))
        .and_then(|(_, v)| TraceParent::parse(v).ok())
}

/// Lowercase hex digits' values; 0xff for every other byte.
const HEX_VALUE: [u8; 256] = {
    let mut t = [0xffu8; 256];
    let mut i = 0;
    while i < 10 {
        t[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        t[b'a' as usize + i] = 10 + i as u8;
        i += 1;
    }
    t
};

fn hex_byte(b: &[u8]) -> Result<u8, TraceParentError> {
    let (hi, lo) = (HEX_VALUE[usize::from(b[0])], HEX_VALUE[usize::from(b[1])]);
    if (hi | lo) & 0xf0 != 0 {
        return Err(TraceParentError::Hex);
    }
    Ok(hi << 4 | lo)
}

/// `out.len()` bytes from twice as many lowercase hex digits, checked once
/// at the end (a traceparent is parsed for every traced message).
fn hex_into(digits: &[u8], out: &mut [u8]) -> Result<(), TraceParentError> {
    let mut bad = 0u8;
    for (o, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        let (hi, lo) = (
            HEX_VALUE[usize::from(pair[0])],
            HEX_VALUE[usize::from(pair[1])],
        );
        bad |= hi | lo;
        *o = hi << 4 | lo;
    }
    if bad & 0xf0 != 0 {
        return Err(TraceParentError::Hex);
    }
    Ok(())
}

/// `bytes` as lowercase hex digits into `out` (twice as long).
fn hex_to(bytes: &[u8], out: &mut [u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for (&b, o) in bytes.iter().zip(out.chunks_exact_mut(2)) {
        o[0] = HEX[usize::from(b >> 4)];
        o[1] = HEX[usize::from(b & 15)];
    }
}

// ----- sampling ----------------------------------------------------------

/// A sampling ratio as a threshold on 64 random bits: a trace is sampled
/// when its bits are below it. `0.0` (or less, or NaN) samples nothing,
/// `1.0` (or more) everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ratio(u64);

impl Ratio {
    pub const NEVER: Ratio = Ratio(0);
    pub const ALWAYS: Ratio = Ratio(u64::MAX);

    pub fn new(ratio: f64) -> Ratio {
        if ratio.is_nan() || ratio <= 0.0 {
            Ratio::NEVER
        } else if ratio >= 1.0 {
            Ratio::ALWAYS
        } else {
            // Exact enough: 2^-53 granularity.
            Ratio((ratio * 18_446_744_073_709_551_616.0) as u64)
        }
    }

    /// The threshold, for storing in an atomic.
    pub fn bits(self) -> u64 {
        self.0
    }

    pub fn from_bits(bits: u64) -> Ratio {
        Ratio(bits)
    }

    /// Whether `random` (uniform 64 bits) falls in the sampled share.
    pub fn admits(self, random: u64) -> bool {
        self.0 == u64::MAX || random < self.0
    }

    /// How many operations that could start a trace to pass over before
    /// the next one that does, from `random` (uniform 64 bits): geometric
    /// with this ratio as its chance of success, so that counting down
    /// from it decides exactly as drawing [`Ratio::admits`] for each
    /// operation would (independently, at this ratio), with one draw per
    /// sampled operation instead of one per operation. `0` for
    /// [`Ratio::ALWAYS`], `u64::MAX` (never reached) for [`Ratio::NEVER`];
    /// never larger for a larger ratio and the same `random`.
    pub fn skip(self, random: u64) -> u64 {
        if self.0 == u64::MAX {
            return 0;
        }
        if self.0 == 0 {
            return u64::MAX;
        }
        // U uniform in (0, 1], 53 bits; P(skip >= k) = (1 - p)^k.
        let u = ((random >> 11) + 1) as f64 / 9_007_199_254_740_992.0;
        let p = self.0 as f64 / 18_446_744_073_709_551_616.0;
        // Saturating: a ratio too small for f64 to tell from 0 is never.
        (u.ln() / (-p).ln_1p()).floor() as u64
    }

    /// The ratio's decision for a new trace with `trace_id`, from its low 8
    /// bytes as OpenTelemetry's `TraceIdRatioBased` reads them (so the
    /// decision is the same wherever this trace ID is seen).
    pub fn admits_trace(self, trace_id: &[u8; 16]) -> bool {
        let mut low = [0u8; 8];
        low.copy_from_slice(&trace_id[8..]);
        // Only 63 bits are compared, as the reference does.
        self.admits((u64::from_be_bytes(low) >> 1) << 1)
    }
}

/// What a node decides for a span it is about to start: parent-based (a
/// remote or local parent's sampled flag decides), and for a new trace
/// (no parent) the ratio on `random`.
pub fn decide(parent_sampled: Option<bool>, ratio: Ratio, random: u64) -> bool {
    match parent_sampled {
        Some(sampled) => sampled,
        None => ratio.admits(random),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_the_specification_example() {
        let t = TraceParent::parse(EXAMPLE).unwrap();
        assert_eq!(t.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(
            t.parent_id,
            [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]
        );
        assert!(t.sampled());
        assert_eq!(t.to_string(), EXAMPLE);
        assert_eq!(t.encode(), EXAMPLE);
        let unsampled = EXAMPLE.replace("-01", "-00");
        assert!(!TraceParent::parse(&unsampled).unwrap().sampled());
    }

    #[test]
    fn refuses_what_the_specification_refuses() {
        use TraceParentError::*;
        let bad = |s: &str| TraceParent::parse(s).unwrap_err();
        assert_eq!(bad(""), Length(0));
        assert_eq!(bad(&EXAMPLE[..54]), Length(54));
        assert_eq!(bad(&EXAMPLE.replace("4bf9", "4BF9")), Hex);
        assert_eq!(bad(&EXAMPLE.replacen("00-", "ff-", 1)), Version);
        assert_eq!(
            bad("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            Zero
        );
        assert_eq!(
            bad("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01"),
            Zero
        );
        assert_eq!(bad(&EXAMPLE.replace('-', "_")), Layout);
        // Version 00 is exactly 55 bytes; a later version may add fields.
        assert_eq!(bad(&format!("{EXAMPLE}-x")), Length(57));
        let later = format!("01{}-more", &EXAMPLE[2..]);
        assert_eq!(TraceParent::parse(&later).unwrap().flags, 1);
        assert_eq!(bad(&format!("01{}x", &EXAMPLE[2..])), Length(56));
    }

    #[test]
    fn finds_the_header_among_others_whatever_its_case() {
        let h = [("a", "b"), ("TraceParent", EXAMPLE)];
        assert_eq!(find(h).unwrap().to_string(), EXAMPLE);
        assert_eq!(find([("traceparent", "junk")]), None);
        assert_eq!(find(std::iter::empty()), None);
    }

    #[test]
    fn a_new_parent_keeps_trace_and_flags() {
        let t = TraceParent::parse(EXAMPLE).unwrap().with_parent([7; 8]);
        assert_eq!(
            t.to_string(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0707070707070707-01"
        );
    }

    #[test]
    fn ratio_edges() {
        assert!(!Ratio::new(0.0).admits(0));
        assert!(!Ratio::new(-1.0).admits(0));
        assert!(!Ratio::new(f64::NAN).admits(0));
        assert!(Ratio::new(1.0).admits(u64::MAX));
        assert!(Ratio::new(2.0).admits(u64::MAX));
        let half = Ratio::new(0.5);
        assert!(half.admits(u64::MAX / 2 - 1) && !half.admits(u64::MAX / 2 + 1));
        assert_eq!(Ratio::from_bits(half.bits()), half);
    }

    #[test]
    fn parent_based_decisions() {
        assert!(decide(Some(true), Ratio::NEVER, 0));
        assert!(!decide(Some(false), Ratio::ALWAYS, 0));
        assert!(decide(None, Ratio::ALWAYS, u64::MAX));
        assert!(!decide(None, Ratio::NEVER, 0));
    }

    #[test]
    fn a_one_percent_ratio_samples_about_one_percent() {
        // A fixed sequence of well-spread 64-bit values (splitmix64).
        let mut x = 0u64;
        let mut next = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        let r = Ratio::new(0.01);
        let n = (0..100_000).filter(|_| r.admits(next())).count();
        assert!((800..1200).contains(&n), "{n}");
    }

    #[test]
    fn counting_down_skips_samples_at_the_ratio() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        assert_eq!(Ratio::ALWAYS.skip(next()), 0);
        assert_eq!(Ratio::NEVER.skip(next()), u64::MAX);
        assert_eq!(Ratio::new(1e-300).skip(next()), u64::MAX);
        for (ratio, n) in [(0.01, 1_000_000u64), (0.5, 100_000), (0.9, 100_000)] {
            let r = Ratio::new(ratio);
            // Operations sampled out of n, counting down from each skip.
            let (mut sampled, mut left) = (0u64, r.skip(next()));
            let mut gaps = Vec::new();
            for _ in 0..n {
                if left == 0 {
                    sampled += 1;
                    let g = r.skip(next());
                    gaps.push(g);
                    left = g;
                } else {
                    left -= 1;
                }
            }
            // Binomial(n, ratio): within 4 standard deviations.
            let (mean, sd) = (n as f64 * ratio, (n as f64 * ratio * (1.0 - ratio)).sqrt());
            assert!(
                (sampled as f64 - mean).abs() < 4.0 * sd,
                "{ratio}: {sampled} of {n}"
            );
            // Geometric gaps: P(0) = ratio, mean (1 - ratio) / ratio.
            let zero = gaps.iter().filter(|&&g| g == 0).count() as f64 / gaps.len() as f64;
            assert!(
                (zero - ratio).abs() < 0.02 + ratio * 0.1,
                "{ratio}: P(0) {zero}"
            );
            let avg = gaps.iter().sum::<u64>() as f64 / gaps.len() as f64;
            let want = (1.0 - ratio) / ratio;
            assert!(
                (avg - want).abs() < 0.1 * want + 0.05,
                "{ratio}: mean gap {avg}"
            );
        }
    }

    proptest! {
        #[test]
        fn a_higher_ratio_never_skips_more(
            a in 0.0f64..=1.0, b in 0.0f64..=1.0, x in any::<u64>()
        ) {
            let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
            prop_assert!(Ratio::new(hi).skip(x) <= Ratio::new(lo).skip(x));
        }

        #[test]
        fn format_then_parse_is_identity(
            trace_id in any::<[u8; 16]>(),
            parent_id in any::<[u8; 8]>(),
            flags in any::<u8>(),
        ) {
            prop_assume!(trace_id != [0; 16] && parent_id != [0; 8]);
            let t = TraceParent { trace_id, parent_id, flags };
            let s = t.to_string();
            prop_assert_eq!(s.len(), TRACEPARENT_LEN);
            prop_assert_eq!(TraceParent::parse(&s), Ok(t));
            prop_assert_eq!(t.trace_id_hex(), &s[3..35]);
        }

        #[test]
        fn one_bad_digit_anywhere_is_refused(pos in 0usize..55, c in any::<u8>()) {
            let hex = |b: u8| b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
            prop_assume!(![2, 35, 52].contains(&pos) && !hex(c) && c.is_ascii());
            let mut b = EXAMPLE.as_bytes().to_vec();
            b[pos] = c;
            let s = String::from_utf8(b).unwrap();
            prop_assert_eq!(TraceParent::parse(&s), Err(TraceParentError::Hex));
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,80}") {
            let _ = TraceParent::parse(&s);
        }

        #[test]
        fn what_parses_formats_back_the_same(s in "[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}") {
            if let Ok(t) = TraceParent::parse(&s) {
                // Version 00 round-trips exactly; a later one as version 00.
                prop_assert_eq!(t.to_string()[2..].to_string(), s[2..].to_string());
            }
        }

        #[test]
        fn a_higher_ratio_admits_everything_a_lower_one_does(
            a in 0.0f64..=1.0, b in 0.0f64..=1.0, x in any::<u64>()
        ) {
            let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
            if Ratio::new(lo).admits(x) {
                prop_assert!(Ratio::new(hi).admits(x));
            }
        }

        #[test]
        fn the_trace_decision_depends_on_the_trace_id_only(id in any::<[u8; 16]>(), r in 0.0f64..=1.0) {
            let ratio = Ratio::new(r);
            prop_assert_eq!(ratio.admits_trace(&id), ratio.admits_trace(&id));
            let mut same_low = [0u8; 16];
            same_low[8..].copy_from_slice(&id[8..]);
            prop_assert_eq!(ratio.admits_trace(&id), ratio.admits_trace(&same_low));
        }
    }
}
