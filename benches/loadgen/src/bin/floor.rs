//! The floor: the same server as benches/servers/*.py, on the servercore engine
//! crate, driven from a plain Rust event loop. No Python anywhere, so it is
//! what servercore could do if dispatch cost nothing.
//!
//! floor --port P --mode broadcast|echo|hello|idle|raw-echo
//!
//! raw-echo: raw framing (servercore's `Session`); every read goes back as it
//! came, the received `Bytes` queued as is (no copy).
//! Prints "listening <port>" once it accepts connections.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use _core::coalesce::{self, WriteBatch};
use _core::frame::PacketRun;
use _core::send_buffer::SendBufferPool;
use _core::{Application, DisconnectReason, Framing, Known, Server, ServiceConfig, SessionHandle};
use bytes::Bytes;
use clap::{Parser, ValueEnum};

const ID_BROADCAST: u16 = 1;
const ID_ECHO: u16 = 2;
const ID_CONTROL: u16 = 0xFFF0;
const ID_QUERY: u16 = 0xFFF1;
const HELLO_PERIOD: Duration = Duration::from_millis(250);

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Broadcast,
    Echo,
    Hello,
    Idle,
    RawEcho,
}

#[derive(Parser)]
#[command(name = "floor", about = "servercore engine without Python: the benchmarks' floor")]
struct Cli {
    /// 0 picks a free port (printed).
    #[arg(long, default_value_t = 0)]
    port: u16,
    #[arg(long, value_enum)]
    mode: Mode,
    /// Tokio I/O threads (servercore's default: the number of cores).
    #[arg(long)]
    io_threads: Option<usize>,
    #[arg(long, default_value_t = 20_000)]
    max_sessions: usize,
    /// Broadcasts between two looks at the event queue.
    #[arg(long, default_value_t = 64)]
    poll_every: u32,
}

struct App {
    mode: Mode,
    sessions: usize,
    job: Option<(u32, u32)>,
    pool: &'static SendBufferPool,
}

impl Application for App {
    type Session = ();

    fn connected(&mut self, _handle: &Arc<SessionHandle>) {
        self.sessions += 1;
    }

    fn packets(&mut self, session: &mut Known<()>, packets: &PacketRun) {
        let handle = &session.handle;
        for (packet_id, payload) in packets {
            match packet_id {
                ID_ECHO if self.mode == Mode::Echo => {
                    coalesce::send(handle, self.pool.encode(ID_ECHO, payload).expect("echo fits"));
                }
                ID_CONTROL if payload.len() >= 8 => {
                    let packets = u32::from_le_bytes(payload[0..4].try_into().unwrap());
                    let size = u32::from_le_bytes(payload[4..8].try_into().unwrap());
                    self.job = Some((packets, size.max(4)));
                }
                ID_QUERY => {
                    let count = self.sessions as u32;
                    coalesce::send(handle, self.pool.encode(ID_QUERY, &count.to_le_bytes()).expect("fits"));
                }
                _ => {}
            }
        }
    }

    fn received(&mut self, session: &mut Known<()>, data: &Bytes) {
        if self.mode == Mode::RawEcho {
            coalesce::send(&session.handle, data.clone());
        }
    }

    fn disconnected(&mut self, _session: Known<()>, _reason: DisconnectReason) {
        self.sessions -= 1;
    }
}

fn main() {
    let cli = Cli::parse();
    servercore_loadgen::raise_nofile_limit();
    let mut config = ServiceConfig::default();
    if let Some(n) = cli.io_threads {
        config.io_threads = n;
    }
    config.max_sessions = cli.max_sessions;
    if cli.mode == Mode::RawEcho {
        config.session.framing = Framing::Raw;
    }
    let server = match Server::listen(config, SocketAddr::from(([127, 0, 0, 1], cli.port))) {
        Ok(server) => server,
        Err(e) => {
            eprintln!("floor: cannot listen on 127.0.0.1:{}: {e}", cli.port);
            std::process::exit(1);
        }
    };
    println!("listening {}", server.local_addr().port());
    let _ = std::io::stdout().flush();

    let pool = SendBufferPool::global();
    let mut app = App { mode: cli.mode, sessions: 0, job: None, pool };
    let mut inbox = server.service().shared().inbox::<()>();
    let mut events = Vec::new();
    let mut inner = Vec::new();
    let mut payload = Vec::new();
    let hello_payload = {
        let mut p = b"Hello World".to_vec();
        p.resize(1000, 0);
        p
    };
    let mut next_tick = Instant::now() + HELLO_PERIOD;
    loop {
        let wait = match cli.mode {
            Mode::Hello => next_tick.saturating_duration_since(Instant::now()),
            _ => Duration::from_millis(100),
        };
        server.service().wait_events(Some(wait), &mut events);
        // As the Python dispatcher does: answers leave in one write per session.
        let handled = events.len();
        let writes = WriteBatch::begin(handled);
        for event in events.drain(..) {
            inbox.deliver(event, &mut app);
        }
        writes.flush(handled);
        drop(writes);
        if let Some((packets, size)) = app.job.take() {
            payload.clear();
            payload.resize(size as usize, 0);
            for seq in 0..packets {
                payload[..4].copy_from_slice(&seq.to_le_bytes());
                let packet = pool.encode(ID_BROADCAST, &payload).expect("broadcast packet fits");
                server.service().broadcast(&packet, None);
                if cli.poll_every > 0 && seq % cli.poll_every == cli.poll_every - 1 {
                    server.service().wait_events(Some(Duration::ZERO), &mut inner);
                    for event in inner.drain(..) {
                        inbox.deliver(event, &mut app);
                    }
                }
            }
        }
        if cli.mode == Mode::Hello && Instant::now() >= next_tick {
            let packet = pool.encode(ID_BROADCAST, &hello_payload).expect("hello fits");
            server.service().broadcast(&packet, None);
            next_tick += HELLO_PERIOD;
            if next_tick < Instant::now() {
                next_tick = Instant::now() + HELLO_PERIOD;
            }
        }
    }
}
