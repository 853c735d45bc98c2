//! TSO segmentation, checksum completion and GRO coalescing: whatever a
//! (possibly hostile or buggy) kernel or peer hands over, no panic; segments
//! never exceed their source; a coalesced run never exceeds 64 KiB.
#![no_main]
use libfuzzer_sys::fuzz_target;
use tapir_wire::vnet::{self, Coalescer, VnetHeader};

fuzz_target!(|data: &[u8]| {
    let Some(hdr) = VnetHeader::parse(data) else { return };
    let mut packet = data[vnet::LEN..].to_vec();
    let _ = vnet::finish_checksum(&hdr, &mut packet);
    let mut gro = Coalescer::new();
    if let Ok(count) = vnet::segment_count(&hdr, &packet) {
        let mut out = vec![0u8; 65536 + 128];
        for i in 0..count.min(100) {
            if let Ok(n) = vnet::segment(&hdr, &packet, i, &mut out) {
                assert!(n <= packet.len());
                if !gro.push(&out[..n]) {
                    if let Some(b) = gro.flush() {
                        assert!(b.len() <= vnet::LEN + 65535);
                    }
                    let _ = gro.push(&out[..n]);
                }
            }
        }
    }
    // Arbitrary packets too: split the rest at 0xff bytes.
    for chunk in packet.split(|&b| b == 0xff) {
        if !gro.push(chunk) {
            let _ = gro.flush();
        }
    }
    if let Some(b) = gro.flush() {
        assert!(b.len() <= vnet::LEN + 65535);
    }
});
