//! servercore: the networking engine of an MMO-style game server, on tokio.
//!
//! The data flow, one way each:
//!
//! ```text
//! socket ─ reactor ─ driver ─> RecvBuffer ─> frame::check ─> Event::Packets ─> EventQueue ─batch─> application thread
//! application: send / broadcast ─> SendBufferPool (encode once) ─> SendQueue per session ─> driver ─> sendmsg
//! ```
//!
//! The modules, from the bottom up; each depends only on the ones above it
//! in this list:
//!
//! - [`clock`]: instants in 8 bytes, for the deadlines a connection keeps.
//! - [`frame`]: the `[size u16][id u16][payload]` header, checked before anything
//!   is waited for or allocated.
//! - [`recv_buffer`]: bytes read and not yet consumed; packets leave it without a copy.
//! - [`send_buffer`]: pooled chunks that packets are encoded into once and shared.
//! - [`reason`], [`config`], [`stats`]: why sessions end, the limits, the counters.
//! - [`log_limit`]: how many farewell warnings an attacker can make the server write.
//! - [`proxy_header`]: the PROXY protocol header a trusted load balancer sends first.
//! - [`wake_fd`]: an eventfd, to wake a thread that waits on descriptors.
//! - [`events`]: what crosses to the application, by session id, in batches.
//! - [`doorbell`], [`send_queue`]: how a session's driver is told of work, and
//!   one session's outgoing packets with its writer role.
//! - [`context`]: what every session of a service shares (limits, counters, events).
//! - [`session`]: a connection's handle: send, close, ask.
//! - [`coalesce`]: sends made during a batch of callbacks wake each writer once.
//! - [`connection`]: a connection's driver, which owns the socket.
//! - [`registry`]: the open sessions and the broadcast over them.
//! - [`accept_rate`]: how fast one address may open connections.
//! - [`admission`]: whether an accepted connection may become a session.
//! - [`room`]: groups of sessions to broadcast to; a session leaves them when it ends.
//! - [`reactor`]: one I/O thread's sessions, served over its own epoll set.
//! - [`inbox`]: the application's end of the events, and what it owes for each.
//! - [`service`]: the runtime, the accept loop, the N-session client, shutdown.
//! - [`bus`]: what crosses services (workers, machines), over Redis Pub/Sub.
//!
//! Nothing here knows Python; the PyO3 bindings live in `bindings` behind the
//! `python` feature and drive this crate like any other application would.

pub mod accept_rate;
pub mod admission;
pub mod bus;
pub mod clock;
pub mod coalesce;
pub mod config;
pub mod connection;
pub mod context;
pub mod doorbell;
pub mod events;
pub mod frame;
pub mod inbox;
pub mod log_limit;
pub mod proxy_header;
pub mod reactor;
pub mod reason;
pub mod recv_buffer;
pub mod registry;
pub mod room;
pub mod send_buffer;
pub mod send_queue;
pub mod service;
pub mod session;
pub mod stats;
pub mod wake_fd;

#[cfg(feature = "python")]
mod bindings;

pub use config::{ConfigError, Framing, Keepalive, ServiceConfig, SessionConfig};
pub use events::{Event, SessionId};
pub use inbox::{Application, Inbox, Known};
pub use reason::DisconnectReason;
pub use service::{Client, ConnectReport, Server, Service};
pub use session::SessionHandle;
