//! TSO segmentation, checksum completion and GRO coalescing, on a tun (IP
//! at offset 0) and on a tap (IP behind the Ethernet header, as the frame
//! says): whatever a (possibly hostile or buggy) kernel or peer hands over,
//! no panic; segments never exceed their source; a coalesced run never
//! exceeds 64 KiB plus the link-layer header.
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
    // The same as a tap frame, with the IP offset the frame's EtherType gives.
    if let Some(l2) = vnet::ip_offset(&packet) {
        if let Ok(count) = vnet::segment_count_at(&hdr, &packet, l2) {
            let mut out = vec![0u8; 65536 + 128];
            for i in 0..count.min(100) {
                if let Ok(n) = vnet::segment_at(&hdr, &packet, l2, i, &mut out) {
                    assert!(n <= packet.len());
                    assert_eq!(&out[..l2], &packet[..l2]);
                    if !gro.push_at(&out[..n], l2) {
                        if let Some(b) = gro.flush() {
                            assert!(b.len() <= vnet::LEN + 18 + 65535);
                        }
                        let _ = gro.push_at(&out[..n], l2);
                    }
                }
            }
        }
        if let Some(b) = gro.flush() {
            assert!(b.len() <= vnet::LEN + 18 + 65535);
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
