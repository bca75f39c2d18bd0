//! An example Macula workload (docs/WASM.md), used by the tests and by
//! `macula bench wasm`. Its configuration key `prefix` (default `wasm`)
//! names what it serves:
//! - `<prefix>.echo`: answers the payload;
//! - `<prefix>.relay`: calls the procedure named by the payload (with the
//!   payload `ping`) and answers its answer, or its error;
//! - `<prefix>.kv`: payload `group/key=value` writes then reads back the key;
//! - `<prefix>.hog`: allocates 1 MiB blocks until the memory limit stops it;
//! - `<prefix>.spin`: loops until its fuel runs out;
//! - `<prefix>.fail`: answers a handler error (code 7);
//! - `<prefix>.version`: answers the configuration key `version` (default
//!   `0`): the tests tell versions of a rollout apart by it;
//! - `<prefix>.health`: answers `ok`, or a handler error (code 13) when
//!   the configuration key `healthy` is `no` (a rollout's health check);
//! - it subscribes to `<prefix>.in` and publishes each event's payload
//!   prefixed by `seen:` to `<prefix>.out`.
#![no_std]

extern crate alloc;

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec;
use alloc::vec::Vec;

// memcmp, memcpy, memset: from the target's own wasi-libc (self-contained),
// which needs no import for them.
#[link(name = "c")]
extern "C" {}

#[global_allocator]
static ALLOC: dlmalloc::GlobalDlmalloc = dlmalloc::GlobalDlmalloc;

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    core::arch::wasm32::unreachable()
}

/// The canonical ABI's allocator. wit-bindgen leaves it to the target's
/// libc on `wasm32-wasip2`, which a `no_std` component does not link.
///
/// # Safety
/// Called by the component model with a pointer it got from here.
#[no_mangle]
pub unsafe extern "C" fn cabi_realloc(
    old_ptr: *mut u8,
    old_len: usize,
    align: usize,
    new_len: usize,
) -> *mut u8 {
    use alloc::alloc::{alloc, realloc, Layout};
    if new_len == 0 {
        return align as *mut u8;
    }
    let ptr = if old_len == 0 {
        alloc(Layout::from_size_align_unchecked(new_len, align))
    } else {
        realloc(
            old_ptr,
            Layout::from_size_align_unchecked(old_len, align),
            new_len,
        )
    };
    if ptr.is_null() {
        core::arch::wasm32::unreachable()
    }
    ptr
}

wit_bindgen::generate!({
    world: "workload",
    path: "../../wit",
});

use exports::macula::mesh::handlers::{CallError, Guest};
use macula::mesh::host::{self, Level};

static mut PREFIX: Option<String> = None;
static mut VERSION: Option<String> = None;
static mut HEALTHY: bool = true;

fn prefix() -> String {
    // Single-threaded: the component model never enters an instance twice.
    #[allow(static_mut_refs)]
    unsafe { PREFIX.clone() }.unwrap_or_else(|| "wasm".to_string())
}

struct Example;

impl Guest for Example {
    fn init(config: Vec<(String, String)>) -> Result<(), String> {
        let prefix = config
            .iter()
            .find(|(k, _)| k == "prefix")
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| "wasm".to_string());
        let get = |key: &str| config.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
        unsafe {
            VERSION = get("version");
            HEALTHY = get("healthy").as_deref() != Some("no");
        }
        for p in ["echo", "relay", "kv", "hog", "spin", "fail", "version", "health"] {
            host::advertise(&format!("{prefix}.{p}"))?;
        }
        host::subscribe(&format!("{prefix}.in"))?;
        host::log(Level::Info, &format!("example workload ready as {prefix}"));
        unsafe { PREFIX = Some(prefix) };
        Ok(())
    }

    fn handle_call(procedure: String, payload: Vec<u8>) -> Result<Vec<u8>, CallError> {
        let prefix = prefix();
        let name = procedure
            .strip_prefix(prefix.as_str())
            .and_then(|r| r.strip_prefix('.'))
            .unwrap_or("");
        match name {
            "echo" => Ok(payload),
            "relay" => {
                let target = String::from_utf8(payload).map_err(|_| err(1, "not UTF-8"))?;
                host::call(&target, b"ping", 0).map_err(|e| err(2, &e))
            }
            "kv" => {
                let text = String::from_utf8(payload).map_err(|_| err(1, "not UTF-8"))?;
                let (group, rest) = text.split_once('/').ok_or_else(|| err(1, "group/key=value"))?;
                let (key, value) = rest.split_once('=').ok_or_else(|| err(1, "group/key=value"))?;
                host::kv_put(group, key, value.as_bytes()).map_err(|e| err(3, &e))?;
                match host::kv_get(group, key).map_err(|e| err(3, &e))? {
                    Some(v) => Ok(v),
                    None => Err(err(4, "written key not found")),
                }
            }
            "hog" => {
                let mut held: Vec<Vec<u8>> = Vec::new();
                loop {
                    held.push(core::hint::black_box(vec![1u8; 1 << 20]));
                }
            }
            "spin" => {
                let mut n: u64 = 0;
                loop {
                    n = core::hint::black_box(n.wrapping_add(1));
                }
            }
            "fail" => Err(err(7, "asked to fail")),
            "version" => {
                #[allow(static_mut_refs)]
                let v = unsafe { VERSION.clone() }.unwrap_or_else(|| "0".to_string());
                Ok(v.into_bytes())
            }
            "health" => {
                if unsafe { HEALTHY } {
                    Ok(b"ok".to_vec())
                } else {
                    Err(err(13, "unhealthy (configuration healthy=no)"))
                }
            }
            _ => Err(err(404, &format!("no procedure {procedure}"))),
        }
    }

    fn handle_event(topic: String, payload: Vec<u8>) {
        let mut out = b"seen:".to_vec();
        out.extend_from_slice(&payload);
        if let Err(e) = host::publish(&format!("{}.out", prefix()), &out) {
            host::log(Level::Warn, &format!("event of {topic} not passed on: {e}"));
        }
    }
}

fn err(code: i64, message: &str) -> CallError {
    CallError {
        code,
        message: message.to_string(),
    }
}

export!(Example);
