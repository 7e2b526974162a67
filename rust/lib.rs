//! servercore: the networking engine of an MMO-style game server, on tokio.
//!
//! The data flow, one way each:
//!
//! ```text
//! socket ─ reactor ─ driver ─> RecvBuffer ─> frame::check ─> Event::Packets ─> EventQueue ─batch─> application thread
//! application: send / broadcast ─> SendBufferPool (encode once) ─> SendQueue per session ─> driver ─> sendmsg
//! ```
//!
//! - [`frame`]: the `[size u16][id u16][payload]` header, checked before anything
//!   is waited for or allocated.
//! - [`recv_buffer`]: bytes read and not yet consumed; packets leave it without a copy.
//! - [`send_buffer`]: pooled chunks that packets are encoded into once and shared.
//! - [`send_queue`]: one session's outgoing packets and its writer-registered flag.
//! - [`session`]: a connection's handle (send, close) and its driver.
//! - [`reactor`]: one I/O thread's sessions, served over its own epoll set.
//! - [`doorbell`]: how another thread tells a reactor a session has work.
//! - [`coalesce`]: sends made during a batch of callbacks wake each writer once.
//! - [`registry`]: the open sessions and the broadcast over them.
//! - [`dispatch`]: events to the application thread, in batches.
//! - [`service`]: the runtime, the accept loop, the N-session client, shutdown.
//!
//! Nothing here knows Python; the PyO3 bindings live in `bindings` behind the
//! `python` feature and drive this crate like any other application would.

pub mod coalesce;
pub mod config;
pub mod dispatch;
pub mod doorbell;
pub mod frame;
pub mod reactor;
pub mod reason;
pub mod recv_buffer;
pub mod registry;
pub mod send_buffer;
pub mod send_queue;
pub mod service;
pub mod session;
pub mod stats;

#[cfg(feature = "python")]
mod bindings;

pub use config::{Framing, Keepalive, ServiceConfig, SessionConfig};
pub use dispatch::Event;
pub use reason::DisconnectReason;
pub use service::{Client, ConnectReport, Server, Service};
pub use session::{SessionHandle, SessionId};
