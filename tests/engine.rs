//! The engine without Python: a `Server` driven by a plain Rust event loop,
//! talked to by blocking `std` sockets over loopback.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use _core::coalesce::WriteBatch;
use _core::send_buffer::SendBufferPool;
use _core::{DisconnectReason, Event, Server, ServiceConfig, SessionHandle, SessionId};

/// What the application side of a test saw, per session.
#[derive(Default)]
struct App {
    sessions: HashMap<SessionId, Arc<SessionHandle>>,
    packets: Vec<(SessionId, u16, Vec<u8>)>,
    disconnected: Vec<(SessionId, DisconnectReason)>,
    echo: bool,
}

impl App {
    fn echoing() -> Self {
        Self { echo: true, ..Self::default() }
    }

    /// Handles events until `done(self)` or the timeout; returns whether `done` held.
    fn pump(&mut self, server: &Server, timeout: Duration, done: impl Fn(&App) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut events = Vec::new();
        while !done(self) {
            if Instant::now() > deadline {
                return false;
            }
            server.service().wait_events(Some(Duration::from_millis(10)), &mut events);
            for event in events.drain(..) {
                self.handle(event);
            }
        }
        true
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Connected(handle) => {
                handle.mark_announced();
                self.sessions.insert(handle.id(), handle);
            }
            Event::Packets { session, packets } => {
                let handle = &self.sessions[&session];
                for (packet_id, payload) in &packets {
                    if self.echo {
                        handle.send(SendBufferPool::global().encode(packet_id, payload).unwrap());
                    }
                    self.packets.push((session, packet_id, payload.to_vec()));
                }
                handle.release_received(packets.byte_len(), 1);
            }
            Event::Received { .. } | Event::Sent { .. } => {}
            Event::Disconnected { session, reason } => {
                self.sessions.remove(&session);
                self.disconnected.push((session, reason));
            }
        }
    }

    fn reason_of_only_disconnect(&self) -> DisconnectReason {
        assert_eq!(self.disconnected.len(), 1, "{:?}", self.disconnected);
        self.disconnected[0].1
    }
}

fn listen(config: ServiceConfig) -> Server {
    let mut config = config;
    config.io_threads = 2;
    Server::listen(config, "127.0.0.1:0".parse().unwrap()).unwrap()
}

fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    stream.set_nodelay(true).unwrap();
    stream
}

fn packet(id: u16, payload: &[u8]) -> Vec<u8> {
    let mut out = ((payload.len() + 4) as u16).to_le_bytes().to_vec();
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(payload);
    out
}

fn read_packet(stream: &mut TcpStream) -> (u16, Vec<u8>) {
    let mut header = [0u8; 4];
    stream.read_exact(&mut header).unwrap();
    let size = usize::from(u16::from_le_bytes([header[0], header[1]]));
    let mut payload = vec![0u8; size - 4];
    stream.read_exact(&mut payload).unwrap();
    (u16::from_le_bytes([header[2], header[3]]), payload)
}

/// True if the peer closed (EOF or reset) within the read timeout.
fn closed_by_server(stream: &mut TcpStream) -> bool {
    let mut sink = [0u8; 65536];
    loop {
        match stream.read(&mut sink) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

const FEW_SECONDS: Duration = Duration::from_secs(5);

#[test]
fn packets_are_delivered_whole_and_in_order_however_they_are_split() {
    let server = listen(ServiceConfig::default());
    let mut app = App::echoing();
    let mut client = connect(server.local_addr());
    let stream: Vec<u8> =
        (0..50u16).flat_map(|i| packet(i, &i.to_le_bytes().repeat(usize::from(i)))).collect();
    for piece in stream.chunks(7) {
        client.write_all(piece).unwrap();
    }
    assert!(app.pump(&server, FEW_SECONDS, |app| app.packets.len() == 50));
    for (i, (_, id, payload)) in app.packets.iter().enumerate() {
        assert_eq!(usize::from(*id), i);
        assert_eq!(payload.len(), 2 * i);
    }
    for i in 0..50u16 {
        assert_eq!(read_packet(&mut client).0, i, "echoes come back in order");
    }
}

#[test]
fn a_lying_header_closes_only_its_own_session() {
    let server = listen(ServiceConfig::default());
    let mut app = App::echoing();
    let mut honest = connect(server.local_addr());
    let mut liar = connect(server.local_addr());
    liar.write_all(&[2, 0, 1, 0]).unwrap();
    assert!(closed_by_server(&mut liar));
    assert!(app.pump(&server, FEW_SECONDS, |app| !app.disconnected.is_empty()));
    assert_eq!(app.reason_of_only_disconnect(), DisconnectReason::InvalidHeader);
    honest.write_all(&packet(9, b"still here")).unwrap();
    assert!(app.pump(&server, FEW_SECONDS, |app| !app.packets.is_empty()));
    assert_eq!(read_packet(&mut honest), (9, b"still here".to_vec()));
    assert_eq!(server.service().stats().disconnects(DisconnectReason::InvalidHeader), 1);
}

#[test]
fn a_header_over_the_limit_is_refused_before_its_payload_arrives() {
    let mut config = ServiceConfig::default();
    config.session.frame_limits.max_packet_size = 100;
    let server = listen(config);
    let mut app = App::default();
    let mut liar = connect(server.local_addr());
    liar.write_all(&101u16.to_le_bytes()).unwrap();
    liar.write_all(&1u16.to_le_bytes()).unwrap();
    assert!(closed_by_server(&mut liar), "closed without waiting for 97 payload bytes");
    assert!(app.pump(&server, FEW_SECONDS, |app| !app.disconnected.is_empty()));
    assert_eq!(app.reason_of_only_disconnect(), DisconnectReason::PacketTooLarge);
}

#[test]
fn a_dribbled_packet_times_out_from_its_first_byte() {
    let mut config = ServiceConfig::default();
    config.session.packet_timeout = Some(Duration::from_millis(300));
    let server = listen(config);
    let mut app = App::default();
    let mut slow = connect(server.local_addr());
    let started = Instant::now();
    // One byte of a 100-byte packet every 50 ms: every byte is "progress", but
    // the deadline runs from the first one.
    slow.write_all(&[100]).unwrap();
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(50));
        if slow.write_all(&[0]).is_err() {
            break;
        }
    }
    assert!(app.pump(&server, FEW_SECONDS, |app| !app.disconnected.is_empty()));
    let elapsed = started.elapsed();
    assert_eq!(app.reason_of_only_disconnect(), DisconnectReason::PacketTimeout);
    assert!(elapsed < Duration::from_millis(900), "closed after {elapsed:?}");
}

#[test]
fn a_silent_session_is_closed_at_the_idle_timeout() {
    let mut config = ServiceConfig::default();
    config.session.idle_timeout = Some(Duration::from_millis(200));
    let server = listen(config);
    let mut app = App::default();
    let mut quiet = connect(server.local_addr());
    assert!(closed_by_server(&mut quiet));
    assert!(app.pump(&server, FEW_SECONDS, |app| !app.disconnected.is_empty()));
    assert_eq!(app.reason_of_only_disconnect(), DisconnectReason::IdleTimeout);
}

#[test]
fn a_local_close_delivers_what_was_queued_before_it() {
    let server = listen(ServiceConfig::default());
    let mut app = App::default();
    let mut client = connect(server.local_addr());
    assert!(app.pump(&server, FEW_SECONDS, |app| app.sessions.len() == 1));
    let handle = app.sessions.values().next().unwrap().clone();
    for i in 0..100u16 {
        handle.send(SendBufferPool::global().encode(i, &[7u8; 1000]).unwrap());
    }
    assert!(handle.close(DisconnectReason::ClosedLocally));
    assert!(!handle.close(DisconnectReason::ClosedLocally), "idempotent");
    for i in 0..100u16 {
        assert_eq!(read_packet(&mut client).0, i);
    }
    assert!(closed_by_server(&mut client));
    drop(client);
    assert!(app.pump(&server, FEW_SECONDS, |app| !app.disconnected.is_empty()));
    assert_eq!(app.reason_of_only_disconnect(), DisconnectReason::ClosedLocally);
}

#[test]
fn a_peer_that_never_reads_is_cut_at_the_send_queue_limit() {
    let mut config = ServiceConfig::default();
    config.session.max_send_queue_bytes = 64 * 1024;
    let server = listen(config);
    let mut app = App::default();
    let _never_reads = connect(server.local_addr());
    assert!(app.pump(&server, FEW_SECONDS, |app| app.sessions.len() == 1));
    let handle = app.sessions.values().next().unwrap().clone();
    let packet = SendBufferPool::global().encode(1, &[0u8; 4000]).unwrap();
    let mut sent = 0usize;
    while handle.send(packet.clone()) == _core::send_queue::Push::Queued {
        sent += 1;
        assert!(sent < 100_000, "the queue never filled");
    }
    assert!(app.pump(&server, FEW_SECONDS, |app| !app.disconnected.is_empty()));
    assert_eq!(app.reason_of_only_disconnect(), DisconnectReason::SendQueueFull);
    assert_eq!(server.service().stats().send_queue_bytes, 0, "the dropped queue is released");
}

#[test]
fn a_broadcast_reaches_every_announced_session_once() {
    let server = listen(ServiceConfig::default());
    let mut app = App::default();
    let mut clients: Vec<TcpStream> = (0..20).map(|_| connect(server.local_addr())).collect();
    assert!(app.pump(&server, FEW_SECONDS, |app| app.sessions.len() == 20));
    let hello = SendBufferPool::global().encode(1, b"Hello World").unwrap();
    let outcome = server.service().broadcast(&hello, None);
    assert_eq!(outcome.queued, 20);
    for client in &mut clients {
        assert_eq!(read_packet(client), (1, b"Hello World".to_vec()));
    }
}

#[test]
fn shutdown_reports_every_session_once_with_its_reason() {
    let mut server = listen(ServiceConfig::default());
    let mut app = App::default();
    let mut clients: Vec<TcpStream> = (0..10).map(|_| connect(server.local_addr())).collect();
    assert!(app.pump(&server, FEW_SECONDS, |app| app.sessions.len() == 10));
    server.service_mut().shutdown(DisconnectReason::ServerShutdown);
    for client in &mut clients {
        assert!(closed_by_server(client));
    }
    let mut events = Vec::new();
    server.service().wait_events(Some(Duration::ZERO), &mut events);
    for event in events {
        app.handle(event);
    }
    assert_eq!(app.disconnected.len(), 10);
    assert!(app.disconnected.iter().all(|(_, reason)| *reason == DisconnectReason::ServerShutdown));
    assert_eq!(server.service().stats().sessions, 0);
}

#[test]
fn a_flooder_over_the_packet_rate_is_disconnected() {
    let mut config = ServiceConfig::default();
    config.session.max_packets_per_second = Some(100);
    let server = listen(config);
    let mut app = App::default();
    let mut flooder = connect(server.local_addr());
    let burst: Vec<u8> = (0..500).flat_map(|_| packet(1, b"x")).collect();
    let _ = flooder.write_all(&burst);
    assert!(app.pump(&server, FEW_SECONDS, |app| !app.disconnected.is_empty()));
    assert_eq!(app.reason_of_only_disconnect(), DisconnectReason::RateLimited);
}

#[test]
fn sends_inside_a_write_batch_leave_when_the_batch_ends() {
    let server = listen(ServiceConfig::default());
    let mut app = App::default();
    let mut client = connect(server.local_addr());
    assert!(app.pump(&server, FEW_SECONDS, |app| app.sessions.len() == 1));
    let handle = app.sessions.values().next().unwrap().clone();
    let batch = WriteBatch::begin();
    for i in 0..32u16 {
        handle.send(SendBufferPool::global().encode(i, b"answer").unwrap());
    }
    client.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let mut probe = [0u8; 1];
    assert!(client.peek(&mut probe).is_err(), "nothing is written before the batch ends");
    drop(batch);
    client.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for i in 0..32u16 {
        assert_eq!(read_packet(&mut client), (i, b"answer".to_vec()));
    }
}

/// A reactor that never runs out of work (a broadcast in a tight loop to peers
/// that never read, so every serve writes into a full window) still yields to
/// the runtime often enough for the accept loop: each newcomer is taken in and
/// reached by the broadcast within a second.
#[test]
fn a_reactor_kept_busy_by_a_tight_broadcast_still_takes_in_newcomers() {
    let config = ServiceConfig { io_threads: 1, ..ServiceConfig::default() };
    let server = Server::listen(config, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = server.local_addr();
    let broadcasting = AtomicBool::new(true);
    let latencies = std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut app = App::default();
            let mut events = Vec::new();
            let tick = SendBufferPool::global().encode(1, b"tick").unwrap();
            while broadcasting.load(Ordering::Relaxed) {
                server.service().broadcast(&tick, None);
                server.service().wait_events(Some(Duration::ZERO), &mut events);
                events.drain(..).for_each(|event| app.handle(event));
            }
        });
        let stop_broadcasting = Defer(|| broadcasting.store(false, Ordering::Relaxed));
        let stalled: Vec<TcpStream> = (0..200)
            .map(|_| {
                let stream = TcpStream::connect(addr).unwrap();
                socket2::SockRef::from(&stream).set_recv_buffer_size(4096).unwrap();
                stream
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        let latencies: Vec<Duration> = (0..10)
            .map(|_| {
                let started = Instant::now();
                let mut newcomer = connect(addr);
                newcomer.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
                let mut first = [0u8; 1];
                newcomer.read_exact(&mut first).expect("a newcomer got its first broadcast within a second");
                started.elapsed()
            })
            .collect();
        drop(stop_broadcasting);
        drop(stalled);
        latencies
    });
    assert!(latencies.iter().all(|l| *l < Duration::from_secs(1)), "{latencies:?}");
}

/// Runs a closure when dropped: the broadcaster stops even if an assertion fails.
struct Defer<F: FnMut()>(F);

impl<F: FnMut()> Drop for Defer<F> {
    fn drop(&mut self) {
        (self.0)();
    }
}
