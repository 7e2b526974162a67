//! A bus between services (worker processes, machines) over Redis Pub/Sub.
//!
//! One service holds the sessions of one process. What crosses processes (a
//! world chat, a system notice, a room whose members are spread over
//! workers, a whisper to a player on another worker) is published to Redis
//! once and fanned out by every subscribed service to its own sessions, here
//! on the engine's runtime: the framed packet goes out as it came, with no
//! Python and no copy per recipient.
//!
//! Channels (`prefix` is `servercore` unless configured):
//! - `{prefix}:all`: every session of every service;
//! - `{prefix}:room:{name}`: the local members of the room `name`, on every
//!   service that has one;
//! - `{prefix}:node:{node}`: one session of the service `node`, by id.
//!
//! A message is an envelope of `[kind u8]` (`1`: to the channel's sessions;
//! `2`: to one session, then its id as a u64, little-endian) and then one
//! framed packet, checked like a peer's before anything is sent (a message
//! that does not parse is counted and dropped).
//!
//! Delivery is at most once, as Redis Pub/Sub's: a message published while
//! a subscriber is disconnected is lost for it, and so is one queued here
//! when the connection drops. Publishing never waits for Redis: it queues
//! (bounded) for the publisher task, and says `false` at once while Redis is
//! unreachable. Both tasks reconnect with a backoff (0.1 s doubling to 5 s),
//! and the subscriber subscribes again to everything it had.
//!
//! A directory maps names (a player, an account) to session addresses
//! (`node/id`) in Redis keys with a TTL, refreshed by a heartbeat while the
//! session lives and deleted when it has ended, so a crashed worker's
//! entries expire by themselves.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use futures_util::StreamExt;
use redis::AsyncCommands;
use redis::aio::MultiplexedConnection;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::events::SessionId;
use crate::frame::HEADER_SIZE;
use crate::log_limit::ThrottledLog;
use crate::registry::BroadcastOutcome;
use crate::room::Room;
use crate::service::ServiceShared;

const TO_CHANNEL: u8 = 1;
const TO_SESSION: u8 = 2;
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long a connection must hold for the backoff to start over.
const STABLE: Duration = Duration::from_secs(5);
/// Publishes one round trip to Redis carries at most.
const PUBLISH_BATCH: usize = 256;

#[derive(Clone, Debug)]
pub struct BusConfig {
    /// `redis://host:port/db`.
    pub url: String,
    pub prefix: String,
    /// This service's name in the cluster; unique per process.
    pub node: String,
    /// How long a directory entry outlives its last heartbeat.
    pub directory_ttl: Duration,
    /// Publishes waiting for the publisher task; past it `publish` says false.
    pub max_queued_publishes: usize,
}

/// What a channel's messages are fanned out to, here.
pub trait Fanout: Send + Sync {
    fn fan_out(&self, packet: &Bytes) -> BroadcastOutcome;
}

impl<T: Send + 'static> Fanout for Room<T> {
    fn fan_out(&self, packet: &Bytes) -> BroadcastOutcome {
        self.broadcast(packet, None)
    }
}

enum Route {
    AllSessions,
    OneSession,
    Group(Arc<dyn Fanout>),
}

enum Subscription {
    Join(String),
    Leave(String),
}

enum Outgoing {
    Publish { channel: String, message: Bytes },
    Register { key: String, value: String },
}

#[derive(Default)]
pub struct BusStats {
    pub published: AtomicU64,
    pub publish_failed: AtomicU64,
    pub received: AtomicU64,
    pub delivered: AtomicU64,
    pub malformed: AtomicU64,
    pub reconnects: AtomicU64,
}

/// Why a bus could not be made or asked.
#[derive(Debug)]
pub enum BusError {
    /// The URL does not parse.
    Url(String),
    /// Redis did not answer.
    Unavailable(String),
}

struct BusShared {
    config: BusConfig,
    client: redis::Client,
    service: Arc<ServiceShared>,
    routes: Mutex<HashMap<String, Route>>,
    /// Channels the subscriber task should subscribe to or leave now.
    subscriptions: mpsc::UnboundedSender<Subscription>,
    publish: mpsc::Sender<Outgoing>,
    /// Names in the directory, and whose they are.
    names: Mutex<HashMap<String, SessionId>>,
    /// The publisher's connection while it is up, for questions (lookups).
    connection: Mutex<Option<MultiplexedConnection>>,
    publisher_up: AtomicBool,
    subscriber_up: AtomicBool,
    /// The subscriber lost Redis: the publisher checks its own connection
    /// at once rather than at its next write (which would be lost).
    lost: tokio::sync::Notify,
    refusals: Mutex<ThrottledLog>,
    stats: BusStats,
}

pub struct Bus {
    shared: Arc<BusShared>,
    tasks: Vec<JoinHandle<()>>,
    runtime: tokio::runtime::Handle,
    closed: AtomicBool,
}

impl Bus {
    /// Starts the bus's tasks on `runtime` (the service's); they connect in
    /// the background.
    pub fn start(
        config: BusConfig,
        service: Arc<ServiceShared>,
        runtime: tokio::runtime::Handle,
    ) -> Result<Self, BusError> {
        let url_error = |error: redis::RedisError| BusError::Url(format!("{:?}: {error}", config.url));
        let connection =
            redis::IntoConnectionInfo::into_connection_info(config.url.as_str()).map_err(url_error)?;
        // Without it a lone publish waits for the delayed ACK (40 ms here).
        let connection =
            connection.set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
        let client = redis::Client::open(connection).map_err(url_error)?;
        let (subscriptions_tx, subscriptions) = mpsc::unbounded_channel();
        let (publish, outgoing) = mpsc::channel(config.max_queued_publishes);
        let mut routes = HashMap::new();
        routes.insert(format!("{}:all", config.prefix), Route::AllSessions);
        routes.insert(format!("{}:node:{}", config.prefix, config.node), Route::OneSession);
        let shared = Arc::new(BusShared {
            config,
            client,
            service,
            routes: Mutex::new(routes),
            subscriptions: subscriptions_tx,
            publish,
            names: Mutex::default(),
            connection: Mutex::default(),
            publisher_up: AtomicBool::new(false),
            subscriber_up: AtomicBool::new(false),
            lost: tokio::sync::Notify::new(),
            refusals: Mutex::new(ThrottledLog::new(Duration::from_secs(5))),
            stats: BusStats::default(),
        });
        let tasks = vec![
            runtime.spawn(subscriber(shared.clone(), subscriptions)),
            runtime.spawn(publisher(shared.clone(), outgoing)),
        ];
        Ok(Self { shared, tasks, runtime, closed: AtomicBool::new(false) })
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    pub fn node(&self) -> &str {
        &self.shared.config.node
    }

    /// Whether both connections to Redis are up.
    pub fn is_connected(&self) -> bool {
        self.shared.publisher_up.load(Ordering::Relaxed) && self.shared.subscriber_up.load(Ordering::Relaxed)
    }

    pub fn stats(&self) -> &BusStats {
        &self.shared.stats
    }

    /// Fans what is published to the room `name` out to `members` here.
    /// Replaces an earlier group of that name.
    pub fn attach_room(&self, name: &str, members: Arc<dyn Fanout>) {
        let channel = self.room_channel(name);
        let new = self.shared.routes().insert(channel.clone(), Route::Group(members)).is_none();
        if new {
            let _ = self.shared.subscriptions.send(Subscription::Join(channel));
        }
    }

    /// Stops fanning out the room `name` here (and unsubscribes from it).
    pub fn detach_room(&self, name: &str) -> bool {
        let channel = self.room_channel(name);
        let removed = self.shared.routes().remove(&channel).is_some();
        if removed {
            let _ = self.shared.subscriptions.send(Subscription::Leave(channel));
        }
        removed
    }

    /// Publishes a framed packet to every session of every service.
    pub fn broadcast(&self, packet: Bytes) -> bool {
        let channel = format!("{}:all", self.shared.config.prefix);
        self.publish(channel, envelope(TO_CHANNEL, None, &packet))
    }

    /// Publishes a framed packet to the members of the room `name` on every service.
    pub fn publish_to_room(&self, name: &str, packet: Bytes) -> bool {
        self.publish(self.room_channel(name), envelope(TO_CHANNEL, None, &packet))
    }

    /// Publishes a framed packet to one session anywhere, by its address.
    pub fn send_to(&self, address: &SessionAddress, packet: Bytes) -> bool {
        let channel = format!("{}:node:{}", self.shared.config.prefix, address.node);
        self.publish(channel, envelope(TO_SESSION, Some(address.session), &packet))
    }

    /// This service's session `id`, as the cluster knows it.
    pub fn address_of(&self, id: SessionId) -> SessionAddress {
        SessionAddress { node: self.shared.config.node.clone(), session: id }
    }

    /// Puts `name` -> this session's address in the directory, kept alive by
    /// the heartbeat while the session lives. Whether it was queued.
    pub fn register(&self, name: &str, id: SessionId) -> bool {
        self.shared.names().insert(name.to_owned(), id);
        let outgoing =
            Outgoing::Register { key: self.directory_key(name), value: self.address_of(id).to_string() };
        self.shared.publish.try_send(outgoing).is_ok()
    }

    /// The address registered for `name`, asked of Redis (waits up to `timeout`).
    /// Not from one of the runtime's own threads: it waits on the runtime.
    pub fn lookup(&self, name: &str, timeout: Duration) -> Result<Option<SessionAddress>, BusError> {
        if tokio::runtime::Handle::try_current().is_ok() {
            return Err(BusError::Unavailable("lookup cannot wait on an engine thread".to_owned()));
        }
        let unavailable = || BusError::Unavailable("Redis is unreachable".to_owned());
        let mut connection = self.shared.connection().clone().ok_or_else(unavailable)?;
        let key = self.directory_key(name);
        // Asked by a task, answered over a channel: a runtime that shuts down
        // meanwhile (the server stopping) drops the task, and the channel
        // says so, where waiting on the runtime itself would panic.
        let (answer, answered) = std::sync::mpsc::sync_channel(1);
        self.runtime.spawn(async move {
            let _ = answer.send(connection.get::<_, Option<String>>(key).await);
        });
        let value = match answered.recv_timeout(timeout) {
            Ok(value) => value.map_err(|error| BusError::Unavailable(error.to_string()))?,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                return Err(BusError::Unavailable(format!("Redis did not answer within {timeout:?}")));
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err(BusError::Unavailable("the server has stopped".to_owned()));
            }
        };
        Ok(value.and_then(|text| text.parse().ok()))
    }

    fn publish(&self, channel: String, message: Bytes) -> bool {
        let stats = &self.shared.stats;
        // Either connection down means Redis is away (the publisher's may
        // not know yet: it learns at its next write).
        if !self.is_connected()
            || self.shared.publish.try_send(Outgoing::Publish { channel, message }).is_err()
        {
            stats.publish_failed.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    fn room_channel(&self, name: &str) -> String {
        format!("{}:room:{name}", self.shared.config.prefix)
    }

    fn directory_key(&self, name: &str) -> String {
        format!("{}:session:{name}", self.shared.config.prefix)
    }
}

impl Bus {
    /// Stops the tasks: nothing is published or received from now on.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
        for task in &self.tasks {
            task.abort();
        }
        Down { shared: &self.shared, publisher: true }.mark();
        Down { shared: &self.shared, publisher: false }.mark();
    }
}

impl Drop for Bus {
    fn drop(&mut self) {
        self.close();
    }
}

/// A session anywhere in the cluster: its service's node name and its id there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionAddress {
    pub node: String,
    pub session: SessionId,
}

impl std::fmt::Display for SessionAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.node, self.session.0)
    }
}

impl std::str::FromStr for SessionAddress {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let (node, id) = text.rsplit_once('/').ok_or_else(|| format!("{text:?} is not node/id"))?;
        let id = id.parse().map_err(|_| format!("{text:?}: {id:?} is not a session id"))?;
        if node.is_empty() {
            return Err(format!("{text:?} has no node"));
        }
        Ok(Self { node: node.to_owned(), session: SessionId(id) })
    }
}

impl BusShared {
    fn routes(&self) -> MutexGuard<'_, HashMap<String, Route>> {
        self.routes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn names(&self) -> MutexGuard<'_, HashMap<String, SessionId>> {
        self.names.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn connection(&self) -> MutexGuard<'_, Option<MultiplexedConnection>> {
        self.connection.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A connection is up: counted and said if it is a reconnection.
    fn came_back(&self, was_up: &mut bool, what: &str) {
        if *was_up {
            self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
            log::warn!(target: "servercore", "bus: {what} {}", self.config.url);
        }
        *was_up = true;
    }

    /// Redis refused a command: said at most once per 5 s. A refusal that
    /// means this is no longer the server to talk to (a replica after a
    /// failover, a master going down) ends the connection, so the bus
    /// reconnects, to the new primary behind the same address.
    fn refused(&self, error: &redis::RedisError) -> redis::RedisResult<()> {
        use redis::{ErrorKind, ServerErrorKind};
        if matches!(
            error.kind(),
            ErrorKind::Server(
                ServerErrorKind::ReadOnly | ServerErrorKind::MasterDown | ServerErrorKind::BusyLoading
            )
        ) {
            return Err(error.clone());
        }
        let mut log = self.refusals.lock().unwrap_or_else(|e| e.into_inner());
        log.warn(|suppressed| format!("bus: Redis refused a command: {error}{suppressed}"));
        Ok(())
    }

    /// One message from Redis, fanned out here.
    fn deliver(&self, channel: &str, message: Bytes) {
        self.stats.received.fetch_add(1, Ordering::Relaxed);
        let Some((session, packet)) = open_envelope(message) else {
            self.stats.malformed.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let delivered = {
            let routes = self.routes();
            match (routes.get(channel), session) {
                (Some(Route::AllSessions), None) => self.service.broadcast(&packet, None).queued,
                (Some(Route::Group(group)), None) => group.fan_out(&packet).queued,
                (Some(Route::OneSession), Some(id)) => {
                    drop(routes);
                    match self.service.registry.get(id) {
                        Some(handle) => usize::from(handle.send(packet) == crate::send_queue::Push::Queued),
                        None => 0,
                    }
                }
                _ => {
                    self.stats.malformed.fetch_add(1, Ordering::Relaxed);
                    0
                }
            }
        };
        self.stats.delivered.fetch_add(delivered as u64, Ordering::Relaxed);
    }
}

/// Marks one of the two connections down when its task ends, however it
/// ends: a runtime that shuts down (the server stopping) drops the task
/// without a word, and `connected` must not go on saying true.
struct Down<'a> {
    shared: &'a BusShared,
    publisher: bool,
}

impl Down<'_> {
    fn mark(&self) {
        if self.publisher {
            self.shared.publisher_up.store(false, Ordering::Relaxed);
            *self.shared.connection() = None;
        } else {
            self.shared.subscriber_up.store(false, Ordering::Relaxed);
        }
    }
}

impl Drop for Down<'_> {
    fn drop(&mut self) {
        self.mark();
    }
}

fn envelope(kind: u8, session: Option<SessionId>, packet: &[u8]) -> Bytes {
    let mut message = Vec::with_capacity(1 + 8 + packet.len());
    message.push(kind);
    if let Some(id) = session {
        message.extend_from_slice(&id.0.to_le_bytes());
    }
    message.extend_from_slice(packet);
    Bytes::from(message)
}

/// The envelope's recipient (a session, or the channel's) and its packet, if
/// the message is one: a known kind and exactly one whole framed packet.
fn open_envelope(mut message: Bytes) -> Option<(Option<SessionId>, Bytes)> {
    let kind = *message.first()?;
    message.advance(1);
    let session = match kind {
        TO_CHANNEL => None,
        TO_SESSION => {
            let id = message.get(..8)?;
            let id = SessionId(u64::from_le_bytes(id.try_into().ok()?));
            message.advance(8);
            Some(id)
        }
        _ => return None,
    };
    let size = usize::from(u16::from_le_bytes(message.get(..2)?.try_into().ok()?));
    (size >= HEADER_SIZE && size == message.len()).then_some((session, message))
}

/// A connection that held for `STABLE` starts its reconnection from the
/// first step; one that broke at once (Redis accepts and drops us) does not,
/// so it cannot make the bus reconnect in a tight loop.
async fn settle_backoff(attempt: &mut u32, up_since: Instant) {
    if up_since.elapsed() >= STABLE {
        *attempt = 0;
    }
    backoff(attempt).await;
}

async fn backoff(attempt: &mut u32) {
    let delay = BACKOFF_FIRST.saturating_mul(1 << (*attempt).min(6)).min(BACKOFF_MAX);
    *attempt += 1;
    tokio::time::sleep(delay).await;
}

/// Receives what is published to this service's channels, for as long as
/// the bus lives, reconnecting when Redis goes away.
async fn subscriber(shared: Arc<BusShared>, mut subscriptions: mpsc::UnboundedReceiver<Subscription>) {
    let _down = Down { shared: &shared, publisher: false };
    let mut attempt = 0;
    let mut was_up = false;
    loop {
        let pubsub = match shared.client.get_async_pubsub().await {
            Ok(pubsub) => pubsub,
            Err(error) => {
                if attempt == 0 {
                    log::warn!(target: "servercore", "bus: cannot subscribe at {}: {error}; retrying", shared.config.url);
                }
                backoff(&mut attempt).await;
                continue;
            }
        };
        let (mut sink, mut stream) = pubsub.split();
        // Queued changes are covered by the routes, read after them: a room
        // made while Redis was away (or during this SUBSCRIBE) is subscribed
        // to now or by its own change, never by neither.
        while subscriptions.try_recv().is_ok() {}
        let channels: Vec<String> = shared.routes().keys().cloned().collect();
        if let Err(error) = sink.subscribe(&channels).await {
            log::warn!(target: "servercore", "bus: subscribing failed: {error}; retrying");
            backoff(&mut attempt).await;
            continue;
        }
        shared.came_back(&mut was_up, "subscribed again at");
        let up_since = Instant::now();
        shared.subscriber_up.store(true, Ordering::Relaxed);
        loop {
            tokio::select! {
                message = stream.next() => match message {
                    Some(message) => {
                        let channel = message.get_channel_name().to_owned();
                        shared.deliver(&channel, Bytes::copy_from_slice(message.get_payload_bytes()));
                    }
                    None => break,
                },
                Some(change) = subscriptions.recv() => {
                    let done = match change {
                        Subscription::Join(channel) => sink.subscribe(&channel).await,
                        Subscription::Leave(channel) => sink.unsubscribe(&channel).await,
                    };
                    if done.is_err() {
                        break;
                    }
                }
            }
        }
        shared.subscriber_up.store(false, Ordering::Relaxed);
        shared.lost.notify_one();
        log::warn!(target: "servercore", "bus: lost the subscription at {}; reconnecting", shared.config.url);
        settle_backoff(&mut attempt, up_since).await;
    }
}

/// Sends publishes and directory writes in order, batching what is queued
/// into one round trip; refreshes the directory every third of its TTL.
async fn publisher(shared: Arc<BusShared>, mut outgoing: mpsc::Receiver<Outgoing>) {
    let _down = Down { shared: &shared, publisher: true };
    let mut attempt = 0;
    let mut was_up = false;
    let ttl = shared.config.directory_ttl;
    let mut heartbeat = tokio::time::interval((ttl / 3).max(Duration::from_millis(100)));
    // After an outage, one heartbeat, not every one that was missed.
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut connection = match shared.client.get_multiplexed_async_connection().await {
            Ok(connection) => connection,
            Err(error) => {
                if attempt == 0 {
                    log::warn!(target: "servercore", "bus: cannot reach {}: {error}; retrying", shared.config.url);
                }
                // What was queued before Redis went away is lost: counted.
                drain_as_failed(&shared, &mut outgoing);
                backoff(&mut attempt).await;
                continue;
            }
        };
        shared.came_back(&mut was_up, "connected again to");
        let up_since = Instant::now();
        *shared.connection() = Some(connection.clone());
        shared.publisher_up.store(true, Ordering::Relaxed);
        let mut batch = Vec::with_capacity(PUBLISH_BATCH);
        let failed = loop {
            tokio::select! {
                received = outgoing.recv_many(&mut batch, PUBLISH_BATCH) => {
                    if received == 0 {
                        return; // the bus is gone
                    }
                    if let Err(error) = send_batch(&shared, &mut connection, &mut batch).await {
                        break error;
                    }
                }
                _ = heartbeat.tick() => {
                    if let Err(error) = refresh_directory(&shared, &mut connection).await {
                        break error;
                    }
                }
                _ = shared.lost.notified() => {
                    if let Err(error) = redis::cmd("PING").query_async::<()>(&mut connection).await {
                        break error;
                    }
                }
            }
        };
        shared.publisher_up.store(false, Ordering::Relaxed);
        *shared.connection() = None;
        log::warn!(target: "servercore", "bus: lost {}: {failed}; reconnecting", shared.config.url);
        settle_backoff(&mut attempt, up_since).await;
    }
}

async fn send_batch(
    shared: &BusShared,
    connection: &mut MultiplexedConnection,
    batch: &mut Vec<Outgoing>,
) -> redis::RedisResult<()> {
    let mut pipe = redis::pipe();
    // Redis may refuse one command (OOM, a read-only replica, an ACL) and
    // take the others: each is judged on its own, and only a broken
    // connection ends the connection.
    pipe.ignore_errors();
    let mut is_publish = Vec::with_capacity(batch.len());
    let ttl = shared.config.directory_ttl.as_secs().max(1);
    for item in batch.drain(..) {
        match item {
            Outgoing::Publish { channel, message } => {
                pipe.publish(channel, message.as_ref());
                is_publish.push(true);
            }
            Outgoing::Register { key, value } => {
                pipe.set_ex(key, value, ttl);
                is_publish.push(false);
            }
        }
    }
    let results = match pipe.query_async::<Vec<redis::RedisResult<redis::Value>>>(connection).await {
        Ok(results) => results,
        Err(error) => {
            let publishes = is_publish.iter().filter(|&&p| p).count() as u64;
            shared.stats.publish_failed.fetch_add(publishes, Ordering::Relaxed);
            return Err(error);
        }
    };
    let mut ended = Ok(());
    for (result, publish) in results.into_iter().zip(is_publish) {
        match result {
            Ok(_) if publish => {
                shared.stats.published.fetch_add(1, Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(error) => {
                if publish {
                    shared.stats.publish_failed.fetch_add(1, Ordering::Relaxed);
                }
                if ended.is_ok() {
                    ended = shared.refused(&error);
                }
            }
        }
    }
    ended
}

/// Deletes a directory entry only if it still names this session: the
/// player may have logged in again on another service meanwhile.
const DELETE_IF_OURS: &str =
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0";

/// Keeps the live sessions' names alive; forgets the ended ones'.
async fn refresh_directory(
    shared: &BusShared,
    connection: &mut MultiplexedConnection,
) -> redis::RedisResult<()> {
    let names: Vec<(String, SessionId)> = shared.names().iter().map(|(k, v)| (k.clone(), *v)).collect();
    if names.is_empty() {
        return Ok(());
    }
    let ttl = shared.config.directory_ttl.as_secs().max(1);
    let mut pipe = redis::pipe();
    pipe.ignore_errors();
    let mut ended = Vec::new();
    for (name, id) in names {
        let key = format!("{}:session:{name}", shared.config.prefix);
        let address = SessionAddress { node: shared.config.node.clone(), session: id }.to_string();
        if shared.service.registry.get(id).is_some() {
            pipe.set_ex(key, address, ttl);
        } else {
            pipe.cmd("EVAL").arg(DELETE_IF_OURS).arg(1).arg(key).arg(address);
            ended.push((name, id));
        }
    }
    let results = pipe.query_async::<Vec<redis::RedisResult<redis::Value>>>(connection).await?;
    if let Some(Err(error)) = results.into_iter().find(Result::is_err) {
        shared.refused(&error)?;
    }
    let mut names = shared.names();
    for (name, id) in ended {
        // Unless the name was registered again meanwhile, for another session.
        if names.get(&name) == Some(&id) {
            names.remove(&name);
        }
    }
    Ok(())
}

fn drain_as_failed(shared: &BusShared, outgoing: &mut mpsc::Receiver<Outgoing>) {
    while let Ok(item) = outgoing.try_recv() {
        if matches!(item, Outgoing::Publish { .. }) {
            shared.stats.publish_failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(id: u16, payload: &[u8]) -> Vec<u8> {
        let mut packet = ((HEADER_SIZE + payload.len()) as u16).to_le_bytes().to_vec();
        packet.extend(id.to_le_bytes());
        packet.extend(payload);
        packet
    }

    #[test]
    fn an_envelope_opens_to_what_was_put_in() {
        let packet = framed(7, b"hello");
        let to_all = envelope(TO_CHANNEL, None, &packet);
        assert_eq!(open_envelope(to_all), Some((None, Bytes::from(packet.clone()))));
        let to_one = envelope(TO_SESSION, Some(SessionId(42)), &packet);
        assert_eq!(open_envelope(to_one), Some((Some(SessionId(42)), Bytes::from(packet))));
    }

    #[test]
    fn a_message_that_is_not_one_whole_packet_is_refused() {
        let packet = framed(7, b"hello");
        let mut trailing = envelope(TO_CHANNEL, None, &packet).to_vec();
        trailing.push(0);
        let short = &envelope(TO_CHANNEL, None, &packet)[..8];
        for bad in [
            &[][..],
            &[9, 4, 0, 1, 0][..],
            &[TO_CHANNEL, 2, 0, 1, 0][..],
            &[TO_SESSION, 1, 2, 3][..],
            short,
            &trailing,
        ] {
            assert_eq!(open_envelope(Bytes::copy_from_slice(bad)), None, "{bad:?}");
        }
    }

    #[test]
    fn addresses_read_back_as_written() {
        let address = SessionAddress { node: "host-12/a".into(), session: SessionId(9) };
        assert_eq!(address.to_string(), "host-12/a/9");
        assert_eq!("host-12/a/9".parse::<SessionAddress>(), Ok(address));
        assert!("nonode".parse::<SessionAddress>().is_err());
        assert!("/9".parse::<SessionAddress>().is_err());
        assert!("n/x".parse::<SessionAddress>().is_err());
    }
}
