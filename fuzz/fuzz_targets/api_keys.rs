//! Feeds arbitrary bytes to the API keys file parser (`macula_runtime::
//! apikey`): parse as a file, look the bytes up as a key, parse as a key's
//! text. Nothing may panic or over-allocate.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    macula_runtime::apikey::fuzz_api_keys(data);
});
