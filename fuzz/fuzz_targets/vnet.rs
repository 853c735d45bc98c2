//! TSO segmentation and checksum completion: whatever a (possibly hostile
//! or buggy) kernel hands over, no panic, and segments never exceed the MSS.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tapir_wire::vnet::{self, VnetHeader};

fuzz_target!(|data: &[u8]| {
    let Some(hdr) = VnetHeader::parse(data) else { return };
    let mut packet = data[vnet::LEN..].to_vec();
    let _ = vnet::finish_checksum(&hdr, &mut packet);
    if let Ok(count) = vnet::segment_count(&hdr, &packet) {
        let mut out = vec![0u8; 65536 + 128];
        for i in 0..count.min(100) {
            if let Ok(n) = vnet::segment(&hdr, &packet, i, &mut out) {
                assert!(n <= packet.len());
            }
        }
    }
});
