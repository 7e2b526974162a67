//! epoll_floor: the B1 floor with no servercore code at all. One thread,
//! plain epoll (libc), non-blocking sockets, what a C broadcast server would
//! be: the bar servercore's broadcast is held to (B1 target: ≥ 0.8 × this).
//!
//! epoll_floor --port P --mode broadcast|hello|idle
//! Prints "listening <port>" once it accepts connections.
//!
//! The protocol of the other benchmark servers (benches/servers/*.py):
//! `[size u16 LE][id u16 LE][payload]`. Every mode answers 0xFFF1 (the load
//! client's "how many sessions") with `[sessions u32]`; in broadcast mode
//! 0xFFF0 `[packets u32][size u32]` broadcasts `packets` packets of id 1 and
//! `size` payload bytes, the u32 sequence number first, to every client; hello
//! mode sends the lecture's 1004-byte Hello World to every client every 250 ms;
//! idle mode only holds the connections.
//!
//! What a server must do, it does: each header is checked as soon as its four
//! bytes are in (a size below 4 or above 4096 closes that client); per-client
//! send queues are bounded (1 MiB queued closes that client, as servercore's
//! `SEND_QUEUE_FULL` does); a client that closes or resets is dropped; SIGPIPE
//! is ignored. A broadcast packet is encoded once, shared by reference count
//! (single-threaded `Rc`), and queued on every client; every `--poll-every`
//! packets (64, as the Python servers' poll) each client's queue goes out in
//! one `writev` (up to IOV_MAX packets), and epoll is polled once, without
//! waiting, so that reads and writability are served during a long broadcast.
//! A client whose socket is full waits for its EPOLLOUT (edge-triggered).

use std::collections::VecDeque;
use std::io::{self, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, RawFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};

const ID_BROADCAST: u16 = 1;
const ID_CONTROL: u16 = 0xFFF0;
const ID_QUERY: u16 = 0xFFF1;
const HEADER: usize = 4;
const MAX_PACKET_SIZE: usize = 4096;
const MAX_QUEUE_BYTES: usize = 1 << 20;
/// Linux's IOV_MAX: the most slices one writev takes.
const IOV_MAX: usize = 1024;
const READ_CHUNK: usize = 64 * 1024;
const HELLO_PERIOD: Duration = Duration::from_millis(250);
const EVENTS: usize = 1024;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Broadcast,
    Hello,
    Idle,
}

#[derive(Parser)]
#[command(name = "epoll_floor", about = "one-thread epoll broadcast server, no servercore code: B1's floor")]
struct Cli {
    /// 0 picks a free port (printed).
    #[arg(long, default_value_t = 0)]
    port: u16,
    #[arg(long, value_enum)]
    mode: Mode,
    /// Broadcast packets between two looks at epoll (without waiting): reads
    /// and writability are served during a long broadcast.
    #[arg(long, default_value_t = 64)]
    poll_every: u32,
    /// Broadcast packets queued between two flushes (one writev per client);
    /// the default, IOV_MAX, is the most one writev takes.
    #[arg(long, default_value_t = IOV_MAX as u32)]
    flush_every: u32,
}

type Packet = Rc<[u8]>;

struct Client {
    fd: RawFd,
    /// Its place in `Server::live`.
    live_index: usize,
    /// Bumped each time the slot is reused, so a stale event is recognised.
    generation: u32,
    inbuf: Vec<u8>,
    queue: VecDeque<Packet>,
    /// Bytes of `queue[0]` already written.
    head_written: usize,
    queued_bytes: usize,
    /// The last write found the socket full: wait for EPOLLOUT.
    blocked: bool,
}

struct Server {
    epfd: RawFd,
    listener: TcpListener,
    /// Indexed by file descriptor.
    slots: Vec<Option<Box<Client>>>,
    generations: Vec<u32>,
    live: Vec<RawFd>,
    mode: Mode,
    job: Option<(u32, u32)>,
    closed_full: u64,
    closed_bad: u64,
    iov: Vec<libc::iovec>,
    read_buf: Vec<u8>,
}

fn encode(id: u16, payload: &[u8]) -> Packet {
    let size = u16::try_from(HEADER + payload.len()).expect("packet fits a u16 size");
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(&size.to_le_bytes());
    out.extend_from_slice(&id.to_le_bytes());
    out.extend_from_slice(payload);
    out.into()
}

fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

impl Server {
    fn token(fd: RawFd, generation: u32) -> u64 {
        (u64::from(generation) << 32) | fd as u32 as u64
    }

    fn accept_all(&mut self) {
        loop {
            // SAFETY: accept4 on our listening socket; null address pointers are allowed.
            let fd = unsafe {
                libc::accept4(
                    self.listener.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            if fd < 0 {
                match errno() {
                    libc::EAGAIN => return,
                    libc::ECONNABORTED | libc::EINTR => continue,
                    libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM => {
                        eprintln!("epoll_floor: accept: {}; backing off 10 ms", io::Error::last_os_error());
                        std::thread::sleep(Duration::from_millis(10));
                        return;
                    }
                    _ => {
                        eprintln!("epoll_floor: accept: {}", io::Error::last_os_error());
                        return;
                    }
                }
            }
            let one: libc::c_int = 1;
            // SAFETY: setsockopt with a valid int option on a socket we own.
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::IPPROTO_TCP,
                    libc::TCP_NODELAY,
                    (&one as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
            let index = fd as usize;
            if index >= self.slots.len() {
                self.slots.resize_with(index + 1, || None);
                self.generations.resize(index + 1, 0);
            }
            self.generations[index] = self.generations[index].wrapping_add(1);
            let generation = self.generations[index];
            let mut event = libc::epoll_event {
                events: (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32,
                u64: Self::token(fd, generation),
            };
            // SAFETY: registering a descriptor we own with our epoll instance.
            if unsafe { libc::epoll_ctl(self.epfd, libc::EPOLL_CTL_ADD, fd, &mut event) } != 0 {
                eprintln!("epoll_floor: epoll_ctl: {}", io::Error::last_os_error());
                // SAFETY: closing the descriptor accept4 gave us.
                unsafe { libc::close(fd) };
                continue;
            }
            self.slots[index] = Some(Box::new(Client {
                fd,
                live_index: self.live.len(),
                generation,
                inbuf: Vec::new(),
                queue: VecDeque::new(),
                head_written: 0,
                queued_bytes: 0,
                blocked: false,
            }));
            self.live.push(fd);
        }
    }

    fn close(&mut self, fd: RawFd) {
        let Some(client) = self.slots[fd as usize].take() else { return };
        let last = self.live.pop().expect("a live client");
        if last != fd {
            self.live[client.live_index] = last;
            self.slots[last as usize].as_mut().expect("live").live_index = client.live_index;
        }
        // SAFETY: closing a descriptor we own (this also leaves the epoll set).
        unsafe { libc::close(fd) };
    }

    /// Queues `packet` on `fd`; false if that overflows its bound (the caller closes it).
    fn queue(&mut self, fd: RawFd, packet: &Packet) -> bool {
        let client = self.slots[fd as usize].as_mut().expect("live");
        if client.queued_bytes + packet.len() > MAX_QUEUE_BYTES {
            return false;
        }
        client.queued_bytes += packet.len();
        client.queue.push_back(packet.clone());
        true
    }

    /// Writes `fd`'s queue: one writev of up to IOV_MAX packets, more only if
    /// the socket took all of it. Ok(()) also when the socket is full (then
    /// `blocked` waits for EPOLLOUT); Err if the connection is gone.
    fn flush(&mut self, fd: RawFd) -> Result<(), ()> {
        let client = self.slots[fd as usize].as_mut().expect("live");
        while !client.queue.is_empty() {
            self.iov.clear();
            let mut offered = 0usize;
            for (i, packet) in client.queue.iter().take(IOV_MAX).enumerate() {
                let skip = if i == 0 { client.head_written } else { 0 };
                self.iov.push(libc::iovec {
                    iov_base: packet[skip..].as_ptr() as *mut libc::c_void,
                    iov_len: packet.len() - skip,
                });
                offered += packet.len() - skip;
            }
            // SAFETY: the iovecs point into packets the queue keeps alive for the call.
            let n = unsafe { libc::writev(client.fd, self.iov.as_ptr(), self.iov.len() as libc::c_int) };
            if n < 0 {
                match errno() {
                    libc::EAGAIN => {
                        client.blocked = true;
                        return Ok(());
                    }
                    libc::EINTR => continue,
                    _ => return Err(()),
                }
            }
            let mut left = n as usize;
            client.queued_bytes -= left;
            while left > 0 {
                let head =
                    client.queue.front().expect("written bytes were queued").len() - client.head_written;
                if left >= head {
                    left -= head;
                    client.head_written = 0;
                    client.queue.pop_front();
                } else {
                    client.head_written += left;
                    left = 0;
                }
            }
            if (n as usize) < offered {
                // A short write: the socket buffer is full.
                client.blocked = true;
                return Ok(());
            }
        }
        client.blocked = false;
        Ok(())
    }

    /// Reads until EAGAIN, cutting and handling whole packets. Err: close it.
    fn read(&mut self, fd: RawFd) -> Result<(), &'static str> {
        loop {
            // SAFETY: reading into our own buffer of READ_CHUNK bytes.
            let n = unsafe { libc::read(fd, self.read_buf.as_mut_ptr().cast(), READ_CHUNK) };
            if n == 0 {
                return Err("closed by peer");
            }
            if n < 0 {
                match errno() {
                    libc::EAGAIN => return Ok(()),
                    libc::EINTR => continue,
                    _ => return Err("reset"),
                }
            }
            let client = self.slots[fd as usize].as_mut().expect("live");
            client.inbuf.extend_from_slice(&self.read_buf[..n as usize]);
            let mut at = 0;
            let mut replies: Vec<Packet> = Vec::new();
            while client.inbuf.len() - at >= HEADER {
                let b = &client.inbuf[at..];
                let size = usize::from(u16::from_le_bytes([b[0], b[1]]));
                let id = u16::from_le_bytes([b[2], b[3]]);
                if !(HEADER..=MAX_PACKET_SIZE).contains(&size) {
                    self.closed_bad += 1;
                    return Err("invalid header");
                }
                if b.len() < size {
                    break;
                }
                let payload = &b[HEADER..size];
                match id {
                    ID_QUERY => replies.push(encode(ID_QUERY, &(self.live.len() as u32).to_le_bytes())),
                    ID_CONTROL if self.mode == Mode::Broadcast => {
                        if payload.len() < 8 {
                            self.closed_bad += 1;
                            return Err("short control packet");
                        }
                        let packets = u32::from_le_bytes(payload[0..4].try_into().expect("4 bytes"));
                        let size = u32::from_le_bytes(payload[4..8].try_into().expect("4 bytes"));
                        self.job = Some((packets, size.clamp(4, (MAX_PACKET_SIZE - HEADER) as u32)));
                    }
                    _ => {}
                }
                at += size;
            }
            client.inbuf.drain(..at);
            for reply in &replies {
                if !self.queue(fd, reply) {
                    self.closed_full += 1;
                    return Err("send queue full");
                }
            }
            if !replies.is_empty() && self.flush(fd).is_err() {
                return Err("reset");
            }
        }
    }

    /// One epoll_wait (`timeout_ms`: 0 = just look) and everything it returned.
    fn poll(&mut self, events: &mut [libc::epoll_event], timeout_ms: i32) {
        // SAFETY: `events` is a valid buffer of `events.len()` entries.
        let n = unsafe { libc::epoll_wait(self.epfd, events.as_mut_ptr(), events.len() as i32, timeout_ms) };
        if n < 0 {
            if errno() != libc::EINTR {
                eprintln!("epoll_floor: epoll_wait: {}", io::Error::last_os_error());
            }
            return;
        }
        for event in &events[..n as usize] {
            let (token, flags) = (event.u64, event.events);
            if token == u64::MAX {
                self.accept_all();
                continue;
            }
            let fd = (token & 0xFFFF_FFFF) as RawFd;
            let generation = (token >> 32) as u32;
            match self.slots.get(fd as usize) {
                Some(Some(client)) if client.generation == generation => {}
                _ => continue, // closed earlier in this batch
            }
            if flags & (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0
                && self.read(fd).is_err()
            {
                self.close(fd);
                continue;
            }
            if flags & libc::EPOLLOUT as u32 != 0 {
                let client = self.slots[fd as usize].as_mut().expect("live");
                client.blocked = false;
                if !client.queue.is_empty() && self.flush(fd).is_err() {
                    self.close(fd);
                }
            }
        }
    }

    /// Queues `packet` on every client, closing any whose queue overflows.
    fn queue_all(&mut self, packet: &Packet) {
        let mut i = 0;
        while i < self.live.len() {
            let fd = self.live[i];
            if self.queue(fd, packet) {
                i += 1;
            } else {
                self.closed_full += 1;
                eprintln!("epoll_floor: client fd {fd}: send queue over {MAX_QUEUE_BYTES} bytes; closed");
                self.close(fd); // swaps the last live client into place i
            }
        }
    }

    /// One writev per client that has something queued and a socket that takes it.
    fn flush_all(&mut self) {
        let mut i = 0;
        while i < self.live.len() {
            let fd = self.live[i];
            let client = self.slots[fd as usize].as_ref().expect("live");
            if !client.blocked && !client.queue.is_empty() && self.flush(fd).is_err() {
                self.close(fd);
                continue;
            }
            i += 1;
        }
    }
}

fn main() {
    let cli = Cli::parse();
    servercore_loadgen::raise_nofile_limit();
    // SAFETY: ignoring SIGPIPE; a write to a reset socket then fails with EPIPE.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    let listener = match TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], cli.port))) {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("epoll_floor: cannot listen on 127.0.0.1:{}: {e}", cli.port);
            std::process::exit(1);
        }
    };
    listener.set_nonblocking(true).expect("non-blocking listener");
    // SAFETY: listen() again on a listening socket only raises its backlog (std uses 128).
    unsafe { libc::listen(listener.as_raw_fd(), 1024) };
    // SAFETY: a new epoll instance, owned by this process until it exits.
    let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    assert!(epfd >= 0, "epoll_create1: {}", io::Error::last_os_error());
    let mut event = libc::epoll_event { events: libc::EPOLLIN as u32, u64: u64::MAX };
    // SAFETY: registering the listener (level-triggered) with our epoll instance.
    let rc = unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, listener.as_raw_fd(), &mut event) };
    assert!(rc == 0, "epoll_ctl: {}", io::Error::last_os_error());
    println!("listening {}", listener.local_addr().expect("bound").port());
    let _ = io::stdout().flush();

    let mut server = Server {
        epfd,
        listener,
        slots: Vec::new(),
        generations: Vec::new(),
        live: Vec::new(),
        mode: cli.mode,
        job: None,
        closed_full: 0,
        closed_bad: 0,
        iov: Vec::with_capacity(IOV_MAX),
        read_buf: vec![0; READ_CHUNK],
    };
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS];
    let hello = {
        let mut payload = b"Hello World".to_vec();
        payload.resize(1000, 0);
        encode(ID_BROADCAST, &payload)
    };
    let poll_every = cli.poll_every.max(1);
    let flush_every = cli.flush_every.max(1);
    let mut next_tick = Instant::now() + HELLO_PERIOD;
    loop {
        let timeout_ms = match cli.mode {
            Mode::Hello => next_tick.saturating_duration_since(Instant::now()).as_millis().min(1000) as i32,
            _ => 100,
        };
        server.poll(&mut events, timeout_ms);
        if let Some((packets, size)) = server.job.take() {
            let mut payload = vec![0u8; size as usize];
            for seq in 0..packets {
                payload[..4].copy_from_slice(&seq.to_le_bytes());
                let packet = encode(ID_BROADCAST, &payload);
                server.queue_all(&packet);
                if seq % flush_every == flush_every - 1 || seq + 1 == packets {
                    server.flush_all();
                }
                if seq % poll_every == poll_every - 1 || seq + 1 == packets {
                    server.poll(&mut events, 0);
                }
            }
        }
        if cli.mode == Mode::Hello && Instant::now() >= next_tick {
            server.queue_all(&hello);
            server.flush_all();
            next_tick += HELLO_PERIOD;
            if next_tick < Instant::now() {
                next_tick = Instant::now() + HELLO_PERIOD;
            }
        }
    }
}
