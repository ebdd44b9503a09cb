//! Process-wide shard I/O counters, for monitoring (`/metrics`): how many shards are
//! open, and the compressed bytes read from them and decompressed. Relaxed atomics:
//! a brick read adds two numbers.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

static OPEN_SHARDS: AtomicI64 = AtomicI64::new(0);
static BYTES_READ: AtomicU64 = AtomicU64::new(0);
static BYTES_DECOMPRESSED: AtomicU64 = AtomicU64::new(0);

/// The counters at one instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IoStats {
    /// Shards mapped now.
    pub open_shards: i64,
    /// Compressed brick bytes read since the process started.
    pub bytes_read: u64,
    /// Raw bytes those bricks decompressed to.
    pub bytes_decompressed: u64,
}

pub fn io_stats() -> IoStats {
    IoStats {
        open_shards: OPEN_SHARDS.load(Ordering::Relaxed),
        bytes_read: BYTES_READ.load(Ordering::Relaxed),
        bytes_decompressed: BYTES_DECOMPRESSED.load(Ordering::Relaxed),
    }
}

pub(crate) fn opened() {
    OPEN_SHARDS.fetch_add(1, Ordering::Relaxed);
}

pub(crate) fn closed() {
    OPEN_SHARDS.fetch_sub(1, Ordering::Relaxed);
}

pub(crate) fn brick_read(compressed: u64, raw: u64) {
    BYTES_READ.fetch_add(compressed, Ordering::Relaxed);
    BYTES_DECOMPRESSED.fetch_add(raw, Ordering::Relaxed);
}
