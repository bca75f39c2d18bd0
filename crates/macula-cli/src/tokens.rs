//! Grant tokens and revocation list files as the CLI reads them (`--grant-file`,
//! `--revocations`, `realm push`): decoded and checked here, verified by the
//! node against its authority.

use std::path::Path;

use anyhow::{anyhow, Context};
use base64::Engine as _;
use macula::auth::{Grant, RevocationList};

use crate::Failure;

/// How grant tokens are written: URL-safe base64 without padding.
pub const TOKEN: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// The bytes of the grant token in the file at `path` (`macula start
/// --grant-file`), checked to decode as a grant.
pub fn grant_file(path: &Path) -> Result<Vec<u8>, Failure> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the grant file {}", path.display()))?;
    let bytes = TOKEN
        .decode(text.trim())
        .map_err(|e| crate::usage(anyhow!("{} is not a grant token: {e}", path.display())))?;
    Grant::from_bytes(&bytes)
        .map_err(|e| crate::usage(anyhow!("{} is not a grant: {e}", path.display())))?;
    Ok(bytes)
}

/// Reads a signed revocation list file (as `realm revoke` writes it);
/// checked to decode here, verified by the node against its authority.
pub fn revocations_file(path: &Path) -> Result<Vec<u8>, Failure> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("cannot read the revocation list {}", path.display()))?;
    RevocationList::from_bytes(&bytes)
        .map_err(|e| crate::usage(anyhow!("{} is not a revocation list: {e}", path.display())))?;
    Ok(bytes)
}
