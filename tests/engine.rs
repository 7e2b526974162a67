//! The engine without Python: a `Server` driven by a plain Rust event loop,
//! talked to by blocking `std` sockets over loopback.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use _core::coalesce::{self, WriteBatch};
use _core::frame::PacketRun;
use _core::send_buffer::SendBufferPool;
use _core::{
    Application, DisconnectReason, Event, Inbox, Known, Server, ServiceConfig, SessionHandle, SessionId,
};

/// What the application side of a test saw.
#[derive(Default)]
struct Seen {
    packets: Vec<(SessionId, u16, Vec<u8>)>,
    disconnected: Vec<(SessionId, DisconnectReason)>,
    echo: bool,
}

impl Application for Seen {
    type Session = ();

    fn connected(&mut self, _handle: &Arc<SessionHandle>) {}

    fn packets(&mut self, session: &mut Known<()>, packets: &PacketRun) {
        for (packet_id, payload) in packets {
            if self.echo {
                session.handle.send(SendBufferPool::global().encode(packet_id, payload).unwrap());
            }
            self.packets.push((session.handle.id(), packet_id, payload.to_vec()));
        }
    }

    fn disconnected(&mut self, session: Known<()>, reason: DisconnectReason) {
        self.disconnected.push((session.handle.id(), reason));
    }
}

/// A test's application: the engine's inbox and what it saw.
struct App {
    inbox: Inbox<()>,
    seen: Seen,
}

impl App {
    fn new(server: &Server) -> Self {
        Self { inbox: server.service().shared().inbox(), seen: Seen::default() }
    }

    fn echoing(server: &Server) -> Self {
        let mut app = Self::new(server);
        app.seen.echo = true;
        app
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
        self.inbox.deliver(event, &mut self.seen);
    }

    fn sessions(&self) -> usize {
        self.inbox.len()
    }

    fn packets(&self) -> &[(SessionId, u16, Vec<u8>)] {
        &self.seen.packets
    }

    fn disconnected(&self) -> &[(SessionId, DisconnectReason)] {
        &self.seen.disconnected
    }

    fn only_handle(&self) -> Arc<SessionHandle> {
        assert_eq!(self.inbox.len(), 1);
        self.inbox.iter().next().unwrap().1.handle.clone()
    }

    fn reason_of_only_disconnect(&self) -> DisconnectReason {
        assert_eq!(self.seen.disconnected.len(), 1, "{:?}", self.seen.disconnected);
        self.seen.disconnected[0].1
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
    let mut app = App::echoing(&server);
    let mut client = connect(server.local_addr());
    let stream: Vec<u8> =
        (0..50u16).flat_map(|i| packet(i, &i.to_le_bytes().repeat(usize::from(i)))).collect();
    for piece in stream.chunks(7) {
        client.write_all(piece).unwrap();
    }
    assert!(app.pump(&server, FEW_SECONDS, |app| app.packets().len() == 50));
    for (i, (_, id, payload)) in app.packets().iter().enumerate() {
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
    let mut app = App::echoing(&server);
    let mut honest = connect(server.local_addr());
    let mut liar = connect(server.local_addr());
    assert!(app.pump(&server, FEW_SECONDS, |app| app.sessions() == 2));
    liar.write_all(&[2, 0, 1, 0]).unwrap();
    assert!(closed_by_server(&mut liar));
    assert!(app.pump(&server, FEW_SECONDS, |app| !app.disconnected().is_empty()));
    assert_eq!(app.reason_of_only_disconnect(), DisconnectReason::InvalidHeader);
    honest.write_all(&packet(9, b"still here")).unwrap();
    assert!(app.pump(&server, FEW_SECONDS, |app| !app.packets().is_empty()));
    assert_eq!(read_packet(&mut honest), (9, b"still here".to_vec()));
    assert_eq!(server.service().stats().disconnects(DisconnectReason::InvalidHeader), 1);
}

#[test]
fn a_header_over_the_limit_is_refused_before_its_payload_arrives() {
    let mut config = ServiceConfig::default();
    config.session.frame_limits.max_packet_size = 100;
    let server = listen(config);
    let mut app = App::new(&server);
    let mut liar = connect(server.local_addr());
    assert!(app.pump(&server, FEW_SECONDS, |app| app.sessions() == 1));
    liar.write_all(&101u16.to_le_bytes()).unwrap();
    liar.write_all(&1u16.to_le_bytes()).unwrap();
    assert!(closed_by_server(&mut liar), "closed without waiting for 97 payload bytes");
    assert!(app.pump(&server, FEW_SECONDS, |app| !app.disconnected().is_empty()));
    assert_eq!(app.reason_of_only_disconnect(), DisconnectReason::PacketTooLarge);
}

#[test]
fn a_dribbled_packet_times_out_from_its_first_byte() {
    let mut config = ServiceConfig::default();
    config.session.packet_timeout = Some(Duration::from_millis(300));
    let server = listen(config);
    let mut app = App::new(&server);
    let mut slow = connect(server.local_addr());
    assert!(app.pump(&server, FEW_SECONDS, |app| app.sessions() == 1));
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
    assert!(app.pump(&server, FEW_SECONDS, |app| !app.disconnected().is_empty()));
    let elapsed = started.elapsed();
    assert_eq!(app.reason_of_only_disconnect(), DisconnectReason::PacketTimeout);
    assert!(elapsed < Duration::from_millis(900), "closed after {elapsed:?}");
}

#[test]
fn a_silent_session_is_closed_at_the_idle_timeout() {
    let mut config = ServiceConfig::default();
    config.session.idle_timeout = Some(Duration::from_millis(200));
    let server = listen(config);
    let mut app = App::new(&server);
    let mut quiet = connect(server.local_addr());
    assert!(app.pump(&server, FEW_SECONDS, |app| app.sessions() == 1));
    assert!(closed_by_server(&mut quiet));
    assert!(app.pump(&server, FEW_SECONDS, |app| !app.disconnected().is_empty()));
    assert_eq!(app.reason_of_only_disconnect(), DisconnectReason::IdleTimeout);
}

#[test]
fn a_connection_closed_before_the_application_looked_is_never_announced() {
    let server = listen(ServiceConfig::default());
    let mut liar = connect(server.local_addr());
    liar.write_all(&[0, 0, 1, 0]).unwrap();
    assert!(closed_by_server(&mut liar));
    let deadline = Instant::now() + FEW_SECONDS;
    while server.service().stats().sessions > 0 {
        assert!(Instant::now() < deadline, "the liar's session never ended");
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut app = App::new(&server);
    assert!(!app.pump(&server, Duration::from_millis(200), |app| app.sessions() > 0));
    assert!(app.disconnected().is_empty(), "neither Connected nor Disconnected reach the application");
    let stats = server.service().stats();
    assert_eq!(stats.disconnects(DisconnectReason::InvalidHeader), 1, "it is counted all the same");
    assert_eq!(stats.pending_recv_bytes, 0);
}

#[test]
fn a_half_closed_peer_gets_its_answers_before_the_session_closes() {
    let server = listen(ServiceConfig::default());
    let mut app = App::echoing(&server);
    let mut client = connect(server.local_addr());
    assert!(app.pump(&server, FEW_SECONDS, |app| app.sessions() == 1));
    client.write_all(&[packet(1, b"one"), packet(2, b"two")].concat()).unwrap();
    client.shutdown(std::net::Shutdown::Write).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(app.pump(&server, FEW_SECONDS, |app| !app.disconnected().is_empty()));
    assert_eq!(read_packet(&mut client), (1, b"one".to_vec()));
    assert_eq!(read_packet(&mut client), (2, b"two".to_vec()));
    assert!(closed_by_server(&mut client));
    assert_eq!(app.reason_of_only_disconnect(), DisconnectReason::ClosedByPeer);
}

#[test]
fn deadlines_stand_still_while_the_application_is_behind() {
    let mut config = ServiceConfig::default();
    config.session.packet_timeout = Some(Duration::from_millis(200));
    config.session.idle_timeout = Some(Duration::from_millis(300));
    config.session.max_pending_recv_bytes = 4096;
    let server = listen(config);
    let mut app = App::new(&server);
    let mut client = connect(server.local_addr());
    assert!(app.pump(&server, FEW_SECONDS, |app| app.sessions() == 1));
    // Far more than the backlog takes, and the start of one more packet.
    let burst: Vec<u8> = (0..64).flat_map(|_| packet(1, &[9u8; 1000])).chain([200, 0]).collect();
    client.write_all(&burst).unwrap();
    // The application looks away for longer than both timeouts.
    std::thread::sleep(Duration::from_millis(800));
    assert!(app.pump(&server, FEW_SECONDS, |app| app.packets().len() == 64));
    assert!(app.disconnected().is_empty(), "{:?}", app.disconnected());
    // Once everything is handled, the peer's clocks run again: the started
    // packet times out.
    assert!(app.pump(&server, FEW_SECONDS, |app| !app.disconnected().is_empty()));
    assert_eq!(app.reason_of_only_disconnect(), DisconnectReason::PacketTimeout);
}

#[test]
fn a_local_close_delivers_what_was_queued_before_it() {
    let server = listen(ServiceConfig::default());
    let mut app = App::new(&server);
    let mut client = connect(server.local_addr());
    assert!(app.pump(&server, FEW_SECONDS, |app| app.sessions() == 1));
    let handle = app.only_handle();
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
    assert!(app.pump(&server, FEW_SECONDS, |app| !app.disconnected().is_empty()));
    assert_eq!(app.reason_of_only_disconnect(), DisconnectReason::ClosedLocally);
}

#[test]
fn a_peer_that_never_reads_is_cut_at_the_send_queue_limit() {
    let mut config = ServiceConfig::default();
    config.session.max_send_queue_bytes = 64 * 1024;
    let server = listen(config);
    let mut app = App::new(&server);
    let _never_reads = connect(server.local_addr());
    assert!(app.pump(&server, FEW_SECONDS, |app| app.sessions() == 1));
    let handle = app.only_handle();
    let packet = SendBufferPool::global().encode(1, &[0u8; 4000]).unwrap();
    let mut sent = 0usize;
    while handle.send(packet.clone()) == _core::send_queue::Push::Queued {
        sent += 1;
        assert!(sent < 100_000, "the queue never filled");
    }
    assert!(app.pump(&server, FEW_SECONDS, |app| !app.disconnected().is_empty()));
    assert_eq!(app.reason_of_only_disconnect(), DisconnectReason::SendQueueFull);
    assert_eq!(server.service().stats().send_queue_bytes, 0, "the dropped queue is released");
}

#[test]
fn a_broadcast_reaches_every_announced_session_once() {
    let server = listen(ServiceConfig::default());
    let mut app = App::new(&server);
    let mut clients: Vec<TcpStream> = (0..20).map(|_| connect(server.local_addr())).collect();
    assert!(app.pump(&server, FEW_SECONDS, |app| app.sessions() == 20));
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
    let mut app = App::new(&server);
    let mut clients: Vec<TcpStream> = (0..10).map(|_| connect(server.local_addr())).collect();
    assert!(app.pump(&server, FEW_SECONDS, |app| app.sessions() == 10));
    server.service_mut().shutdown(DisconnectReason::ServerShutdown);
    for client in &mut clients {
        assert!(closed_by_server(client));
    }
    let mut events = Vec::new();
    server.service().wait_events(Some(Duration::ZERO), &mut events);
    for event in events {
        app.handle(event);
    }
    assert_eq!(app.disconnected().len(), 10);
    assert!(app.disconnected().iter().all(|(_, reason)| *reason == DisconnectReason::ServerShutdown));
    assert_eq!(server.service().stats().sessions, 0);
}

#[test]
fn a_flooder_over_the_packet_rate_is_disconnected() {
    let mut config = ServiceConfig::default();
    config.session.max_packets_per_second = Some(100);
    let server = listen(config);
    let mut app = App::new(&server);
    let mut flooder = connect(server.local_addr());
    assert!(app.pump(&server, FEW_SECONDS, |app| app.sessions() == 1));
    let burst: Vec<u8> = (0..500).flat_map(|_| packet(1, b"x")).collect();
    let _ = flooder.write_all(&burst);
    assert!(app.pump(&server, FEW_SECONDS, |app| !app.disconnected().is_empty()));
    assert_eq!(app.reason_of_only_disconnect(), DisconnectReason::RateLimited);
}

#[test]
fn sends_inside_a_write_batch_leave_when_the_batch_ends() {
    let server = listen(ServiceConfig::default());
    let mut app = App::new(&server);
    let mut client = connect(server.local_addr());
    assert!(app.pump(&server, FEW_SECONDS, |app| app.sessions() == 1));
    let handle = app.only_handle();
    let batch = WriteBatch::begin(32);
    for i in 0..32u16 {
        coalesce::send(&handle, SendBufferPool::global().encode(i, b"answer").unwrap());
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
            let mut app = App::new(&server);
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

// The application thread serving the reactors inline while it waits
// (rust/reactor.rs): a game loop's poll(0) and a stop from another thread.

fn listen_with_io_threads(io_threads: usize) -> Server {
    let config = ServiceConfig { io_threads, ..ServiceConfig::default() };
    Server::listen(config, "127.0.0.1:0".parse().unwrap()).unwrap()
}

#[test]
fn a_consumer_polling_with_a_zero_timeout_gets_its_packets() {
    for io_threads in [1, 2] {
        let server = listen_with_io_threads(io_threads);
        let shared = server.service().shared().clone();
        let mut peer = connect(server.local_addr());
        let mut events = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !events.iter().any(|e| matches!(e, Event::Connected { .. })) && Instant::now() < deadline {
            shared.wait_events_in_poll(Some(Duration::from_millis(10)), &mut events);
        }
        events.clear();
        peer.write_all(&packet(1, b"ping")).unwrap();
        let started = Instant::now();
        let mut got = false;
        // A game loop: poll(0), then a millisecond of game logic, more often
        // than the I/O threads' watchdog (25 ms) would take the sockets back.
        while !got && started.elapsed() < Duration::from_secs(2) {
            shared.wait_events_in_poll(Some(Duration::ZERO), &mut events);
            got = events.iter().any(|e| matches!(e, Event::Packets { .. }));
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(got, "{io_threads} I/O threads: no packet after {:?} of poll(0)", started.elapsed());
    }
}

#[test]
fn shutdown_does_not_wait_for_a_consumer_that_waits_without_a_timeout() {
    for io_threads in [1, 2] {
        let mut server = listen_with_io_threads(io_threads);
        let shared = server.service().shared().clone();
        let waiting = Arc::new(AtomicBool::new(false));
        let consumer = {
            let (shared, waiting) = (shared.clone(), waiting.clone());
            std::thread::spawn(move || {
                let mut events = Vec::new();
                waiting.store(true, Ordering::SeqCst);
                shared.wait_events(None, &mut events);
            })
        };
        // Whatever the assertions say, the consumer is let go and joined.
        let _release = Defer(|| shared.interrupt_wait());
        while !waiting.load(Ordering::SeqCst) {
            std::thread::yield_now();
        }
        std::thread::sleep(Duration::from_millis(50));
        let started = Instant::now();
        server.service_mut().shutdown(DisconnectReason::ServerShutdown);
        let took = started.elapsed();
        assert!(took < Duration::from_millis(500), "{io_threads} I/O threads: shutdown took {took:?}");
        let back = Instant::now() + Duration::from_secs(1);
        while !consumer.is_finished() && Instant::now() < back {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert!(
            consumer.is_finished(),
            "{io_threads} I/O threads: the consumer's wait did not end at shutdown"
        );
        consumer.join().unwrap();
    }
}

#[test]
fn shutdown_is_not_held_up_by_a_consumer_in_an_idle_inline_wait() {
    let mut worst = Duration::ZERO;
    for round in 0..10 {
        let mut server = listen_with_io_threads(1 + round % 2);
        let shared = server.service().shared().clone();
        let stop = AtomicBool::new(false);
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let mut events = Vec::new();
                // The bindings' run loop waits in slices of this length.
                while !stop.load(Ordering::SeqCst) {
                    shared.wait_events_in_poll(Some(Duration::from_millis(100)), &mut events);
                    events.clear();
                }
            });
            let _stop = Defer(|| {
                stop.store(true, Ordering::SeqCst);
                shared.interrupt_wait();
            });
            std::thread::sleep(Duration::from_millis(30));
            let started = Instant::now();
            server.service_mut().shutdown(DisconnectReason::ServerShutdown);
            worst = worst.max(started.elapsed());
        });
    }
    assert!(worst < Duration::from_millis(20), "an idle shutdown took up to {worst:?}");
}
