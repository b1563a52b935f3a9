//! Receive buffers, kept for the next delta.
//!
//! The first write to fresh memory costs a page fault and a zeroed page per page: filling a new 256 MB buffer takes
//! about 0.09 s on this project's CI machines, refilling one already touched 0.015 s, and a relay receives every byte
//! of every delta. Replicas stage deltas of similar sizes one after another, so a released buffer goes back to a
//! small pool (the last [`KEEP`], as vLLM keeps two rotating transfer buffers) and the next delta that fits reuses it.
//!
//! The chunks a relay holds to forward (and to send again to a replacement child) get the same treatment
//! ([`chunk`]): held as they arrived, they would pin the gRPC decoder's buffer, which then allocates afresh for every
//! message.

use std::ops::Deref;
use std::sync::Mutex;

use bytes::Bytes;

/// Idle buffers kept at most: one being filled while the previous delta is prepared needs two.
pub const KEEP: usize = 2;

static IDLE: Pool = Pool(Mutex::new(Vec::new()));

/// Idle buffers, at most [`KEEP`].
struct Pool(Mutex<Vec<Vec<u8>>>);

impl Pool {
    /// An empty vector holding at least `bytes`: the smallest idle one that fits, else a new one.
    fn take(&self, bytes: usize) -> Vec<u8> {
        let mut idle = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let fit = idle.iter().enumerate().filter(|(_, b)| b.capacity() >= bytes).min_by_key(|(_, b)| b.capacity());
        match fit.map(|(i, _)| i) {
            Some(i) => idle.swap_remove(i),
            None => Vec::with_capacity(bytes),
        }
    }

    fn give(&self, mut buf: Vec<u8>) {
        if buf.capacity() == 0 {
            return;
        }
        buf.clear();
        let mut idle = self.0.lock().unwrap_or_else(|e| e.into_inner());
        idle.push(buf);
        if idle.len() > KEEP {
            // Keep the largest: they fit every delta the smaller ones fit.
            let smallest = idle.iter().enumerate().min_by_key(|(_, b)| b.capacity()).map(|(i, _)| i);
            if let Some(i) = smallest {
                idle.swap_remove(i);
            }
        }
    }
}

/// A growable byte buffer that returns its memory to the pool when dropped.
#[derive(Default, Debug)]
pub struct Buffer(Vec<u8>);

impl Buffer {
    /// An empty buffer holding at least `bytes`: an idle one that fits, else a new one.
    pub fn with_capacity(bytes: usize) -> Self {
        Self(IDLE.take(bytes))
    }

    /// `len` zero bytes, for a receiver that is handed a slice to fill.
    pub fn zeroed(len: usize) -> Self {
        let mut b = Self::with_capacity(len);
        b.0.resize(len, 0);
        b
    }

    pub fn extend_from_slice(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
    }
}

impl std::ops::DerefMut for Buffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }
}

impl Deref for Buffer {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        IDLE.give(std::mem::take(&mut self.0));
    }
}

/// Chunk buffers not in use, and how many bytes of them may be kept: as many as were lent out at once during the
/// last busy spell (a relay holds one delta's chunks until its children acknowledge, so that is about the last
/// delta relayed; a spell ends when nothing is lent, and the idle buffers are trimmed to its peak then).
struct ChunkPool {
    idle: Vec<Vec<u8>>,
    idle_bytes: usize,
    lent: usize,
    /// The most lent at once in this busy spell, and in the last one.
    spell_peak: usize,
    keep: usize,
}

static CHUNKS: Mutex<ChunkPool> =
    Mutex::new(ChunkPool { idle: Vec::new(), idle_bytes: 0, lent: 0, spell_peak: 0, keep: 0 });

/// A copy of `data` in a pooled buffer, returned to the pool when the last reference to it is dropped.
pub fn chunk(data: &[u8]) -> Bytes {
    let mut buf = {
        let mut pool = CHUNKS.lock().unwrap_or_else(|e| e.into_inner());
        let fit = pool
            .idle
            .iter()
            .enumerate()
            .filter(|(_, b)| b.capacity() >= data.len())
            .min_by_key(|(_, b)| b.capacity())
            .map(|(i, _)| i);
        let buf = match fit {
            Some(i) => {
                let b = pool.idle.swap_remove(i);
                pool.idle_bytes -= b.capacity();
                b
            }
            None => Vec::with_capacity(data.len()),
        };
        pool.lent += buf.capacity();
        pool.spell_peak = pool.spell_peak.max(pool.lent);
        pool.keep = pool.keep.max(pool.spell_peak);
        buf
    };
    buf.extend_from_slice(data);
    Bytes::from_owner(Lent(buf))
}

struct Lent(Vec<u8>);

impl AsRef<[u8]> for Lent {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        let mut buf = std::mem::take(&mut self.0);
        buf.clear();
        let mut pool = CHUNKS.lock().unwrap_or_else(|e| e.into_inner());
        pool.lent -= buf.capacity();
        if pool.idle_bytes + buf.capacity() <= pool.keep {
            pool.idle_bytes += buf.capacity();
            pool.idle.push(buf);
        }
        if pool.lent == 0 {
            // The spell is over: keep what it needed, no more.
            pool.keep = pool.spell_peak;
            pool.spell_peak = 0;
            while pool.idle_bytes > pool.keep {
                let Some(b) = pool.idle.pop() else { break };
                pool.idle_bytes -= b.capacity();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_released_buffer_is_reused_and_the_pool_stays_bounded() {
        let pool = Pool(Mutex::new(Vec::new()));
        let big = 1 << 20;
        let mut a = pool.take(big);
        a.extend_from_slice(&[7; 16]);
        let at = a.as_ptr();
        pool.give(a);
        let b = pool.take(big - 1);
        assert_eq!(b.as_ptr(), at, "the released buffer is handed out again");
        assert!(b.is_empty(), "and it comes back empty");
        assert!(pool.take(big + 1).capacity() >= big + 1, "one too small is not");
        let held: Vec<Vec<u8>> = (0..KEEP + 3).map(|i| pool.take(big + i)).collect();
        for h in held {
            pool.give(h);
        }
        pool.give(b);
        let idle = pool.0.lock().unwrap();
        assert_eq!(idle.len(), KEEP);
        assert!(idle.iter().all(|b| b.capacity() >= big + 3), "the largest are kept");
    }

    #[test]
    fn a_pooled_chunk_holds_a_copy_and_its_memory_comes_back() {
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let a = chunk(&data);
        assert_eq!(&a[..], &data[..]);
        let at = a.as_ptr();
        let slice = a.slice(10..20);
        drop(a);
        assert_eq!(&slice[..], &data[10..20], "a slice keeps the buffer alive");
        drop(slice);
        // Other tests in this process may take chunks meanwhile: look for ours among a few.
        let again: Vec<Bytes> = (0..8).map(|_| chunk(&data)).collect();
        assert!(again.iter().any(|b| b.as_ptr() == at), "the released buffer is handed out again");
    }
}
