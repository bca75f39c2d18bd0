#!/usr/bin/env bash
# The whole test suite: formatting, lints, every test, and the fuzz targets
# building. README's second command and CI's .ci/run both run exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (all targets, -D warnings)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo test"
cargo test --workspace --locked

step "fuzz targets build (cargo fuzz run needs nightly; see docs/PROTOCOL.md)"
# Not --locked: fuzz/ has its own lock file, refreshed here as the crates grow.
CARGO_TARGET_DIR=target cargo build --manifest-path fuzz/Cargo.toml --bins

step "all checks passed"
