//! tapir: a Linux TUN/TAP toolkit and tunnel daemon.
//!
//! ```text
//!   tapir (binary) ── main.rs: flags → validated requests → these wings
//!      ├─ device/   dev (add, del, list, show, set with rollback), doctor, caps, users
//!      ├─ packets/  echo (the responder), dump and capture (reader, pcap), explain
//!      ├─ tunnel/   `tapir run`: the datapath (tun|tap x UDP|TCP), tcp transport, control
//!      │            thread, config (wg-quick, TOML), uapi (wg show / wg set), ops (routes,
//!      │            rules, hooks, DNS), reload, engine (wg-quick's userspace WireGuard), saveconfig
//!      └─ ops/      service (up/down/status/reload), scope (namespaces), notify (systemd),
//!                   demo, qemu (ifup/ifdown), nat, guestnet (bridge, NAT, DHCP), devices (at boot)
//!   all kernel calls go through tapir-sys
//! ```
//!
//! This crate holds no unsafe code; it decides what to do and in which
//! order, and how to undo it, while `tapir-sys` does the system calls.

pub mod device;
pub mod ops;
pub mod packets;
pub mod tunnel;

// The modules by their short names, wherever their wing is.
pub use device::{caps, dev, doctor, users};
pub use ops::{demo, devices, guestnet, nat, notify, qemu, scope, service};
pub use packets::{capture, dump, echo, explain};
pub use tunnel::{config, saveconfig, uapi};
