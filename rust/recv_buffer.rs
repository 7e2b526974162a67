//! The lecture's `RecvBuffer`: bytes read from a socket and not yet consumed.
//!
//! Reads append at the back; whoever parses takes whole packets off the front
//! (`OnRead(n)`) and the rest stays for the next read. Taking is
//! `BytesMut::split_to().freeze()`: the packet keeps sharing the buffer's memory on
//! its way to the Python thread, so nothing is copied between the socket and the
//! single copy into a Python `bytes`. The next `reserve` compacts: it reuses the
//! memory once every handed-out packet is gone, or moves the unconsumed tail into a
//! fresh allocation while they are still in flight.
//!
//! A buffer that has never been read into holds no memory, which keeps idle
//! sessions small.

use std::io;

use bytes::{Bytes, BytesMut};

use crate::frame::{self, FrameError, FrameLimits, PacketRun};

/// Bytes asked of the socket per read when no partial packet needs more.
pub const DEFAULT_READ_SIZE: usize = 8 * 1024;

#[derive(Debug, Default)]
pub struct RecvBuffer {
    buf: BytesMut,
}

impl RecvBuffer {
    /// The received bytes not yet taken.
    pub fn unread(&self) -> &[u8] {
        &self.buf
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Reads once into the free space, making room for at least `room` more
    /// bytes first. `read` is a non-blocking read such as
    /// `TcpStream::try_read_buf`; its result is returned as is, so `Ok(0)` still
    /// means end of stream.
    pub fn read_with(
        &mut self,
        room: usize,
        read: impl FnOnce(&mut BytesMut) -> io::Result<usize>,
    ) -> io::Result<usize> {
        self.buf.reserve(room.max(1));
        read(&mut self.buf)
    }

    /// Appends bytes (used by tests and by in-memory parsing).
    pub fn extend_from_slice(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Consumes the first `n` unread bytes and hands them out without copying.
    ///
    /// # Panics
    /// If `n` is more than [`len`](Self::len).
    pub fn take(&mut self, n: usize) -> Bytes {
        self.buf.split_to(n).freeze()
    }

    /// Takes every whole packet at the front as one run: check each header,
    /// then cut once. `Ok(None)` means the packet at the front is still
    /// incomplete. A header that lies ends the run before it; the next call
    /// returns the error, and leaves the lie in the buffer.
    pub fn next_packets(&mut self, limits: &FrameLimits) -> Result<Option<PacketRun>, FrameError> {
        let (mut offset, mut count) = (0, 0);
        let error = loop {
            match frame::check(&self.buf[offset..], limits) {
                Ok(Some(header)) => {
                    offset += header.size;
                    count += 1;
                }
                Ok(None) => break None,
                Err(error) => break Some(error),
            }
        };
        match (count, error) {
            (0, Some(error)) => Err(error),
            (0, None) => Ok(None),
            _ => Ok(Some(PacketRun::checked(self.take(offset), count))),
        }
    }

    /// Drops the memory of an empty buffer, so that a session that has gone quiet
    /// does not keep a read-sized allocation alive.
    pub fn release_if_empty(&mut self) {
        if self.buf.is_empty() && self.buf.capacity() > 0 {
            self.buf = BytesMut::new();
        }
    }

    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BufMut;

    #[test]
    fn a_new_buffer_holds_no_memory() {
        let buf = RecvBuffer::default();
        assert_eq!(buf.capacity(), 0);
        assert!(buf.is_empty());
    }

    #[test]
    fn a_read_gets_at_least_the_room_asked_for() {
        let mut buf = RecvBuffer::default();
        let mut offered = 0;
        buf.read_with(64, |b| {
            offered = b.capacity() - b.len();
            b.put_slice(b"abc");
            Ok(3)
        })
        .unwrap();
        assert!(offered >= 64);
        buf.read_with(1000, |b| {
            offered = b.capacity() - b.len();
            Ok(0)
        })
        .unwrap();
        assert!(offered >= 1000);
        assert_eq!(buf.unread(), b"abc");
    }

    #[test]
    fn taking_keeps_the_rest_for_the_next_read() {
        let mut buf = RecvBuffer::default();
        buf.extend_from_slice(b"hello world");
        assert_eq!(&buf.take(6)[..], b"hello ");
        assert_eq!(buf.unread(), b"world");
        buf.extend_from_slice(b"!");
        assert_eq!(buf.unread(), b"world!");
    }

    #[test]
    fn taken_bytes_survive_later_reads_into_the_same_buffer() {
        let mut buf = RecvBuffer::default();
        buf.extend_from_slice(b"first");
        let first = buf.take(5);
        for _ in 0..100 {
            buf.read_with(8, |b| {
                b.put_slice(b"xxxxxxxx");
                Ok(8)
            })
            .unwrap();
            buf.take(8);
        }
        assert_eq!(&first[..], b"first");
    }

    #[test]
    fn next_packets_cuts_whole_packets_as_one_run_and_keeps_the_rest() {
        let limits = FrameLimits::default();
        let mut buf = RecvBuffer::default();
        buf.extend_from_slice(&[5, 0, 9, 0, b'a', 4, 0, 7, 0, 4, 0, 1]);
        let run = buf.next_packets(&limits).unwrap().unwrap();
        let packets: Vec<(u16, &[u8])> = run.iter().collect();
        assert_eq!(packets, [(9, &b"a"[..]), (7, &b""[..])]);
        assert_eq!(buf.next_packets(&limits), Ok(None));
        buf.extend_from_slice(&[0]);
        let run = buf.next_packets(&limits).unwrap().unwrap();
        assert_eq!((run.len(), run.byte_len()), (1, 4));
        assert!(buf.is_empty());
    }

    #[test]
    fn a_lying_header_ends_the_run_before_it_and_stays_in_place() {
        let limits = FrameLimits::default();
        let mut buf = RecvBuffer::default();
        buf.extend_from_slice(&[4, 0, 1, 0, 0, 0, 1, 0]);
        assert_eq!(buf.next_packets(&limits).unwrap().unwrap().len(), 1);
        assert!(buf.next_packets(&limits).is_err());
        assert_eq!(buf.len(), 4);
    }

    #[test]
    fn an_empty_buffer_can_give_its_memory_back() {
        let mut buf = RecvBuffer::default();
        buf.extend_from_slice(b"abcd");
        buf.take(4);
        buf.release_if_empty();
        assert_eq!(buf.capacity(), 0);
        buf.extend_from_slice(b"x");
        buf.release_if_empty();
        assert_eq!(buf.unread(), b"x");
    }

    mod properties {
        use super::*;
        use crate::frame::HEADER_SIZE;
        use proptest::collection::vec;
        use proptest::prelude::*;

        fn encode(packets: &[(u16, Vec<u8>)]) -> Vec<u8> {
            let mut stream = Vec::new();
            for (id, payload) in packets {
                stream.extend_from_slice(&frame::encode_header(*id, payload.len()));
                stream.extend_from_slice(payload);
            }
            stream
        }

        proptest! {
            /// However TCP splits a valid stream, the same packets come out, in order.
            #[test]
            fn random_splits_decode_to_the_same_packets(
                packets in vec((any::<u16>(), vec(any::<u8>(), 0..300)), 0..40),
                mut cuts in vec(any::<prop::sample::Index>(), 0..30),
            ) {
                let stream = encode(&packets);
                let mut points: Vec<usize> = cuts.drain(..).map(|i| i.index(stream.len() + 1)).collect();
                points.push(0);
                points.push(stream.len());
                points.sort_unstable();
                let limits = FrameLimits::default();
                let mut buf = RecvBuffer::default();
                let mut decoded = Vec::new();
                for piece in points.windows(2) {
                    buf.extend_from_slice(&stream[piece[0]..piece[1]]);
                    while let Some(run) = buf.next_packets(&limits).unwrap() {
                        decoded.extend(run.iter().map(|(id, payload)| (id, payload.to_vec())));
                    }
                }
                prop_assert!(buf.is_empty());
                prop_assert_eq!(decoded, packets);
            }

            /// Arbitrary bytes never make the decoder spin: every packet it accepts
            /// consumes at least a header, and it stops at the first lie.
            #[test]
            fn garbage_always_makes_progress_or_stops(bytes in vec(any::<u8>(), 0..2000)) {
                let limits = FrameLimits::default();
                let mut buf = RecvBuffer::default();
                buf.extend_from_slice(&bytes);
                loop {
                    let before = buf.len();
                    match buf.next_packets(&limits) {
                        Ok(Some(run)) => {
                            let consumed = before - buf.len();
                            prop_assert!(consumed >= HEADER_SIZE * run.len());
                            let payloads: usize = run.iter().map(|(_, payload)| payload.len()).sum();
                            prop_assert_eq!(consumed, payloads + HEADER_SIZE * run.len());
                        }
                        Ok(None) | Err(_) => break,
                    }
                }
            }
        }
    }
}
