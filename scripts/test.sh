#!/usr/bin/env bash
# The whole test suite: formatting, lints, every test, the dependency policy
# (cargo deny) and the fuzz targets building. README's second command and
# CI's .ci/run both run exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

# One feature set for every cargo command below, so the workspace builds
# once: the tracing exporter (issue 23) is built and tested. A command
# without it would rebuild macula-runtime, macula and macula-cli.
FEATURES=(--features macula-cli/otlp)

# The WebAssembly workloads' tests (crates/macula-wasm/tests) build their
# example component from source for wasm32-wasip2 (docs/WASM.md).
if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip2; then
    step "rustup target add wasm32-wasip2"
    rustup target add wasm32-wasip2
fi

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (all targets, -D warnings)"
cargo clippy --workspace --all-targets --locked "${FEATURES[@]}" -- -D warnings

step "cargo test"
cargo test --workspace --locked "${FEATURES[@]}"

# The network-namespace tests are #[ignore]d (a non-root run lists them as
# ignored instead of passing them silently); as root they run here, and a
# missing prerequisite fails them (.ci/run sets MACULA_TEST_REQUIRE_NETNS=1).
if [ "$(id -u)" = 0 ]; then
    step "cargo test: network-namespace tests (root)"
    cargo test --locked "${FEATURES[@]}" -p macula-cli --test nat --test nat_clients --test nat_types -- --ignored
else
    echo "note: network-namespace tests ignored (not root); run scripts/test.sh as root to include them"
fi

step "cargo deny: licenses, bans, sources, advisories (deny.toml)"
if ! cargo deny --version >/dev/null 2>&1; then
    cargo install cargo-deny --locked --version 0.20.2
fi
cargo deny --locked check licenses bans sources
# Advisories need the RustSec database, a git repository on github.com: a
# machine that cannot reach it checks against a copy it already has, or says
# plainly that it checked none.
dbs="${CARGO_HOME:-$HOME/.cargo}/advisory-dbs"
if cargo deny --locked fetch db >/dev/null 2>&1; then
    cargo deny --locked check advisories
elif ls -d "$dbs"/advisory-db-* >/dev/null 2>&1; then
    echo "note: the RustSec advisory database cannot be fetched: checking against the copy in $dbs"
    cargo deny --locked --offline check advisories
else
    echo "note: the RustSec advisory database (github.com/rustsec/advisory-db) cannot be fetched and no copy is in $dbs: advisories NOT checked"
fi

step "fuzz targets build (cargo fuzz run needs nightly; see docs/PROTOCOL.md)"
# Not --locked: fuzz/ has its own lock file, refreshed here as the crates grow.
CARGO_TARGET_DIR=target cargo build --manifest-path fuzz/Cargo.toml --bins

step "all checks passed"
