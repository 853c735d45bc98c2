//! tapir: a Linux TUN/TAP toolkit and tunnel daemon.
//!
//! ```text
//!   tapir (binary) ── main.rs: flags → validated requests → these modules
//!      ├─ dev     persistent tun/tap devices: add, del, list, show, set (with rollback)
//!      ├─ echo    answer pings on a tun/tap device (tapir-proto's responder)
//!      ├─ dump    read a device, print a line per packet, write pcap
//!      ├─ capture attach as a device's reader with its own flags
//!      ├─ doctor  what the kernel and this process can do
//!      ├─ config  wg-quick and TOML tunnel files, checked before any kernel call
//!      ├─ tunnel  `tapir run`: the datapath (tun|tap x UDP|TCP), tcp transport, control thread
//!      ├─ uapi    WireGuard's control socket protocol (wg show / wg set), tapir-get
//!      ├─ service `tapir up/down/status`: background tunnels, pid and log files
//!      ├─ demo    the lab: two namespaces and a tunnel
//!      ├─ caps    capabilities of this process
//!      └─ users   user and group names
//!   all kernel calls go through tapir-sys
//! ```
//!
//! This crate holds no unsafe code; it decides what to do and in which
//! order, and how to undo it, while `tapir-sys` does the system calls.

pub mod caps;
pub mod capture;
pub mod config;
pub mod demo;
pub mod dev;
pub mod devices;
pub mod doctor;
pub mod dump;
pub mod echo;
pub mod explain;
pub mod guestnet;
pub mod nat;
pub mod notify;
pub mod qemu;
pub mod saveconfig;
pub mod scope;
pub mod service;
pub mod tunnel;
pub mod uapi;
pub mod users;
