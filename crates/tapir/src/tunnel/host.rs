//! The host around a running tunnel, watched on a thread of its own: the
//! device's MTU, the namespace's addresses, the bridge's ports. Each look
//! is netlink requests and dumps that grow with the host (5,000 addresses:
//! 4.5 ms; a bridge among 1,000 links: 14-22 ms), which held the packet
//! thread's packets for as long when it made them. The packet thread now
//! takes what changed ([`HostFacts::take`]) when the watcher rings it, and
//! at its timers.
//!
//! The watcher looks when the kernel says a link or an address changed
//! (`tapir_sys::netlink::Changes`), at most [`LOOKS_PER_SECOND`] times a
//! second, and sleeps otherwise: a look once a second woke an idle tunnel
//! as often as its timers. Where the kernel's word cannot be had, it looks
//! once a second.

use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tapir_sys::{IfName, Netlink};

use super::bell::Bell;
use super::off;

/// What the watcher saw last, for the packet thread.
#[derive(Default)]
pub(super) struct HostFacts {
    /// Goes up with each change of `seen`.
    version: AtomicU64,
    seen: Mutex<Seen>,
}

/// One look at the host.
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct Seen {
    /// The device's MTU.
    pub mtu: Option<usize>,
    /// Whether answers must be told where to leave from (UDP): the host
    /// has more than one global address of a family outside the tunnel's
    /// device (see `Outbox::take_host`). `None` before the first look.
    pub sticky: Option<bool>,
    /// The host's interface addresses (TCP: see
    /// `TcpTransport::close_orphans`); over UDP its global ones outside the
    /// tunnel's device, where the connected socket's must be (see
    /// `steer_connected`).
    pub addresses: Vec<IpAddr>,
}

impl HostFacts {
    /// What changed since version `seen` (which it moves on), if anything.
    pub fn take(&self, seen: &mut u64) -> Option<Seen> {
        let v = self.version.load(Ordering::Acquire);
        if v == *seen {
            return None;
        }
        *seen = v;
        Some(self.seen.lock().unwrap_or_else(|e| e.into_inner()).clone())
    }

    fn publish(&self, s: &Seen) {
        *self.seen.lock().unwrap_or_else(|e| e.into_inner()) = s.clone();
        self.version.fetch_add(1, Ordering::Release);
    }
}

/// The watcher: what it looks at, and what it said.
pub(super) struct Watch<'a> {
    name: &'a IfName,
    bridge: Option<&'a IfName>,
    tcp: bool,
    /// Kept open between looks (opened again after an error).
    nl: Option<Netlink>,
    last: Seen,
    /// Ports of the tap's bridge named for an MTU over the tap's.
    warned_ports: Vec<(u32, u32)>,
    /// The kernel's word of changes, heard from before the first look.
    changes: Option<tapir_sys::netlink::Changes>,
}

/// Looks after changes, at most: a burst of them (5,000 addresses added)
/// is seen by one look, not 5,000.
pub(super) const LOOKS_PER_SECOND: u32 = 10;

impl<'a> Watch<'a> {
    pub fn new(name: &'a IfName, bridge: Option<&'a IfName>, tcp: bool) -> Self {
        Self {
            name,
            bridge,
            tcp,
            nl: None,
            last: Seen::default(),
            warned_ports: Vec::new(),
            changes: tapir_sys::netlink::Changes::open().ok(),
        }
    }

    /// Looks once, and publishes what changed; whether anything did.
    pub fn look(&mut self, facts: &HostFacts) -> bool {
        self.look_whole(facts).0
    }

    /// [`Watch::look`], and whether all of the host could be looked at
    /// (if not, to look again soon: no word of a change may come).
    fn look_whole(&mut self, facts: &HostFacts) -> (bool, bool) {
        if self.nl.is_none() {
            self.nl = Netlink::open().ok();
        }
        let Some(nl) = self.nl.as_mut() else {
            return (false, false);
        };
        let link = match nl.link(self.name.as_str()) {
            Ok(l) => l,
            Err(_) => {
                self.nl = None;
                return (false, false);
            }
        };
        let mut seen = self.last.clone();
        if let Some(l) = &link {
            seen.mtu = Some(l.mtu as usize);
        }
        let addrs = nl.addresses(None);
        let whole = addrs.is_ok();
        // (Not taken from a dump that failed: the last look stands.)
        if let Ok(a) = &addrs {
            // UDP: the global ones outside the tunnel's device (where the
            // connected socket's address must be; not the link-local ones
            // that come and go with other links), counted by family.
            let index = link.as_ref().map(|l| l.index);
            seen.addresses = a
                .iter()
                .filter(|a| self.tcp || (a.scope == "global" && Some(a.index) != index))
                .map(|a| a.local.addr())
                .collect();
            if !self.tcp {
                let count = |v4: bool| seen.addresses.iter().filter(|a| a.is_ipv4() == v4).count();
                seen.sticky =
                    Some(!off("TAPIR_STICKY_SOURCE") && (count(true) > 1 || count(false) > 1));
            }
        }
        if let (Some(b), Some(m)) = (self.bridge, seen.mtu) {
            super::bridge_mtu_note(nl, b, self.name.as_str(), m as u32, &mut self.warned_ports);
        }
        if seen == self.last {
            return (false, whole);
        }
        facts.publish(&seen);
        self.last = seen;
        (true, whole)
    }

    /// Looks when the host changed (or once a second, without word of
    /// changes) until `stop` (`bell` rings it in), calling `changed` when
    /// what it sees did (to wake the packet thread: it takes the change at
    /// once, not at its next timer).
    pub fn run(
        &mut self,
        facts: &HostFacts,
        bell: &Bell,
        stop: &dyn Fn() -> bool,
        changed: &dyn Fn(),
    ) {
        let second = Duration::from_secs(1);
        // The least time between two looks: longer while looks find
        // nothing new (links and addresses of others coming and going),
        // up to a second; the shortest again after one that did.
        let shortest = second / LOOKS_PER_SECOND;
        let mut gap = shortest;
        let mut looked = Instant::now();
        // A look that could not see everything is made again in a second.
        let mut again = false;
        while !stop() {
            let heard = match &self.changes {
                Some(c) if !again => {
                    tapir_sys::poll::readable([bell.fd(), c.fd()], tapir_sys::poll::FOREVER)
                        .map(|r| r[1])
                }
                _ => tapir_sys::poll::readable([bell.fd()], second).map(|_| true),
            };
            bell.drain();
            if heard.is_err() {
                std::thread::sleep(second);
            }
            if stop() {
                break;
            }
            let look = match &mut self.changes {
                None => true,
                Some(_) if again => true,
                Some(_) if !heard.unwrap_or(true) => false,
                Some(c) => {
                    // What comes until the gap is over is seen by the same look.
                    let wait = gap.saturating_sub(looked.elapsed());
                    if !wait.is_zero() && bell.wait(Some(wait)).is_ok() && stop() {
                        break;
                    }
                    match c.take() {
                        Ok(any) => any,
                        Err(_) => {
                            // Back to looking once a second.
                            self.changes = None;
                            true
                        }
                    }
                }
            };
            if look {
                looked = Instant::now();
                let (seen, whole) = self.look_whole(facts);
                again = !whole;
                if seen {
                    changed();
                    gap = shortest;
                } else {
                    gap = (gap * 2).min(second);
                }
            }
        }
    }
}
