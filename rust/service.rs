//! A service is what a `Server` or a `Client` runs on: a tokio runtime, the
//! registry of its sessions, the event queue to the application, and counters.
//! The server adds an accept loop; the client connects N sessions.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use socket2::{Domain, SockRef, Socket, TcpKeepalive, Type};
use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;
use tokio::runtime::Runtime;
use tokio::task::JoinHandle;

use crate::admission::Admission;
use crate::config::{ServiceConfig, SessionConfig};
use crate::connection::Connection;
use crate::context::SessionContext;
use crate::events::Event;
use crate::inbox::Inbox;
use crate::log_limit::ThrottledLog;
use crate::proxy_header;
use crate::reactor::Reactors;
use crate::reason::DisconnectReason;
use crate::registry::{BroadcastOutcome, SessionRegistry};
use crate::send_buffer::SendBufferPool;
use crate::session::{SessionHandle, SessionId};
use crate::stats::{ServiceStats, StatsSnapshot};

/// What the runtime's tasks and the application share.
pub struct ServiceShared {
    pub config: ServiceConfig,
    /// What every session shares: its limits, the counters, the event queue.
    pub context: Arc<SessionContext>,
    pub registry: Arc<SessionRegistry>,
    pub pool: &'static SendBufferPool,
    reactors: Reactors,
    next_id: AtomicU64,
    admission: Admission,
    /// Connections from trusted proxies whose PROXY header is being read:
    /// they hold a socket, so they count against `max_sessions`.
    proxy_handshakes: AtomicUsize,
    /// False once the service stops taking new connections (a drain).
    accepting: AtomicBool,
    /// Ends a shutdown's wait for its sessions to flush (a second signal).
    hurry: tokio::sync::Notify,
}

impl ServiceShared {
    /// The shared state, and the reactors it starts on `runtime`.
    fn start(config: ServiceConfig, runtime: &tokio::runtime::Handle) -> io::Result<Arc<Self>> {
        let context = Arc::new(SessionContext::new(config.session.clone())?);
        let registry = Arc::new(SessionRegistry::default());
        let reactors = Reactors::start(runtime, config.io_threads, config.inline_io, &context, &registry)?;
        Ok(Arc::new(ServiceShared {
            context,
            admission: Admission::new(&config),
            config,
            registry,
            pool: SendBufferPool::global(),
            reactors,
            next_id: AtomicU64::new(1),
            proxy_handshakes: AtomicUsize::new(0),
            accepting: AtomicBool::new(true),
            hurry: tokio::sync::Notify::new(),
        }))
    }

    /// Registers a connected socket, announces it and hands it to a reactor. A
    /// stopping service closes it instead.
    fn start_session(self: &Arc<Self>, stream: mio::net::TcpStream, peer: SocketAddr) -> bool {
        if let Err(error) = configure_socket(&stream, &self.config.session) {
            log::debug!(target: "servercore", "{peer}: socket options not applied: {error}");
        }
        let id = SessionId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let reactor = self.reactors.next();
        let handle = Arc::new(SessionHandle::new(
            id,
            peer,
            stream.as_raw_fd(),
            reactor.doorbell(),
            self.context.clone(),
        ));
        if !self.registry.insert(handle.clone()) {
            return false;
        }
        // Queued before anything the reactor reports for this session.
        self.context.events.push(Event::Connected { session: id });
        reactor.adopt(Connection::new(stream, handle));
        true
    }

    /// Closes the longest-silent session (EVICTED) if there is one.
    fn evict_a_silent_session(&self) -> bool {
        let Some(victim) = self.registry.oldest_silent() else { return false };
        let detail = "the server was full and this connection had sent nothing yet".to_owned();
        victim.close_with_detail(DisconnectReason::Evicted, detail)
    }

    /// Whether a connection from `peer` may become a session (the
    /// `admission` module); a refusal is counted and logged.
    fn admit(&self, peer: SocketAddr) -> bool {
        let stats = &self.context.stats;
        let evict = || self.evict_a_silent_session();
        self.admission.admit(peer, &self.config, &self.registry, stats, evict)
    }

    /// A trusted proxy's connection: its PROXY header names the client, who
    /// is then admitted like a direct connection. A connection whose header
    /// is missing, malformed or late never becomes a session (PROXY_HEADER).
    async fn accept_proxied(self: Arc<Self>, stream: mio::net::TcpStream, proxy: SocketAddr) {
        // The sockets waiting for a header are bounded; room for the session
        // itself (eviction included) is decided once the client is known.
        let handshakes = self.proxy_handshakes.fetch_add(1, Ordering::Relaxed);
        if handshakes >= self.config.max_sessions {
            self.proxy_handshakes.fetch_sub(1, Ordering::Relaxed);
            self.admission.refuse_handshake(proxy, handshakes, &self.context.stats);
            return;
        }
        let outcome =
            match tokio::time::timeout(proxy_header::HEADER_TIMEOUT, proxy_header::read(stream)).await {
                Ok(read) => read,
                Err(_) => Err(format!(
                    "no complete PROXY header within {} s of connecting",
                    proxy_header::HEADER_TIMEOUT.as_secs()
                )),
            };
        self.proxy_handshakes.fetch_sub(1, Ordering::Relaxed);
        match outcome {
            // A drain began while the header was read: no new sessions.
            Ok(_) if !self.accepting.load(Ordering::Relaxed) => {}
            Ok((stream, header)) => {
                let peer = header.client.unwrap_or(proxy);
                if self.admit(peer) {
                    self.start_session(stream, peer);
                }
            }
            Err(detail) => {
                let reason = DisconnectReason::ProxyHeader;
                self.context.stats.count_disconnect(reason);
                let level = self.context.fault_log.level_for(reason, proxy.ip());
                log::log!(target: "servercore", level, "{proxy}: closed before it was a session: {reason}: {detail}");
            }
        }
    }

    /// The application's end of the event queue, keeping `T` per session.
    pub fn inbox<T>(&self) -> Inbox<T> {
        Inbox::new(self.registry.clone(), self.context.clone())
    }

    /// Queues one encoded packet on every announced session (but `exclude`).
    pub fn broadcast(&self, packet: &Bytes, exclude: Option<SessionId>) -> BroadcastOutcome {
        self.registry.broadcast(packet, exclude, &self.context.stats.send_queue_bytes)
    }

    /// Waits up to `timeout` for events and appends them to `out`. While
    /// nothing waits, the calling thread may serve the reactors itself (see
    /// [`reactor`](crate::reactor)): only the application's one consuming
    /// thread should call this.
    pub fn wait_events(&self, timeout: Option<Duration>, out: &mut Vec<Event>) -> usize {
        let taken = self.wait_events_in_poll(timeout, out);
        self.end_poll();
        taken
    }

    /// [`wait_events`](Self::wait_events) for a consumer that waits again
    /// within microseconds (between the two it only runs its callbacks): the
    /// sockets it served stay with it until it waits again, it calls
    /// [`end_poll`](Self::end_poll), or a short while passes (see
    /// [`reactor`](crate::reactor)).
    pub fn wait_events_in_poll(&self, timeout: Option<Duration>, out: &mut Vec<Event>) -> usize {
        self.reactors.wait(&self.context.events, timeout, out)
    }

    /// The consumer leaves for a while: the I/O threads watch every socket, now.
    pub fn end_poll(&self) {
        self.reactors.release();
    }

    /// For a consumer woken through a descriptor by an event loop of its own
    /// (asyncio's `add_reader`) rather than blocked in
    /// [`wait_events`](Self::wait_events). Returns the descriptor to watch
    /// until the next call, or None, without starting the wait, if there is
    /// something to take already: take it now. While its last
    /// [`wait_events_in_poll`](Self::wait_events_in_poll) left the reactors
    /// lent to it (light load), that is their set, and the consumer serves
    /// their sockets itself when it wakes (`wait_events_in_poll` with a zero
    /// timeout), as `poll()` does; otherwise the I/O threads watch every socket
    /// and it is [`wake_fd`](Self::wake_fd).
    pub fn begin_fd_wait(&self) -> Option<std::os::fd::RawFd> {
        let watched = match self.reactors.app_fd() {
            Some(fd) => fd,
            None => {
                self.reactors.release();
                self.wake_fd()
            }
        };
        self.context.events.begin_fd_wait().then_some(watched)
    }

    /// A shutdown under way (or the next one) stops waiting for its sessions
    /// to flush: they are dropped at once, each reported. From any thread.
    pub fn hurry_shutdown(&self) {
        self.hurry.notify_one();
    }

    /// Whether the consumer's last wait left the reactors lent to it: their
    /// sockets are its to watch (see [`begin_fd_wait`](Self::begin_fd_wait)).
    pub fn sockets_lent(&self) -> bool {
        self.reactors.app_fd().is_some()
    }

    /// The descriptor woke the consumer (or it stops waiting): its signals are taken.
    pub fn end_fd_wait(&self) {
        self.context.events.end_fd_wait();
    }

    /// Moves what is queued to `out` without waiting (and without serving
    /// the reactors inline); returns how many events.
    pub fn take_events(&self, out: &mut Vec<Event>) -> usize {
        self.context.events.take(out)
    }

    /// The descriptor that becomes readable when a consumer in
    /// [`begin_fd_wait`](Self::begin_fd_wait) has events to take.
    pub fn wake_fd(&self) -> std::os::fd::RawFd {
        self.context.events.wake_fd()
    }

    /// Ends the application's current (or next) wait for events at once.
    pub fn interrupt_wait(&self) {
        self.context.events.interrupt();
    }

    pub fn stats(&self) -> StatsSnapshot {
        let context = &self.context;
        context.stats.snapshot(self.registry.len(), context.events.len(), self.pool.stats())
    }

    /// Counts received packets dropped because the application had closed their session.
    pub fn count_discarded(&self, packets: u64) {
        ServiceStats::add(&self.context.stats.packets_discarded, packets);
    }
}

/// The part of a server or client that does not depend on which it is.
pub struct Service {
    shared: Arc<ServiceShared>,
    runtime: Option<Runtime>,
    accept_task: Option<JoinHandle<()>>,
}

impl Service {
    fn new(config: ServiceConfig, role: &str) -> io::Result<Self> {
        config.validate().map_err(|error| io::Error::new(io::ErrorKind::InvalidInput, error))?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.io_threads)
            .thread_name(format!("servercore-{role}-io"))
            // A reactor's poll serves many sessions, so a worker runs few, long
            // polls: the runtime's own driver (the listening socket, timers) is
            // looked at after every one, not every 61st.
            .event_interval(1)
            .enable_all()
            .build()?;
        let shared = ServiceShared::start(config, runtime.handle())?;
        Ok(Self { shared, runtime: Some(runtime), accept_task: None })
    }

    /// The engine's runtime, for tasks that live as long as the service (a bus).
    pub fn runtime(&self) -> Option<tokio::runtime::Handle> {
        self.runtime.as_ref().map(|runtime| runtime.handle().clone())
    }

    pub fn shared(&self) -> &Arc<ServiceShared> {
        &self.shared
    }

    pub fn config(&self) -> &ServiceConfig {
        &self.shared.config
    }

    pub fn is_running(&self) -> bool {
        self.runtime.is_some()
    }

    pub fn broadcast(&self, packet: &Bytes, exclude: Option<SessionId>) -> BroadcastOutcome {
        self.shared.broadcast(packet, exclude)
    }

    pub fn session(&self, id: SessionId) -> Option<Arc<SessionHandle>> {
        self.shared.registry.get(id)
    }

    pub fn wait_events(&self, timeout: Option<Duration>, out: &mut Vec<Event>) -> usize {
        self.shared.wait_events(timeout, out)
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.shared.stats()
    }

    /// Stops the service: no new sessions; every open one is closed with
    /// `reason` (flushing, bounded by the linger); waits until each has queued
    /// its `Disconnected` event; then ends the I/O threads. Blocks for up to the
    /// linger and a second more. Idempotent.
    pub fn shutdown(&mut self, reason: DisconnectReason) {
        let linger = self.shared.config.session.linger;
        self.shutdown_within(reason, linger);
    }

    /// [`shutdown`](Self::shutdown), with `grace` instead of the linger for the
    /// sessions it closes: a graceful drain. [`ServiceShared::hurry_shutdown`]
    /// (from any thread) cuts the wait short; sessions still flushing are
    /// then dropped, each reported.
    pub fn shutdown_within(&mut self, reason: DisconnectReason, grace: Duration) {
        let Some(runtime) = self.runtime.take() else { return };
        // The application thread may be serving a reactor in its wait (from
        // another thread than this one): the tasks need their reactors back.
        self.shared.reactors.stop_inline(&self.shared.context.events);
        self.stop_accepting();
        self.shared.context.set_shutdown_grace(grace);
        self.shared.registry.close_all(reason);
        let wait = grace + Duration::from_secs(1);
        let (registry, hurry) = (&self.shared.registry, &self.shared.hurry);
        let hurried = runtime.block_on(async {
            tokio::select! {
                _ = tokio::time::timeout(wait, registry.emptied()) => false,
                () = hurry.notified() => true,
            }
        });
        if !registry.is_empty() {
            let why = match hurried {
                true => "told to stop at once".to_owned(),
                false => format!("still closing after {:.1}s", wait.as_secs_f64()),
            };
            log::warn!(target: "servercore", "{} sessions {why}; cutting them off", registry.len());
        }
        // Tasks still running are dropped here; each one's farewell reports it.
        runtime.shutdown_timeout(Duration::from_secs(1));
        for summary in self.shared.context.fault_log.finish(std::time::Instant::now()) {
            log::warn!(target: "servercore", "{summary}");
        }
    }

    /// No new sessions from now on (a server closes its listening socket);
    /// the open ones go on. Idempotent.
    pub fn stop_accepting(&mut self) {
        self.shared.accepting.store(false, Ordering::Relaxed);
        if let Some(accept) = self.accept_task.take() {
            accept.abort();
        }
    }
}

impl Drop for Service {
    /// A service dropped while running shuts down first, which blocks for up
    /// to the linger: call [`Service::shutdown`] where that matters.
    fn drop(&mut self) {
        self.shutdown(DisconnectReason::ServerShutdown);
    }
}

/// A listening service: the lecture's `ServerService`.
pub struct Server {
    service: Service,
    local_addr: SocketAddr,
}

impl Server {
    /// Binds `addr` (port 0 picks a free port) and starts accepting.
    pub fn listen(config: ServiceConfig, addr: SocketAddr) -> io::Result<Self> {
        let mut service = Service::new(config, "server")?;
        let listener = bind(addr, service.config())?;
        let local_addr = listener.local_addr()?;
        let runtime = service.runtime.as_ref().expect("a new service runs").handle().clone();
        let listener = {
            let _entered = runtime.enter();
            let listener = mio::net::TcpListener::from_std(listener);
            // SAFETY: the listener owns its descriptor and keeps it, unchanged,
            // until it is dropped with the `AsyncFd`.
            unsafe { AsyncFd::register_with_interest(listener, tokio::io::Interest::READABLE)? }
        };
        let shared = service.shared.clone();
        service.accept_task = Some(runtime.spawn(accept_loop(listener, shared)));
        Ok(Self { service, local_addr })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn service(&self) -> &Service {
        &self.service
    }

    pub fn service_mut(&mut self) -> &mut Service {
        &mut self.service
    }
}

/// A connecting service: the lecture's `ClientService` (the DummyClient's N sessions).
pub struct Client {
    service: Service,
}

/// How a client's connection attempts went.
#[derive(Debug, Default)]
pub struct ConnectReport {
    pub connected: usize,
    pub failed: usize,
    pub first_error: Option<io::Error>,
}

impl Client {
    /// Opens `count` sessions to `addr`, all at once, and returns when every
    /// attempt has connected or failed (each bounded by `connect_timeout`).
    pub fn connect(
        config: ServiceConfig,
        addr: SocketAddr,
        count: usize,
    ) -> io::Result<(Self, ConnectReport)> {
        let service = Service::new(config, "client")?;
        let runtime = service.runtime.as_ref().expect("a new service runs").handle().clone();
        let shared = service.shared.clone();
        let timeout = shared.config.connect_timeout;
        let report = runtime.block_on(async {
            let mut attempts = tokio::task::JoinSet::new();
            for _ in 0..count {
                attempts.spawn(async move {
                    match tokio::time::timeout(timeout, TcpStream::connect(addr)).await {
                        Ok(result) => result,
                        Err(_) => Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!("no connection within connect_timeout {:.1}s", timeout.as_secs_f64()),
                        )),
                    }
                });
            }
            let mut report = ConnectReport::default();
            while let Some(attempt) = attempts.join_next().await {
                let connected = attempt.map_err(io::Error::other).and_then(|r| r).and_then(|stream| {
                    // The reactor registers it again in its own epoll set.
                    let stream = stream.into_std()?;
                    Ok((stream.peer_addr().unwrap_or(addr), mio::net::TcpStream::from_std(stream)))
                });
                match connected {
                    Ok((peer, stream)) => {
                        if shared.start_session(stream, peer) {
                            report.connected += 1;
                        }
                    }
                    Err(error) => {
                        report.failed += 1;
                        report.first_error.get_or_insert(error);
                    }
                }
            }
            report
        });
        let stats = &service.shared.context.stats;
        ServiceStats::add(&stats.connected, report.connected as u64);
        ServiceStats::add(&stats.connect_failed, report.failed as u64);
        Ok((Self { service }, report))
    }

    pub fn service(&self) -> &Service {
        &self.service
    }

    pub fn service_mut(&mut self) -> &mut Service {
        &mut self.service
    }
}

fn bind(addr: SocketAddr, config: &ServiceConfig) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    // A restarted server must not wait out the old one's TIME_WAIT sockets.
    socket.set_reuse_address(true)?;
    // Worker processes on one port: the kernel spreads new connections over
    // their listeners.
    socket.set_reuse_port(config.reuse_port)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(i32::try_from(config.backlog).unwrap_or(i32::MAX))?;
    Ok(socket.into())
}

fn configure_socket(stream: &impl AsFd, config: &SessionConfig) -> io::Result<()> {
    let socket = SockRef::from(stream);
    socket.set_tcp_nodelay(config.nodelay)?;
    if let Some(keepalive) = config.keepalive {
        let params = TcpKeepalive::new()
            .with_time(keepalive.idle)
            .with_interval(keepalive.interval)
            .with_retries(keepalive.retries);
        socket.set_tcp_keepalive(&params)?;
        socket.set_tcp_user_timeout(Some(keepalive.user_timeout))?;
    }
    Ok(())
}

async fn accept_loop(listener: AsyncFd<mio::net::TcpListener>, shared: Arc<ServiceShared>) {
    let mut exhausted = ThrottledLog::new(Duration::from_secs(5));
    let mut backoff = Duration::ZERO;
    loop {
        // mio's accept: the socket comes non-blocking and is registered only by its reactor.
        match listener.async_io(tokio::io::Interest::READABLE, |listener| listener.accept()).await {
            Ok((stream, peer)) => {
                backoff = Duration::ZERO;
                shared.context.stats.accepted.fetch_add(1, Ordering::Relaxed);
                if shared.config.trusted_proxies.contains(&peer.ip()) {
                    tokio::spawn(shared.clone().accept_proxied(stream, peer));
                } else if shared.admit(peer) {
                    shared.start_session(stream, peer);
                }
                // Otherwise closed before it is a session: no Python ever hears of it.
            }
            Err(error) if is_out_of_resources(&error) => {
                // The pending connection stays in the backlog; retrying at once
                // would spin a core until a descriptor frees up.
                backoff = (backoff * 2).clamp(Duration::from_millis(10), Duration::from_secs(1));
                exhausted.warn(|suppressed| {
                    format!("accept failed: {error}; retrying in {} ms{suppressed}", backoff.as_millis())
                });
                tokio::time::sleep(backoff).await;
            }
            // The connection died in the backlog (ECONNABORTED and kin): next one.
            Err(_) => {}
        }
    }
}

fn is_out_of_resources(error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Keepalive;

    #[tokio::test]
    async fn accepted_sockets_get_nodelay_and_short_keepalive_by_default() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (stream, _) = listener.accept().await.unwrap();
        configure_socket(&stream, &SessionConfig::default()).unwrap();
        let socket = SockRef::from(&stream);
        let defaults = Keepalive::default();
        assert!(stream.nodelay().unwrap());
        assert!(socket.keepalive().unwrap());
        assert_eq!(socket.tcp_keepalive_time().unwrap(), defaults.idle);
        assert_eq!(socket.tcp_keepalive_interval().unwrap(), defaults.interval);
        assert_eq!(socket.tcp_keepalive_retries().unwrap(), defaults.retries);
        assert_eq!(socket.tcp_user_timeout().unwrap(), Some(defaults.user_timeout));
    }
}
