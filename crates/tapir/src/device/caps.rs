//! Which capabilities this process holds, read from `/proc/self/status`.

/// `CAP_NET_ADMIN`: create tun/tap devices, change links, addresses, routes.
pub const CAP_NET_ADMIN: u32 = 12;

/// The effective capability set, or `None` if `/proc` cannot tell.
pub fn effective() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_cap_eff(&status)
}

fn parse_cap_eff(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("CapEff:"))?;
    u64::from_str_radix(line["CapEff:".len()..].trim(), 16).ok()
}

/// Whether this process may administer the network (`CAP_NET_ADMIN`).
/// When `/proc` cannot tell, assumes it may and lets the kernel decide.
pub fn has_net_admin() -> bool {
    effective().is_none_or(|caps| caps & (1 << CAP_NET_ADMIN) != 0)
}

/// The error text for an operation that needs `CAP_NET_ADMIN`.
pub fn net_admin_missing(what: &str) -> String {
    format!(
        "{what} needs CAP_NET_ADMIN, which this process does not have: run it with sudo; \
         to use a tun/tap device without root, have root create it persistent and owned by you \
         (sudo tapir dev add NAME --user $USER) and open it as yourself"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_cap_eff() {
        // From /proc/self/status of a root shell and of an unprivileged one.
        let root = "Name:\tcat\nCapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\nCapEff:\t000001ffffffffff\n";
        let user = "Name:\tcat\nCapEff:\t0000000000000000\nCapBnd:\t000001ffffffffff\n";
        assert_eq!(parse_cap_eff(root), Some(0x1ff_ffff_ffff));
        assert_eq!(parse_cap_eff(user), Some(0));
        assert_eq!(parse_cap_eff("Name:\tx\n"), None);
        assert!(parse_cap_eff(root).unwrap() & (1 << CAP_NET_ADMIN) != 0);
    }
}
