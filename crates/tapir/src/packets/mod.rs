//! Packets: the echo responder, the dump and its capture, and explain.

pub mod capture;
pub mod dump;
pub mod echo;
pub mod explain;
