//! The tun driver's packet-information header (devices without `IFF_NO_PI`):
//! `flags: u16` (host order; `TUN_PKT_STRIP` = 1) then `proto: u16`, the
//! ethertype, big-endian.

/// Its length.
pub const LEN: usize = 4;

/// Set by the kernel when the packet was truncated to fit the read buffer.
pub const TUN_PKT_STRIP: u16 = 0x0001;

/// A parsed packet-information header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PacketInfo {
    /// Flags (`TUN_PKT_STRIP`).
    pub flags: u16,
    /// Ethertype of the packet: 0x0800 IPv4, 0x86dd IPv6.
    pub proto: u16,
}

impl PacketInfo {
    /// Splits a header off `buf`; `None` if it is shorter than 4 bytes.
    pub fn parse(buf: &[u8]) -> Option<(Self, &[u8])> {
        let (head, rest) = buf.split_first_chunk::<LEN>()?;
        Some((
            Self {
                flags: u16::from_ne_bytes([head[0], head[1]]),
                proto: u16::from_be_bytes([head[2], head[3]]),
            },
            rest,
        ))
    }

    /// Writes the header into the first 4 bytes of `buf` (at least 4 long).
    pub fn emit(&self, buf: &mut [u8]) {
        buf[0..2].copy_from_slice(&self.flags.to_ne_bytes());
        buf[2..4].copy_from_slice(&self.proto.to_be_bytes());
    }

    /// Whether the kernel truncated the packet.
    pub fn truncated(&self) -> bool {
        self.flags & TUN_PKT_STRIP != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_short_input() {
        let pi = PacketInfo {
            flags: 0,
            proto: 0x86dd,
        };
        let mut buf = [0u8; 6];
        pi.emit(&mut buf);
        assert_eq!(&buf[2..4], &[0x86, 0xdd], "proto is big-endian");
        let (back, rest) = PacketInfo::parse(&buf).unwrap();
        assert_eq!(back, pi);
        assert_eq!(rest.len(), 2);
        assert!(!back.truncated());
        assert!(PacketInfo::parse(&buf[..3]).is_none());
    }
}
