//! Seals of kind 4 (aligned digests): the input makes up messages (some
//! past BLAKE3's 1 KiB chunk, so their payloads hash in parallel) sealed
//! over the tree of their aligned digests and a forwarded copy of some of
//! them (the hashes of the subtrees it has none of, computed at the
//! forwarder: the publisher's tree's); the frame, the copy and a part of
//! the copy forwarded on must verify, the copy re-presented as kind 1, with
//! a carried hash changed or with two payloads swapped must not, and the
//! copy with a byte changed verify only if its messages are the same.
//! Nothing may panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    macula_pubsub::proof::fuzz_aligned_copies(data);
});
