//! Seals of kind 4 (aligned digests): the input makes up messages (some
//! past BLAKE3's 1 KiB chunk, so their payloads hash in parallel) sealed
//! over aligned digests and a forwarded copy of some of them (the others'
//! aligned digests carried); the frame and the copy must verify, the copy
//! re-presented as kind 1 or with a carried digest changed must not, and
//! the copy with a byte changed verify only if its messages are the same.
//! Nothing may panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    macula_pubsub::proof::fuzz_aligned_copies(data);
});
