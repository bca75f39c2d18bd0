//! The lattice laws of every CRDT, on states built by arbitrary operations
//! on three replicas that sync now and then: merge is commutative,
//! associative and idempotent; deltas merged in any order, duplicated,
//! give the full-state join; `delta_since` sends exactly what is lacked;
//! states, digests and messages survive a MessagePack round trip. And each
//! type against a sequential model when one replica makes every operation.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;

use macula_crdt::{
    Crdt, GCounter, Hlc, HlcConfig, LwwElementSet, LwwMap, LwwRegister, Message, Millis, NodeId,
    OrSet, PnCounter, Timestamp,
};
use macula_wire::rng::Rng;
use proptest::prelude::*;

/// A CRDT with a vocabulary of operations to test it with.
trait Model: Crdt {
    type Op: Debug + Clone;
    fn op() -> BoxedStrategy<Self::Op>;
    /// Applies `op` as `ts.node` at `ts`; returns the delta.
    fn apply(&mut self, op: &Self::Op, ts: Timestamp) -> Self;
}

#[derive(Clone, Debug)]
enum SetOp {
    Add(u8),
    Remove(u8),
    Clear,
}

fn set_op() -> BoxedStrategy<SetOp> {
    prop_oneof![
        4 => (0u8..6).prop_map(SetOp::Add),
        3 => (0u8..6).prop_map(SetOp::Remove),
        1 => Just(SetOp::Clear),
    ]
    .boxed()
}

impl Model for OrSet<u8> {
    type Op = SetOp;
    fn op() -> BoxedStrategy<SetOp> {
        set_op()
    }
    fn apply(&mut self, op: &SetOp, ts: Timestamp) -> Self {
        match op {
            SetOp::Add(x) => self.add(ts.node, *x).expect("under the limit"),
            SetOp::Remove(x) => self.remove(ts.node, x),
            SetOp::Clear => self.clear(ts.node),
        }
    }
}

impl Model for LwwElementSet<u8> {
    type Op = SetOp;
    fn op() -> BoxedStrategy<SetOp> {
        set_op()
    }
    fn apply(&mut self, op: &SetOp, ts: Timestamp) -> Self {
        match op {
            SetOp::Add(x) => self.add(ts, *x).expect("under the limit"),
            SetOp::Remove(x) => self.remove(ts, x),
            // No clear on this type: remove the smallest present element.
            SetOp::Clear => {
                let first = self.iter().next().copied();
                match first {
                    Some(x) => self.remove(ts, &x),
                    None => Self::default(),
                }
            }
        }
    }
}

#[derive(Clone, Debug)]
enum MapOp {
    Put(u8, u16),
    Del(u8),
}

impl Model for LwwMap<u8, u16> {
    type Op = MapOp;
    fn op() -> BoxedStrategy<MapOp> {
        prop_oneof![
            3 => (0u8..5, any::<u16>()).prop_map(|(k, v)| MapOp::Put(k, v)),
            2 => (0u8..5).prop_map(MapOp::Del),
        ]
        .boxed()
    }
    fn apply(&mut self, op: &MapOp, ts: Timestamp) -> Self {
        match op {
            MapOp::Put(k, v) => self.insert(ts, *k, *v).expect("under the limit"),
            MapOp::Del(k) => self.remove(ts, k),
        }
    }
}

impl Model for LwwRegister<u16> {
    type Op = u16;
    fn op() -> BoxedStrategy<u16> {
        any::<u16>().boxed()
    }
    fn apply(&mut self, op: &u16, ts: Timestamp) -> Self {
        self.set(ts, *op)
    }
}

impl Model for GCounter {
    type Op = u8;
    fn op() -> BoxedStrategy<u8> {
        (0u8..10).boxed()
    }
    fn apply(&mut self, op: &u8, ts: Timestamp) -> Self {
        self.increment(ts.node, u64::from(*op))
            .expect("no overflow")
    }
}

impl Model for PnCounter {
    type Op = i8;
    fn op() -> BoxedStrategy<i8> {
        any::<i8>().boxed()
    }
    fn apply(&mut self, op: &i8, ts: Timestamp) -> Self {
        let by = u64::from(op.unsigned_abs());
        if *op >= 0 {
            self.increment(ts.node, by).expect("no overflow")
        } else {
            self.decrement(ts.node, by).expect("no overflow")
        }
    }
}

#[derive(Clone, Debug)]
enum Step<O> {
    Op(usize, O),
    /// Replica `.1` merges replica `.0`'s whole state.
    Sync(usize, usize),
}

fn steps<C: Model>() -> impl Strategy<Value = Vec<Step<C::Op>>> {
    let step = prop_oneof![
        4 => (0usize..3, C::op()).prop_map(|(r, o)| Step::Op(r, o)),
        1 => (0usize..3, 0usize..3).prop_map(|(a, b)| Step::Sync(a, b)),
    ];
    proptest::collection::vec(step, 0..40)
}

fn node(i: usize) -> NodeId {
    NodeId::from_bytes([i as u8 + 1; 32])
}

/// Runs the steps on three replicas; returns their states and every delta
/// the operations produced.
fn run<C: Model>(steps: &[Step<C::Op>]) -> (Vec<C>, Vec<C>) {
    let mut states = vec![C::default(); 3];
    let mut clocks: Vec<Hlc> = (0..3)
        .map(|i| Hlc::new(node(i), HlcConfig::default()))
        .collect();
    let mut deltas = Vec::new();
    for (t, s) in steps.iter().enumerate() {
        // Coarse wall clock: several operations share a millisecond.
        let wall = Millis(1_000 + t as u64 / 3);
        match s {
            Step::Op(r, op) => {
                let ts = clocks[*r].now(wall);
                deltas.push(states[*r].apply(op, ts));
            }
            Step::Sync(a, b) => {
                let from = states[*a].clone();
                if let Some(ts) = from.latest() {
                    clocks[*b].observe(wall, ts).expect("no drift");
                }
                states[*b].merge(&from);
            }
        }
    }
    (states, deltas)
}

fn join<C: Crdt>(a: &C, b: &C) -> C {
    let mut x = a.clone();
    x.merge(b);
    x
}

fn roundtrip<T: serde::Serialize + serde::de::DeserializeOwned>(x: &T) -> T {
    let named = rmp_serde::to_vec_named(x).expect("encodes");
    let compact = rmp_serde::to_vec(x).expect("encodes");
    let back: T = rmp_serde::from_slice(&compact).expect("decodes");
    let _ = back;
    rmp_serde::from_slice(&named).expect("decodes")
}

fn check_laws<C: Model>(steps: &[Step<C::Op>], seed: u64) -> Result<(), TestCaseError> {
    let (s, deltas) = run::<C>(steps);
    let all = join(&join(&s[0], &s[1]), &s[2]);
    for a in &s {
        // Idempotent.
        prop_assert_eq!(&join(a, a), a);
        for b in &s {
            // Commutative.
            prop_assert_eq!(join(a, b), join(b, a));
            prop_assert_eq!(join(&join(a, b), b), join(a, b));
            for c in &s {
                // Associative.
                prop_assert_eq!(join(&join(a, b), c), join(a, &join(b, c)));
            }
            // delta_since sends exactly what b lacks of a.
            let full = join(b, a);
            match a.delta_since(&b.digest()) {
                Some(d) => {
                    prop_assert_eq!(join(b, &d), full.clone());
                    prop_assert_ne!(&full, b);
                }
                None => prop_assert_eq!(&full, b),
            }
            prop_assert_eq!(b.lacks(&a.digest()), &full != b);
        }
        // Serde round trip of states and digests.
        prop_assert_eq!(&roundtrip(a), a);
        prop_assert_eq!(roundtrip(&a.digest()), a.digest());
    }
    // Deltas in any order, some duplicated, give the full-state join; so do
    // they merged into any replica's state.
    let mut rng = Rng::new(seed);
    let mut shuffled: Vec<&C> = deltas.iter().collect();
    for d in &deltas {
        if rng.chance(0.3) {
            shuffled.push(d);
        }
    }
    rng.shuffle(&mut shuffled);
    let mut from_deltas = C::default();
    for d in &shuffled {
        from_deltas.merge(d);
    }
    prop_assert_eq!(&from_deltas, &all);
    let mut into_first = s[0].clone();
    for d in shuffled.iter().rev() {
        into_first.merge(d);
    }
    prop_assert_eq!(&into_first, &all);
    // States from arbitrary subsets of the deltas (some lost, none in causal
    // order): the digest exchange is still exact between them.
    let partial: Vec<C> = (0..3)
        .map(|_| {
            let mut x = C::default();
            for d in &deltas {
                if rng.chance(0.6) {
                    x.merge(d);
                }
            }
            x
        })
        .collect();
    for a in &partial {
        for b in &partial {
            let full = join(b, a);
            match a.delta_since(&b.digest()) {
                // Over the wire, as it travels.
                Some(d) => prop_assert_eq!(join(b, &roundtrip(&d)), full.clone()),
                None => prop_assert_eq!(&full, b),
            }
            prop_assert_eq!(b.lacks(&a.digest()), &full != b);
        }
        // Merging the rest of the deltas converges to the full join.
        let mut rest = a.clone();
        for d in &deltas {
            rest.merge(d);
        }
        prop_assert_eq!(&rest, &all);
    }
    // Deltas round-trip inside messages.
    for d in deltas.iter().take(3) {
        let m = Message::Delta {
            name: "n".to_string(),
            from: node(0),
            delta: d.clone(),
        };
        prop_assert_eq!(
            Message::<C>::decode(&m.encode().expect("encodes")).expect("decodes"),
            m
        );
    }
    let m = Message::<C>::Digest {
        name: "n".to_string(),
        from: node(1),
        digest: all.digest(),
    };
    prop_assert_eq!(
        Message::<C>::decode(&m.encode().expect("encodes")).expect("decodes"),
        m
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn or_set_laws(s in steps::<OrSet<u8>>(), seed: u64) {
        check_laws::<OrSet<u8>>(&s, seed)?;
    }

    #[test]
    fn lww_element_set_laws(s in steps::<LwwElementSet<u8>>(), seed: u64) {
        check_laws::<LwwElementSet<u8>>(&s, seed)?;
    }

    #[test]
    fn lww_map_laws(s in steps::<LwwMap<u8, u16>>(), seed: u64) {
        check_laws::<LwwMap<u8, u16>>(&s, seed)?;
    }

    #[test]
    fn lww_register_laws(s in steps::<LwwRegister<u16>>(), seed: u64) {
        check_laws::<LwwRegister<u16>>(&s, seed)?;
    }

    #[test]
    fn g_counter_laws(s in steps::<GCounter>(), seed: u64) {
        check_laws::<GCounter>(&s, seed)?;
    }

    #[test]
    fn pn_counter_laws(s in steps::<PnCounter>(), seed: u64) {
        check_laws::<PnCounter>(&s, seed)?;
    }

    /// One replica making every operation behaves like the sequential type.
    #[test]
    fn sequential_semantics(
        set_ops in proptest::collection::vec(set_op(), 0..40),
        map_ops in proptest::collection::vec(LwwMap::<u8, u16>::op(), 0..40),
        counts in proptest::collection::vec(any::<i8>(), 0..40),
    ) {
        let mut clock = Hlc::new(node(0), HlcConfig::default());
        let (mut or, mut lww) = (OrSet::<u8>::new(), LwwElementSet::<u8>::new());
        let mut model = BTreeSet::new();
        for op in &set_ops {
            // LWW's Clear removes the smallest element: mirror that in both.
            let op = match op {
                SetOp::Clear => match model.iter().next() {
                    Some(&x) => SetOp::Remove(x),
                    None => continue,
                },
                o => o.clone(),
            };
            or.apply(&op, clock.now(Millis(5)));
            lww.apply(&op, clock.now(Millis(5)));
            match op {
                SetOp::Add(x) => { model.insert(x); }
                SetOp::Remove(x) => { model.remove(&x); }
                SetOp::Clear => {}
            }
            prop_assert_eq!(or.iter().copied().collect::<BTreeSet<_>>(), model.clone());
            prop_assert_eq!(lww.iter().copied().collect::<BTreeSet<_>>(), model.clone());
            prop_assert_eq!(or.len(), model.len());
            prop_assert_eq!(lww.len(), model.len());
        }
        let mut map = LwwMap::<u8, u16>::new();
        let mut mmodel = BTreeMap::new();
        for op in &map_ops {
            map.apply(op, clock.now(Millis(5)));
            match op {
                MapOp::Put(k, v) => { mmodel.insert(*k, *v); }
                MapOp::Del(k) => { mmodel.remove(k); }
            }
            prop_assert_eq!(map.iter().map(|(k, v)| (*k, *v)).collect::<BTreeMap<_, _>>(), mmodel.clone());
        }
        let (mut g, mut pn) = (GCounter::new(), PnCounter::new());
        let (mut gv, mut pv) = (0u128, 0i128);
        for (i, c) in counts.iter().enumerate() {
            let ts = clock.now(Millis(5));
            let ts = Timestamp { node: node(i % 3), ..ts };
            g.apply(&c.unsigned_abs(), ts);
            pn.apply(c, ts);
            gv += u128::from(c.unsigned_abs());
            pv += i128::from(*c);
            prop_assert_eq!(g.value(), gv);
            prop_assert_eq!(pn.value(), pv);
        }
    }

    /// Decoding arbitrary bytes never panics.
    #[test]
    fn decoding_garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
        let _ = Message::<OrSet<u8>>::decode(&bytes);
        let _ = Message::<LwwMap<u8, u16>>::decode(&bytes);
        let _ = Message::<PnCounter>::decode(&bytes);
        let _ = Message::<LwwRegister<u16>>::decode(&bytes);
    }
}
