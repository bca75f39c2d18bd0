//! Property tests of the routing table's invariants: bucket sizes never exceed
//! k, every entry sits in the bucket of its common-prefix length, our own ID is
//! never stored, IDs are unique, and `closest` is exactly the n nearest entries
//! in distance order.

use macula_dht::routing::{common_prefix_len, RoutingTable};
use macula_dht::{Contact, Millis, NodeId};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Seen(NodeId),
    SeenOwn,
    Unresponsive(NodeId),
}

/// IDs that share a chosen number of leading bits with `own`, so that the
/// deep, small buckets fill up too (uniform IDs would all land in bucket 0-3).
fn id_near(own: [u8; 32]) -> impl Strategy<Value = NodeId> {
    (0usize..24, any::<[u8; 32]>()).prop_map(move |(cpl, mut bytes)| {
        for bit in 0..cpl {
            let (byte, mask) = (bit / 8, 0x80u8 >> (bit % 8));
            bytes[byte] = (bytes[byte] & !mask) | (own[byte] & mask);
        }
        NodeId::from_bytes(bytes)
    })
}

fn op(own: [u8; 32]) -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => id_near(own).prop_map(Op::Seen),
        1 => Just(Op::SeenOwn),
        2 => id_near(own).prop_map(Op::Unresponsive),
    ]
}

fn check_invariants(t: &RoutingTable, k: usize) {
    let own = *t.own_id();
    let mut ids = Vec::new();
    for i in 0..t.n_buckets() {
        let bucket = t.bucket(i);
        assert!(bucket.len() <= k, "bucket {i} holds {} > k", bucket.len());
        for e in bucket {
            assert_ne!(e.contact.id, own, "own ID stored");
            assert_eq!(
                common_prefix_len(&own, &e.contact.id),
                i,
                "entry in the wrong bucket"
            );
            ids.push(e.contact.id);
        }
        // Least recently seen first.
        assert!(bucket.windows(2).all(|w| w[0].last_seen <= w[1].last_seen));
    }
    let n = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n, "duplicate entries");
    assert_eq!(t.len(), n);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn invariants_hold_under_any_sequence(
        own in any::<[u8; 32]>(),
        k in 1usize..6,
        ops in any::<[u8; 32]>().prop_flat_map(|own| proptest::collection::vec(op(own), 0..300)),
        targets in proptest::collection::vec(any::<[u8; 32]>(), 1..8),
        n in 0usize..40,
    ) {
        let own_id = NodeId::from_bytes(own);
        let mut t = RoutingTable::new(own_id, k, 3, Millis(0));
        for (step, op) in ops.into_iter().enumerate() {
            let now = Millis(step as u64);
            match op {
                Op::Seen(id) => { t.seen(Contact::new(id, "x"), now); }
                Op::SeenOwn => { t.seen(Contact::new(own_id, "self"), now); }
                Op::Unresponsive(id) => { t.mark_unresponsive(&id, now); }
            }
            check_invariants(&t, k);
        }
        // closest() is the brute-force n nearest, nearest first.
        let all: Vec<NodeId> = t.iter().map(|e| e.contact.id).collect();
        for target in targets.into_iter().map(NodeId::from_bytes).chain([own_id]) {
            let got: Vec<NodeId> = t.closest(&target, n).into_iter().map(|c| c.id).collect();
            let mut want = all.clone();
            want.sort_by_key(|id| id.distance(&target));
            want.truncate(n);
            prop_assert_eq!(got, want);
        }
    }

    #[test]
    fn random_bucket_ids_fall_in_their_bucket(own in any::<[u8; 32]>(), i in 0usize..256, seed in any::<u64>()) {
        let t = RoutingTable::new(NodeId::from_bytes(own), 20, 0, Millis(0));
        let mut rng = macula_dht::rng::Rng::new(seed);
        let id = t.random_id_in_bucket(i, &mut rng);
        prop_assert_eq!(t.bucket_index(&id), Some(i));
    }
}
