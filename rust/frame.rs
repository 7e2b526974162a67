//! The wire format: `[size: u16 LE][id: u16 LE][payload: size - 4 bytes]`.
//!
//! `size` counts the four header bytes. Every header comes from a client that may
//! be lying, so it is checked as soon as its four bytes are in, before any payload
//! is waited for or any memory is set aside for it. A partial packet is an expected
//! state of a TCP stream (`Ok(None)`: wait for more bytes), never an error; a header
//! that lies is an error that ends the session.

use std::fmt;

use bytes::Bytes;

/// Bytes in a packet header.
pub const HEADER_SIZE: usize = 4;

/// The largest `size` a `u16` header can state.
pub const MAX_WIRE_PACKET_SIZE: usize = u16::MAX as usize;

/// The default limit on a packet's `size`, header included.
pub const DEFAULT_MAX_PACKET_SIZE: usize = 4096;

/// A checked header of a complete packet that is waiting at the front of a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PacketHeader {
    /// Whole packet, header included; at least [`HEADER_SIZE`].
    pub size: usize,
    pub id: u16,
}

impl PacketHeader {
    pub fn payload_len(&self) -> usize {
        self.size - HEADER_SIZE
    }
}

/// The limits a header is checked against.
#[derive(Clone, Debug)]
pub struct FrameLimits {
    /// Largest accepted `size`, header included (4..=65535).
    pub max_packet_size: usize,
    /// When set, a packet id outside it is a violation. Indexed by id.
    pub allowed_ids: Option<PacketIdSet>,
}

impl Default for FrameLimits {
    fn default() -> Self {
        Self { max_packet_size: DEFAULT_MAX_PACKET_SIZE, allowed_ids: None }
    }
}

/// A set of packet ids as a 65536-bit map: one lookup per packet, no hashing.
#[derive(Clone, PartialEq, Eq)]
pub struct PacketIdSet {
    bits: Box<[u64; 1024]>,
}

impl PacketIdSet {
    pub fn contains(&self, id: u16) -> bool {
        self.bits[usize::from(id) / 64] & (1 << (id % 64)) != 0
    }

    pub fn len(&self) -> usize {
        self.bits.iter().map(|word| word.count_ones() as usize).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl FromIterator<u16> for PacketIdSet {
    fn from_iter<I: IntoIterator<Item = u16>>(ids: I) -> Self {
        let mut bits = Box::new([0u64; 1024]);
        for id in ids {
            bits[usize::from(id) / 64] |= 1 << (id % 64);
        }
        Self { bits }
    }
}

impl fmt::Debug for PacketIdSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PacketIdSet({} ids)", self.len())
    }
}

/// A header that breaks the protocol or the configured limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// `size` is below the header's own four bytes; such a header would never advance.
    SizeBelowHeader { size: usize },
    /// `size` is above `max_packet_size`.
    TooLarge { size: usize, max: usize },
    /// The id is not in the configured set of packet ids.
    UnknownId { id: u16 },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::SizeBelowHeader { size } => {
                write!(f, "header size {size} is below the {HEADER_SIZE}-byte header")
            }
            FrameError::TooLarge { size, max } => {
                write!(f, "header size {size} exceeds max_packet_size {max}")
            }
            FrameError::UnknownId { id } => write!(f, "packet id {id} is not in packet_ids"),
        }
    }
}

impl std::error::Error for FrameError {}

/// Checks the packet at the front of `buf`.
///
/// Returns `Ok(Some(header))` when a whole, valid packet is there, `Ok(None)` while
/// its header or payload is still incomplete, and an error as soon as the header's
/// four bytes show a lie, even if the payload it announces has not arrived.
pub fn check(buf: &[u8], limits: &FrameLimits) -> Result<Option<PacketHeader>, FrameError> {
    let Some(header) = buf.first_chunk::<HEADER_SIZE>() else {
        return Ok(None);
    };
    let size = usize::from(u16::from_le_bytes([header[0], header[1]]));
    let id = u16::from_le_bytes([header[2], header[3]]);
    if size < HEADER_SIZE {
        return Err(FrameError::SizeBelowHeader { size });
    }
    if size > limits.max_packet_size {
        return Err(FrameError::TooLarge { size, max: limits.max_packet_size });
    }
    if let Some(allowed) = &limits.allowed_ids
        && !allowed.contains(id)
    {
        return Err(FrameError::UnknownId { id });
    }
    if buf.len() < size {
        return Ok(None);
    }
    Ok(Some(PacketHeader { size, id }))
}

/// Whole, checked packets back to back, exactly as they came off the wire:
/// what one read delivers from one session, handed on as one shared `Bytes`.
/// Moving a run instead of each packet saves a reference count, an event and a
/// lookup per packet between the socket and the application.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PacketRun {
    bytes: Bytes,
    count: usize,
}

impl PacketRun {
    /// Checks every header in `bytes` and counts the packets; None if any is
    /// a lie or the last is incomplete.
    pub fn new(bytes: Bytes, limits: &FrameLimits) -> Option<Self> {
        let (mut offset, mut count) = (0, 0);
        while offset < bytes.len() {
            let header = check(&bytes[offset..], limits).ok()??;
            offset += header.size;
            count += 1;
        }
        Some(Self { bytes, count })
    }

    /// Trusts the caller, which has checked every header.
    pub(crate) fn checked(bytes: Bytes, count: usize) -> Self {
        Self { bytes, count }
    }

    /// The number of packets.
    pub fn len(&self) -> usize {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes of all the packets, headers included.
    pub fn byte_len(&self) -> usize {
        self.bytes.len()
    }

    /// `(packet_id, payload)` of each packet, in order.
    pub fn iter(&self) -> PacketIter<'_> {
        PacketIter { rest: &self.bytes }
    }

    /// The run without its first `n` packets (sharing the same bytes).
    pub fn skip(&self, n: usize) -> PacketRun {
        let mut rest = self.iter();
        for _ in 0..n {
            rest.next();
        }
        let offset = self.bytes.len() - rest.rest.len();
        PacketRun { bytes: self.bytes.slice(offset..), count: self.count.saturating_sub(n) }
    }
}

impl<'a> IntoIterator for &'a PacketRun {
    type Item = (u16, &'a [u8]);
    type IntoIter = PacketIter<'a>;

    fn into_iter(self) -> PacketIter<'a> {
        self.iter()
    }
}

pub struct PacketIter<'a> {
    rest: &'a [u8],
}

impl<'a> Iterator for PacketIter<'a> {
    type Item = (u16, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let header = self.rest.first_chunk::<HEADER_SIZE>()?;
        let size = usize::from(u16::from_le_bytes([header[0], header[1]]));
        let id = u16::from_le_bytes([header[2], header[3]]);
        // Checked when the run was made; a broken run ends rather than panics.
        if size < HEADER_SIZE || size > self.rest.len() {
            self.rest = &[];
            return None;
        }
        let (packet, rest) = self.rest.split_at(size);
        self.rest = rest;
        Some((id, &packet[HEADER_SIZE..]))
    }
}

/// Writes a header for a payload of `payload_len` bytes. The caller has checked
/// that the packet fits in a `u16` size.
pub fn encode_header(packet_id: u16, payload_len: usize) -> [u8; HEADER_SIZE] {
    let size = u16::try_from(HEADER_SIZE + payload_len).expect("packet size checked by caller");
    let [s0, s1] = size.to_le_bytes();
    let [i0, i1] = packet_id.to_le_bytes();
    [s0, s1, i0, i1]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(id: u16, payload: &[u8]) -> Vec<u8> {
        let mut out = encode_header(id, payload.len()).to_vec();
        out.extend_from_slice(payload);
        out
    }

    fn header(size: u16, id: u16) -> Vec<u8> {
        let mut out = size.to_le_bytes().to_vec();
        out.extend_from_slice(&id.to_le_bytes());
        out
    }

    #[test]
    fn fewer_than_four_bytes_is_incomplete() {
        let limits = FrameLimits::default();
        for len in 0..HEADER_SIZE {
            assert_eq!(check(&[9u8, 0, 1, 0][..len], &limits), Ok(None));
        }
    }

    #[test]
    fn a_whole_packet_is_reported_with_its_size_and_id() {
        let bytes = packet(7, b"hello");
        let got = check(&bytes, &FrameLimits::default()).unwrap().unwrap();
        assert_eq!(got, PacketHeader { size: 9, id: 7 });
        assert_eq!(got.payload_len(), 5);
    }

    #[test]
    fn a_packet_missing_payload_bytes_is_incomplete() {
        let bytes = packet(7, b"hello");
        assert_eq!(check(&bytes[..8], &FrameLimits::default()), Ok(None));
    }

    #[test]
    fn an_empty_payload_is_a_valid_packet() {
        let got = check(&header(4, 1), &FrameLimits::default()).unwrap().unwrap();
        assert_eq!(got.payload_len(), 0);
    }

    #[test]
    fn sizes_below_the_header_are_rejected_without_waiting_for_more() {
        for size in 0..4u16 {
            assert_eq!(
                check(&header(size, 1), &FrameLimits::default()),
                Err(FrameError::SizeBelowHeader { size: usize::from(size) })
            );
        }
    }

    #[test]
    fn a_size_over_the_limit_is_rejected_from_the_header_alone() {
        let limits = FrameLimits { max_packet_size: 100, allowed_ids: None };
        assert_eq!(check(&header(101, 1), &limits), Err(FrameError::TooLarge { size: 101, max: 100 }));
        assert_eq!(check(&header(100, 1), &limits), Ok(None));
    }

    #[test]
    fn an_id_outside_the_allowed_set_is_rejected() {
        let limits =
            FrameLimits { max_packet_size: 4096, allowed_ids: Some([1u16, 2, 65535].into_iter().collect()) };
        assert_eq!(check(&header(4, 3), &limits), Err(FrameError::UnknownId { id: 3 }));
        assert!(check(&header(4, 65535), &limits).unwrap().is_some());
    }

    #[test]
    fn packet_id_set_counts_its_members() {
        let set: PacketIdSet = [0u16, 64, 64, 65535].into_iter().collect();
        assert_eq!(set.len(), 3);
        assert!(set.contains(0) && set.contains(64) && set.contains(65535));
        assert!(!set.contains(1));
    }

    #[test]
    fn a_packet_run_yields_each_packet_in_order() {
        let mut bytes = packet(1, b"a");
        bytes.extend(packet(2, b""));
        bytes.extend(packet(3, b"ccc"));
        let run = PacketRun::new(Bytes::from(bytes), &FrameLimits::default()).unwrap();
        assert_eq!(run.len(), 3);
        let packets: Vec<(u16, &[u8])> = run.iter().collect();
        assert_eq!(packets, [(1, &b"a"[..]), (2, &b""[..]), (3, &b"ccc"[..])]);
    }

    #[test]
    fn skipping_leaves_the_rest_of_a_run() {
        let mut bytes = packet(1, b"a");
        bytes.extend(packet(2, b"bb"));
        let run = PacketRun::new(Bytes::from(bytes), &FrameLimits::default()).unwrap();
        let rest = run.skip(1);
        assert_eq!(rest.len(), 1);
        assert_eq!(rest.iter().collect::<Vec<_>>(), [(2, &b"bb"[..])]);
        assert!(run.skip(2).is_empty());
    }

    #[test]
    fn a_run_with_a_lying_or_incomplete_packet_is_refused() {
        let limits = FrameLimits::default();
        assert!(PacketRun::new(Bytes::from(header(2, 1)), &limits).is_none());
        assert!(PacketRun::new(Bytes::from(packet(1, b"abc")[..6].to_vec()), &limits).is_none());
    }

    #[test]
    fn encode_header_is_little_endian_and_counts_itself() {
        assert_eq!(encode_header(0x0102, 1000), [0xEC, 0x03, 0x02, 0x01]);
    }
}
