//! The pcap reader used to check recordings: any bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Whatever reads, writes back and reads again the same (snaplen permitting).
    if let Ok((linktype, records)) = tapir_wire::pcap::read(data) {
        let mut w = tapir_wire::pcap::PcapWriter::new(Vec::new(), linktype, u32::MAX).unwrap();
        for r in &records {
            w.write_packet(r.ts, r.data).unwrap();
        }
        let bytes = w.into_inner();
        let (lt, again) = tapir_wire::pcap::read(&bytes).unwrap();
        assert_eq!(lt, linktype);
        assert_eq!(again.len(), records.len());
        for (a, b) in again.iter().zip(&records) {
            assert_eq!(a.data, b.data);
            assert_eq!(a.ts, b.ts);
        }
    }
});
