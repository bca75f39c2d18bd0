//! The store's error type and its one encoding (MessagePack, named form),
//! shared by the log files ([`crate::wal`]) and the database
//! ([`crate::store`]).

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Why the store could not be opened or an operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("redb: {0}")]
    Redb(Box<redb::Error>),
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("encoding {what}: {source}")]
    Encode {
        what: &'static str,
        #[source]
        source: rmp_serde::encode::Error,
    },
    #[error("decoding {what}: {source}")]
    Decode {
        what: &'static str,
        #[source]
        source: rmp_serde::decode::Error,
    },
    #[error("corrupt store: {0}")]
    Corrupt(String),
    #[error("unsupported store format {found} (this build reads {expected})")]
    Format { found: u32, expected: u32 },
    #[error("storage task failed: {0}")]
    Task(String),
}

macro_rules! redb_from {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Redb(Box::new(e.into()))
            }
        }
    )*};
}
redb_from!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

pub(crate) fn encode<T: Serialize>(what: &'static str, value: &T) -> Result<Vec<u8>, StoreError> {
    rmp_serde::to_vec_named(value).map_err(|source| StoreError::Encode { what, source })
}

pub(crate) fn decode<T: DeserializeOwned>(
    what: &'static str,
    bytes: &[u8],
) -> Result<T, StoreError> {
    rmp_serde::from_slice(bytes).map_err(|source| StoreError::Decode { what, source })
}
