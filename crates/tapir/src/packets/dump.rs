//! `tapir dump`: become a device's reader, print a line per packet, record pcap.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tapir_sys::{IfName, Mode};
use tapir_wire::pi::PacketInfo;
use tapir_wire::summary::{self, Link};

use crate::capture;
use crate::dev::DevError;

/// What `tapir dump` was asked for, checked.
#[derive(Debug, Clone)]
pub struct DumpRequest {
    /// The device.
    pub name: IfName,
    /// Mode for a device we create; must match an existing one.
    pub mode: Option<Mode>,
    /// Stop after this many packets.
    pub count: Option<u64>,
    /// Record to this pcap file.
    pub write: Option<PathBuf>,
    /// Bytes kept per packet in the pcap file (0: all).
    pub snaplen: u32,
    /// The clone device.
    pub tun_path: PathBuf,
}

/// `HH:MM:SS.micro` of a time since the epoch, in local time as tcpdump
/// shows it (`TZ`, /etc/localtime), so that the two line up.
pub fn time_of_day(ts: Duration) -> String {
    let offset = tapir_sys::localtime::utc_offset(ts.as_secs() as i64);
    time_of_day_at(ts, offset)
}

/// `HH:MM:SS.micro` of `ts` at `offset` seconds east of UTC.
fn time_of_day_at(ts: Duration, offset: i64) -> String {
    let secs = (ts.as_secs() as i64 + offset).rem_euclid(86_400) as u64;
    format!(
        "{:02}:{:02}:{:02}.{:06}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        ts.subsec_micros()
    )
}

/// Reads and prints until `count` packets or `shutdown`; returns how many were seen.
pub fn run(
    req: &DumpRequest,
    out: &mut impl Write,
    shutdown: &AtomicBool,
) -> Result<u64, DevError> {
    let reader = capture::attach(&req.tun_path, &req.name, req.mode)?;
    let link = match reader.mode {
        Mode::Tun => Link::Ip,
        Mode::Tap => Link::Ethernet,
    };
    let mut pcap = req
        .write
        .as_deref()
        .map(|path| capture::pcap_writer(path, reader.mode, req.snaplen))
        .transpose()?;
    let pcap_to_stdout = req.write.as_deref() == Some(Path::new("-"));
    let dev = &reader.dev;
    eprintln!(
        "tapir dump: reading {} ({}{}{}){}",
        dev.name(),
        reader.mode,
        if reader.framing.pi {
            ", packet info"
        } else {
            ""
        },
        if reader.framing.vnet_len > 0 {
            ", vnet header"
        } else {
            ""
        },
        if reader.created {
            ", a transient device removed on exit"
        } else {
            ""
        }
    );
    let mut buf = vec![0u8; 65536 + reader.framing.prefix_len()];
    let mut seen = 0u64;
    let mut failure = None;
    while !shutdown.load(Ordering::Relaxed) && req.count.is_none_or(|c| seen < c) {
        let n = match capture::next_packet(dev, &mut buf) {
            Ok(Some(n)) => n,
            Ok(None) => continue,
            Err(e) => {
                failure = Some(e);
                break;
            }
        };
        let ts = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        seen += 1;
        let mut data = &buf[..n];
        let mut note = String::new();
        if reader.framing.pi {
            match PacketInfo::parse(data) {
                Some((info, rest)) => {
                    if info.truncated() {
                        note = " [truncated by the kernel]".into();
                    }
                    data = rest;
                }
                None => data = &[],
            }
        }
        data = data.get(reader.framing.vnet_len..).unwrap_or(&[]);
        let line = format!(
            "{} {}{note}\n",
            time_of_day(ts),
            summary::summarize(link, data)
        );
        // (With the pcap on standard output, as tcpdump's `-w -`, no lines.)
        if !pcap_to_stdout
            && out
                .write_all(line.as_bytes())
                .and_then(|()| out.flush())
                .is_err()
        {
            break; // stdout closed (| head): stop quietly, as tcpdump does
        }
        if let Some(w) = pcap.as_mut() {
            // Flushed per packet (tcpdump's -U): the file can be read, or
            // followed, while the capture runs.
            match w.write_packet(ts, data).and_then(|()| w.flush()) {
                Ok(()) => {}
                // The reader of `-w -` went (| tcpdump -r - -c 5): done.
                Err(e) if pcap_to_stdout && e.kind() == std::io::ErrorKind::BrokenPipe => break,
                Err(e) => return Err(DevError::Runtime(format!("writing the pcap file: {e}"))),
            }
        }
    }
    if let Some(mut w) = pcap {
        match w.flush() {
            Err(e) if !(pcap_to_stdout && e.kind() == std::io::ErrorKind::BrokenPipe) => {
                return Err(DevError::Runtime(format!("writing the pcap file: {e}")));
            }
            _ => {}
        }
    }
    if let Some(e) = failure {
        return Err(DevError::Runtime(format!(
            "{}: reading the device failed: {e}",
            dev.name()
        )));
    }
    Ok(seen)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_of_day_is_local_with_microseconds() {
        let t = Duration::new(86_400 * 3 + 3723, 4_567_000);
        assert_eq!(time_of_day_at(t, 0), "01:02:03.004567");
        assert_eq!(time_of_day_at(t, -5 * 3600), "20:02:03.004567");
        assert_eq!(time_of_day_at(t, 5 * 3600 + 1800), "06:32:03.004567");
    }
}
