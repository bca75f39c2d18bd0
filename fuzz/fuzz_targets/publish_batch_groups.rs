//! Seals of kind 3 (topic groups): the input makes up messages on three
//! topics sealed by topic groups and a forwarded copy of some of them
//! (whole groups, the others' digests, part of a group left out); the
//! frame and the copy must verify, the copy hold only whole groups, and
//! the copy with a byte changed verify only if its messages are the same.
//! Nothing may panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    macula_pubsub::proof::fuzz_group_copies(data);
});
