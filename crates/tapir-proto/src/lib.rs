//! tapir's protocol logic, with no I/O: bytes in, bytes out.
//!
//! ```text
//!   device read ─▶ &mut [u8] ─▶ echo::Responder::handle ─▶ Outcome::Reply(len): write buf[..len] back
//!                                                       └▶ Outcome::Ignored(why): counted, nothing sent
//! ```
//!
//! Nothing here opens a device, reads a clock or draws randomness: a MAC
//! address or a time is a parameter, so every path can be driven by unit
//! tests and fuzzers. Beside the echo responder: the WireGuard tunnel (`wg`),
//! the tap-mode switch's MAC table (`switch`) and the rate limit (`bucket`).

#![forbid(unsafe_code)]

pub mod bucket;
pub mod dhcp;
pub mod echo;
pub mod switch;
pub mod wg;
