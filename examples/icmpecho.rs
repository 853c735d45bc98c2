//! The classic "icmpecho" seed program: a tun device that answers every ping
//! routed into it, with tapir's responder doing the in-place rewrite.
//!
//!     cargo run -p tapir-examples --example icmpecho -- tun0 192.168.0.1/24
//!     ping 192.168.0.3     # (another shell) replies come from the program

use std::path::Path;
use tapir_proto::echo::{Config, Link, Outcome, Responder};
use tapir_sys::{DEFAULT_TUN_PATH, IfName, Mode, Netlink, TunDevice, TunOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let name = IfName::new(args.first().map_or("tun%d", String::as_str))?;
    let addr = args
        .get(1)
        .map_or("192.168.0.1/24", String::as_str)
        .parse()?;
    let dev = TunDevice::open(
        Path::new(DEFAULT_TUN_PATH),
        &name,
        TunOptions::new(Mode::Tun),
    )?;
    let mut nl = Netlink::open()?;
    let index = nl
        .link(dev.name().as_str())?
        .ok_or("device vanished")?
        .index;
    nl.add_address(index, addr, None)?; // the prefix route comes with it
    nl.set_up(index, true)?;
    let config = Config {
        link: Link::Ip,
        mac: [0; 6],
        subnets: vec![addr],
        only: vec![],
    };
    let mut responder = Responder::new(config);
    println!(
        "{}: answering pings for {addr} (all but the host's own address)",
        dev.name()
    );
    let mut buf = [0u8; 65536];
    loop {
        let n = dev.read(&mut buf)?;
        if let Outcome::Reply(len) = responder.handle(&mut buf, n) {
            dev.write(&buf[..len])?;
            println!("replied to a ping ({len} bytes); {:?}", responder.stats());
        }
    }
}
