//! The packet decoder of `tapir dump`: any bytes, as IP or as Ethernet.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tapir_wire::summary::{Link, summarize};

fuzz_target!(|data: &[u8]| {
    let _ = summarize(Link::Ip, data);
    let _ = summarize(Link::Ethernet, data);
});
