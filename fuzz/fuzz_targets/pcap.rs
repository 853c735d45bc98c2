//! The pcap reader used to check recordings: any bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((_, records)) = tapir_wire::pcap::read(data) {
        for r in records {
            assert!(r.data.len() <= data.len());
        }
    }
});
