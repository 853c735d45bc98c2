//! The Linux kernel side of tapir, and the only crate of it with `unsafe`.
//!
//! ```text
//!   tapir (CLI, daemon) ──▶ tapir-sys ──┬─ tun:     /dev/net/tun + TUNSETIFF/PERSIST/OWNER/GROUP/OFFLOAD
//!                                       ├─ netlink: links, addresses, routes (rtnetlink)
//!                                       ├─ netns:   setns for the calling thread
//!                                       ├─ mmsg, poll: batched UDP (GSO, GRO), waiting on many fds
//!                                       ├─ raw:     read/write/poll/recvmmsg/sendmmsg, made directly
//!                                       ├─ caps:    keep CAP_NET_ADMIN and CAP_NET_BIND_SERVICE only, after set-up
//!                                       └─ ifname:  interface names, checked before any call
//! ```
//!
//! Every unsafe block is a single system call with a `// SAFETY:` line, and
//! every failure carries the operation, the device and the errno, with a hint
//! saying what to do. This crate never sees a key and holds no policy: what
//! to create and how to roll back is the caller's business.
//!
//! A short program that does what the classic `tun_alloc()` did:
//!
//! ```no_run
//! use std::path::Path;
//! use tapir_sys::{IfName, Mode, Netlink, TunDevice, TunOptions, DEFAULT_TUN_PATH};
//!
//! let name = IfName::new("tun%d")?;
//! let tun = TunDevice::open(Path::new(DEFAULT_TUN_PATH), &name, TunOptions::new(Mode::Tun))?;
//! let mut nl = Netlink::open()?;
//! let link = nl.link(tun.name().as_str())?.expect("the device we just made");
//! nl.add_address(link.index, "10.0.0.1/24".parse()?, None)?;
//! nl.set_up(link.index, true)?;
//! let mut buf = [0u8; 2048];
//! let n = tun.read(&mut buf)?;
//! println!("read {n} bytes from {}", tun.name());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![deny(unsafe_op_in_unsafe_fn)]

pub mod caps;
pub mod ifname;
pub mod interrupt;
pub mod localtime;
pub mod mmsg;
pub mod netlink;
pub mod netns;
pub mod poll;
pub mod process;
pub mod random;
pub mod raw;
pub mod tun;

pub use ifname::{IfName, NameError};
pub use netlink::{
    Address, Link, LinkState, MAIN_TABLE, Netlink, NetlinkError, RefusingRule, Route, RouteLookup,
    Rule, TunInfo,
};
pub use tun::{DEFAULT_TUN_PATH, Mode, TunDevice, TunError, TunFeatures, TunOptions, offload};
