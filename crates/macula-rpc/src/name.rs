//! Procedure names and the DHT names advertisements live under.
//!
//! A procedure name is one or more dot-separated segments of ASCII letters,
//! digits, `_`, `-`, `:` and `/`, at most [`MAX_PROCEDURE_LEN`] bytes, e.g.
//! `billing.invoice.create` or `kv/get`. No wildcards: a call names exactly
//! one procedure.

/// Longest procedure name, in bytes.
pub const MAX_PROCEDURE_LEN: usize = 256;

/// Why a procedure name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    #[error("procedure name is empty")]
    Empty,
    #[error("procedure name is {len} bytes, limit {MAX_PROCEDURE_LEN}")]
    TooLong { len: usize },
    #[error("procedure name has an empty segment (leading, trailing or doubled '.')")]
    EmptySegment,
    #[error("procedure name contains {ch:?}; allowed: ASCII letters, digits, '_', '-', ':', '/', and '.' between segments")]
    BadChar { ch: char },
}

/// Checks a procedure name.
pub fn validate_procedure(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_PROCEDURE_LEN {
        return Err(NameError::TooLong { len: name.len() });
    }
    for seg in name.split('.') {
        if seg.is_empty() {
            return Err(NameError::EmptySegment);
        }
        if let Some(ch) = seg
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | ':' | '/')))
        {
            return Err(NameError::BadChar { ch });
        }
    }
    Ok(())
}

/// The DHT name under which providers of `procedure` in `realm` advertise
/// (one record per provider; hash it with `dht_key`).
pub fn ad_name(realm: &str, procedure: &str) -> String {
    format!("rpc:{realm}:{procedure}")
}

/// The DHT name under which every node lists the procedures it provides.
pub fn index_name(realm: &str) -> String {
    format!("rpcidx:{realm}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "calc.add", "kv/get", "svc-1.v2:op", "A_b"] {
            assert_eq!(validate_procedure(ok), Ok(()), "{ok}");
        }
        assert_eq!(validate_procedure(""), Err(NameError::Empty));
        assert_eq!(validate_procedure("a..b"), Err(NameError::EmptySegment));
        assert_eq!(validate_procedure(".a"), Err(NameError::EmptySegment));
        assert_eq!(validate_procedure("a."), Err(NameError::EmptySegment));
        assert_eq!(
            validate_procedure("a.*"),
            Err(NameError::BadChar { ch: '*' })
        );
        assert_eq!(
            validate_procedure("a b"),
            Err(NameError::BadChar { ch: ' ' })
        );
        let long = "x".repeat(MAX_PROCEDURE_LEN + 1);
        assert_eq!(
            validate_procedure(&long),
            Err(NameError::TooLong { len: long.len() })
        );
        assert_eq!(validate_procedure(&long[1..]), Ok(()));
        assert_eq!(ad_name("r", "a.b"), "rpc:r:a.b");
        assert_eq!(index_name("r"), "rpcidx:r");
    }
}
