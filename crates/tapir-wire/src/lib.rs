//! tapir's formats, with no I/O and no unsafe code.
//!
//! ```text
//!   bytes from a tun/tap fd ─▶ pi::PacketInfo (optional 4-byte header)
//!                            ─▶ summary::summarize  (one tcpdump-style line, via etherparse)
//!                            ─▶ pcap::PcapWriter    (LINKTYPE_RAW for tun, ETHERNET for tap)
//!   in-place edits           ─▶ checksum::{checksum, update16}  (RFC 1071, RFC 1624)
//! ```
//!
//! Ethernet, ARP, IP, ICMP, UDP and TCP are parsed by `etherparse`; this crate
//! owns only the formats that are ours (pcap framing, the packet-information
//! header) and the checksum arithmetic that in-place rewrites need. It does
//! not read devices or files: callers pass byte slices and `Write`rs.

#![forbid(unsafe_code)]

pub mod checksum;
pub mod pcap;
pub mod pi;
pub mod summary;
pub mod tcpframe;
pub mod vnet;
