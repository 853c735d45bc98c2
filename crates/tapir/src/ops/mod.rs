//! Operations around devices and tunnels: background tunnels and their
//! services, VM networks, NAT, devices at boot, the demo.

pub mod demo;
pub mod devices;
pub mod guestnet;
pub mod nat;
pub mod notify;
pub mod qemu;
pub mod scope;
pub mod service;
