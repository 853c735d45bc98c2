//! Devices: tun/tap devices, doctor, users and capabilities.

pub mod caps;
pub mod dev;
pub mod doctor;
pub mod users;
