//! A small DHCPv4 server's lease logic, sans-IO: the guest network's
//! (`tapir guest-net`) answer to a VM that boots and asks for an address.
//! Messages are `dhcproto`'s; time is an input; the caller moves the bytes
//! (from UDP port 68 to 67, replies broadcast back to 68).
//!
//! ```text
//!   DISCOVER ─▶ the client's lease, or the address it asks for if free, or the first free one
//!               ─▶ OFFER (held 60 s for it)
//!   REQUEST  ─▶ ours and free (or its own) ─▶ ACK, bound for the lease time
//!            ─▶ another server chosen ─▶ our offer dropped, no reply
//!            ─▶ taken, or outside the subnet ─▶ NAK
//!   RELEASE ─▶ freed        DECLINE ─▶ that address set aside for a lease time
//!   INFORM  ─▶ ACK with the options, no address
//! ```
//! An address is never held by two clients at once; expired leases are
//! handed out again, the client's own first.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use dhcproto::v4::{
    self, Decodable, DhcpOption, Encodable, HType, MessageType, Opcode, OptionCode,
};
use ipnet::Ipv4Net;

/// How long an offer is held for the client it was made to.
pub const OFFER_HOLD: Duration = Duration::from_secs(60);

/// One client's address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The client's hardware address.
    pub mac: [u8; 6],
    /// Its address.
    pub ip: Ipv4Addr,
    /// Until when.
    pub expires: Instant,
    /// Acknowledged (`false`: only offered).
    pub bound: bool,
    /// The host name it gave (option 12), if any.
    pub hostname: Option<String>,
}

/// Where the options start: the fixed BOOTP fields (236 bytes) and the
/// magic cookie (4).
const OPTIONS_AT: usize = 240;

/// Whether the options are plain TLVs that end inside the datagram, and
/// none that `dhcproto` would choke on (Rapid Commit, option 80, carries
/// no data: it asserts so in debug builds). Checked before decoding.
fn options_well_formed(datagram: &[u8]) -> bool {
    let Some(mut rest) = datagram.get(OPTIONS_AT..) else {
        return false;
    };
    while let Some((&code, tail)) = rest.split_first() {
        match code {
            0 => rest = tail,
            255 => return true,
            _ => {
                let Some((&len, tail)) = tail.split_first() else {
                    return false;
                };
                if code == 80 && len != 0 {
                    return false;
                }
                let Some(after) = tail.get(usize::from(len)..) else {
                    return false;
                };
                rest = after;
            }
        }
    }
    true
}

/// The addresses of one subnet and who holds them.
#[derive(Debug)]
pub struct Pool {
    net: Ipv4Net,
    server: Ipv4Addr,
    lease_time: Duration,
    /// Name servers given to the clients (none: the option left out).
    dns: Vec<Ipv4Addr>,
    leases: Vec<Lease>,
    declined: Vec<(Ipv4Addr, Instant)>,
}

impl Pool {
    /// The hosts of `net` but `server` (the bridge's own address), leased
    /// for `lease_time`.
    pub fn new(net: Ipv4Net, server: Ipv4Addr, lease_time: Duration) -> Self {
        Self {
            net: net.trunc(),
            server,
            lease_time,
            dns: Vec::new(),
            leases: Vec::new(),
            declined: Vec::new(),
        }
    }

    /// Gives the clients these name servers (option 6).
    pub fn with_dns(mut self, dns: Vec<Ipv4Addr>) -> Self {
        self.dns = dns;
        self
    }

    /// The leases given and not expired at `now` (`bound` ones acknowledged).
    pub fn leases(&self, now: Instant) -> impl Iterator<Item = &Lease> {
        self.leases.iter().filter(move |l| l.expires > now)
    }

    fn usable(&self, ip: Ipv4Addr) -> bool {
        self.net.contains(&ip)
            && ip != self.net.network()
            && ip != self.net.broadcast()
            && ip != self.server
    }

    fn holder(&self, now: Instant, ip: Ipv4Addr) -> Option<[u8; 6]> {
        self.leases
            .iter()
            .find(|l| l.ip == ip && l.expires > now)
            .map(|l| l.mac)
    }

    fn free(&self, now: Instant, ip: Ipv4Addr, mac: &[u8; 6]) -> bool {
        self.usable(ip)
            && self.holder(now, ip).is_none_or(|m| m == *mac)
            && !self
                .declined
                .iter()
                .any(|(d, until)| *d == ip && *until > now)
    }

    /// The address for `mac`: its lease (even expired, if nobody took it),
    /// the one it asks for, or the first free one.
    fn choose(&self, now: Instant, mac: &[u8; 6], asked: Option<Ipv4Addr>) -> Option<Ipv4Addr> {
        if let Some(l) = self.leases.iter().find(|l| l.mac == *mac) {
            if self.free(now, l.ip, mac) {
                return Some(l.ip);
            }
        }
        if let Some(a) = asked.filter(|a| self.free(now, *a, mac)) {
            return Some(a);
        }
        self.net.hosts().find(|ip| self.free(now, *ip, mac))
    }

    /// Records `ip` for `mac` until `expires`, dropping its other leases and
    /// any expired lease of that address.
    fn hold(
        &mut self,
        now: Instant,
        mac: [u8; 6],
        ip: Ipv4Addr,
        until: Instant,
        bound: bool,
        hostname: Option<String>,
    ) {
        self.leases
            .retain(|l| l.mac != mac && !(l.ip == ip && l.expires <= now));
        self.leases.push(Lease {
            mac,
            ip,
            expires: until,
            bound,
            hostname,
        });
    }

    /// Answers the DHCP message in `datagram` (from a client, to port 67):
    /// the reply's bytes, to broadcast to port 68, or `None` (not ours, or
    /// nothing to say).
    pub fn handle(&mut self, now: Instant, datagram: &[u8]) -> Option<Vec<u8>> {
        if !options_well_formed(datagram) {
            return None;
        }
        let msg = v4::Message::from_bytes(datagram).ok()?;
        if msg.opcode() != Opcode::BootRequest || msg.htype() != HType::Eth || msg.hlen() != 6 {
            return None;
        }
        let mac: [u8; 6] = msg.chaddr().get(..6)?.try_into().ok()?;
        let opts = msg.opts();
        let asked = match opts.get(OptionCode::RequestedIpAddress) {
            Some(DhcpOption::RequestedIpAddress(a)) => Some(*a),
            _ => None,
        };
        let hostname = match opts.get(OptionCode::Hostname) {
            Some(DhcpOption::Hostname(h)) => Some(h.chars().take(64).collect()),
            _ => None,
        };
        self.declined.retain(|(_, until)| *until > now);
        match opts.msg_type()? {
            MessageType::Discover => {
                let ip = self.choose(now, &mac, asked)?;
                let bound = self
                    .leases
                    .iter()
                    .any(|l| l.mac == mac && l.ip == ip && l.bound && l.expires > now);
                let until = if bound {
                    self.leases.iter().find(|l| l.mac == mac)?.expires
                } else {
                    now + OFFER_HOLD
                };
                self.hold(now, mac, ip, until, bound, hostname);
                Some(self.reply(&msg, MessageType::Offer, ip))
            }
            MessageType::Request => {
                let server = match opts.get(OptionCode::ServerIdentifier) {
                    Some(DhcpOption::ServerIdentifier(s)) => Some(*s),
                    _ => None,
                };
                if server.is_some_and(|s| s != self.server) {
                    // It chose another server: our offer goes.
                    self.leases.retain(|l| l.mac != mac || l.bound);
                    return None;
                }
                let want = asked.or_else(|| {
                    let c = msg.ciaddr();
                    (!c.is_unspecified()).then_some(c)
                });
                match want {
                    Some(ip) if self.free(now, ip, &mac) => {
                        self.hold(now, mac, ip, now + self.lease_time, true, hostname);
                        Some(self.reply(&msg, MessageType::Ack, ip))
                    }
                    _ => Some(self.nak(&msg)),
                }
            }
            MessageType::Release => {
                let c = msg.ciaddr();
                self.leases.retain(|l| !(l.mac == mac && l.ip == c));
                None
            }
            MessageType::Decline => {
                if let Some(ip) = asked.filter(|a| self.holder(now, *a) == Some(mac)) {
                    self.leases.retain(|l| l.ip != ip);
                    self.declined.push((ip, now + self.lease_time));
                }
                None
            }
            MessageType::Inform => Some(self.reply(&msg, MessageType::Ack, Ipv4Addr::UNSPECIFIED)),
            _ => None,
        }
    }

    fn base(&self, req: &v4::Message, yiaddr: Ipv4Addr) -> v4::Message {
        let mut m = v4::Message::new_with_id(
            req.xid(),
            req.ciaddr(),
            yiaddr,
            self.server,
            req.giaddr(),
            req.chaddr(),
        );
        m.set_opcode(Opcode::BootReply).set_flags(req.flags());
        m
    }

    fn reply(&self, req: &v4::Message, kind: MessageType, ip: Ipv4Addr) -> Vec<u8> {
        let mut m = self.base(req, ip);
        let secs = self.lease_time.as_secs().min(u64::from(u32::MAX)) as u32;
        let o = m.opts_mut();
        o.insert(DhcpOption::MessageType(kind));
        o.insert(DhcpOption::ServerIdentifier(self.server));
        if !ip.is_unspecified() {
            o.insert(DhcpOption::AddressLeaseTime(secs));
            o.insert(DhcpOption::Renewal(secs / 2));
            o.insert(DhcpOption::Rebinding(secs / 8 * 7));
        }
        o.insert(DhcpOption::SubnetMask(self.net.netmask()));
        o.insert(DhcpOption::BroadcastAddr(self.net.broadcast()));
        o.insert(DhcpOption::Router(vec![self.server]));
        if !self.dns.is_empty() {
            o.insert(DhcpOption::DomainNameServer(self.dns.clone()));
        }
        m.to_vec().unwrap_or_default()
    }

    fn nak(&self, req: &v4::Message) -> Vec<u8> {
        let mut m = self.base(req, Ipv4Addr::UNSPECIFIED);
        m.set_siaddr(Ipv4Addr::UNSPECIFIED);
        let o = m.opts_mut();
        o.insert(DhcpOption::MessageType(MessageType::Nak));
        o.insert(DhcpOption::ServerIdentifier(self.server));
        m.to_vec().unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVER: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 1);

    fn pool(prefix: u8) -> Pool {
        Pool::new(
            Ipv4Net::new(Ipv4Addr::new(192, 168, 77, 0), prefix).unwrap(),
            SERVER,
            Duration::from_secs(3600),
        )
    }

    fn client(mac: u8, kind: MessageType, opts: &[DhcpOption], ciaddr: Ipv4Addr) -> Vec<u8> {
        let chaddr = [0x52, 0x54, 0, 0, 0, mac];
        let mut m = v4::Message::new_with_id(
            0x1000 + u32::from(mac),
            ciaddr,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            &chaddr,
        );
        m.opts_mut().insert(DhcpOption::MessageType(kind));
        for o in opts {
            m.opts_mut().insert(o.clone());
        }
        m.to_vec().unwrap()
    }

    fn answer(bytes: Option<Vec<u8>>) -> (MessageType, Ipv4Addr, v4::Message) {
        let m = v4::Message::from_bytes(&bytes.expect("a reply")).unwrap();
        (m.opts().msg_type().unwrap(), m.yiaddr(), m.clone())
    }

    fn lease(p: &mut Pool, now: Instant, mac: u8) -> Ipv4Addr {
        let (k, ip, offer) = answer(p.handle(
            now,
            &client(mac, MessageType::Discover, &[], Ipv4Addr::UNSPECIFIED),
        ));
        assert_eq!(k, MessageType::Offer);
        assert_eq!(offer.xid(), 0x1000 + u32::from(mac));
        let (k, got, ack) = answer(p.handle(
            now,
            &client(
                mac,
                MessageType::Request,
                &[
                    DhcpOption::RequestedIpAddress(ip),
                    DhcpOption::ServerIdentifier(SERVER),
                ],
                Ipv4Addr::UNSPECIFIED,
            ),
        ));
        assert_eq!((k, got), (MessageType::Ack, ip));
        assert!(matches!(
            ack.opts().get(OptionCode::Router),
            Some(DhcpOption::Router(r)) if r == &vec![SERVER]
        ));
        ip
    }

    #[test]
    fn discover_offer_request_ack_and_never_one_address_twice() {
        let now = Instant::now();
        let mut p = pool(24);
        let a = lease(&mut p, now, 1);
        let b = lease(&mut p, now, 2);
        assert_eq!(
            a,
            Ipv4Addr::new(192, 168, 77, 2),
            "the first host but the server's"
        );
        assert_ne!(a, b);
        // b asks for a's address: refused.
        let (k, _, _) = answer(p.handle(
            now,
            &client(
                2,
                MessageType::Request,
                &[DhcpOption::RequestedIpAddress(a)],
                Ipv4Addr::UNSPECIFIED,
            ),
        ));
        assert_eq!(k, MessageType::Nak);
        // a comes back (a reboot): the same address.
        assert_eq!(lease(&mut p, now, 1), a);
        assert_eq!(p.leases(now).count(), 2);
        // Outside the subnet, or the server's own: refused.
        for bad in [Ipv4Addr::new(10, 0, 0, 5), SERVER] {
            let (k, _, _) = answer(p.handle(
                now,
                &client(
                    3,
                    MessageType::Request,
                    &[DhcpOption::RequestedIpAddress(bad)],
                    Ipv4Addr::UNSPECIFIED,
                ),
            ));
            assert_eq!(k, MessageType::Nak, "{bad}");
        }
    }

    #[test]
    fn name_servers_are_given_when_there_are_some() {
        let now = Instant::now();
        let dns = |p: &mut Pool, mac: u8| {
            let (_, _, offer) = answer(p.handle(
                now,
                &client(mac, MessageType::Discover, &[], Ipv4Addr::UNSPECIFIED),
            ));
            offer.opts().get(OptionCode::DomainNameServer).cloned()
        };
        assert_eq!(dns(&mut pool(24), 1), None);
        let servers = vec![Ipv4Addr::new(192, 0, 2, 53), Ipv4Addr::new(192, 0, 2, 54)];
        let mut p = pool(24).with_dns(servers.clone());
        assert_eq!(dns(&mut p, 1), Some(DhcpOption::DomainNameServer(servers)));
    }

    #[test]
    fn a_full_pool_offers_nothing_and_expired_or_released_addresses_come_back() {
        let now = Instant::now();
        let mut p = pool(30); // hosts .1 and .2; .1 is the server's
        let a = lease(&mut p, now, 1);
        assert_eq!(a, Ipv4Addr::new(192, 168, 77, 2));
        assert!(
            p.handle(
                now,
                &client(2, MessageType::Discover, &[], Ipv4Addr::UNSPECIFIED)
            )
            .is_none()
        );
        let later = now + Duration::from_secs(3601);
        assert_eq!(lease(&mut p, later, 2), a, "expired: handed out again");
        p.handle(later, &client(2, MessageType::Release, &[], a));
        assert_eq!(p.leases(later).count(), 0);
        assert_eq!(lease(&mut p, later, 1), a);
    }

    #[test]
    fn another_servers_choice_and_declines_and_informs() {
        let now = Instant::now();
        let mut p = pool(24);
        let (_, ip, _) = answer(p.handle(
            now,
            &client(1, MessageType::Discover, &[], Ipv4Addr::UNSPECIFIED),
        ));
        let other = Ipv4Addr::new(192, 168, 77, 254);
        assert!(
            p.handle(
                now,
                &client(
                    1,
                    MessageType::Request,
                    &[
                        DhcpOption::RequestedIpAddress(ip),
                        DhcpOption::ServerIdentifier(other)
                    ],
                    Ipv4Addr::UNSPECIFIED
                )
            )
            .is_none()
        );
        assert_eq!(p.leases(now).count(), 0, "the offer is dropped");
        let a = lease(&mut p, now, 1);
        p.handle(
            now,
            &client(
                1,
                MessageType::Decline,
                &[DhcpOption::RequestedIpAddress(a)],
                Ipv4Addr::UNSPECIFIED,
            ),
        );
        assert_ne!(lease(&mut p, now, 1), a, "a declined address is set aside");
        let (k, y, _) = answer(p.handle(
            now,
            &client(9, MessageType::Inform, &[], Ipv4Addr::new(192, 168, 77, 50)),
        ));
        assert_eq!((k, y), (MessageType::Ack, Ipv4Addr::UNSPECIFIED));
    }

    #[test]
    fn garbage_gets_no_answer() {
        let mut p = pool(24);
        let now = Instant::now();
        for len in 0..600 {
            let junk: Vec<u8> = (0..len).map(|i| (i * 31 + len) as u8).collect();
            let _ = p.handle(now, &junk);
        }
        // Rapid Commit with data: refused before decoding.
        let mut bad = client(1, MessageType::Discover, &[], Ipv4Addr::UNSPECIFIED);
        let end = bad.len() - 1;
        bad.splice(end..end, [80u8, 2, 1, 1]);
        assert!(p.handle(now, &bad).is_none());
        // A reply, not a request: ignored.
        let mut m = v4::Message::from_bytes(&client(
            1,
            MessageType::Discover,
            &[],
            Ipv4Addr::UNSPECIFIED,
        ))
        .unwrap();
        m.set_opcode(Opcode::BootReply);
        assert!(p.handle(now, &m.to_vec().unwrap()).is_none());
    }
}
