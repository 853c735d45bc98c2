//! Classic pcap files (the format of `tcpdump -w`), microsecond timestamps.
//!
//! ```text
//!   file header (24 bytes): magic a1b2c3d4, version 2.4, zone 0, sigfigs 0, snaplen, linktype
//!   record (16 bytes + data): ts_sec, ts_usec, captured length, original length
//! ```
//! Written in this machine's byte order, which readers detect from the magic.

use std::io::{self, Write};
use std::time::Duration;

/// `LINKTYPE_ETHERNET`: tap devices.
pub const LINKTYPE_ETHERNET: u32 = 1;
/// `LINKTYPE_RAW`: IPv4 or IPv6 with no link header, tun devices.
pub const LINKTYPE_RAW: u32 = 101;
/// The snap length tcpdump uses by default.
pub const DEFAULT_SNAPLEN: u32 = 262_144;

const MAGIC: u32 = 0xa1b2_c3d4;

/// Writes a pcap stream to `W`.
#[derive(Debug)]
pub struct PcapWriter<W: Write> {
    out: W,
    snaplen: u32,
}

impl<W: Write> PcapWriter<W> {
    /// Writes the file header. `snaplen` caps what each record keeps (0 means the default).
    pub fn new(mut out: W, linktype: u32, snaplen: u32) -> io::Result<Self> {
        let snaplen = if snaplen == 0 {
            DEFAULT_SNAPLEN
        } else {
            snaplen
        };
        let mut header = [0u8; 24];
        header[0..4].copy_from_slice(&MAGIC.to_ne_bytes());
        header[4..6].copy_from_slice(&2u16.to_ne_bytes());
        header[6..8].copy_from_slice(&4u16.to_ne_bytes());
        header[16..20].copy_from_slice(&snaplen.to_ne_bytes());
        header[20..24].copy_from_slice(&linktype.to_ne_bytes());
        out.write_all(&header)?;
        Ok(Self { out, snaplen })
    }

    /// Appends one packet seen at `ts` (since the Unix epoch).
    pub fn write_packet(&mut self, ts: Duration, data: &[u8]) -> io::Result<()> {
        let caplen = data.len().min(self.snaplen as usize);
        let mut rec = [0u8; 16];
        rec[0..4].copy_from_slice(&(ts.as_secs() as u32).to_ne_bytes());
        rec[4..8].copy_from_slice(&ts.subsec_micros().to_ne_bytes());
        rec[8..12].copy_from_slice(&(caplen as u32).to_ne_bytes());
        rec[12..16].copy_from_slice(&(data.len() as u32).to_ne_bytes());
        self.out.write_all(&rec)?;
        self.out.write_all(&data[..caplen])
    }

    /// Flushes buffered records.
    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    /// Gives back the writer.
    pub fn into_inner(self) -> W {
        self.out
    }
}

/// One record read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record<'a> {
    /// Timestamp since the epoch.
    pub ts: Duration,
    /// Length on the wire.
    pub orig_len: u32,
    /// The captured bytes.
    pub data: &'a [u8],
}

/// Why a pcap stream could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PcapError(pub &'static str);

impl std::fmt::Display for PcapError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "not a readable pcap file: {}", self.0)
    }
}

impl std::error::Error for PcapError {}

/// Reads a whole pcap file in memory: its link type and records. Both byte
/// orders; truncated or oversized records are errors, never panics.
pub fn read(file: &[u8]) -> Result<(u32, Vec<Record<'_>>), PcapError> {
    let header = file.get(..24).ok_or(PcapError("shorter than its header"))?;
    let word = |b: &[u8], swap: bool| {
        let v = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
        if swap { v.swap_bytes() } else { v }
    };
    let swap = match word(header, false) {
        MAGIC => false,
        m if m.swap_bytes() == MAGIC => true,
        _ => return Err(PcapError("bad magic number")),
    };
    let linktype = word(&header[20..24], swap);
    let mut records = Vec::new();
    let mut rest = &file[24..];
    while !rest.is_empty() {
        let rec = rest.get(..16).ok_or(PcapError("truncated record header"))?;
        let caplen = word(&rec[8..12], swap) as usize;
        let data = rest
            .get(16..16usize.saturating_add(caplen))
            .ok_or(PcapError("truncated record"))?;
        records.push(Record {
            ts: Duration::new(
                u64::from(word(&rec[0..4], swap)),
                word(&rec[4..8], swap).min(999_999) * 1000,
            ),
            orig_len: word(&rec[12..16], swap),
            data,
        });
        rest = &rest[16 + caplen..];
    }
    Ok((linktype, records))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_then_read() {
        let mut w = PcapWriter::new(Vec::new(), LINKTYPE_RAW, 8).unwrap();
        w.write_packet(Duration::new(1_700_000_000, 123_456_000), &[1, 2, 3])
            .unwrap();
        w.write_packet(Duration::new(1_700_000_001, 0), &[9; 20])
            .unwrap();
        let bytes = w.into_inner();
        assert_eq!(
            bytes.len(),
            24 + 16 + 3 + 16 + 8,
            "the second record is cut to the snaplen"
        );
        let (lt, recs) = read(&bytes).unwrap();
        assert_eq!(lt, LINKTYPE_RAW);
        assert_eq!(recs[0].data, &[1, 2, 3]);
        assert_eq!(recs[0].ts, Duration::new(1_700_000_000, 123_456_000));
        assert_eq!(recs[1].orig_len, 20);
        assert_eq!(recs[1].data.len(), 8);
    }

    #[test]
    fn bad_files_are_errors() {
        assert!(read(&[0; 10]).is_err());
        assert!(read(&[0; 24]).is_err());
        let mut w = PcapWriter::new(Vec::new(), LINKTYPE_ETHERNET, 0).unwrap();
        w.write_packet(Duration::ZERO, &[7; 30]).unwrap();
        let bytes = w.into_inner();
        assert!(read(&bytes[..bytes.len() - 1]).is_err());
        assert!(read(&bytes[..30]).is_err());
        // The same file written on the other byte order reads the same.
        let mut swapped = bytes.clone();
        for chunk in [0..4, 20..24, 24..28, 28..32, 32..36, 36..40] {
            swapped[chunk].reverse();
        }
        swapped[4..6].reverse();
        swapped[6..8].reverse();
        swapped[16..20].reverse();
        assert_eq!(read(&swapped).unwrap(), read(&bytes).unwrap());
    }
}
