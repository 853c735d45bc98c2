//! The virtio-net header in front of packets on an `IFF_VNET_HDR` tun device,
//! and what it asks of the reader: finishing a partial checksum, or cutting a
//! TCP super-packet (TSO) into segments.
//!
//! ```text
//!   flags u8 | gso_type u8 | hdr_len u16 | gso_size u16 | csum_start u16 | csum_offset u16   (10 bytes, host order)
//! ```
//! Reading 64 KiB super-packets instead of MTU-sized ones is what saves the
//! system calls and the kernel's per-packet TCP work on the sending side.

use crate::checksum;

/// Length of the header (`struct virtio_net_hdr`, the tun default).
pub const LEN: usize = 10;
/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`: the checksum at csum_start + csum_offset is partial.
pub const F_NEEDS_CSUM: u8 = 1;
/// Not a GSO packet.
pub const GSO_NONE: u8 = 0;
/// IPv4 TCP super-packet.
pub const GSO_TCPV4: u8 = 1;
/// IPv6 TCP super-packet.
pub const GSO_TCPV6: u8 = 4;
/// ECN bit, or-ed into gso_type.
pub const GSO_ECN: u8 = 0x80;

/// A parsed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VnetHeader {
    /// `F_NEEDS_CSUM` and others.
    pub flags: u8,
    /// `GSO_*`.
    pub gso_type: u8,
    /// Length of the headers (a hint; recomputed here).
    pub hdr_len: u16,
    /// Payload bytes per segment.
    pub gso_size: u16,
    /// Where checksumming starts.
    pub csum_start: u16,
    /// Where, from csum_start, the checksum goes.
    pub csum_offset: u16,
}

/// Why a packet could not be finished or segmented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VnetError;

impl VnetHeader {
    /// Reads the first 10 bytes.
    pub fn parse(buf: &[u8]) -> Option<Self> {
        let b = buf.get(..LEN)?;
        let u = |i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
        Some(Self {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
        })
    }

    /// Whether the packet is a super-packet to cut.
    pub fn is_gso(&self) -> bool {
        self.gso_type & !GSO_ECN != GSO_NONE
    }
}

/// Completes a partial checksum in place (`F_NEEDS_CSUM` on a packet that is
/// not GSO): the field holds the pseudo-header sum; the checksum of
/// everything from csum_start is what belongs there.
pub fn finish_checksum(hdr: &VnetHeader, packet: &mut [u8]) -> Result<(), VnetError> {
    if hdr.flags & F_NEEDS_CSUM == 0 {
        return Ok(());
    }
    let start = usize::from(hdr.csum_start);
    let at = start + usize::from(hdr.csum_offset);
    if at + 2 > packet.len() {
        return Err(VnetError);
    }
    let c = checksum::checksum(&packet[start..]);
    packet[at..at + 2].copy_from_slice(&c.to_be_bytes());
    Ok(())
}

/// The IP and TCP header lengths of a TCP packet, and whether it is IPv4.
fn tcp_headers(packet: &[u8]) -> Option<(usize, usize, bool)> {
    let (ip_len, v4) = match packet.first()? >> 4 {
        4 => (usize::from(packet[0] & 0xf) * 4, true),
        6 => (40, false),
        _ => return None,
    };
    let proto = if v4 { *packet.get(9)? } else { *packet.get(6)? };
    if proto != 6 || ip_len < 20 {
        return None;
    }
    let tcp_len = usize::from(packet.get(ip_len + 12)? >> 4) * 4;
    (tcp_len >= 20 && ip_len + tcp_len <= packet.len()).then_some((ip_len, tcp_len, v4))
}

/// Where the IP header starts in an Ethernet frame on a tap: after the
/// 14-byte header, or 18 with one VLAN tag; `None` if the frame carries
/// neither IPv4 nor IPv6.
pub fn ip_offset(frame: &[u8]) -> Option<usize> {
    let ethertype = |at: usize| Some(u16::from_be_bytes([*frame.get(at)?, *frame.get(at + 1)?]));
    match ethertype(12)? {
        0x0800 | 0x86dd => Some(14),
        0x8100 => matches!(ethertype(16)?, 0x0800 | 0x86dd).then_some(18),
        _ => None,
    }
}

/// [`segment_count`] for a frame whose IP header starts at `l2` (a tap's
/// Ethernet frame; 0 on a tun).
pub fn segment_count_at(hdr: &VnetHeader, frame: &[u8], l2: usize) -> Result<usize, VnetError> {
    segment_count(hdr, frame.get(l2..).ok_or(VnetError)?)
}

/// [`segment`] for a frame whose IP header starts at `l2`: the link-layer
/// header is copied in front of every segment.
pub fn segment_at(
    hdr: &VnetHeader,
    frame: &[u8],
    l2: usize,
    index: usize,
    out: &mut [u8],
) -> Result<usize, VnetError> {
    if frame.len() < l2 || out.len() < l2 {
        return Err(VnetError);
    }
    out[..l2].copy_from_slice(&frame[..l2]);
    Ok(l2 + segment(hdr, &frame[l2..], index, &mut out[l2..])?)
}

/// Whether the TCP checksum of the IP packet `packet` (IP header of
/// `ip_len` bytes) is right.
fn tcp_checksum_ok(packet: &[u8], ip_len: usize, v4: bool) -> bool {
    let seg_len = (packet.len() - ip_len) as u32;
    let pseudo = if v4 {
        let s = checksum::add(checksum::add(0, &packet[12..16]), &packet[16..20]);
        checksum::add(s, &[0, 6, (seg_len >> 8) as u8, seg_len as u8])
    } else {
        let src: [u8; 16] = packet[8..24].try_into().expect("16 bytes");
        let dst: [u8; 16] = packet[24..40].try_into().expect("16 bytes");
        checksum::ipv6_pseudo(&src, &dst, seg_len, 6)
    };
    checksum::finish(checksum::add(pseudo, &packet[ip_len..])) == 0
}

/// How many segments a TSO super-packet makes.
pub fn segment_count(hdr: &VnetHeader, packet: &[u8]) -> Result<usize, VnetError> {
    let (ip_len, tcp_len, _) = tcp_headers(packet).ok_or(VnetError)?;
    let mss = usize::from(hdr.gso_size);
    if mss == 0 {
        return Err(VnetError);
    }
    Ok((packet.len() - ip_len - tcp_len).div_ceil(mss).max(1))
}

/// Writes segment `index` of the TSO super-packet `packet` into `out` and
/// returns its length: headers copied, lengths, IPv4 id, TCP sequence number
/// and flags adjusted, both checksums computed. `out` needs the headers plus
/// `gso_size` bytes.
pub fn segment(
    hdr: &VnetHeader,
    packet: &[u8],
    index: usize,
    out: &mut [u8],
) -> Result<usize, VnetError> {
    let (ip_len, tcp_len, v4) = tcp_headers(packet).ok_or(VnetError)?;
    let hl = ip_len + tcp_len;
    let mss = usize::from(hdr.gso_size);
    let count = segment_count(hdr, packet)?;
    if index >= count {
        return Err(VnetError);
    }
    let payload = &packet[hl..];
    let chunk = &payload[(index * mss).min(payload.len())..((index + 1) * mss).min(payload.len())];
    let len = hl + chunk.len();
    if out.len() < len {
        return Err(VnetError);
    }
    out[..hl].copy_from_slice(&packet[..hl]);
    out[hl..len].copy_from_slice(chunk);
    if v4 {
        out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        let id = u16::from_be_bytes([out[4], out[5]]).wrapping_add(index as u16);
        out[4..6].copy_from_slice(&id.to_be_bytes());
        out[10..12].fill(0);
        let c = checksum::checksum(&out[..ip_len]);
        out[10..12].copy_from_slice(&c.to_be_bytes());
    } else {
        out[4..6].copy_from_slice(&((len - 40) as u16).to_be_bytes());
    }
    let tcp = ip_len;
    let seq = u32::from_be_bytes([out[tcp + 4], out[tcp + 5], out[tcp + 6], out[tcp + 7]]);
    let seq = seq.wrapping_add((index * mss) as u32);
    out[tcp + 4..tcp + 8].copy_from_slice(&seq.to_be_bytes());
    // FIN and PSH belong to the last segment only, CWR to the first only.
    if index + 1 < count {
        out[tcp + 13] &= !(0x01 | 0x08);
    }
    if index > 0 {
        out[tcp + 13] &= !0x80;
    }
    out[tcp + 16..tcp + 18].fill(0);
    let seg_len = (len - tcp) as u32;
    let pseudo = if v4 {
        let s = checksum::add(checksum::add(0, &out[12..16]), &out[16..20]);
        checksum::add(s, &[0, 6, (seg_len >> 8) as u8, seg_len as u8])
    } else {
        let src: [u8; 16] = out[8..24].try_into().expect("16 bytes");
        let dst: [u8; 16] = out[24..40].try_into().expect("16 bytes");
        checksum::ipv6_pseudo(&src, &dst, seg_len, 6)
    };
    let c = checksum::finish(checksum::add(pseudo, &out[tcp..len]));
    out[tcp + 16..tcp + 18].copy_from_slice(&c.to_be_bytes());
    Ok(len)
}

/// Receive-side coalescing (GRO): consecutive TCP segments of one flow are
/// joined into one super-packet, written to the tun device in one call with
/// a GSO virtio-net header; the kernel's TCP sees one big packet.
///
/// Segments join while they have the same IP and TCP headers (but for
/// lengths, ids, sequence numbers and checksums), the next sequence number,
/// flags ACK (PSH ends the run), and no more payload than the first.
#[derive(Debug)]
pub struct Coalescer {
    buf: Vec<u8>,
    /// Bytes of link-layer header in front of the IP header (14 on a tap).
    l2: usize,
    /// Bytes from the IP header on.
    len: usize,
    ip_len: usize,
    tcp_len: usize,
    v4: bool,
    mss: usize,
    next_seq: u32,
    count: usize,
    closed: bool,
}

/// The most a super-packet may hold (the IP length field's limit).
const MAX_SUPER: usize = 65535;
/// The longest link-layer header kept in front (Ethernet with one VLAN tag).
const MAX_L2: usize = 18;

impl Default for Coalescer {
    fn default() -> Self {
        Self::new()
    }
}

impl Coalescer {
    /// An empty coalescer with its buffer (header and 64 KiB) allocated once.
    pub fn new() -> Self {
        Self {
            buf: vec![0; LEN + MAX_L2 + MAX_SUPER],
            l2: 0,
            len: 0,
            ip_len: 0,
            tcp_len: 0,
            v4: true,
            mss: 0,
            next_seq: 0,
            count: 0,
            closed: false,
        }
    }

    /// Whether a run is being built.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Adds `packet` to the current run, or starts one. `false`: it does not
    /// join (another flow, a gap, other flags, not TCP); flush, then push it
    /// again, and if it still does not join, write it on its own.
    pub fn push(&mut self, packet: &[u8]) -> bool {
        self.push_at(packet, 0)
    }

    /// [`Coalescer::push`] for a frame whose IP header starts at `l2` (a
    /// tap's Ethernet frame): frames join only with the same link-layer header.
    pub fn push_at(&mut self, frame: &[u8], l2: usize) -> bool {
        if l2 > MAX_L2 || frame.len() < l2 {
            return false;
        }
        let (link, packet) = frame.split_at(l2);
        let Some((ip_len, tcp_len, v4)) = tcp_headers(packet) else {
            return false;
        };
        let hl = ip_len + tcp_len;
        // The packet as its IP header sizes it: an Ethernet frame's padding
        // (a short segment's, to 60 bytes) is not payload; one shorter than
        // its header says, or an IPv4 header whose checksum is wrong (the
        // joined packet's is computed afresh), never joins.
        let total = if v4 {
            usize::from(u16::from_be_bytes([packet[2], packet[3]]))
        } else {
            40 + usize::from(u16::from_be_bytes([packet[4], packet[5]]))
        };
        if total < hl || total > packet.len() {
            return false;
        }
        let packet = &packet[..total];
        if v4 && checksum::finish(checksum::add(0, &packet[..ip_len])) != 0 {
            return false;
        }
        let payload = packet.len() - hl;
        let flags = packet[ip_len + 13];
        // ACK, with PSH allowed (it ends the run); nothing else (SYN, FIN, RST, URG, ECE, CWR).
        if payload == 0 || flags & !0x08 != 0x10 {
            return false;
        }
        // IPv4: no options, not a fragment; the real length must match.
        if v4 && (ip_len != 20 || u16::from_be_bytes([packet[6], packet[7]]) & 0x3fff != 0) {
            return false;
        }
        // A segment whose TCP checksum is wrong never joins: the joined
        // packet's checksum is computed afresh and would hide the damage.
        // Written on its own, the kernel checks it and drops it.
        if !tcp_checksum_ok(packet, ip_len, v4) {
            return false;
        }
        let seq = u32::from_be_bytes([
            packet[ip_len + 4],
            packet[ip_len + 5],
            packet[ip_len + 6],
            packet[ip_len + 7],
        ]);
        if self.count == 0 {
            if LEN + l2 + packet.len() > self.buf.len() {
                return false;
            }
            self.buf[LEN..LEN + l2].copy_from_slice(link);
            self.buf[LEN + l2..LEN + l2 + packet.len()].copy_from_slice(packet);
            self.l2 = l2;
            self.len = packet.len();
            self.ip_len = ip_len;
            self.tcp_len = tcp_len;
            self.v4 = v4;
            self.mss = payload;
            self.next_seq = seq.wrapping_add(payload as u32);
            self.count = 1;
            self.closed = flags & 0x08 != 0;
            return true;
        }
        let at = LEN + self.l2;
        let head = &self.buf[at..at + hl.min(self.len)];
        let same_headers = l2 == self.l2
            && self.buf[LEN..at] == *link
            && v4 == self.v4
            && ip_len == self.ip_len
            && tcp_len == self.tcp_len
            && if v4 {
                // version, tos | flags, ttl, protocol | addresses
                head[0..2] == packet[0..2] && head[6..10] == packet[6..10] && head[12..20] == packet[12..20]
            } else {
                head[0..4] == packet[0..4] && head[6..40] == packet[6..40]
            }
            // ports | ack number, data offset | window | options (flags: below)
            && head[ip_len..ip_len + 4] == packet[ip_len..ip_len + 4]
            && head[ip_len + 8..ip_len + 13] == packet[ip_len + 8..ip_len + 13]
            && head[ip_len + 14..ip_len + 16] == packet[ip_len + 14..ip_len + 16]
            && head[ip_len + 20..hl] == packet[ip_len + 20..hl];
        let flags_ok = flags == 0x10 || flags == 0x18;
        if self.closed
            || !same_headers
            || !flags_ok
            || seq != self.next_seq
            || payload > self.mss
            || self.len + payload > MAX_SUPER
        {
            return false;
        }
        self.buf[at + self.len..at + self.len + payload].copy_from_slice(&packet[hl..]);
        self.len += payload;
        self.next_seq = seq.wrapping_add(payload as u32);
        self.count += 1;
        // A short segment or PSH ends the run; its flags become the run's.
        self.buf[at + ip_len + 13] = flags;
        self.closed = payload < self.mss || flags & 0x08 != 0;
        true
    }

    /// Ends the run: returns the virtio-net header and packet to write (a
    /// plain packet with an empty header if it is a single segment).
    pub fn flush(&mut self) -> Option<&[u8]> {
        if self.count == 0 {
            return None;
        }
        let count = std::mem::take(&mut self.count);
        let (ip_len, tcp_len, len, l2) = (self.ip_len, self.tcp_len, self.len, self.l2);
        let (hdr, rest) = self.buf.split_at_mut(LEN);
        let pkt = &mut rest[l2..l2 + len];
        hdr.fill(0);
        if count == 1 {
            return Some(&self.buf[..LEN + l2 + len]);
        }
        if self.v4 {
            pkt[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            pkt[10..12].fill(0);
            let c = checksum::checksum(&pkt[..20]);
            pkt[10..12].copy_from_slice(&c.to_be_bytes());
        } else {
            pkt[4..6].copy_from_slice(&((len - 40) as u16).to_be_bytes());
        }
        // A partial checksum: the pseudo-header sum, folded, not complemented,
        // as the kernel leaves it for hardware (VIRTIO_NET_HDR_F_NEEDS_CSUM).
        let tcp_total = (len - ip_len) as u32;
        let pseudo = if self.v4 {
            let s = checksum::add(checksum::add(0, &pkt[12..16]), &pkt[16..20]);
            checksum::add(s, &[0, 6, (tcp_total >> 8) as u8, tcp_total as u8])
        } else {
            let src: [u8; 16] = pkt[8..24].try_into().expect("16 bytes");
            let dst: [u8; 16] = pkt[24..40].try_into().expect("16 bytes");
            checksum::ipv6_pseudo(&src, &dst, tcp_total, 6)
        };
        let partial = !checksum::finish(pseudo);
        pkt[ip_len + 16..ip_len + 18].copy_from_slice(&partial.to_be_bytes());
        let put = |h: &mut [u8], at: usize, v: u16| h[at..at + 2].copy_from_slice(&v.to_ne_bytes());
        hdr[0] = F_NEEDS_CSUM;
        hdr[1] = if self.v4 { GSO_TCPV4 } else { GSO_TCPV6 };
        put(hdr, 2, (l2 + ip_len + tcp_len) as u16);
        put(hdr, 4, self.mss as u16);
        put(hdr, 6, (l2 + ip_len) as u16);
        put(hdr, 8, 16);
        Some(&self.buf[..LEN + l2 + len])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An IPv4 TCP super-packet of `payload` bytes, as the kernel hands it
    /// over with TSO: one header, lengths for the whole, a partial checksum.
    fn super_packet(v6: bool, payload: usize, flags: u8) -> Vec<u8> {
        let ip_len = if v6 { 40 } else { 20 };
        let mut p = vec![0u8; ip_len + 20 + payload];
        if v6 {
            p[0] = 0x60;
            p[4..6].copy_from_slice(&((20 + payload) as u16).to_be_bytes());
            p[6] = 6;
            p[7] = 64;
            p[8..24].copy_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
            p[24..40].copy_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
        } else {
            p[0] = 0x45;
            p[2..4].copy_from_slice(&((40 + payload) as u16).to_be_bytes());
            p[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
            p[6] = 0x40;
            p[8] = 64;
            p[9] = 6;
            p[12..16].copy_from_slice(&[10, 0, 0, 1]);
            p[16..20].copy_from_slice(&[10, 0, 0, 2]);
        }
        let t = ip_len;
        p[t..t + 2].copy_from_slice(&40000u16.to_be_bytes());
        p[t + 2..t + 4].copy_from_slice(&5201u16.to_be_bytes());
        p[t + 4..t + 8].copy_from_slice(&0xffff_fff0u32.to_be_bytes()); // wraps
        p[t + 12] = 5 << 4;
        p[t + 13] = flags;
        for (i, b) in p[t + 20..].iter_mut().enumerate() {
            *b = (i * 7) as u8;
        }
        p
    }

    fn tcp_ok(seg: &[u8], v6: bool) -> bool {
        let ip_len = if v6 { 40 } else { 20 };
        let len = (seg.len() - ip_len) as u32;
        let pseudo = if v6 {
            checksum::ipv6_pseudo(
                seg[8..24].try_into().unwrap(),
                seg[24..40].try_into().unwrap(),
                len,
                6,
            )
        } else {
            checksum::add(
                checksum::add(checksum::add(0, &seg[12..16]), &seg[16..20]),
                &[0, 6, (len >> 8) as u8, len as u8],
            )
        };
        checksum::finish(checksum::add(pseudo, &seg[ip_len..])) == 0
    }

    #[test]
    fn ethernet_frames_segment_and_coalesce_behind_their_header() {
        for v6 in [false, true] {
            let p = super_packet(v6, 4000, 0x18);
            let mut frame = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00];
            if v6 {
                frame[12..14].copy_from_slice(&[0x86, 0xdd]);
            }
            frame.extend_from_slice(&p);
            assert_eq!(ip_offset(&frame), Some(14));
            let hdr = VnetHeader {
                gso_type: if v6 { GSO_TCPV6 } else { GSO_TCPV4 },
                gso_size: 1400,
                ..Default::default()
            };
            assert_eq!(segment_count_at(&hdr, &frame, 14), Ok(3));
            let mut c = Coalescer::new();
            for i in 0..3 {
                let mut out = [0u8; 2000];
                let n = segment_at(&hdr, &frame, 14, i, &mut out).unwrap();
                let mut plain = [0u8; 2000];
                let m = segment(&hdr, &p, i, &mut plain).unwrap();
                assert_eq!(
                    &out[..14],
                    &frame[..14],
                    "the Ethernet header leads every segment"
                );
                assert_eq!(&out[14..n], &plain[..m]);
                assert!(c.push_at(&out[..n], 14));
            }
            // Another link-layer header does not join.
            let mut other = [0u8; 2000];
            let n = segment_at(&hdr, &frame, 14, 0, &mut other).unwrap();
            other[0] = 4;
            assert!(!c.push_at(&other[..n], 14));
            let joined = c.flush().unwrap().to_vec();
            let got = VnetHeader::parse(&joined).unwrap();
            assert_eq!(usize::from(got.csum_start), 14 + if v6 { 40 } else { 20 });
            assert_eq!(usize::from(got.hdr_len), 14 + if v6 { 60 } else { 40 });
            assert_eq!(&joined[LEN..LEN + 14], &frame[..14]);
            assert_eq!(joined.len() - LEN, frame.len());
            assert_eq!(
                &joined[LEN + 14 + 40 + if v6 { 20 } else { 0 }..],
                &frame[14 + 40 + if v6 { 20 } else { 0 }..]
            );
        }
        assert_eq!(ip_offset(&[0xff; 14]), None);
        let vlan = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x81, 0, 0, 5, 0x08, 0];
        assert_eq!(ip_offset(&vlan), Some(18));
    }

    #[test]
    fn a_padded_frame_joins_without_its_padding_and_a_bad_ip_header_not_at_all() {
        // 1001 bytes as 1000 + 1: the second frame is 55 bytes, padded to 60.
        let p = super_packet(false, 1001, 0x18);
        let mut frame = vec![2, 0, 0, 0, 0, 2, 2, 0, 0, 0, 0, 1, 0x08, 0x00];
        frame.extend_from_slice(&p);
        let hdr = VnetHeader {
            gso_type: GSO_TCPV4,
            gso_size: 1000,
            ..Default::default()
        };
        let cut = |i: usize| {
            let mut out = [0u8; 2000];
            let n = segment_at(&hdr, &frame, 14, i, &mut out).unwrap();
            out[..n].to_vec()
        };
        let (first, mut second) = (cut(0), cut(1));
        assert_eq!(second.len(), 55);
        second.resize(60, 0);
        let mut c = Coalescer::new();
        assert!(c.push_at(&first, 14));
        assert!(c.push_at(&second, 14), "padding is not the segment's");
        let joined = c.flush().unwrap().to_vec();
        assert_eq!(
            joined.len() - LEN,
            14 + 40 + 1001,
            "the padding joined the stream"
        );
        assert_eq!(&joined[LEN + 54..], &p[40..]);
        // A wrong IPv4 header checksum: written alone, for the kernel to drop.
        let mut bad = cut(1);
        bad[14 + 10] ^= 0xff;
        assert!(c.push_at(&first, 14));
        assert!(!c.push_at(&bad, 14));
    }

    #[test]
    fn a_super_packet_becomes_valid_segments() {
        for v6 in [false, true] {
            let p = super_packet(v6, 4000, 0x18 | 0x01 | 0x80); // PSH ACK FIN CWR
            let hdr = VnetHeader {
                gso_type: if v6 { GSO_TCPV6 } else { GSO_TCPV4 },
                gso_size: 1400,
                ..Default::default()
            };
            assert_eq!(segment_count(&hdr, &p), Ok(3));
            let ip_len = if v6 { 40 } else { 20 };
            let mut joined = Vec::new();
            for i in 0..3 {
                let mut out = [0u8; 2000];
                let n = segment(&hdr, &p, i, &mut out).unwrap();
                let seg = &out[..n];
                assert_eq!(n, ip_len + 20 + if i < 2 { 1400 } else { 1200 });
                if v6 {
                    assert_eq!(usize::from(u16::from_be_bytes([seg[4], seg[5]])), n - 40);
                } else {
                    assert_eq!(usize::from(u16::from_be_bytes([seg[2], seg[3]])), n);
                    assert_eq!(u16::from_be_bytes([seg[4], seg[5]]), 0x1234 + i as u16);
                    assert!(checksum::verify(&seg[..20]), "IPv4 header checksum");
                }
                assert!(tcp_ok(seg, v6), "TCP checksum of segment {i}");
                let seq = u32::from_be_bytes(seg[ip_len + 4..ip_len + 8].try_into().unwrap());
                assert_eq!(seq, 0xffff_fff0u32.wrapping_add(1400 * i as u32));
                let flags = seg[ip_len + 13];
                assert_eq!(flags & 0x01 != 0, i == 2, "FIN on the last only");
                assert_eq!(flags & 0x08 != 0, i == 2, "PSH on the last only");
                assert_eq!(flags & 0x80 != 0, i == 0, "CWR on the first only");
                assert_eq!(flags & 0x10, 0x10, "ACK on all");
                joined.extend_from_slice(&seg[ip_len + 20..]);
            }
            assert_eq!(joined, p[ip_len + 20..]);
            assert!(segment(&hdr, &p, 3, &mut [0u8; 2000]).is_err());
            assert!(
                segment(&hdr, &p, 0, &mut [0u8; 100]).is_err(),
                "too small a buffer"
            );
        }
    }

    #[test]
    fn segments_coalesce_back_into_the_super_packet() {
        for v6 in [false, true] {
            let ip_len = if v6 { 40 } else { 20 };
            let p = super_packet(v6, 4000, 0x18); // ACK PSH
            let hdr = VnetHeader {
                gso_type: if v6 { GSO_TCPV6 } else { GSO_TCPV4 },
                gso_size: 1400,
                ..Default::default()
            };
            let segs: Vec<Vec<u8>> = (0..3)
                .map(|i| {
                    let mut out = [0u8; 2000];
                    let n = segment(&hdr, &p, i, &mut out).unwrap();
                    out[..n].to_vec()
                })
                .collect();
            let mut c = Coalescer::new();
            for (i, s) in segs.iter().enumerate() {
                assert!(
                    c.push(s),
                    "v6 {v6} segment {i}: flags {:#x} len {}",
                    s[ip_len + 13],
                    s.len()
                );
            }
            let written = c.flush().unwrap().to_vec();
            assert!(c.is_empty());
            let got = VnetHeader::parse(&written).unwrap();
            assert_eq!(got.flags, F_NEEDS_CSUM);
            assert_eq!(got.gso_type, hdr.gso_type);
            assert_eq!(got.gso_size, 1400);
            assert_eq!(usize::from(got.csum_start), ip_len);
            assert_eq!(got.csum_offset, 16);
            let mut packet = written[LEN..].to_vec();
            assert_eq!(packet.len(), p.len());
            assert_eq!(
                &packet[ip_len + 20..],
                &p[ip_len + 20..],
                "payload in order"
            );
            // What the kernel would do with it: segment again. Same segments.
            for (i, want) in segs.iter().enumerate() {
                let mut out = [0u8; 2000];
                let n = segment(&got, &packet, i, &mut out).unwrap();
                assert_eq!(&out[..n], &want[..], "segment {i} after a round trip");
            }
            // Completing the partial checksum gives a valid whole packet.
            finish_checksum(&got, &mut packet).unwrap();
            assert!(tcp_ok(&packet, v6));
            if !v6 {
                assert!(checksum::verify(&packet[..20]));
            }
        }
    }

    #[test]
    fn only_the_right_segments_join() {
        let p = super_packet(false, 4200, 0x10);
        let hdr = VnetHeader {
            gso_type: GSO_TCPV4,
            gso_size: 1400,
            ..Default::default()
        };
        let seg = |i: usize| {
            let mut out = [0u8; 2000];
            let n = segment(&hdr, &p, i, &mut out).unwrap();
            out[..n].to_vec()
        };
        let mut c = Coalescer::new();
        assert!(c.push(&seg(0)));
        assert!(!c.push(&seg(2)), "a gap");
        assert!(!c.push(&seg(0)), "a duplicate");
        let mut other_flow = seg(1);
        other_flow[20] ^= 1; // another source port
        assert!(!c.push(&other_flow));
        let mut syn = seg(1);
        syn[33] = 0x12;
        assert!(!c.push(&syn), "SYN never joins");
        assert!(c.push(&seg(1)));
        assert_eq!(c.flush().map(|b| b.len()), Some(LEN + 20 + 20 + 2800));
        // A single segment is written as it is, with an empty header.
        assert!(c.push(&seg(2)));
        let one = c.flush().unwrap();
        assert_eq!(&one[..LEN], &[0; LEN]);
        assert_eq!(&one[LEN..], &seg(2)[..]);
        assert!(c.flush().is_none());
        assert!(!c.push(&[0x45, 0, 0]), "garbage");
        // A segment with a damaged byte (its checksum no longer matches) never joins.
        let mut damaged = seg(0);
        let last = damaged.len() - 1;
        damaged[last] ^= 0x40;
        let mut fresh = Coalescer::new();
        assert!(!fresh.push(&damaged), "a bad checksum does not start a run");
        assert!(fresh.push(&seg(0)));
        let mut damaged1 = seg(1);
        let last = damaged1.len() - 1;
        damaged1[last] ^= 0x40;
        assert!(!fresh.push(&damaged1), "nor join one");
    }

    #[test]
    fn partial_checksums_are_finished_and_garbage_refused() {
        let mut p = super_packet(false, 100, 0x10);
        // What the kernel leaves: the pseudo-header sum, not complemented.
        let len = (p.len() - 20) as u32;
        let pseudo = checksum::add(
            checksum::add(checksum::add(0, &p[12..16]), &p[16..20]),
            &[0, 6, (len >> 8) as u8, len as u8],
        );
        let mut folded = pseudo;
        while folded > 0xffff {
            folded = (folded & 0xffff) + (folded >> 16);
        }
        p[36..38].copy_from_slice(&(folded as u16).to_be_bytes());
        let hdr = VnetHeader {
            flags: F_NEEDS_CSUM,
            csum_start: 20,
            csum_offset: 16,
            ..Default::default()
        };
        finish_checksum(&hdr, &mut p).unwrap();
        assert!(tcp_ok(&p, false));
        let bad = VnetHeader {
            flags: F_NEEDS_CSUM,
            csum_start: 200,
            csum_offset: 16,
            ..Default::default()
        };
        assert!(finish_checksum(&bad, &mut p).is_err());
        let gso = VnetHeader {
            gso_type: GSO_TCPV4,
            gso_size: 0,
            ..Default::default()
        };
        assert!(segment_count(&gso, &p).is_err(), "zero MSS");
        for cut in 0..40 {
            let g = VnetHeader {
                gso_type: GSO_TCPV4,
                gso_size: 10,
                ..Default::default()
            };
            assert!(
                segment(&g, &p[..cut], 0, &mut [0u8; 100]).is_err(),
                "cut at {cut}"
            );
        }
        let hdr = VnetHeader::parse(&[1, 1, 0, 0, 0x78, 0x05, 0, 0, 0, 0]).unwrap();
        assert!(hdr.is_gso());
        assert_eq!(hdr.gso_size, u16::from_ne_bytes([0x78, 0x05]));
        assert!(VnetHeader::parse(&[0; 9]).is_none());
    }
}
