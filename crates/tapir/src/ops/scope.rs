//! A tunnel's identity is (network namespace, name). Two namespaces may
//! each run a `wg0`; their pid files, logs, control sockets and status
//! must never mix.
//!
//! In the host's namespace everything stays where the tools look for it
//! (`/run/tapir/wg0.pid`, `/var/run/wireguard/wg0.sock`). In any other
//! namespace it moves into a directory of that namespace's own, named by
//! its identity (`/run/tapir/netns-4026532301-132365/wg0.pid`,
//! `/var/run/wireguard/netns-4026532301-132365/wg0.sock`). Stock `wg` only looks
//! in `/var/run/wireguard`, so a tunnel in another namespace also links
//! its socket there when the name is free (and the host's tunnel of that
//! name takes the link over), and refuses control connections from any
//! namespace but its own.

use std::path::{Path, PathBuf};

use tapir_sys::netns;

/// The network namespace this process works in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope {
    id: u64,
    /// Its cookie, where the kernel tells it (see [`Scope::dir`]).
    cookie: Option<u64>,
    initial: bool,
}

impl Scope {
    /// The calling thread's namespace.
    pub fn current() -> Result<Self, String> {
        let id = netns::current().map_err(|e| format!("which network namespace is this: {e}"))?;
        let cookie = netns::cookie().ok();
        // Without access to pid 1 (not root, or root without its
        // capabilities): another namespace if tapir made it a directory
        // (a tunnel ran there), else taken for the host's.
        let initial = netns::initial().map_or_else(
            |_| {
                let own = format!("netns-{id}-{}", cookie.unwrap_or(0));
                let run = std::env::var_os("TAPIR_RUN_DIR").map(PathBuf::from);
                ![Path::new("/run/tapir"), Path::new("/var/run/wireguard")]
                    .into_iter()
                    .chain(run.as_deref())
                    .any(|base| base.join(&own).is_dir())
            },
            |i| i == id,
        );
        Ok(Self {
            id,
            cookie,
            initial,
        })
    }

    /// A namespace as given (for tests of what depends on it).
    #[cfg(test)]
    pub(crate) fn fake(id: u64, initial: bool) -> Self {
        Self {
            id,
            cookie: None,
            initial,
        }
    }

    /// Whether this is the host's namespace (the first process's).
    pub fn is_initial(&self) -> bool {
        self.initial
    }

    /// Where this namespace's files under `base` go: `base` itself in the
    /// host's namespace, `base/netns-ID-COOKIE` in any other. The inode
    /// (ID, as `lsns` shows it) alone would not do: the kernel gives it
    /// again to a namespace made after this one is gone, which would then
    /// find this one's records (rules to take back, hooks to run, bridges
    /// to delete) as its own; the cookie is never given again while the
    /// machine runs, and /run goes with a reboot.
    pub fn dir(&self, base: &Path) -> PathBuf {
        if self.initial {
            base.to_path_buf()
        } else {
            match self.cookie {
                Some(c) => base.join(format!("netns-{}-{c}", self.id)),
                None => base.join(format!("netns-{}", self.id)),
            }
        }
    }

    /// Whether process `pid` lives in this namespace.
    /// (A process we may not inspect, not being root, is taken for one of
    /// this namespace: what it holds is then asked of it, and refused.)
    pub fn holds(&self, pid: i32) -> bool {
        match netns::of_pid(pid) {
            Ok(id) => id == self.id,
            Err(e) => e.kind() == std::io::ErrorKind::PermissionDenied,
        }
    }

    /// The namespace in words, for messages.
    pub fn describe(&self) -> String {
        if self.initial {
            "the host's network namespace".into()
        } else {
            match netns::name_of(self.id) {
                Some(n) => format!("network namespace {n} (netns {})", self.id),
                None => format!("network namespace {}", self.id),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_keeps_the_usual_places_and_others_get_their_own() {
        let host = Scope {
            id: 1,
            cookie: Some(3),
            initial: true,
        };
        let other = Scope {
            id: 4026532301,
            cookie: Some(132365),
            initial: false,
        };
        let base = Path::new("/run/tapir");
        assert_eq!(host.dir(base), base);
        assert_eq!(
            other.dir(base),
            Path::new("/run/tapir/netns-4026532301-132365")
        );
        assert!(Scope::current().unwrap().holds(std::process::id() as i32));
    }
}
