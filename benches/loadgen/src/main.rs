//! The one load client of servercore's benchmarks: the same Rust client drives
//! every server (servercore, asyncio, uvloop, the Rust floor), so the client is
//! never what is measured.
//!
//! Protocol: `[size u16 LE][id u16 LE][payload]`, `size` counting the 4 header
//! bytes. Packet ids used here:
//!
//! - `1`      broadcast payload: `[seq u32 LE][...]` (B1), or the Hello World packet.
//! - `2`      echo: `[seq u32 LE][send time u64 LE ns][padding]`; the server returns it as is.
//! - `0xFFF0` control, client to server: `[packets u32 LE][size u32 LE]` = "broadcast now".
//! - `0xFFF1` query, client to server, empty; the server answers with the same id
//!   and `[sessions u32 LE]`, the sessions it has announced to the application.
//!   Every subcommand uses it after connecting, so that timing starts only when
//!   the server has taken in every connection.
//!
//! Every packet is checked; any mismatch is an error, counted in the JSON line,
//! and makes the exit status non-zero.
//!
//! `raw-echo` is the exception to the protocol: it speaks to a raw echo server
//! (bytes back as they came, no header), so it has no 0xFFF1 handshake.
//! Instead every connection first sends a probe message and waits for it to
//! come back whole; the clock starts once every connection's probe is back.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

const ID_BROADCAST: u16 = 1;
const ID_ECHO: u16 = 2;
const ID_CONTROL: u16 = 0xFFF0;
const ID_QUERY: u16 = 0xFFF1;
const HEADER: usize = 4;

#[derive(Parser)]
#[command(name = "loadgen", about = "Load client for servercore benchmarks (loopback only)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// B1: all clients receive `packets` broadcasts, each checked in order.
    Broadcast(BroadcastArgs),
    /// E1: each client keeps `inflight` echoes outstanding until `count` came back.
    Echo(EchoArgs),
    /// L1: echo with one packet in flight per client; reports RTT percentiles.
    Latency(LatencyArgs),
    /// M1 / Hello: open N connections, hold them, drain and check what arrives.
    Idle(IdleArgs),
    /// Send `count` tiny packets as fast as possible (the dispatch floor).
    Flood(FloodArgs),
    /// RAW / R1RAW: unframed echo; every byte checked in order against what was sent.
    RawEcho(RawEchoArgs),
    /// CLUSTER: N clients spread over worker processes; how fast they are all
    /// announced, then `packets` bus broadcasts each, checked in order, with
    /// publish-to-delivery latency.
    Cluster(ClusterArgs),
}

#[derive(Args)]
struct ClusterArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long, default_value_t = 4000)]
    clients: usize,
    #[arg(long, default_value_t = 200)]
    packets: u32,
    /// Payload bytes (at least 12: sequence u32 and publish time u64 ns, CLOCK_MONOTONIC).
    #[arg(long, default_value_t = 16)]
    size: u32,
    /// Microseconds between publishes (0: as fast as the publisher can).
    #[arg(long, default_value_t = 0)]
    interval_us: u32,
    #[arg(long, default_value = "CLUSTER")]
    label: String,
}

#[derive(Args, Clone)]
struct Common {
    /// Server address; only loopback addresses are accepted.
    #[arg(long, default_value = "127.0.0.1")]
    host: IpAddr,
    #[arg(long)]
    port: u16,
    /// Whole-run limit in seconds; past it the run fails with what it has.
    #[arg(long, default_value_t = 300.0)]
    timeout: f64,
    /// Connection attempts in flight at once.
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// Skip the 0xFFF1 "how many sessions" handshake after connecting
    /// (raw-echo has none: its probe message cannot be skipped).
    #[arg(long)]
    no_ready_check: bool,
}

#[derive(Args)]
struct BroadcastArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    #[arg(long, default_value_t = 5000)]
    packets: u32,
    /// Payload bytes per broadcast packet (at least 4: the sequence number).
    #[arg(long, default_value_t = 64)]
    size: u32,
    #[arg(long, default_value = "B1")]
    label: String,
}

#[derive(Args)]
struct EchoArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    #[arg(long, default_value_t = 32)]
    inflight: usize,
    #[arg(long, default_value_t = 2000)]
    count: u64,
    /// Payload bytes per echo packet (at least 12: sequence and send time).
    #[arg(long, default_value_t = 16)]
    size: usize,
    #[arg(long, default_value = "E1")]
    label: String,
}

#[derive(Args)]
struct LatencyArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long, default_value_t = 100)]
    clients: usize,
    #[arg(long, default_value_t = 2000)]
    count: u64,
    #[arg(long, default_value_t = 16)]
    size: usize,
    #[arg(long, default_value = "L1")]
    label: String,
}

#[derive(Args)]
struct IdleArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long, default_value_t = 10_000)]
    clients: usize,
    /// Seconds to hold the connections after all are up (or until stdin closes).
    #[arg(long, default_value_t = 5.0)]
    hold: f64,
    /// Ignore stdin: hold for `--hold` seconds even if stdin is closed.
    #[arg(long)]
    ignore_stdin: bool,
    /// If set, every id-1 packet must have this payload size and begin with
    /// "Hello World" (the lecture's case).
    #[arg(long)]
    expect_hello: Option<usize>,
    /// Sessions the server must report before "connected" is printed
    /// (default: --clients; more when other clients are already connected).
    #[arg(long)]
    expect_sessions: Option<usize>,
    /// Local (source) addresses, comma-separated, bound round-robin before each
    /// connect: one address has only the ephemeral port range (about 28k ports)
    /// toward one server port. Loopback only. Default: the kernel's choice,
    /// which is the target's own address.
    #[arg(long, value_delimiter = ',')]
    sources: Vec<IpAddr>,
    /// Packets per second every connection must receive (the Hello World's
    /// 4 Hz): over the measured window of `w` seconds each connection's count
    /// must lie in [floor(rate*w) - 1, ceil(rate*w) + 1]; each one outside is
    /// an error.
    #[arg(long)]
    expect_rate: Option<f64>,
}

#[derive(Args)]
struct FloodArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long, default_value_t = 1)]
    clients: usize,
    /// Packets in all, split over the clients.
    #[arg(long, default_value_t = 1_000_000)]
    count: u64,
    #[arg(long, default_value_t = 8)]
    size: usize,
    #[arg(long, default_value_t = 1)]
    id: u16,
    /// Seconds to keep the connections open after sending (or until stdin closes).
    #[arg(long, default_value_t = 60.0)]
    hold: f64,
}

#[derive(Args)]
struct RawEchoArgs {
    #[command(flatten)]
    common: Common,
    #[arg(long, default_value_t = 100)]
    clients: usize,
    /// Messages outstanding per client (inflight × size at most 256 KiB).
    #[arg(long, default_value_t = 4)]
    inflight: usize,
    /// Messages per client, after the probe.
    #[arg(long, default_value_t = 2000)]
    count: u64,
    /// Bytes per message.
    #[arg(long, default_value_t = 1000)]
    size: usize,
    #[arg(long, default_value = "RAW")]
    label: String,
}

fn main() {
    let cli = Cli::parse();
    servercore_loadgen::raise_nofile_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = runtime.block_on(async {
        match cli.command {
            Command::Broadcast(args) => broadcast(args).await,
            Command::Echo(args) => {
                let EchoArgs { common, clients, inflight, count, size, label } = args;
                echo(common, clients, inflight, count, size, label).await
            }
            Command::Latency(args) => {
                let LatencyArgs { common, clients, count, size, label } = args;
                echo(common, clients, 1, count, size, label).await
            }
            Command::Idle(args) => idle(args).await,
            Command::Flood(args) => flood(args).await,
            Command::RawEcho(args) => raw_echo(args).await,
            Command::Cluster(args) => {
                let label = args.label.clone();
                cluster(args).await.unwrap_or_else(|e| fail(&label, &e))
            }
        }
    });
    let _ = io::stdout().flush();
    // Exit without waiting for tasks still holding sockets.
    std::process::exit(code);
}

// ---------------------------------------------------------------- utilities

fn nofile_limit() -> u64 {
    // SAFETY: as above.
    unsafe {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 { limit.rlim_cur } else { 0 }
    }
}

fn address(common: &Common) -> Result<SocketAddr, String> {
    if !common.host.is_loopback() {
        return Err(format!("refusing {}: loadgen only sends to loopback addresses", common.host));
    }
    Ok(SocketAddr::new(common.host, common.port))
}

fn put_header(out: &mut Vec<u8>, id: u16, payload_len: usize) {
    let size = u16::try_from(HEADER + payload_len).expect("packet fits a u16 size");
    out.extend_from_slice(&size.to_le_bytes());
    out.extend_from_slice(&id.to_le_bytes());
}

fn fail(label: &str, message: &str) -> i32 {
    eprintln!("loadgen {label}: {message}");
    println!("{{\"workload\":{},\"errors\":1,\"error\":{}}}", json_str(label), json_str(message));
    1
}

fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A receive buffer that cuts whole packets, reused for the whole connection.
struct FrameBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl FrameBuf {
    fn new(capacity: usize) -> Self {
        Self { buf: vec![0; capacity.max(64)], start: 0, end: 0 }
    }

    /// Reads once into the free tail (compacting or growing first if needed).
    async fn fill<R: AsyncRead + Unpin>(&mut self, reader: &mut R) -> io::Result<usize> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.buf.len() - self.end < 1024 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            let len = self.buf.len();
            self.buf.resize(len * 2, 0);
        }
        let n = reader.read(&mut self.buf[self.end..]).await?;
        self.end += n;
        Ok(n)
    }

    /// The next whole packet, if one is buffered. A size below 4 is an error.
    fn next(&mut self) -> Result<Option<(u16, &[u8])>, String> {
        let avail = self.end - self.start;
        if avail < HEADER {
            return Ok(None);
        }
        let b = &self.buf[self.start..self.end];
        let size = usize::from(u16::from_le_bytes([b[0], b[1]]));
        let id = u16::from_le_bytes([b[2], b[3]]);
        if size < HEADER {
            return Err(format!("invalid header from server: size {size} < 4 (id {id})"));
        }
        if avail < size {
            if size > self.buf.len() {
                // Make room for the whole packet.
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
                self.buf.resize(size.next_power_of_two(), 0);
            }
            return Ok(None);
        }
        let from = self.start + HEADER;
        let to = self.start + size;
        self.start = to;
        Ok(Some((id, &self.buf[from..to])))
    }

    fn is_empty(&self) -> bool {
        self.start == self.end
    }
}

/// Connects `n` clients, `concurrency` attempts at a time, TCP_NODELAY on each.
async fn connect_all(addr: SocketAddr, n: usize, concurrency: usize) -> Result<Vec<TcpStream>, String> {
    let semaphore = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut attempts = JoinSet::new();
    for i in 0..n {
        let semaphore = semaphore.clone();
        attempts.spawn(async move {
            let _permit = semaphore.acquire_owned().await.expect("semaphore open");
            let stream = match tokio::time::timeout(Duration::from_secs(15), TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => return Err(format!("connection {i}: {e}")),
                Err(_) => return Err(format!("connection {i}: no connection within 15 s")),
            };
            stream.set_nodelay(true).map_err(|e| format!("connection {i}: set_nodelay: {e}"))?;
            Ok((i, stream))
        });
    }
    let mut streams: Vec<Option<TcpStream>> = (0..n).map(|_| None).collect();
    let mut first_error = None;
    let mut failed = 0usize;
    while let Some(joined) = attempts.join_next().await {
        match joined.map_err(|e| e.to_string()).and_then(|r| r) {
            Ok((i, stream)) => streams[i] = Some(stream),
            Err(e) => {
                failed += 1;
                first_error.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_error {
        return Err(format!(
            "{failed} of {n} connections failed (first: {e}; RLIMIT_NOFILE {})",
            nofile_limit()
        ));
    }
    Ok(streams.into_iter().map(|s| s.expect("every connection accounted for")).collect())
}

/// Asks the server (0xFFF1) until it reports at least `want` sessions. Packets
/// of other ids that arrive meanwhile are handed to `other`. Returns the count.
async fn await_sessions(
    stream: &mut TcpStream,
    frames: &mut FrameBuf,
    want: usize,
    timeout: Duration,
    other: &mut dyn FnMut(u16, &[u8]) -> Result<(), String>,
) -> Result<usize, String> {
    let deadline = Instant::now() + timeout;
    let mut query = Vec::new();
    put_header(&mut query, ID_QUERY, 0);
    let mut last = 0usize;
    loop {
        stream.write_all(&query).await.map_err(|e| format!("ready check: write: {e}"))?;
        let count = 'reply: loop {
            while let Some((id, payload)) = frames.next()? {
                if id == ID_QUERY {
                    if payload.len() != 4 {
                        return Err(format!("ready check: reply of {} bytes, expected 4", payload.len()));
                    }
                    break 'reply u32::from_le_bytes(payload.try_into().expect("4 bytes")) as usize;
                }
                other(id, payload)?;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, frames.fill(stream)).await {
                Ok(Ok(0)) => return Err("ready check: server closed the connection".into()),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(format!("ready check: read: {e}")),
                Err(_) => {
                    return Err(format!("ready check: server had {last} of {want} sessions at the timeout"));
                }
            }
        };
        last = count;
        if count >= want {
            return Ok(count);
        }
        if Instant::now() >= deadline {
            return Err(format!("ready check: server had {count} of {want} sessions at the timeout"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn percentile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let index = ((q * sorted.len() as f64).ceil() as usize).saturating_sub(1).min(sorted.len() - 1);
    sorted[index]
}

fn micros(ns: u64) -> f64 {
    (ns as f64 / 1000.0 * 10.0).round() / 10.0
}

/// `"rtt_us":{...}` for the report line, from round-trip times sorted in ns.
fn rtt_us_json(sorted: &[u64]) -> String {
    format!(
        "\"rtt_us\":{{\"p50\":{},\"p99\":{},\"p999\":{},\"max\":{}}}",
        micros(percentile(sorted, 0.50)),
        micros(percentile(sorted, 0.99)),
        micros(percentile(sorted, 0.999)),
        micros(sorted.last().copied().unwrap_or(0)),
    )
}

/// `"errors":N` (and the first one) for the report line; the first ten go to stderr.
fn errors_json(label: &str, errors: &[String]) -> String {
    for e in errors.iter().take(10) {
        eprintln!("loadgen {label}: {e}");
    }
    let first = errors.first().map(|e| format!(",\"first_error\":{}", json_str(e))).unwrap_or_default();
    format!("\"errors\":{}{first}", errors.len())
}

// ---------------------------------------------------------------- broadcast

async fn broadcast(args: BroadcastArgs) -> i32 {
    let label = args.label.clone();
    match broadcast_run(args).await {
        Ok(code) => code,
        Err(e) => fail(&label, &e),
    }
}

async fn broadcast_run(args: BroadcastArgs) -> Result<i32, String> {
    let addr = address(&args.common)?;
    if args.size < 4 {
        return Err("--size must be at least 4 (the u32 sequence number)".into());
    }
    if args.clients == 0 {
        return Err("--clients must be at least 1".into());
    }
    let timeout = Duration::from_secs_f64(args.common.timeout);
    let mut streams = connect_all(addr, args.clients, args.common.connect_concurrency).await?;
    let mut frames0 = FrameBuf::new(64 * 1024);
    if !args.common.no_ready_check {
        await_sessions(&mut streams[0], &mut frames0, args.clients, timeout, &mut |id, _| {
            Err(format!("unexpected packet id {id} before the broadcast started"))
        })
        .await?;
    }
    let progress: Arc<Vec<AtomicU32>> = Arc::new((0..args.clients).map(|_| AtomicU32::new(0)).collect());
    let mut tasks = JoinSet::new();
    let mut control_writer = None;
    for (i, stream) in streams.into_iter().enumerate() {
        let progress = progress.clone();
        let (packets, size) = (args.packets, args.size as usize);
        let frames = if i == 0 {
            std::mem::replace(&mut frames0, FrameBuf::new(64))
        } else {
            FrameBuf::new(64 * 1024)
        };
        if i == 0 {
            let (reader, writer) = stream.into_split();
            control_writer = Some(writer);
            tasks.spawn(
                async move { (i, receive_broadcasts(reader, frames, packets, size, &progress[i]).await) },
            );
        } else {
            tasks.spawn(async move {
                let mut stream = stream;
                (i, receive_broadcasts(&mut stream, frames, packets, size, &progress[i]).await)
            });
        }
    }
    let mut control = Vec::new();
    put_header(&mut control, ID_CONTROL, 8);
    control.extend_from_slice(&args.packets.to_le_bytes());
    control.extend_from_slice(&args.size.to_le_bytes());
    let started = Instant::now();
    control_writer
        .as_mut()
        .expect("client 0 exists")
        .write_all(&control)
        .await
        .map_err(|e| format!("sending the control packet: {e}"))?;

    let mut finished = Vec::with_capacity(args.clients);
    let mut errors = Vec::new();
    let deadline = started + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, tasks.join_next()).await {
            Ok(Some(Ok((_, Ok(done))))) => finished.push(done),
            Ok(Some(Ok((i, Err(e))))) => errors.push(format!("client {i}: {e}")),
            Ok(Some(Err(e))) => errors.push(format!("client task failed: {e}")),
            Ok(None) => break,
            Err(_) => {
                let got: Vec<u32> = progress.iter().map(|p| p.load(Ordering::Relaxed)).collect();
                let behind = got.iter().filter(|&&g| g < args.packets).count();
                errors.push(format!(
                    "timeout after {:.1} s: {behind} clients incomplete, fewest packets received {} of {}",
                    timeout.as_secs_f64(),
                    got.iter().min().copied().unwrap_or(0),
                    args.packets
                ));
                tasks.abort_all();
                break;
            }
        }
    }
    drop(control_writer);
    let seconds = finished.iter().max().map_or(0.0, |last| last.duration_since(started).as_secs_f64());
    let total = args.clients as u64 * u64::from(args.packets);
    let received: u64 = progress.iter().map(|p| u64::from(p.load(Ordering::Relaxed))).sum();
    let rate = if seconds > 0.0 && errors.is_empty() { total as f64 / seconds } else { 0.0 };
    println!(
        "{{\"workload\":{},\"clients\":{},\"packets_per_client\":{},\"size\":{},\"total_packets\":{},\"received_packets\":{},\"seconds\":{:.6},\"packets_per_sec\":{:.1},{}}}",
        json_str(&args.label),
        args.clients,
        args.packets,
        args.size,
        total,
        received,
        seconds,
        rate,
        errors_json(&args.label, &errors),
    );
    Ok(if errors.is_empty() { 0 } else { 1 })
}

/// One broadcast checked: id 1, payload `size` bytes, sequence number `expected`.
fn check_broadcast(id: u16, payload: &[u8], expected: u32, size: usize) -> Result<(), String> {
    if id != ID_BROADCAST {
        return Err(format!("packet id {id} where broadcast {expected} (id 1) was expected"));
    }
    if payload.len() != size {
        return Err(format!("broadcast {expected}: payload {} bytes, expected {size}", payload.len()));
    }
    let seq = u32::from_le_bytes(payload[..4].try_into().expect("4 bytes"));
    if seq != expected {
        return Err(format!("sequence {seq} where {expected} was expected (gap or reorder)"));
    }
    Ok(())
}

/// Reads one client's broadcasts until all `packets` arrived, each checked:
/// id 1, payload `size` bytes, sequence number the next expected.
async fn receive_broadcasts<R: AsyncRead + Unpin>(
    mut reader: R,
    mut frames: FrameBuf,
    packets: u32,
    size: usize,
    progress: &AtomicU32,
) -> Result<Instant, String> {
    let mut expected: u32 = 0;
    loop {
        while let Some((id, payload)) = frames.next()? {
            check_broadcast(id, payload, expected, size)?;
            expected += 1;
            if expected == packets {
                progress.store(expected, Ordering::Relaxed);
                if !frames.is_empty() {
                    return Err(format!("bytes after the last of {packets} broadcasts"));
                }
                return Ok(Instant::now());
            }
        }
        progress.store(expected, Ordering::Relaxed);
        if packets == 0 {
            return Ok(Instant::now());
        }
        match frames.fill(&mut reader).await {
            Ok(0) => {
                return Err(format!("server closed the connection after {expected} of {packets} broadcasts"));
            }
            Ok(_) => {}
            Err(e) => return Err(format!("read after {expected} of {packets} broadcasts: {e}")),
        }
    }
}

// ---------------------------------------------------------------- echo / latency

async fn echo(
    common: Common,
    clients: usize,
    inflight: usize,
    count: u64,
    size: usize,
    label: String,
) -> i32 {
    match echo_run(common, clients, inflight, count, size, &label).await {
        Ok(code) => code,
        Err(e) => fail(&label, &e),
    }
}

async fn echo_run(
    common: Common,
    clients: usize,
    inflight: usize,
    count: u64,
    size: usize,
    label: &str,
) -> Result<i32, String> {
    let addr = address(&common)?;
    if size < 12 {
        return Err("--size must be at least 12 (u32 sequence and u64 send time)".into());
    }
    if clients == 0 || inflight == 0 {
        return Err("--clients and --inflight must be at least 1".into());
    }
    let timeout = Duration::from_secs_f64(common.timeout);
    let mut streams = connect_all(addr, clients, common.connect_concurrency).await?;
    let mut frames0 = FrameBuf::new(16 * 1024);
    if !common.no_ready_check {
        await_sessions(&mut streams[0], &mut frames0, clients, timeout, &mut |id, _| {
            Err(format!("unexpected packet id {id} before the echo run started"))
        })
        .await?;
    }
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for (i, stream) in streams.into_iter().enumerate() {
        let frames = if i == 0 {
            std::mem::replace(&mut frames0, FrameBuf::new(64))
        } else {
            FrameBuf::new(16 * 1024)
        };
        tasks.spawn(async move { (i, echo_client(stream, frames, inflight, count, size, started).await) });
    }
    let (rtts, seconds, errors) = collect_rtts(tasks, started, timeout, clients * count as usize).await;
    let round_trips = rtts.len() as u64;
    let rate = if seconds > 0.0 && errors.is_empty() { round_trips as f64 / seconds } else { 0.0 };
    println!(
        "{{\"workload\":{},\"clients\":{},\"inflight\":{},\"count_per_client\":{},\"size\":{},\"round_trips\":{},\"seconds\":{:.6},\"round_trips_per_sec\":{:.1},{},{}}}",
        json_str(label),
        clients,
        inflight,
        count,
        size,
        round_trips,
        seconds,
        rate,
        rtt_us_json(&rtts),
        errors_json(label, &errors),
    );
    Ok(if errors.is_empty() { 0 } else { 1 })
}

/// What the echo clients return: each one's RTTs (ns) and when it finished.
type ClientResult = (usize, Result<(Vec<u64>, Instant), String>);

/// Waits for every client task (the whole run bounded by `timeout` from
/// `started`); returns the RTTs sorted, the seconds from `started` to the last
/// client's finish, and the errors.
async fn collect_rtts(
    mut tasks: JoinSet<ClientResult>,
    started: Instant,
    timeout: Duration,
    expected: usize,
) -> (Vec<u64>, f64, Vec<String>) {
    let mut rtts: Vec<u64> = Vec::with_capacity(expected);
    let mut last_done = started;
    let mut errors = Vec::new();
    let deadline = started + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, tasks.join_next()).await {
            Ok(Some(Ok((_, Ok((samples, done)))))) => {
                rtts.extend_from_slice(&samples);
                last_done = last_done.max(done);
            }
            Ok(Some(Ok((i, Err(e))))) => errors.push(format!("client {i}: {e}")),
            Ok(Some(Err(e))) => errors.push(format!("client task failed: {e}")),
            Ok(None) => break,
            Err(_) => {
                errors.push(format!(
                    "timeout after {:.1} s with {} clients unfinished",
                    timeout.as_secs_f64(),
                    tasks.len()
                ));
                tasks.abort_all();
                break;
            }
        }
    }
    rtts.sort_unstable();
    (rtts, last_done.duration_since(started).as_secs_f64(), errors)
}

/// Writes echo packet `seq` stamped `sent_ns` into `out`: `[seq][sent_ns][padding]`.
fn put_echo(out: &mut Vec<u8>, seq: u32, sent_ns: u64, size: usize) {
    put_header(out, ID_ECHO, size);
    out.extend_from_slice(&seq.to_le_bytes());
    out.extend_from_slice(&sent_ns.to_le_bytes());
    out.extend((12..size).map(|j| (seq as u8).wrapping_add(j as u8)));
}

/// One echo client: `inflight` outstanding, a new one per echo, until `count`
/// came back. Returns the RTTs (ns) and when it finished.
async fn echo_client(
    mut stream: TcpStream,
    mut frames: FrameBuf,
    inflight: usize,
    count: u64,
    size: usize,
    epoch: Instant,
) -> Result<(Vec<u64>, Instant), String> {
    let mut rtts = Vec::with_capacity(count as usize);
    let mut pending: VecDeque<u64> = VecDeque::with_capacity(inflight);
    let mut out = Vec::with_capacity(inflight * (HEADER + size));
    let mut expect = Vec::with_capacity(HEADER + size);
    let mut sent: u64 = 0;
    let mut received: u64 = 0;
    let first = (inflight as u64).min(count);
    let now = epoch.elapsed().as_nanos() as u64;
    for _ in 0..first {
        put_echo(&mut out, sent as u32, now, size);
        pending.push_back(now);
        sent += 1;
    }
    stream.write_all(&out).await.map_err(|e| format!("write: {e}"))?;
    out.clear();
    while received < count {
        match frames.fill(&mut stream).await {
            Ok(0) => return Err(format!("server closed the connection after {received} of {count} echoes")),
            Ok(_) => {}
            Err(e) => return Err(format!("read after {received} of {count} echoes: {e}")),
        }
        let arrived = epoch.elapsed().as_nanos() as u64;
        let mut replies = 0u64;
        while let Some((id, payload)) = frames.next()? {
            if id != ID_ECHO {
                return Err(format!("packet id {id} where echo {received} (id 2) was expected"));
            }
            let Some(sent_ns) = pending.pop_front() else {
                return Err(format!("an echo nobody sent (after {received})"));
            };
            expect.clear();
            put_echo(&mut expect, received as u32, sent_ns, size);
            if payload != &expect[HEADER..] {
                return Err(format!(
                    "echo {received} does not match what was sent ({} bytes back, {size} sent)",
                    payload.len()
                ));
            }
            rtts.push(arrived.saturating_sub(sent_ns));
            received += 1;
            replies += 1;
        }
        if replies > 0 && sent < count {
            let now = epoch.elapsed().as_nanos() as u64;
            let more = replies.min(count - sent);
            for _ in 0..more {
                put_echo(&mut out, sent as u32, now, size);
                pending.push_back(now);
                sent += 1;
            }
            stream.write_all(&out).await.map_err(|e| format!("write: {e}"))?;
            out.clear();
        }
    }
    Ok((rtts, Instant::now()))
}

// ---------------------------------------------------------------- idle

async fn idle(args: IdleArgs) -> i32 {
    match idle_run(args).await {
        Ok(code) => code,
        Err(e) => fail("idle", &e),
    }
}

#[derive(Default)]
struct IdleCounters {
    packets: AtomicU64,
    bytes: AtomicU64,
    closed: AtomicU64,
    bad: AtomicU64,
}

/// What the idle readers share: the totals, each connection's packet count,
/// and the widest gap between two reads that brought packets, counted only
/// for gaps that began inside the measured window.
struct IdleShared {
    counters: IdleCounters,
    per_conn: Box<[AtomicU32]>,
    epoch: Instant,
    /// ns since `epoch` when the measured window began.
    window_start_ns: AtomicU64,
    max_gap_ns: AtomicU64,
    /// Those gaps in GAP_BUCKET_MS buckets (the last one: everything longer).
    gap_hist: Box<[AtomicU64]>,
    expect_hello: Option<usize>,
}

const GAP_BUCKET_MS: u64 = 5;
const GAP_BUCKETS: usize = 401;

impl IdleShared {
    fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    fn gap(&self, ns: u64) {
        self.max_gap_ns.fetch_max(ns, Ordering::Relaxed);
        let bucket = ((ns / 1_000_000 / GAP_BUCKET_MS) as usize).min(GAP_BUCKETS - 1);
        self.gap_hist[bucket].fetch_add(1, Ordering::Relaxed);
    }

    /// The gap (ms, a bucket's upper end) below which a fraction `q` of the gaps fall.
    fn gap_percentile(&self, hist: &[u64], q: f64) -> u64 {
        let total: u64 = hist.iter().sum();
        if total == 0 {
            return 0;
        }
        let want = ((q * total as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, &n) in hist.iter().enumerate() {
            seen += n;
            if seen >= want {
                return (i as u64 + 1) * GAP_BUCKET_MS;
            }
        }
        GAP_BUCKETS as u64 * GAP_BUCKET_MS
    }

    fn snapshot(&self) -> Vec<u32> {
        self.per_conn.iter().map(|c| c.load(Ordering::Relaxed)).collect()
    }

    /// Counts and checks one packet of connection `i` (its count is added by the caller).
    fn packet(&self, id: u16, payload: &[u8]) -> Result<(), String> {
        self.counters.packets.fetch_add(1, Ordering::Relaxed);
        self.counters.bytes.fetch_add((payload.len() + HEADER) as u64, Ordering::Relaxed);
        check_idle_packet(id, payload, self.expect_hello)
    }
}

fn check_idle_packet(id: u16, payload: &[u8], expect_hello: Option<usize>) -> Result<(), String> {
    match expect_hello {
        Some(size) if id == ID_BROADCAST => {
            if payload.len() != size || !payload.starts_with(b"Hello World") {
                return Err(format!("a Hello World packet of {} bytes, expected {size}", payload.len()));
            }
            Ok(())
        }
        Some(_) => Err(format!("unexpected packet id {id}")),
        None => Ok(()),
    }
}

/// One connection, bound first to `source` if given (port chosen at connect
/// time: IP_BIND_ADDRESS_NO_PORT), TCP_NODELAY on.
async fn open_from(addr: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpStream> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    if let Some(source) = source {
        if source.is_ipv4() {
            use std::os::fd::AsRawFd;
            let on: libc::c_int = 1;
            // SAFETY: setsockopt on a socket we own, with a valid int option.
            // Best effort: without it the port is chosen at bind, from the same range.
            unsafe {
                libc::setsockopt(
                    socket.as_raw_fd(),
                    libc::IPPROTO_IP,
                    libc::IP_BIND_ADDRESS_NO_PORT,
                    (&on as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
        socket.bind(SocketAddr::new(source, 0))?;
    }
    let stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

async fn open_within(addr: SocketAddr, source: Option<IpAddr>, i: usize) -> Result<TcpStream, String> {
    let from = source.map(|s| format!(" from {s}")).unwrap_or_default();
    match tokio::time::timeout(Duration::from_secs(15), open_from(addr, source)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(e)) => Err(format!("connection {i}{from}: {e}")),
        Err(_) => Err(format!("connection {i}{from}: no connection within 15 s")),
    }
}

/// Reads connection `i` until it fails: counts every packet (in all and for
/// this connection), checks it, and keeps the widest gap between reads that
/// brought whole packets. On an error it reports and keeps the socket open.
async fn idle_reader(
    i: usize,
    mut stream: TcpStream,
    mut frames: FrameBuf,
    shared: Arc<IdleShared>,
    error_tx: tokio::sync::mpsc::UnboundedSender<String>,
) {
    let mut last_ns: Option<u64> = None;
    let result: Result<(), String> = async {
        loop {
            let mut got = 0u32;
            let checked: Result<(), String> = (|| {
                while let Some((id, payload)) = frames.next()? {
                    got += 1;
                    shared.packet(id, payload)?;
                }
                Ok(())
            })();
            if got > 0 {
                shared.per_conn[i].fetch_add(got, Ordering::Relaxed);
                let now = shared.now_ns();
                if let Some(last) = last_ns {
                    if last >= shared.window_start_ns.load(Ordering::Relaxed) {
                        shared.gap(now - last);
                    }
                }
                last_ns = Some(now);
            }
            if let Err(e) = checked {
                shared.counters.bad.fetch_add(1, Ordering::Relaxed);
                return Err(format!("connection {i}: {e}"));
            }
            match frames.fill(&mut stream).await {
                Ok(0) => {
                    shared.counters.closed.fetch_add(1, Ordering::Relaxed);
                    return Err(format!("connection {i}: closed by the server"));
                }
                Ok(_) => {}
                Err(e) => {
                    shared.counters.closed.fetch_add(1, Ordering::Relaxed);
                    return Err(format!("connection {i}: {e}"));
                }
            }
        }
    }
    .await;
    if let Err(e) = result {
        let _ = error_tx.send(e);
    }
    // Keep the socket open until the process exits.
    std::future::pending::<()>().await;
}

/// `idle`: connects `--clients` connections (each read from the moment it is
/// up, so nothing piles up while the rest connect), holds them, and checks
/// what arrives. Prints a "connected" line once the server reports every
/// session, then, when the hold ends (`--hold` or stdin closed), a summary.
/// A line "mark" on stdin (re)starts the measured window: each connection's
/// packets in it (min / max over the connections) and the widest gap between
/// two reads; with `--expect-rate` every connection's count must be in the band.
async fn idle_run(args: IdleArgs) -> Result<i32, String> {
    let addr = address(&args.common)?;
    for source in &args.sources {
        if !source.is_loopback() {
            return Err(format!("refusing source {source}: loadgen only uses loopback addresses"));
        }
        if source.is_ipv4() != addr.is_ipv4() {
            return Err(format!("source {source} is not of the target's address family ({})", addr.ip()));
        }
    }
    if args.clients == 0 {
        return Err("--clients must be at least 1".into());
    }
    let nofile = servercore_loadgen::raise_nofile_to(args.clients as u64 + 64);
    if nofile < args.clients as u64 + 16 {
        return Err(format!(
            "RLIMIT_NOFILE is {nofile} and could not be raised: {} connections need about {}",
            args.clients,
            args.clients + 16
        ));
    }
    let source_of = |i: usize| (!args.sources.is_empty()).then(|| args.sources[i % args.sources.len()]);
    let timeout = Duration::from_secs_f64(args.common.timeout);
    let shared = Arc::new(IdleShared {
        counters: IdleCounters::default(),
        per_conn: (0..args.clients).map(|_| AtomicU32::new(0)).collect(),
        epoch: Instant::now(),
        window_start_ns: AtomicU64::new(u64::MAX),
        max_gap_ns: AtomicU64::new(0),
        gap_hist: (0..GAP_BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        expect_hello: args.expect_hello,
    });
    let (error_tx, mut error_rx) = tokio::sync::mpsc::unbounded_channel::<String>();

    let connecting = Instant::now();
    // Connection 0 first: it asks the server for its session count, then reads like the rest.
    let mut stream0 = open_within(addr, source_of(0), 0).await?;
    let semaphore = Arc::new(Semaphore::new(args.common.connect_concurrency.max(1)));
    let (conn_tx, mut conn_rx) = tokio::sync::mpsc::unbounded_channel::<Result<(), String>>();
    for i in 1..args.clients {
        let semaphore = semaphore.clone();
        let (shared, error_tx, conn_tx) = (shared.clone(), error_tx.clone(), conn_tx.clone());
        let source = source_of(i);
        tokio::spawn(async move {
            let permit = semaphore.acquire_owned().await.expect("semaphore open");
            let opened = open_within(addr, source, i).await;
            drop(permit);
            match opened {
                Ok(stream) => {
                    let _ = conn_tx.send(Ok(()));
                    drop(conn_tx);
                    idle_reader(i, stream, FrameBuf::new(2048), shared, error_tx).await;
                }
                Err(e) => {
                    let _ = conn_tx.send(Err(e));
                }
            }
        });
    }
    drop(conn_tx);
    let (mut connected, mut failed, mut first_failure) = (1usize, 0usize, None);
    while let Some(outcome) = conn_rx.recv().await {
        match outcome {
            Ok(()) => connected += 1,
            Err(e) => {
                failed += 1;
                first_failure.get_or_insert(e);
            }
        }
    }
    let connect_seconds = connecting.elapsed().as_secs_f64();
    if let Some(e) = first_failure {
        return Err(format!(
            "{failed} of {} connections failed, {connected} connected in {connect_seconds:.1} s (first: {e}; RLIMIT_NOFILE {})",
            args.clients,
            nofile_limit()
        ));
    }

    let mut frames0 = FrameBuf::new(4096);
    let mut server_sessions = None;
    if !args.common.no_ready_check {
        let want = args.expect_sessions.unwrap_or(args.clients);
        let s = shared.clone();
        let n = await_sessions(&mut stream0, &mut frames0, want, timeout, &mut |id, payload| {
            s.per_conn[0].fetch_add(1, Ordering::Relaxed);
            s.packet(id, payload)
        })
        .await?;
        server_sessions = Some(n);
    }
    let ready_seconds = connecting.elapsed().as_secs_f64();
    tokio::spawn(idle_reader(0, stream0, frames0, shared.clone(), error_tx.clone()));
    drop(error_tx);
    let sources = if args.sources.is_empty() { vec![addr.ip()] } else { args.sources.clone() };
    let sources_json = sources.iter().map(|s| json_str(&s.to_string())).collect::<Vec<_>>().join(",");
    println!(
        "{{\"connected\":{},\"server_sessions\":{},\"connect_seconds\":{:.3},\"ready_seconds\":{:.3},\"sources\":[{}],\"nofile\":{}}}",
        connected,
        server_sessions.map_or("null".to_string(), |n| n.to_string()),
        connect_seconds,
        ready_seconds,
        sources_json,
        nofile
    );
    let _ = io::stdout().flush();

    // stdin: a line "mark" (re)starts the window; EOF ends the hold.
    let (mark_tx, mut mark_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let _keep_marks_open = if args.ignore_stdin {
        Some(mark_tx)
    } else {
        tokio::task::spawn_blocking(move || {
            use std::io::BufRead;
            for line in io::stdin().lock().lines() {
                match line {
                    Ok(line) if line.trim() == "mark" => {
                        let _ = mark_tx.send(());
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        });
        None
    };

    let held = Instant::now();
    let mut window_start = held;
    shared.window_start_ns.store(shared.now_ns(), Ordering::Relaxed);
    let mut base = shared.snapshot();
    let mut base_packets = shared.counters.packets.load(Ordering::Relaxed);
    let hold = tokio::time::sleep(Duration::from_secs_f64(args.hold));
    tokio::pin!(hold);
    let mut first_error: Option<String> = None;
    loop {
        tokio::select! {
            () = &mut hold => break,
            mark = mark_rx.recv() => match mark {
                Some(()) => {
                    window_start = Instant::now();
                    shared.window_start_ns.store(shared.now_ns(), Ordering::Relaxed);
                    shared.max_gap_ns.store(0, Ordering::Relaxed);
                    for b in shared.gap_hist.iter() {
                        b.store(0, Ordering::Relaxed);
                    }
                    base = shared.snapshot();
                    base_packets = shared.counters.packets.load(Ordering::Relaxed);
                    println!("{{\"marked\":true,\"held_seconds\":{:.3}}}", held.elapsed().as_secs_f64());
                    let _ = io::stdout().flush();
                }
                None => break,
            },
            Some(e) = error_rx.recv() => { first_error.get_or_insert(e); }
        }
    }
    let end = shared.snapshot();
    let window_packets = shared.counters.packets.load(Ordering::Relaxed) - base_packets;
    let window_seconds = window_start.elapsed().as_secs_f64();
    let held_seconds = held.elapsed().as_secs_f64();
    while let Ok(e) = error_rx.try_recv() {
        first_error.get_or_insert(e);
    }
    let counts: Vec<u32> = end.iter().zip(&base).map(|(e, b)| e.wrapping_sub(*b)).collect();
    let min = counts.iter().copied().min().unwrap_or(0);
    let max = counts.iter().copied().max().unwrap_or(0);
    let hist: Vec<u64> = shared.gap_hist.iter().map(|b| b.load(Ordering::Relaxed)).collect();
    // Percentiles are bucket upper ends (5 ms buckets), never above the exact max.
    let max_gap_ms = shared.max_gap_ns.load(Ordering::Relaxed) as f64 / 1e6;
    let pct = |q: f64| (shared.gap_percentile(&hist, q) as f64).min(max_gap_ms.ceil());
    let gaps_json = format!(
        ",\"gaps\":{},\"gap_ms\":{{\"p50\":{},\"p99\":{},\"p999\":{},\"max\":{:.1}}}",
        hist.iter().sum::<u64>(),
        pct(0.50),
        pct(0.99),
        pct(0.999),
        max_gap_ms
    );
    let mut rate_json = String::new();
    let mut outside = 0u64;
    if let Some(rate) = args.expect_rate {
        let lo = ((rate * window_seconds).floor() as i64 - 1).max(0) as u32;
        let hi = (rate * window_seconds).ceil() as u32 + 1;
        let mut first_outside = None;
        for (i, &c) in counts.iter().enumerate() {
            if c < lo || c > hi {
                outside += 1;
                first_outside.get_or_insert((i, c));
            }
        }
        // A gap over 1.5 periods: a packet at least half a period late (or a tick missed).
        let late_ms = (1500.0 / rate) as u64;
        let late: u64 = hist
            .iter()
            .enumerate()
            .filter(|(i, _)| *i as u64 * GAP_BUCKET_MS >= late_ms)
            .map(|(_, n)| n)
            .sum();
        rate_json = format!(
            ",\"expect_rate\":{rate},\"per_conn_band\":[{lo},{hi}],\"per_conn_outside\":{outside},\"gaps_over_{late_ms}ms\":{late}"
        );
        if let Some((i, c)) = first_outside {
            rate_json.push_str(&format!(",\"first_outside\":\"connection {i}: {c} packets\""));
            first_error.get_or_insert(format!(
                "connection {i}: {c} packets in {window_seconds:.3} s, outside [{lo}, {hi}]"
            ));
        }
    }
    let closed = shared.counters.closed.load(Ordering::Relaxed);
    let bad = shared.counters.bad.load(Ordering::Relaxed);
    let errors = closed + bad + outside;
    if let Some(e) = &first_error {
        eprintln!("loadgen idle: {e}");
    }
    let first = first_error.map(|e| format!(",\"first_error\":{}", json_str(&e))).unwrap_or_default();
    println!(
        "{{\"workload\":\"idle\",\"clients\":{},\"held_seconds\":{:.3},\"received_packets\":{},\"received_bytes\":{},\"closed_by_server\":{},\"window_seconds\":{:.3},\"window_packets\":{},\"per_conn_min\":{},\"per_conn_max\":{},\"max_gap_ms\":{:.1}{}{},\"errors\":{}{}}}",
        args.clients,
        held_seconds,
        shared.counters.packets.load(Ordering::Relaxed),
        shared.counters.bytes.load(Ordering::Relaxed),
        closed,
        window_seconds,
        window_packets,
        min,
        max,
        shared.max_gap_ns.load(Ordering::Relaxed) as f64 / 1e6,
        gaps_json,
        rate_json,
        errors,
        first
    );
    Ok(if errors == 0 { 0 } else { 1 })
}

// ---------------------------------------------------------------- flood

async fn flood(args: FloodArgs) -> i32 {
    match flood_run(args).await {
        Ok(code) => code,
        Err(e) => fail("flood", &e),
    }
}

async fn flood_run(args: FloodArgs) -> Result<i32, String> {
    let addr = address(&args.common)?;
    if args.clients == 0 {
        return Err("--clients must be at least 1".into());
    }
    let streams = connect_all(addr, args.clients, args.common.connect_concurrency).await?;
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    let per = args.count / args.clients as u64;
    let extra = args.count % args.clients as u64;
    for (i, stream) in streams.into_iter().enumerate() {
        let n = per + u64::from((i as u64) < extra);
        let (size, id) = (args.size, args.id);
        tasks.spawn(async move {
            let mut stream = stream;
            let mut chunk = Vec::new();
            let per_chunk = (256 * 1024 / (HEADER + size)).max(1) as u64;
            for _ in 0..per_chunk.min(n) {
                put_header(&mut chunk, id, size);
                chunk.extend(std::iter::repeat_n(0x5a, size));
            }
            let mut left = n;
            while left > 0 {
                let k = left.min(per_chunk);
                let bytes = &chunk[..k as usize * (HEADER + size)];
                stream.write_all(bytes).await.map_err(|e| format!("connection {i}: write: {e}"))?;
                left -= k;
            }
            Ok::<TcpStream, String>(stream)
        });
    }
    let timeout = Duration::from_secs_f64(args.common.timeout);
    let mut kept = Vec::new();
    let mut errors = Vec::new();
    let deadline = started + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, tasks.join_next()).await {
            Ok(Some(Ok(Ok(stream)))) => kept.push(stream),
            Ok(Some(Ok(Err(e)))) => errors.push(e),
            Ok(Some(Err(e))) => errors.push(e.to_string()),
            Ok(None) => break,
            Err(_) => {
                errors.push("timeout while sending".into());
                tasks.abort_all();
                break;
            }
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    let first = errors.first().map(|e| format!(",\"first_error\":{}", json_str(e))).unwrap_or_default();
    println!(
        "{{\"workload\":\"flood\",\"clients\":{},\"packets\":{},\"size\":{},\"send_seconds\":{:.6},\"errors\":{}{}}}",
        args.clients,
        args.count,
        args.size,
        seconds,
        errors.len(),
        first
    );
    let _ = io::stdout().flush();
    if errors.is_empty() {
        // Hold the connections (so the server sees no disconnects) until told.
        let hold = tokio::time::sleep(Duration::from_secs_f64(args.hold));
        let stdin_closed = tokio::task::spawn_blocking(|| {
            let mut sink = [0u8; 256];
            let mut stdin = io::stdin();
            while let Ok(n) = io::Read::read(&mut stdin, &mut sink) {
                if n == 0 {
                    break;
                }
            }
        });
        tokio::select! {
            () = hold => {}
            _ = stdin_closed => {}
        }
    }
    drop(kept);
    Ok(if errors.is_empty() { 0 } else { 1 })
}

// ---------------------------------------------------------------- raw echo

/// Raw echo checks bytes, not packets: no in-band sequence numbers and no
/// timestamps on the wire. Message `msg` of client `client` is `size` bytes of
/// a splitmix64 stream seeded by the pair, so every byte is a fixed function
/// of (client, message, offset): a lost, duplicated, reordered or altered byte,
/// or one from another connection, is a mismatch at a known place. Message 0
/// is each connection's probe; the measured ones are 1..=count.
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Appends message `msg` of `client` (`size` bytes) to `out`.
fn put_raw_message(out: &mut Vec<u8>, client: u64, msg: u64, size: usize) {
    let seed = splitmix64(client ^ splitmix64(msg ^ 0x5241_5745_4348_4F00));
    let start = out.len();
    out.reserve(size.div_ceil(8) * 8);
    for w in 0..size.div_ceil(8) as u64 {
        out.extend_from_slice(&splitmix64(seed.wrapping_add(w)).to_le_bytes());
    }
    out.truncate(start + size);
}

/// Compares `got` with `want`; on a difference, says where.
fn check_raw(got: &[u8], want: &[u8], client: usize, msg: u64, offset: usize) -> Result<(), String> {
    if got == want {
        return Ok(());
    }
    let i = got.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
    Err(format!(
        "client {client}, message {msg}, byte {}: got {:#04x}, sent {:#04x}",
        offset + i,
        got[i],
        want[i]
    ))
}

async fn raw_echo(args: RawEchoArgs) -> i32 {
    let label = args.label.clone();
    match raw_echo_run(args).await {
        Ok(code) => code,
        Err(e) => fail(&label, &e),
    }
}

/// Sends the probe (message 0) and reads until all of it is back.
async fn raw_probe(mut stream: TcpStream, client: usize, size: usize) -> Result<TcpStream, String> {
    let mut probe = Vec::with_capacity(size);
    put_raw_message(&mut probe, client as u64, 0, size);
    stream.write_all(&probe).await.map_err(|e| format!("client {client}: probe: write: {e}"))?;
    let mut buf = vec![0u8; size.max(64)];
    let mut got = 0;
    while got < size {
        let n = stream
            .read(&mut buf[..size - got])
            .await
            .map_err(|e| format!("client {client}: probe: read: {e}"))?;
        if n == 0 {
            return Err(format!(
                "client {client}: server closed the connection after {got} of {size} probe bytes"
            ));
        }
        check_raw(&buf[..n], &probe[got..got + n], client, 0, got)?;
        got += n;
    }
    Ok(stream)
}

async fn raw_echo_run(args: RawEchoArgs) -> Result<i32, String> {
    let RawEchoArgs { common, clients, inflight, count, size, label } = args;
    let addr = address(&common)?;
    if clients == 0 || inflight == 0 || size == 0 || count == 0 {
        return Err("--clients, --inflight, --count and --size must be at least 1".into());
    }
    if inflight * size > 256 * 1024 {
        // One task reads and writes each connection: more than the socket
        // buffers hold in flight could deadlock with a server that stops
        // reading while it cannot write (asyncio's flow control).
        return Err("--inflight × --size must be at most 256 KiB".into());
    }
    let timeout = Duration::from_secs_f64(common.timeout);
    let connecting = Instant::now();
    let streams = connect_all(addr, clients, common.connect_concurrency).await?;
    // The probes: the clock starts only once the server serves every connection.
    let mut probes = JoinSet::new();
    for (i, stream) in streams.into_iter().enumerate() {
        probes.spawn(async move { (i, raw_probe(stream, i, size).await) });
    }
    let mut ready: Vec<Option<TcpStream>> = (0..clients).map(|_| None).collect();
    let probe_deadline = Instant::now() + timeout;
    while !probes.is_empty() {
        let left = probe_deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, probes.join_next()).await {
            Ok(Some(Ok((i, Ok(stream))))) => ready[i] = Some(stream),
            Ok(Some(Ok((_, Err(e))))) => return Err(e),
            Ok(Some(Err(e))) => return Err(format!("probe task failed: {e}")),
            Ok(None) => break,
            Err(_) => {
                let back = ready.iter().filter(|s| s.is_some()).count();
                return Err(format!(
                    "only {back} of {clients} probes came back within {:.1} s",
                    timeout.as_secs_f64()
                ));
            }
        }
    }
    let ready_seconds = connecting.elapsed().as_secs_f64();

    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for (i, stream) in ready.into_iter().enumerate() {
        let stream = stream.expect("every probe accounted for");
        tasks.spawn(async move { (i, raw_echo_client(stream, i, inflight, count, size, started).await) });
    }
    let (rtts, seconds, errors) = collect_rtts(tasks, started, timeout, clients * count as usize).await;
    let messages = rtts.len() as u64;
    let ok = seconds > 0.0 && errors.is_empty();
    let rate = if ok { messages as f64 / seconds } else { 0.0 };
    println!(
        "{{\"workload\":{},\"clients\":{},\"inflight\":{},\"count_per_client\":{},\"size\":{},\"messages\":{},\"bytes\":{},\"ready_seconds\":{:.6},\"seconds\":{:.6},\"messages_per_sec\":{:.1},\"mbytes_per_sec\":{:.2},{},{}}}",
        json_str(&label),
        clients,
        inflight,
        count,
        size,
        messages,
        messages * size as u64,
        ready_seconds,
        seconds,
        rate,
        if ok { (messages * size as u64) as f64 / seconds / 1e6 } else { 0.0 },
        rtt_us_json(&rtts),
        errors_json(&label, &errors),
    );
    Ok(if errors.is_empty() { 0 } else { 1 })
}

/// One raw echo client: `inflight` messages outstanding, a new one for each
/// that came back whole, until `count` came back. The echoed stream is read in
/// whatever pieces it arrives and checked byte for byte against the messages
/// in the order they were sent. A message's RTT runs from the write that sent
/// it to the read that brought its last byte. Returns the RTTs (ns) and when
/// the client finished.
async fn raw_echo_client(
    mut stream: TcpStream,
    client: usize,
    inflight: usize,
    count: u64,
    size: usize,
    epoch: Instant,
) -> Result<(Vec<u64>, Instant), String> {
    let id = client as u64;
    let mut rtts = Vec::with_capacity(count as usize);
    let mut pending: VecDeque<u64> = VecDeque::with_capacity(inflight);
    let mut out = Vec::with_capacity(inflight * size);
    // The message being received (number `received + 1`) and how much of it is back.
    let mut expect = Vec::with_capacity(size);
    let mut matched = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    let mut sent: u64 = 0;
    let mut received: u64 = 0;
    let first = (inflight as u64).min(count);
    for _ in 0..first {
        sent += 1;
        put_raw_message(&mut out, id, sent, size);
    }
    let now = epoch.elapsed().as_nanos() as u64;
    pending.extend(std::iter::repeat_n(now, first as usize));
    stream.write_all(&out).await.map_err(|e| format!("write: {e}"))?;
    out.clear();
    put_raw_message(&mut expect, id, 1, size);
    while received < count {
        let n = match stream.read(&mut buf).await {
            Ok(0) => {
                return Err(format!("server closed the connection after {received} of {count} messages"));
            }
            Ok(n) => n,
            Err(e) => return Err(format!("read after {received} of {count} messages: {e}")),
        };
        let arrived = epoch.elapsed().as_nanos() as u64;
        let mut data = &buf[..n];
        let mut completed = 0u64;
        while !data.is_empty() {
            if received == count {
                return Err(format!("{} bytes after the last of {count} messages", data.len()));
            }
            if pending.is_empty() {
                return Err(format!("bytes of message {} back before it was sent", received + 1));
            }
            let take = (size - matched).min(data.len());
            check_raw(&data[..take], &expect[matched..matched + take], client, received + 1, matched)?;
            matched += take;
            data = &data[take..];
            if matched == size {
                let sent_ns = pending.pop_front().expect("checked above");
                rtts.push(arrived.saturating_sub(sent_ns));
                received += 1;
                completed += 1;
                matched = 0;
                if received < count {
                    expect.clear();
                    put_raw_message(&mut expect, id, received + 1, size);
                }
            }
        }
        if completed > 0 && sent < count {
            let more = completed.min(count - sent);
            for _ in 0..more {
                sent += 1;
                put_raw_message(&mut out, id, sent, size);
            }
            let now = epoch.elapsed().as_nanos() as u64;
            pending.extend(std::iter::repeat_n(now, more as usize));
            stream.write_all(&out).await.map_err(|e| format!("write: {e}"))?;
            out.clear();
        }
    }
    Ok((rtts, Instant::now()))
}

// ---------------------------------------------------------------- cluster

fn monotonic_ns() -> u64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec to write into.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// Asks once (0xFFF1) and waits for the answer: the session this connection
/// made has been announced by whichever worker took it.
async fn announced(stream: &mut TcpStream, frames: &mut FrameBuf, timeout: Duration) -> Result<(), String> {
    let mut query = Vec::new();
    put_header(&mut query, ID_QUERY, 0);
    stream.write_all(&query).await.map_err(|e| format!("ready check: write: {e}"))?;
    let deadline = Instant::now() + timeout;
    loop {
        while let Some((id, _)) = frames.next()? {
            if id == ID_QUERY {
                return Ok(());
            }
            return Err(format!("packet id {id} before the ready check's answer"));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, frames.fill(stream)).await {
            Ok(Ok(0)) => return Err("ready check: server closed the connection".into()),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(format!("ready check: read: {e}")),
            Err(_) => return Err("ready check: no answer".into()),
        }
    }
}

async fn cluster(args: ClusterArgs) -> Result<i32, String> {
    let addr = address(&args.common)?;
    if args.size < 12 {
        return Err("--size must be at least 12 (sequence u32, publish time u64)".into());
    }
    let timeout = Duration::from_secs_f64(args.common.timeout);
    let started = Instant::now();
    let streams = connect_all(addr, args.clients, args.common.connect_concurrency).await?;
    let mut ready = JoinSet::new();
    for (i, mut stream) in streams.into_iter().enumerate() {
        ready.spawn(async move {
            let mut frames = FrameBuf::new(16 * 1024);
            announced(&mut stream, &mut frames, timeout).await.map(|()| (i, stream, frames))
        });
    }
    let mut clients: Vec<Option<(TcpStream, FrameBuf)>> = (0..args.clients).map(|_| None).collect();
    while let Some(joined) = ready.join_next().await {
        let (i, stream, frames) = joined.map_err(|e| e.to_string())??;
        clients[i] = Some((stream, frames));
    }
    let accept_seconds = started.elapsed().as_secs_f64();
    let progress: Arc<Vec<AtomicU32>> = Arc::new((0..args.clients).map(|_| AtomicU32::new(0)).collect());
    let mut tasks = JoinSet::new();
    let mut control_writer = None;
    for (i, client) in clients.into_iter().enumerate() {
        let (stream, frames) = client.expect("every client answered");
        let progress = progress.clone();
        let (packets, size) = (args.packets, args.size as usize);
        if i == 0 {
            let (reader, writer) = stream.into_split();
            control_writer = Some(writer);
            tasks.spawn(async move { (i, receive_timed(reader, frames, packets, size, &progress[i]).await) });
        } else {
            tasks.spawn(async move { (i, receive_timed(stream, frames, packets, size, &progress[i]).await) });
        }
    }
    let mut control = Vec::new();
    put_header(&mut control, ID_CONTROL, 12);
    control.extend_from_slice(&args.packets.to_le_bytes());
    control.extend_from_slice(&args.size.to_le_bytes());
    control.extend_from_slice(&args.interval_us.to_le_bytes());
    let broadcast_started = Instant::now();
    let mut writer = control_writer.expect("client 0 exists");
    writer.write_all(&control).await.map_err(|e| format!("sending the control packet: {e}"))?;
    let mut latencies = Vec::with_capacity(args.clients * args.packets as usize);
    let mut last = broadcast_started;
    let mut errors = Vec::new();
    let deadline = broadcast_started + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, tasks.join_next()).await {
            Ok(Some(Ok((_, Ok((done, samples)))))) => {
                last = last.max(done);
                latencies.extend(samples);
            }
            Ok(Some(Ok((i, Err(e))))) => errors.push(format!("client {i}: {e}")),
            Ok(Some(Err(e))) => errors.push(format!("client task failed: {e}")),
            Ok(None) => break,
            Err(_) => {
                let fewest = progress.iter().map(|p| p.load(Ordering::Relaxed)).min().unwrap_or(0);
                errors.push(format!("timeout: fewest packets received {fewest} of {}", args.packets));
                tasks.abort_all();
                break;
            }
        }
    }
    drop(writer);
    latencies.sort_unstable();
    let seconds = last.duration_since(broadcast_started).as_secs_f64();
    let total = args.clients as u64 * u64::from(args.packets);
    let us = |ns: u64| ns as f64 / 1000.0;
    println!(
        "{{\"workload\":{},\"clients\":{},\"packets_per_client\":{},\"accept_seconds\":{:.6},\"sessions_per_sec\":{:.1},\"seconds\":{:.6},\"packets_per_sec\":{:.1},\"latency_p50_us\":{:.1},\"latency_p99_us\":{:.1},\"latency_max_us\":{:.1},{}}}",
        json_str(&args.label),
        args.clients,
        args.packets,
        accept_seconds,
        args.clients as f64 / accept_seconds,
        seconds,
        if errors.is_empty() && seconds > 0.0 { total as f64 / seconds } else { 0.0 },
        us(percentile(&latencies, 0.50)),
        us(percentile(&latencies, 0.99)),
        us(latencies.last().copied().unwrap_or(0)),
        errors_json(&args.label, &errors),
    );
    Ok(if errors.is_empty() { 0 } else { 1 })
}

/// One client's broadcasts, each checked (id 1, size, the next sequence), with
/// how long each took from its publish.
async fn receive_timed<R: AsyncRead + Unpin>(
    mut reader: R,
    mut frames: FrameBuf,
    packets: u32,
    size: usize,
    progress: &AtomicU32,
) -> Result<(Instant, Vec<u64>), String> {
    let mut expected: u32 = 0;
    let mut samples = Vec::with_capacity(packets as usize);
    loop {
        while let Some((id, payload)) = frames.next()? {
            check_broadcast(id, payload, expected, size)?;
            let sent = u64::from_le_bytes(payload[4..12].try_into().expect("8 bytes"));
            samples.push(monotonic_ns().saturating_sub(sent));
            expected += 1;
            progress.store(expected, Ordering::Relaxed);
            if expected == packets {
                return Ok((Instant::now(), samples));
            }
        }
        match frames.fill(&mut reader).await {
            Ok(0) => return Err(format!("closed after {expected} of {packets} broadcasts")),
            Ok(_) => {}
            Err(e) => return Err(format!("read: {e}")),
        }
    }
}
