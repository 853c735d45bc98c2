//! The classic first TUN/TAP program: allocate a device, give it an address
//! and a route, and print "Read N bytes" for every packet the host sends it.
//!
//!     cargo run -p tapir-examples --example tun_read -- tun0 tun 10.0.0.1/24 10.1.0.0/16
//!     ping 10.0.0.2        # (another shell) each echo request shows up here

use std::path::Path;
use tapir_sys::{DEFAULT_TUN_PATH, IfName, Mode, Netlink, TunDevice, TunOptions};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let name = IfName::new(args.first().map_or("tun%d", String::as_str))?;
    let mode: Mode = args.get(1).map_or("tun", String::as_str).parse()?;
    let dev = TunDevice::open(Path::new(DEFAULT_TUN_PATH), &name, TunOptions::new(mode))?;
    let mut nl = Netlink::open()?;
    let index = nl
        .link(dev.name().as_str())?
        .ok_or("device vanished")?
        .index;
    nl.set_up(index, true)?;
    if let Some(addr) = args.get(2) {
        nl.add_address(index, addr.parse()?, None)?;
    }
    if let Some(route) = args.get(3) {
        nl.add_route(index, route.parse()?, None)?;
    }
    println!("{} is up; reading", dev.name());
    let mut buf = [0u8; 65536];
    loop {
        let n = dev.read(&mut buf)?;
        println!("Read {n} bytes from device {}", dev.name());
    }
}
