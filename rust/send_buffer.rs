//! The lecture's `SendBufferManager`: packets are encoded once into pooled chunks
//! and shared, never copied per recipient.
//!
//! A chunk is one `BytesMut` allocation. Encoding a packet writes header and payload
//! at the chunk's front and cuts them off with `split_to().freeze()`: the packet is a
//! `Bytes` that shares the chunk's memory, and cloning it for a thousand send queues
//! is a thousand reference-count increments. A chunk whose packets are all written
//! and dropped is reclaimed (`BytesMut::try_reclaim`) and reused; the lecture's
//! caveat, that pooled memory whose count never reaches zero is never released,
//! becomes a figure: [`PoolStats::chunks_in_use`] returns to zero when every queue
//! is empty, and free chunks beyond a small reserve are handed back to the
//! allocator.

use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use bytes::{BufMut, Bytes, BytesMut};

use crate::frame::{HEADER_SIZE, MAX_WIRE_PACKET_SIZE, encode_header};

/// One chunk holds any packet the protocol allows.
pub const DEFAULT_CHUNK_SIZE: usize = 64 * 1024;

/// Free chunks kept for reuse; more than this go back to the allocator.
pub const DEFAULT_MAX_FREE_CHUNKS: usize = 16;

/// A packet that cannot be encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EncodeError {
    /// Header plus payload exceed what the header's `u16` size can state.
    TooLarge { size: usize },
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EncodeError::TooLarge { size } => write!(
                f,
                "packet of {size} bytes (header included) exceeds the protocol's {MAX_WIRE_PACKET_SIZE}"
            ),
        }
    }
}

impl std::error::Error for EncodeError {}

/// A snapshot of the pool, for `stats()`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    pub chunk_size: usize,
    /// Chunks allocated and held by the pool.
    pub chunks: usize,
    /// Chunks that still have at least one packet alive somewhere.
    pub chunks_in_use: usize,
    /// Packets encoded since the pool was made.
    pub buffers_encoded: u64,
    /// Bytes encoded since the pool was made, headers included.
    pub bytes_encoded: u64,
}

pub struct SendBufferPool {
    chunks: Mutex<Chunks>,
    buffers_encoded: AtomicU64,
    bytes_encoded: AtomicU64,
}

struct Chunks {
    chunk_size: usize,
    max_free: usize,
    /// Where the next packet is written: the unwritten tail of a chunk (empty,
    /// with no capacity left, once the chunk is written full).
    current: BytesMut,
    /// Chunks written full, oldest first; each is freed for reuse once the packets
    /// cut from it are gone.
    retired: VecDeque<BytesMut>,
}

impl SendBufferPool {
    pub fn new(chunk_size: usize, max_free_chunks: usize) -> Self {
        Self {
            chunks: Mutex::new(Chunks {
                chunk_size: chunk_size.max(HEADER_SIZE),
                max_free: max_free_chunks,
                current: BytesMut::with_capacity(chunk_size.max(HEADER_SIZE)),
                retired: VecDeque::new(),
            }),
            buffers_encoded: AtomicU64::new(0),
            bytes_encoded: AtomicU64::new(0),
        }
    }

    /// The process-wide pool that sessions and `SendBuffer` use.
    pub fn global() -> &'static SendBufferPool {
        static POOL: OnceLock<SendBufferPool> = OnceLock::new();
        POOL.get_or_init(|| SendBufferPool::new(DEFAULT_CHUNK_SIZE, DEFAULT_MAX_FREE_CHUNKS))
    }

    /// Encodes `[size][id][payload]` once; the result can be queued on any number
    /// of sessions.
    pub fn encode(&self, packet_id: u16, payload: &[u8]) -> Result<Bytes, EncodeError> {
        let size = HEADER_SIZE + payload.len();
        if size > MAX_WIRE_PACKET_SIZE {
            return Err(EncodeError::TooLarge { size });
        }
        Ok(self.write(size, |out| {
            out.put_slice(&encode_header(packet_id, payload.len()));
            out.put_slice(payload);
        }))
    }

    /// Copies raw bytes (no header: a raw session's stream) into pooled memory
    /// once; the result can be queued on any number of sessions.
    pub fn copy(&self, data: &[u8]) -> Bytes {
        self.copy_parts(&[data])
    }

    /// Copies `parts` (a header and a payload, say), one after the other,
    /// into pooled memory once.
    pub fn copy_parts(&self, parts: &[&[u8]]) -> Bytes {
        let len = parts.iter().map(|part| part.len()).sum();
        self.write(len, |out| parts.iter().for_each(|part| out.put_slice(part)))
    }

    /// The lecture's `Open(size)` / `Close(size)`: `fill` writes exactly `len`
    /// bytes into pooled memory, which comes back as one shared `Bytes`.
    ///
    /// # Panics
    /// If `fill` writes a different number of bytes than `len`.
    pub fn write(&self, len: usize, fill: impl FnOnce(&mut BytesMut)) -> Bytes {
        let mut chunks = self.chunks.lock().unwrap_or_else(|e| e.into_inner());
        let bytes = if len > chunks.chunk_size {
            // Only a pool built with tiny chunks (tests) gets here.
            let mut own = BytesMut::with_capacity(len);
            fill(&mut own);
            own
        } else {
            if chunks.current.capacity() < len {
                chunks.rotate();
            }
            fill(&mut chunks.current);
            chunks.current.split_to(len)
        };
        drop(chunks);
        assert_eq!(bytes.len(), len, "fill wrote a different length than it reserved");
        self.buffers_encoded.fetch_add(1, Ordering::Relaxed);
        self.bytes_encoded.fetch_add(len as u64, Ordering::Relaxed);
        bytes.freeze()
    }

    /// Counts chunks in use, and hands surplus free chunks back to the allocator.
    pub fn stats(&self) -> PoolStats {
        let mut chunks = self.chunks.lock().unwrap_or_else(|e| e.into_inner());
        let chunk_size = chunks.chunk_size;
        chunks.trim_free();
        let current_in_use = !chunks.current.try_reclaim(chunk_size);
        let retired_in_use =
            chunks.retired.iter_mut().map(|chunk| chunk.try_reclaim(chunk_size)).filter(|free| !free).count();
        PoolStats {
            chunk_size,
            chunks: chunks.retired.len() + 1,
            chunks_in_use: retired_in_use + usize::from(current_in_use),
            buffers_encoded: self.buffers_encoded.load(Ordering::Relaxed),
            bytes_encoded: self.bytes_encoded.load(Ordering::Relaxed),
        }
    }
}

impl Chunks {
    /// Retires the current chunk and takes a free one (or a new one) in its place.
    fn rotate(&mut self) {
        let chunk_size = self.chunk_size;
        let full = std::mem::take(&mut self.current);
        self.retired.push_back(full);
        // The oldest chunks are the likeliest to be free. Looking at two keeps this
        // O(1) while one long-lived packet at the front does not pin the rotation.
        for _ in 0..2 {
            let Some(mut oldest) = self.retired.pop_front() else { break };
            if oldest.try_reclaim(chunk_size) {
                self.current = oldest;
                self.trim_free_if_many();
                return;
            }
            self.retired.push_back(oldest);
        }
        self.current = BytesMut::with_capacity(chunk_size);
        self.trim_free_if_many();
    }

    fn trim_free_if_many(&mut self) {
        if self.retired.len() > self.max_free * 4 {
            self.trim_free();
        }
    }

    /// Frees reclaimable chunks beyond `max_free`.
    fn trim_free(&mut self) {
        let chunk_size = self.chunk_size;
        let mut free_kept = 0;
        let max_free = self.max_free;
        self.retired.retain_mut(|chunk| {
            if chunk.try_reclaim(chunk_size) {
                free_kept += 1;
                free_kept <= max_free
            } else {
                true
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_writes_header_then_payload() {
        let pool = SendBufferPool::new(1024, 4);
        let packet = pool.encode(0x0201, b"Hello").unwrap();
        assert_eq!(&packet[..], &[9, 0, 1, 2, b'H', b'e', b'l', b'l', b'o']);
    }

    #[test]
    fn encode_refuses_what_a_u16_size_cannot_state() {
        let pool = SendBufferPool::new(1024, 4);
        let payload = vec![0u8; MAX_WIRE_PACKET_SIZE - HEADER_SIZE + 1];
        assert_eq!(pool.encode(1, &payload), Err(EncodeError::TooLarge { size: 65536 }));
        assert!(pool.encode(1, &payload[1..]).is_ok());
    }

    #[test]
    fn packets_share_one_chunk_until_it_is_full() {
        let pool = SendBufferPool::new(100, 4);
        let packets: Vec<Bytes> = (0..5).map(|i| pool.encode(i, &[0u8; 16]).unwrap()).collect();
        let stats = pool.stats();
        assert_eq!(stats.chunks, 1);
        assert_eq!(stats.chunks_in_use, 1);
        let more: Vec<Bytes> = (0..5).map(|i| pool.encode(i, &[0u8; 16]).unwrap()).collect();
        assert_eq!(pool.stats().chunks, 2);
        drop((packets, more));
    }

    #[test]
    fn chunks_come_back_when_every_packet_is_dropped() {
        let pool = SendBufferPool::new(64, 4);
        let packets: Vec<Bytes> = (0..20).map(|i| pool.encode(i, &[7u8; 28]).unwrap()).collect();
        assert!(pool.stats().chunks_in_use >= 10);
        drop(packets);
        let idle = pool.stats();
        assert_eq!(idle.chunks_in_use, 0);
        assert!(idle.chunks <= 4 + 1, "surplus free chunks are released: {idle:?}");
        assert_eq!(idle.buffers_encoded, 20);
        assert_eq!(idle.bytes_encoded, 20 * 32);
    }

    #[test]
    fn one_live_packet_pins_only_its_own_chunk() {
        let pool = SendBufferPool::new(64, 0);
        let pinned = pool.encode(1, &[1u8; 28]).unwrap();
        for i in 0..50 {
            drop(pool.encode(i, &[2u8; 28]).unwrap());
        }
        let stats = pool.stats();
        assert_eq!(stats.chunks_in_use, 1);
        assert_eq!(&pinned[4..], &[1u8; 28]);
    }

    #[test]
    fn free_chunks_are_reused_instead_of_allocated() {
        let pool = SendBufferPool::new(64, 8);
        for i in 0..1000 {
            drop(pool.encode(i, &[0u8; 28]).unwrap());
        }
        assert!(pool.stats().chunks <= 3, "{:?}", pool.stats());
    }

    #[test]
    fn write_is_open_and_close_of_the_lecture() {
        let pool = SendBufferPool::new(1024, 4);
        let bytes = pool.write(3, |out| out.put_slice(b"abc"));
        assert_eq!(&bytes[..], b"abc");
    }

    #[test]
    fn packets_larger_than_a_chunk_still_encode() {
        let pool = SendBufferPool::new(16, 4);
        let packet = pool.encode(9, &[5u8; 100]).unwrap();
        assert_eq!(packet.len(), 104);
        assert_eq!(pool.stats().chunks_in_use, 0);
    }
}
