//! Feeds arbitrary bytes, in arbitrary pieces, to the receive buffer's packet
//! decoder, with arbitrary limits. It must never panic, never spin on a header
//! that does not advance (the lecture's `size == 0` loop), and every packet it
//! accepts must be exactly as long as its header says.
#![no_main]

use _core::frame::{FrameLimits, HEADER_SIZE, MAX_WIRE_PACKET_SIZE};
use _core::recv_buffer::RecvBuffer;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Some((&[max_hi, max_lo, piece], stream)) = input.split_first_chunk::<3>() else { return };
    let max_packet_size = usize::from(u16::from_be_bytes([max_hi, max_lo])).clamp(HEADER_SIZE, MAX_WIRE_PACKET_SIZE);
    let limits = FrameLimits { max_packet_size, allowed_ids: None };
    let piece = usize::from(piece).max(1);
    let mut buf = RecvBuffer::default();
    for chunk in stream.chunks(piece) {
        buf.extend_from_slice(chunk);
        loop {
            let before = buf.len();
            match buf.next_packets(&limits) {
                Ok(Some(run)) => {
                    let consumed = before - buf.len();
                    assert!(!run.is_empty(), "a run must hold a packet");
                    let mut sizes = 0;
                    for (_, payload) in &run {
                        let size = payload.len() + HEADER_SIZE;
                        assert!(size <= max_packet_size);
                        sizes += size;
                    }
                    assert_eq!(consumed, sizes, "a run is exactly its packets");
                    assert_eq!(run.iter().count(), run.len());
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
