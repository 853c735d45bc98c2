//! tapir: a Linux TUN/TAP toolkit and tunnel daemon.
//!
//! ```text
//!   tapir (binary) ── main.rs: flags → validated requests → these modules
//!      ├─ dev     persistent tun/tap devices: add, del, list, show, set (with rollback)
//!      ├─ doctor  what the kernel and this process can do
//!      ├─ caps    capabilities of this process
//!      └─ users   user and group names
//!   all kernel calls go through tapir-sys
//! ```
//!
//! This crate holds no unsafe code; it decides what to do and in which
//! order, and how to undo it, while `tapir-sys` does the system calls.

pub mod caps;
pub mod dev;
pub mod doctor;
pub mod users;
