//! Messages stored in blocks: table `blocks` maps the first sequence of a
//! block to the block, a run of entries `seq u64 | length u32 | record`
//! (little endian), ascending, every sequence below the next block's key.
//!
//! Why: one redb B-tree insert per message was the writer's bound at
//! 1 KiB (a leaf holds three such records, so a branch page is rebuilt
//! every third insert): about 100,000 inserts a second on this machine,
//! against about 520,000 messages a second in blocks of 16 and 710,000 in
//! blocks of 64 (BENCHMARKS.md, "Messages stored in blocks").
//!
//! The writer appends a group's consecutive new puts as blocks of at most
//! [`BLOCK_MSGS`] messages or [`BLOCK_BYTES`] bytes (a larger record goes
//! alone); a block, once written, is only rewritten when one of its
//! messages is removed (or, rarely, put again: a sequence at or below the
//! highest stored goes into the block that covers it). A block's key
//! stays its first sequence when that one is removed: it is a lower
//! bound, and the block holding a sequence is the one with the greatest
//! key at or below it. The messages stored are counted in `meta.count`
//! (a block count is not a message count). Files of earlier versions kept
//! one record per key in table `msgs`; [`migrate`] moves them into blocks
//! at the first open.

use redb::{ReadableTable, ReadableTableMetadata, Table, TableDefinition, WriteTransaction};

/// Block key (its first sequence, or below) -> entries.
pub(super) const BLOCKS: TableDefinition<u64, &[u8]> = TableDefinition::new("blocks");
/// The table of earlier versions: sequence -> record.
pub(super) const MSGS: TableDefinition<u64, &[u8]> = TableDefinition::new("msgs");
/// `meta` key of the number of messages stored (u64, LE; absent: 0).
pub const META_COUNT: &str = "count";
/// Messages a block the writer appends holds at most.
pub const BLOCK_MSGS: usize = 64;
/// Record bytes a block the writer appends holds at most (a larger record
/// goes alone).
pub const BLOCK_BYTES: usize = 64 << 10;
/// An entry's head: sequence and record length.
const ENTRY_HEAD: usize = 12;

/// A block that does not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("block {key}: {what}")]
pub struct BadBlock {
    pub key: u64,
    pub what: &'static str,
}

/// The entries of block `key`, in order.
pub(super) fn entries(key: u64, block: &[u8]) -> Entries<'_> {
    Entries {
        key,
        rest: block,
        last: None,
    }
}

pub(super) struct Entries<'a> {
    key: u64,
    rest: &'a [u8],
    last: Option<u64>,
}

impl<'a> Iterator for Entries<'a> {
    type Item = Result<(u64, &'a [u8]), BadBlock>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let bad = |what| {
            Some(Err(BadBlock {
                key: self.key,
                what,
            }))
        };
        let Some((head, body)) = self.rest.split_first_chunk::<ENTRY_HEAD>() else {
            self.rest = &[];
            return bad("an entry's head is cut short");
        };
        let (seq, len) = head.split_at(8);
        let seq = u64::from_le_bytes(seq.try_into().unwrap_or_default());
        let len = u32::from_le_bytes(len.try_into().unwrap_or_default()) as usize;
        if len > body.len() {
            self.rest = &[];
            return bad("an entry's record is cut short");
        }
        if seq < self.key || self.last.is_some_and(|l| seq <= l) {
            self.rest = &[];
            return bad("sequences out of order");
        }
        let (rec, rest) = body.split_at(len);
        self.rest = rest;
        self.last = Some(seq);
        Some(Ok((seq, rec)))
    }
}

fn push_entry(buf: &mut Vec<u8>, seq: u64, rec: &[u8]) {
    buf.extend_from_slice(&seq.to_le_bytes());
    buf.extend_from_slice(&(rec.len() as u32).to_le_bytes());
    buf.extend_from_slice(rec);
}

/// A block as read from its table.
pub(super) type Block<'t> = redb::AccessGuard<'t, &'static [u8]>;

/// The block that would hold `seq` (the greatest key at or below it),
/// with that key.
pub(super) fn block_of<'t, T: ReadableTable<u64, &'static [u8]>>(
    t: &'t T,
    seq: u64,
) -> Result<Option<(u64, Block<'t>)>, redb::StorageError> {
    match t.range(..=seq)?.next_back() {
        Some(item) => {
            let (k, v) = item?;
            Ok(Some((k.value(), v)))
        }
        None => Ok(None),
    }
}

/// Finds `seq`'s record in block `key`.
pub(super) fn find(key: u64, block: &[u8], seq: u64) -> Result<Option<&[u8]>, BadBlock> {
    for e in entries(key, block) {
        let (s, rec) = e?;
        if s == seq {
            return Ok(Some(rec));
        }
        if s > seq {
            break;
        }
    }
    Ok(None)
}

/// The first key to read from for sequences from `from` on: the key of the
/// block holding `from`, or `from`.
pub(super) fn start_key<T: ReadableTable<u64, &'static [u8]>>(
    t: &T,
    from: u64,
) -> Result<u64, redb::StorageError> {
    Ok(block_of(t, from)?.map_or(from, |(k, _)| k))
}

/// A redb or block error, as the store reports them.
#[derive(Debug, thiserror::Error)]
pub(super) enum BlockError {
    #[error("{0}")]
    Redb(String),
    #[error(transparent)]
    Bad(#[from] BadBlock),
}

impl From<redb::Error> for BlockError {
    fn from(e: redb::Error) -> Self {
        BlockError::Redb(e.to_string())
    }
}
impl From<redb::StorageError> for BlockError {
    fn from(e: redb::StorageError) -> Self {
        BlockError::Redb(e.to_string())
    }
}
impl From<redb::TableError> for BlockError {
    fn from(e: redb::TableError) -> Self {
        BlockError::Redb(e.to_string())
    }
}

/// The puts and removals of one write transaction (the writer's commit).
pub(super) struct BlockWriter<'t> {
    table: Table<'t, u64, &'static [u8]>,
    /// Consecutive new puts not written yet: one block.
    pending: Vec<u8>,
    pending_first: u64,
    pending_last: u64,
    pending_n: usize,
    /// Every stored sequence is at or below it (`None`: not looked up yet).
    tail: Option<u64>,
    count: u64,
}

impl<'t> BlockWriter<'t> {
    /// Over `table`, which holds `count` messages.
    pub(super) fn new(table: Table<'t, u64, &'static [u8]>, count: u64) -> Self {
        BlockWriter {
            table,
            pending: Vec::new(),
            pending_first: 0,
            pending_last: 0,
            pending_n: 0,
            tail: None,
            count,
        }
    }

    /// The highest stored sequence (0: none), pending puts included.
    fn tail(&mut self) -> Result<u64, BlockError> {
        if self.pending_n > 0 {
            return Ok(self.pending_last);
        }
        if let Some(t) = self.tail {
            return Ok(t);
        }
        let tail = match self.table.last()? {
            Some((k, v)) => {
                let key = k.value();
                let mut last = key;
                for e in entries(key, v.value()) {
                    last = e?.0;
                }
                last
            }
            None => 0,
        };
        self.tail = Some(tail);
        Ok(tail)
    }

    /// Stores `rec` under `seq` (replacing a record stored there).
    pub(super) fn put(&mut self, seq: u64, rec: &[u8]) -> Result<(), BlockError> {
        if seq > self.tail()? {
            let full = self.pending_n >= BLOCK_MSGS
                || (self.pending_n > 0 && self.pending.len() + rec.len() > BLOCK_BYTES);
            if full {
                self.flush()?;
            }
            if self.pending_n == 0 {
                self.pending_first = seq;
            }
            push_entry(&mut self.pending, seq, rec);
            self.pending_last = seq;
            self.pending_n += 1;
            self.count += 1;
            return Ok(());
        }
        self.flush()?;
        // At or below what is stored: into the block that covers it (a
        // block grown past twice the bounds is split in two, so puts out of
        // order never make one block take them all).
        let found = block_of(&self.table, seq)?.map(|(k, v)| (k, v.value().to_vec()));
        let (key, old) = found.unwrap_or((seq, Vec::new()));
        let mut merged: Vec<(u64, &[u8])> = Vec::new();
        let mut added = true;
        for e in entries(key, &old) {
            let (s, r) = e?;
            if s == seq {
                added = false;
            } else {
                merged.push((s, r));
            }
        }
        let at = merged.partition_point(|(s, _)| *s < seq);
        merged.insert(at, (seq, rec));
        self.count += u64::from(added);
        let bytes: usize = merged.iter().map(|(_, r)| ENTRY_HEAD + r.len()).sum();
        let halves =
            if merged.len() > 2 * BLOCK_MSGS || (merged.len() > 1 && bytes > 2 * BLOCK_BYTES) {
                let (a, b) = merged.split_at(merged.len() / 2);
                vec![(key, a), (b[0].0, b)]
            } else {
                vec![(key, &merged[..])]
            };
        for (k, part) in halves {
            let mut block = Vec::with_capacity(bytes);
            for (s, r) in part {
                push_entry(&mut block, *s, r);
            }
            self.table.insert(k, block.as_slice())?;
        }
        Ok(())
    }

    /// Removes `seqs` (those not stored are ignored).
    pub(super) fn delete(&mut self, seqs: &[u64]) -> Result<(), BlockError> {
        self.flush()?;
        let mut sorted = seqs.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let mut i = 0;
        while i < sorted.len() {
            let first = i;
            let Some((key, old)) =
                block_of(&self.table, sorted[i])?.map(|(k, v)| (k, v.value().to_vec()))
            else {
                i += 1;
                continue;
            };
            let mut kept = Vec::with_capacity(old.len());
            let mut removed = 0u64;
            let mut last = key;
            for e in entries(key, &old) {
                let (s, r) = e?;
                while i < sorted.len() && sorted[i] < s {
                    i += 1;
                }
                if i < sorted.len() && sorted[i] == s {
                    removed += 1;
                    i += 1;
                } else {
                    push_entry(&mut kept, s, r);
                }
                last = s;
            }
            // Past this block's last entry: the next sequences are in a
            // later block, if anywhere.
            while i < sorted.len() && sorted[i] <= last {
                i += 1;
            }
            if i == first {
                // Past this block's last entry, below the next block: not
                // stored.
                i += 1;
            }
            if removed > 0 {
                if kept.is_empty() {
                    self.table.remove(key)?;
                } else {
                    self.table.insert(key, kept.as_slice())?;
                }
                self.count -= removed.min(self.count);
            }
        }
        Ok(())
    }

    /// Removes every message.
    pub(super) fn clear(&mut self) -> Result<(), BlockError> {
        self.pending.clear();
        self.pending_n = 0;
        self.table.retain(|_, _| false)?;
        self.tail = Some(0);
        self.count = 0;
        Ok(())
    }

    fn flush(&mut self) -> Result<(), BlockError> {
        if self.pending_n == 0 {
            return Ok(());
        }
        self.table
            .insert(self.pending_first, self.pending.as_slice())?;
        self.tail = Some(self.pending_last);
        self.pending.clear();
        self.pending_n = 0;
        Ok(())
    }

    /// Writes what is pending; the number of messages stored.
    pub(super) fn finish(mut self) -> Result<u64, BlockError> {
        self.flush()?;
        Ok(self.count)
    }
}

/// Moves the records of an earlier version's table `msgs` into blocks and
/// drops it, in `txn`: the number of messages stored after it, or `None`
/// when there was nothing to move (the caller then aborts `txn`).
pub(super) fn migrate(txn: &WriteTransaction, count: u64) -> Result<Option<u64>, BlockError> {
    let old: Vec<(u64, Vec<u8>)> = {
        let msgs = txn.open_table(MSGS)?;
        if msgs.is_empty()? {
            Vec::new()
        } else {
            let mut out = Vec::new();
            for item in msgs.iter()? {
                let (k, v) = item?;
                out.push((k.value(), v.value().to_vec()));
            }
            out
        }
    };
    if old.is_empty() {
        return Ok(None);
    }
    txn.delete_table(MSGS)?;
    let mut w = BlockWriter::new(txn.open_table(BLOCKS)?, count);
    for (seq, rec) in &old {
        w.put(*seq, rec)?;
    }
    Ok(Some(w.finish()?))
}
