//! The PROXY protocol header (HAProxy's; v1 text, v2 binary) that a TCP load
//! balancer puts before a connection's own bytes, naming the client it
//! forwards. Behind a balancer every peer address is the balancer's, which
//! would make per-address limits, logs and bans useless; with the header they
//! apply to the real client. Anyone can write one, so only the balancers in
//! `trusted_proxies` are believed (see `service`); from anyone else it is
//! refused (see `connection`).
//!
//! Parsing is ppp's. As with packets, a header that has not all arrived is an
//! expected state (`Ok(None)`), not an error.

use std::io::{self, Read};
use std::net::SocketAddr;
use std::time::Duration;

use ppp::{PartialResult, v1, v2};
use tokio::io::unix::AsyncFd;

const V1_SIGNATURE: &[u8] = b"PROXY ";
const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";

/// v1's longest line, "\r\n" included (the protocol's own limit).
const V1_MAX_BYTES: usize = 107;

/// v2's fixed part: the signature, version and command, family, length.
const V2_FIXED_BYTES: usize = 16;

/// The longest header read: v1's are at most 107 bytes; v2's may carry
/// TLVs (cloud balancers add a few hundred bytes), but nothing a game needs
/// comes near this.
pub const MAX_HEADER_BYTES: usize = 1024;

/// A balancer writes its header as soon as it has connected, before the
/// client's first byte: waiting longer only holds a socket for an attacker.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// What a complete header said.
#[derive(Debug, PartialEq, Eq)]
pub struct ProxyHeader {
    /// The client the balancer forwards; `None` when the header names none
    /// (v1 UNKNOWN, v2 LOCAL: the balancer's own health check), so the
    /// connection is the balancer's own.
    pub client: Option<SocketAddr>,
    /// Bytes the header took, all consumed before the session's first packet.
    pub len: usize,
}

/// Whether `bytes` begin with a PROXY header's signature (the whole of it:
/// a shorter prefix is not enough to tell).
pub fn starts_with_signature(bytes: &[u8]) -> bool {
    bytes.starts_with(V1_SIGNATURE) || bytes.starts_with(V2_SIGNATURE)
}

/// Parses a header at the start of `bytes`: `Ok(None)` until all of it is
/// there; an error says what is wrong with it.
pub fn parse(bytes: &[u8]) -> Result<Option<ProxyHeader>, String> {
    let seen = |signature: &[u8]| {
        bytes[..bytes.len().min(signature.len())] == signature[..bytes.len().min(signature.len())]
    };
    if seen(V2_SIGNATURE) {
        let Some(fixed) = bytes.first_chunk::<V2_FIXED_BYTES>() else { return Ok(None) };
        // Checked first, so an oversized header is refused at once instead of
        // being waited for until the deadline.
        let len = V2_FIXED_BYTES + usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
        if len > MAX_HEADER_BYTES {
            return Err(format!("a PROXY v2 header of {len} bytes, over the {MAX_HEADER_BYTES} read"));
        }
        return match v2::Header::try_from(bytes) {
            Ok(header) => Ok(Some(ProxyHeader { len: header.len(), client: v2_client(&header) })),
            Err(error) if error.is_incomplete() => Ok(None),
            Err(error) => Err(format!("a malformed PROXY v2 header: {error}")),
        };
    }
    if !seen(b"PROXY") {
        return Err("no PROXY header where one was required".to_owned());
    }
    // A v1 header is one line: until its end arrives, a cut-off field (a port
    // half sent) is not an error.
    if !bytes.contains(&b'\n') && bytes.len() < V1_MAX_BYTES {
        return Ok(None);
    }
    match v1::Header::try_from(bytes) {
        Ok(header) => Ok(Some(ProxyHeader { len: header.header.len(), client: v1_client(&header) })),
        Err(error) if error.is_incomplete() => Ok(None),
        Err(error) => Err(format!("a malformed PROXY v1 header: {error}")),
    }
}

fn v1_client(header: &v1::Header<'_>) -> Option<SocketAddr> {
    match header.addresses {
        v1::Addresses::Tcp4(ip) => Some(SocketAddr::from((ip.source_address, ip.source_port))),
        v1::Addresses::Tcp6(ip) => Some(SocketAddr::from((ip.source_address, ip.source_port))),
        v1::Addresses::Unknown => None,
    }
}

fn v2_client(header: &v2::Header<'_>) -> Option<SocketAddr> {
    match (header.command, header.addresses) {
        (v2::Command::Local, _) => None,
        (v2::Command::Proxy, v2::Addresses::IPv4(ip)) => {
            Some(SocketAddr::from((ip.source_address, ip.source_port)))
        }
        (v2::Command::Proxy, v2::Addresses::IPv6(ip)) => {
            Some(SocketAddr::from((ip.source_address, ip.source_port)))
        }
        (v2::Command::Proxy, v2::Addresses::Unspecified | v2::Addresses::Unix(_)) => None,
    }
}

/// Reads a connection's PROXY header, and nothing after it: what follows is
/// the session's. Peeks until the whole header is there, then consumes
/// exactly its bytes. The caller bounds the wait (`HEADER_TIMEOUT`).
pub async fn read(stream: mio::net::TcpStream) -> Result<(mio::net::TcpStream, ProxyHeader), String> {
    let io_error = |error: io::Error| format!("the connection failed before its PROXY header: {error}");
    // SAFETY: the stream owns its descriptor and keeps it, unchanged, until
    // `into_inner` gives it back (or the `AsyncFd` drops it).
    let socket = unsafe { AsyncFd::register_with_interest(stream, tokio::io::Interest::READABLE) }
        .map_err(|error| io_error(error.into_parts().1))?;
    let mut peeked = [0u8; MAX_HEADER_BYTES];
    let header = loop {
        let mut ready = socket.readable().await.map_err(io_error)?;
        let seen = match ready.get_inner().peek(&mut peeked) {
            Ok(0) => return Err("the connection closed before its PROXY header was complete".to_owned()),
            Ok(seen) => seen,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                ready.clear_ready();
                continue;
            }
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(io_error(error)),
        };
        match parse(&peeked[..seen])? {
            Some(header) => break header,
            None if seen == MAX_HEADER_BYTES => {
                return Err(format!("no end of a PROXY header in its first {MAX_HEADER_BYTES} bytes"));
            }
            // Peeking leaves the bytes in the socket, so readiness comes back
            // only when more arrive (edge-triggered).
            None => ready.clear_ready(),
        }
    };
    let mut stream = socket.into_inner();
    // The header's bytes are in the socket already: peek saw them.
    let mut left = header.len;
    while left > 0 {
        match stream.read(&mut peeked[..left]) {
            Ok(0) => return Err("the connection closed inside its PROXY header".to_owned()),
            Ok(n) => left -= n,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(io_error(error)),
        }
    }
    Ok((stream, header))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(command: u8, family: u8, addresses: &[u8]) -> Vec<u8> {
        let mut header = V2_SIGNATURE.to_vec();
        header.extend([0x20 | command, family]);
        header.extend((addresses.len() as u16).to_be_bytes());
        header.extend(addresses);
        header
    }

    #[test]
    fn a_v1_header_names_the_client_and_its_length() {
        let bytes = b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 7777\r\n\x08\x00";
        let header = parse(bytes).unwrap().unwrap();
        assert_eq!(header.client, Some("203.0.113.7:51000".parse().unwrap()));
        assert_eq!(header.len, bytes.len() - 2);
        let v6 = b"PROXY TCP6 2001:db8::7 2001:db8::1 51000 7777\r\n";
        assert_eq!(parse(v6).unwrap().unwrap().client, Some("[2001:db8::7]:51000".parse().unwrap()));
        assert_eq!(parse(b"PROXY UNKNOWN\r\n").unwrap().unwrap().client, None);
    }

    #[test]
    fn a_v2_header_names_the_client_and_its_length() {
        let mut addresses = vec![203, 0, 113, 7, 10, 0, 0, 1];
        addresses.extend(51000u16.to_be_bytes());
        addresses.extend(7777u16.to_be_bytes());
        let bytes = v2(1, 0x11, &addresses);
        let header = parse(&bytes).unwrap().unwrap();
        assert_eq!(header.client, Some("203.0.113.7:51000".parse().unwrap()));
        assert_eq!(header.len, bytes.len());
        // LOCAL: the balancer's own connection (a health check).
        assert_eq!(parse(&v2(0, 0x00, &[])).unwrap().unwrap().client, None);
    }

    #[test]
    fn a_partial_header_is_not_an_error() {
        let bytes = b"PROXY TCP4 203.0.113.7 10.0.0.1 51000 7777\r\n";
        for end in 0..bytes.len() {
            assert_eq!(parse(&bytes[..end]), Ok(None), "{end} bytes");
        }
        let mut addresses = vec![203, 0, 113, 7, 10, 0, 0, 1];
        addresses.extend([0, 1, 0, 2]);
        let binary = v2(1, 0x11, &addresses);
        for end in 0..binary.len() {
            assert_eq!(parse(&binary[..end]), Ok(None), "{end} bytes");
        }
    }

    #[test]
    fn a_malformed_or_missing_header_is_an_error() {
        for bad in [
            &b"PROXY TCP4 203.0.113.999 10.0.0.1 51000 7777\r\n"[..],
            b"PROXY TCP5 203.0.113.7 10.0.0.1 51000 7777\r\n",
            b"PROXY TCP4 203.0.113.7 10.0.0.1 51000\r\n",
            b"\x08\x00\x07\x00game",
            b"GET / HTTP/1.1\r\n",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} was taken");
        }
        let endless = [&b"PROXY TCP4 "[..], &[b'1'; 100][..]].concat();
        assert!(parse(&endless).is_err(), "a v1 line past 107 bytes was waited for");
        let mut long = V2_SIGNATURE.to_vec();
        long.extend([0x21, 0x11, 0x10, 0x00]);
        let error = parse(&long).unwrap_err();
        assert!(error.contains("4112 bytes"), "{error}");
        let short = [V2_SIGNATURE, &[0x21, 0x11, 0x00, 0x02, 1, 2][..]].concat();
        assert!(parse(&short).unwrap_err().contains("malformed PROXY v2 header"));
        let missing = parse(b"\x08\x00\x07\x00game").unwrap_err();
        assert!(missing.contains("no PROXY header"), "{missing}");
    }

    #[test]
    fn only_a_whole_signature_counts() {
        assert!(starts_with_signature(b"PROXY TCP4 "));
        assert!(starts_with_signature(V2_SIGNATURE));
        assert!(!starts_with_signature(b"PROX"));
        assert!(!starts_with_signature(b"\x08\x00\x07\x00PROXY "));
    }
}
