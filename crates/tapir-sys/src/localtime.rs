//! The local time zone's offset from UTC, as the C library reads it (`TZ`,
//! /etc/localtime): for times shown as tcpdump shows them.

/// Seconds east of UTC in the local time zone at `secs` since the epoch
/// (0 where the C library cannot tell).
pub fn utc_offset(secs: i64) -> i64 {
    let t: libc::time_t = secs;
    // SAFETY: an all-zero `tm` is a valid value of the plain C struct.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: localtime_r reads `t` and writes `tm`, both live locals; it
    // keeps no pointer to either.
    let r = unsafe { libc::localtime_r(&t, &mut tm) };
    if r.is_null() { 0 } else { tm.tm_gmtoff }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_offset_is_within_a_day() {
        let o = utc_offset(1_700_000_000);
        assert!(o.abs() <= 14 * 3600, "{o}");
    }
}
