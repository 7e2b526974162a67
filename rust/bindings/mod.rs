//! The only PyO3 code: the `servercore._core` extension module.
//!
//! - [`session`]: `Session` and `PacketSession`, the classes game code subclasses.
//! - [`send_buffer`]: `SendBuffer`, and the payload forms `send` accepts.
//! - [`options`]: Python values to engine values, checked against the engine's ranges.
//! - [`service`]: `Service`, `Server` and `Client`, and which thread runs callbacks.
//! - [`session_class`]: a session class's framing, and how its callbacks are called.
//! - [`dispatcher`]: engine events turned into callbacks inside `poll()`.
//! - [`scheduler`]: timers and posted calls, run by the polling thread with the callbacks.
//! - [`packet_layout`]: a typed packet class's wire layout, and its decoder.
//! - [`packet_encode`]: a typed packet encoded by its layout.
//! - [`router`]: packet ids to handlers; routed sessions are dispatched without a Python frame.
//! - [`room`]: `Room`, a group of sessions to broadcast to.
//! - [`bus`]: `Bus`, a server's link to its cluster over Redis.
//! - [`logging`]: the engine's log records, emitted through Python's `logging`.

mod bus;
mod dispatcher;
mod logging;
mod options;
mod packet_encode;
mod packet_layout;
mod room;
mod router;
mod scheduler;
mod send_buffer;
mod service;
mod session;
mod session_class;

use pyo3::prelude::*;

use crate::reason::DisconnectReason;

#[pymodule]
fn _core(module: &Bound<'_, PyModule>) -> PyResult<()> {
    logging::install(module)?;
    module.add_class::<session::PySession>()?;
    module.add_class::<session::PyPacketSession>()?;
    module.add_class::<send_buffer::PySendBuffer>()?;
    module.add_class::<service::PyService>()?;
    module.add_class::<service::PyServer>()?;
    module.add_class::<service::PyClient>()?;
    module.add_class::<scheduler::PyTimer>()?;
    module.add_class::<room::PyRoom>()?;
    module.add_class::<packet_layout::PyPacketLayout>()?;
    module.add_class::<router::PyRouteTable>()?;
    module.add("MalformedPacket", module.py().get_type::<packet_layout::MalformedPacket>())?;
    module.add_class::<bus::PyBus>()?;
    module.add_function(wrap_pyfunction!(bus::_bus_stats, module)?)?;
    // The engine's reasons, by code; servercore.DisconnectReason is checked against it.
    let reasons: Vec<(u8, &str)> = DisconnectReason::ALL.iter().map(|r| (r.code(), r.name())).collect();
    module.add("DISCONNECT_REASONS", reasons)?;
    module.add("MAX_PACKET_SIZE", crate::frame::MAX_WIRE_PACKET_SIZE)?;
    module.add("HEADER_SIZE", crate::frame::HEADER_SIZE)?;
    module.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
