//! `tapir up`, `tapir down`, `tapir status`: tunnels in the background.
//!
//! ```text
//!   up FILE ─▶ load + validate ─▶ spawn `tapir run FILE` (own process group, log file)
//!           ─▶ wait until every tunnel's control socket answers ─▶ pid files ─▶ return
//!              (or the child died: its log says why; nothing is left)
//!   down NAME ─▶ SIGTERM to the pid in NAME.pid ─▶ wait ─▶ remove pid files
//!   status    ─▶ each pid file: alive? ─▶ "get=1" on the control socket ─▶ table or JSON
//! ```
//! Directories default to `/run/tapir` (pid files) and `/var/log/tapir`
//! (logs) and can be moved with `--run-dir`/`--log-dir` or TAPIR_RUN_DIR /
//! TAPIR_LOG_DIR.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::Serialize;

use crate::config;
use crate::scope::Scope;
use crate::uapi::SOCKET_DIR;
use tapir_sys::process::stat_fields;

/// Where pid and log files go.
#[derive(Debug, Clone)]
pub struct Dirs {
    /// Pid files.
    pub run: PathBuf,
    /// Logs.
    pub log: PathBuf,
}

impl Dirs {
    /// Makes (or checks) the run and log directories and this namespace's
    /// own in them: root writes there, and a directory someone else owns
    /// or can write to could have links planted in it. An error names the
    /// setting that gave the directory.
    pub fn ensure(&self, scope: &Scope) -> Result<(), String> {
        for (d, what) in [
            (&self.run, "run directory (--run-dir, TAPIR_RUN_DIR)"),
            (&self.log, "log directory (--log-dir, TAPIR_LOG_DIR)"),
        ] {
            let named = |e: String| format!("the {what}: {e}");
            crate::uapi::ensure_private_dir(d).map_err(named)?;
            crate::uapi::ensure_private_dir(&scope.dir(d)).map_err(named)?;
        }
        Ok(())
    }

    /// This network namespace's pid files: `run` itself in the host's
    /// namespace, `run/netns-INODE-COOKIE` in another (see [`crate::scope`]).
    fn run_here(&self, scope: &Scope) -> PathBuf {
        scope.dir(&self.run)
    }

    /// This namespace's logs.
    fn log_here(&self, scope: &Scope) -> PathBuf {
        scope.dir(&self.log)
    }
}

fn pid_file(dirs: &Dirs, scope: &Scope, name: &str) -> PathBuf {
    dirs.run_here(scope).join(format!("{name}.pid"))
}

/// The pid files `up` wrote for this process's tunnels `names`: found
/// before the process gives up its capabilities (without them it cannot
/// tell its namespace from the host's), taken away as it ends.
pub struct OwnPidFiles(Vec<PathBuf>, Option<PathBuf>);

impl OwnPidFiles {
    /// Where they are.
    pub fn of(dirs: &Dirs, names: &[&str]) -> Self {
        let Ok(scope) = Scope::current() else {
            return Self(Vec::new(), None);
        };
        let paths = names.iter().map(|n| pid_file(dirs, &scope, n)).collect();
        let dir = (!scope.is_initial()).then(|| dirs.run_here(&scope));
        Self(paths, dir)
    }

    /// Removes those that hold this process's pid (stopped by SIGTERM,
    /// not by `tapir down`, they stayed), and this namespace's directory
    /// once empty.
    pub fn forget(self) {
        for path in &self.0 {
            if read_pid(path) == Some(std::process::id() as i32) {
                let _ = std::fs::remove_file(path);
            }
        }
        if let Some(dir) = self.1 {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Whether `pid` is a running `tapir run` (not some later process that was
/// given the same pid after ours died) in this network namespace.
fn alive(scope: &Scope, pid: i32) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmdline.split(|&b| b == 0).collect();
    let is_tapir = args.first().is_some_and(|a| {
        Path::new(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(a))
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("tapir"))
    });
    is_tapir && args.contains(&&b"run"[..]) && !is_zombie(pid) && scope.holds(pid)
}

fn read_pid(path: &Path) -> Option<i32> {
    // Only one tapir wrote (its pid is signalled).
    crate::uapi::read_own_file(path).ok()??.trim().parse().ok()
}

/// The control socket of tunnel `name` in this namespace.
fn socket_path(scope: &Scope, name: &str) -> PathBuf {
    scope
        .dir(Path::new(SOCKET_DIR))
        .join(format!("{name}.sock"))
}

/// Asks a tunnel's control socket for its state (`tapir-get=1`: WireGuard's
/// `get=1` answer plus tapir's own `tapir_*` lines).
pub fn query(name: &str) -> Result<Vec<(String, String)>, String> {
    query_from(&Scope::current()?, name, None)
}

/// [`query`] in `scope`, refusing an answer from any process but `pid` (a
/// socket that someone else planted under the tunnel's name).
fn query_from(
    scope: &Scope,
    name: &str,
    pid: Option<i32>,
) -> Result<Vec<(String, String)>, String> {
    let path = socket_path(scope, name);
    let mut s = UnixStream::connect(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    if let Some(want) = pid {
        let got = crate::uapi::peer_pid(&s);
        if got != Some(want) {
            return Err(format!(
                "{} is answered by {}, not by the tunnel tapir started (pid {want}): another process holds that name",
                path.display(),
                got.map_or("an unknown process".into(), |p| format!("pid {p}"))
            ));
        }
    }
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"tapir-get=1\n\n").map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for line in BufReader::new(s).lines() {
        let line = line.map_err(|e| e.to_string())?;
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once('=') {
            out.push((k.to_owned(), v.to_owned()));
        }
    }
    Ok(out)
}

/// What `up` started.
#[derive(Debug)]
pub struct Up {
    /// The tunnels, up and answering.
    pub names: Vec<String>,
    /// The warnings they logged while starting, to show at the terminal.
    pub warnings: Vec<String>,
    /// What became of each declared device.
    pub devices: Vec<String>,
}

/// What a reload did (see [`reload`]).
#[derive(Debug, Default)]
pub struct Reloaded {
    /// Peers added.
    pub added: u64,
    /// Peers removed.
    pub removed: u64,
    /// Peers changed in place.
    pub changed: u64,
    /// The port it moved to, as the file gives it.
    pub listen_port: Option<u16>,
    /// The private key is the file's new one: sessions start again.
    pub new_key: bool,
    /// What it did not change, and why.
    pub notes: Vec<String>,
    /// What it could not make (a port held by another socket, a route),
    /// the rest being made.
    pub failed: Vec<String>,
}

/// Waits until every tunnel of `names` answers on its control socket, and
/// it is `child` answering; or says why not (its log's words if it ended).
/// The tunnel has `up_limit()` to answer, counted from the last moment it
/// was seen running a command of its own (a hook, resolvconf): those have
/// no time limit, as with wg-quick. `stop` (Ctrl-C) stops it, and it takes
/// back what it did.
fn wait_ready(
    child: &mut std::process::Child,
    scope: &Scope,
    names: &[String],
    log_path: &Path,
    log_start: u64,
    stop: &AtomicBool,
    killed: &mut bool,
) -> Result<(), String> {
    let pid = child.id() as i32;
    let mut end = |child: &mut std::process::Child| {
        let stopped = end_daemon(child);
        *killed = !stopped;
        stopped
    };
    let limit = up_limit();
    let mut deadline = Instant::now() + limit;
    let mut look = Instant::now();
    let (mut running, mut said_of) = (None, None);
    loop {
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            let text = std::fs::read_to_string(log_path).unwrap_or_default();
            // Without the lines that said a tunnel of it was up (before
            // its PostUp, or another of the file, failed): it is not.
            let why: Vec<&str> = text
                .get(log_start as usize..)
                .unwrap_or("")
                .trim()
                .lines()
                .filter(|l| {
                    !names
                        .iter()
                        .any(|n| l.starts_with(&format!("tapir: {n}: up (")))
                })
                .collect();
            return Err(format!(
                "the tunnel did not come up ({status}): {}",
                why.join("\n")
            ));
        }
        if stop.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(format!(
                "interrupted: {}",
                match end(child) {
                    true => "the tunnel was stopped, and what it had set up taken back",
                    false =>
                        "the tunnel did not stop in time and was killed: tapir down NAME clears what it left",
                }
            ));
        }
        // A command of its own running (looked for four times a second):
        // the clock starts again, one that runs past the limit is named,
        // and the tunnel is not asked meanwhile (it answers once done;
        // each question waited 2 s for it).
        if Instant::now() >= look {
            look = Instant::now() + Duration::from_millis(250);
            running = command_of_child(pid);
            if let Some((child, cmd)) = &running {
                let long = tapir_sys::process::age(*child).is_some_and(|a| a >= limit);
                if long && said_of != Some(*child) {
                    eprintln!(
                        "tapir: waiting for `{cmd}` (pid {child}), which the tunnel runs as it comes up: as with wg-quick, its hooks have no time limit (Ctrl-C stops it and takes the tunnel back)"
                    );
                    said_of = Some(*child);
                }
                deadline = Instant::now() + limit;
            }
        }
        if running.is_none() {
            // Ready when every tunnel answers, and it is our child answering.
            let answers: Vec<Result<_, String>> = names
                .iter()
                .map(|n| query_from(scope, n, Some(pid)))
                .collect();
            if let Some(Err(e)) = answers.iter().find(|r| {
                r.as_ref()
                    .is_err_and(|e| e.contains("another process holds"))
            }) {
                end(child);
                return Err(e.clone());
            }
            if answers.iter().all(Result::is_ok) {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            // (A question may have waited past a command that began.)
            if command_of_child(pid).is_some() {
                look = Instant::now();
                continue;
            }
            let stopped = end(child);
            return Err(format!(
                "the tunnel did not answer within {} s; see {}{}",
                limit.as_secs(),
                log_path.display(),
                if stopped {
                    ""
                } else {
                    "; it did not stop and was killed: tapir down NAME clears what it left"
                }
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How long `up` waits for a tunnel to answer while it runs no command:
/// 15 s, or `TAPIR_UP_LIMIT` seconds.
fn up_limit() -> Duration {
    let secs = std::env::var("TAPIR_UP_LIMIT")
        .ok()
        .and_then(|v| v.parse().ok());
    Duration::from_secs(secs.unwrap_or(15))
}

/// Stops a daemon `up` started and waits for it to take back what it did
/// (its hooks are ended within 3 s): true; killed after 20 s: false.
fn end_daemon(child: &mut std::process::Child) -> bool {
    let pid = Pid::from_raw(child.id() as i32);
    let _ = kill(pid, Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if !matches!(child.try_wait(), Ok(None)) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = kill(pid, Signal::SIGKILL);
    let _ = child.wait();
    false
}

/// A process `pid` runs (its pid and command line), if any: a hook.
fn command_of_child(pid: i32) -> Option<(i32, String)> {
    tapir_sys::process::pids().into_iter().find_map(|n| {
        let ppid: i32 = stat_fields(Path::new(&format!("/proc/{n}/stat")))?
            .get(1)?
            .parse()
            .ok()?;
        if ppid != pid {
            return None;
        }
        let cmdline = std::fs::read(format!("/proc/{n}/cmdline")).unwrap_or_default();
        let words: Vec<String> = cmdline
            .split(|b| *b == 0)
            .filter(|w| !w.is_empty())
            .map(|w| String::from_utf8_lossy(w).into_owned())
            .collect();
        Some((n, words.join(" ")))
    })
}

/// Asks tunnel `name` of this namespace to read its config file again and
/// apply it without dropping anyone (as `wg syncconf`); a file with an
/// error is refused whole and the tunnel stays as it was.
pub fn reload(name: &str) -> Result<Reloaded, String> {
    let scope = Scope::current()?;
    let path = socket_path(&scope, name);
    let mut s = UnixStream::connect(&path).map_err(|e| {
        format!(
            "{name} does not answer in {} ({}: {e}): is it up?",
            scope.describe(),
            path.display()
        )
    })?;
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"tapir-reload=1\n\n")
        .map_err(|e| e.to_string())?;
    let mut r = Reloaded::default();
    let mut error = None;
    let mut errno = None;
    for line in BufReader::new(s).lines() {
        let line = line.map_err(|e| e.to_string())?;
        if line.is_empty() {
            break;
        }
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        match k {
            "tapir_added" => r.added = v.parse().unwrap_or(0),
            "tapir_removed" => r.removed = v.parse().unwrap_or(0),
            "tapir_changed" => r.changed = v.parse().unwrap_or(0),
            "tapir_listen_port" => r.listen_port = v.parse().ok(),
            "tapir_private_key" => r.new_key = true,
            "tapir_note" => r.notes.push(v.to_owned()),
            "tapir_failed" => r.failed.push(v.to_owned()),
            "tapir_error" => error = Some(v.to_owned()),
            "errno" => errno = v.parse::<i32>().ok(),
            _ => {}
        }
    }
    match (errno, error) {
        (Some(0), _) => Ok(r),
        (_, Some(e)) => Err(format!("reload refused, {name} left as it was: {e}")),
        (Some(95), None) => Err(format!(
            "{name} does not know reload (an older tapir, or not tapir)"
        )),
        (n, None) => Err(format!("{name} answered errno {n:?}")),
    }
}

/// Starts `cmd` (tapir itself) as a daemon: its output appended to `log`
/// (no symbolic link followed), stdin from /dev/null, working from /, with
/// its stdio and nothing else the caller had open, in a process group of
/// its own (a Ctrl-C at the terminal that started it does not reach it).
/// Returns the child and where its output starts in the log.
pub fn spawn_daemon(mut cmd: Command, log: &Path) -> Result<(std::process::Child, u64), String> {
    // 0600: what hooks print goes there too.
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(log)
        .map_err(|e| format!("{}: {e}", log.display()))?;
    let start = out.metadata().map(|m| m.len()).unwrap_or(0);
    if let Err(e) = tapir_sys::process::cloexec_beyond_stdio() {
        eprintln!("tapir: warning: extra descriptors may reach the background process: {e}");
    }
    let child = cmd
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(out.try_clone().map_err(|e| e.to_string())?)
        .stderr(out)
        .process_group(0)
        .spawn()
        .map_err(|e| format!("starting {}: {e}", cmd.get_program().to_string_lossy()))?;
    Ok((child, start))
}

/// Waits (3 s at most) for process `pid` to finish exiting, if it is: a
/// tunnel killed a moment ago may still hold its port while its device is
/// already gone. Its memory goes first (its command line reads empty), its
/// descriptors after, one by one, the device's taking a while; and its
/// threads each exit in turn, the first one (whose state `/proc/PID`
/// shows) a zombie before the others are done.
fn wait_while_exiting(pid: i32) {
    // A kernel thread (a pid used again) has no command line either.
    let kernel_thread = stat_fields(Path::new(&format!("/proc/{pid}/stat")))
        .and_then(|f| f.get(6)?.parse::<u64>().ok())
        .is_some_and(|flags| flags & 0x0020_0000 != 0); // PF_KTHREAD
    let exiting = || {
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            return false;
        };
        !kernel_thread
            && cmdline.is_empty()
            && std::fs::read_dir(format!("/proc/{pid}/task"))
                .map(|tasks| {
                    tasks.flatten().any(|t| {
                        stat_fields(&t.path().join("stat")).is_some_and(|f| {
                            f.first().is_some_and(|st| !st.starts_with(['Z', 'X']))
                        })
                    })
                })
                .unwrap_or(false)
    };
    let deadline = Instant::now() + Duration::from_secs(3);
    while exiting() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Writes `pid` to `path` by a new file renamed into place: whatever is at
/// `path` (a link planted there, say) is replaced, never written through.
fn write_pid_file(path: &Path, pid: i32) -> std::io::Result<()> {
    let mut staging = path.as_os_str().to_owned();
    staging.push(format!(".{}", std::process::id()));
    let staging = PathBuf::from(staging);
    let _ = std::fs::remove_file(&staging);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&staging)
        .and_then(|mut f| f.write_all(format!("{pid}\n").as_bytes()))
        .and_then(|()| std::fs::rename(&staging, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&staging);
    }
    written
}

/// Starts the tunnels of `file` in the background; returns their names once
/// they answer, or the reason they did not (with nothing left behind).
pub fn up(
    tapir: &Path,
    file: &Path,
    tun_path: &Path,
    dirs: &Dirs,
    stop: &AtomicBool,
) -> Result<Up, String> {
    let (configs, devices) = config::load_file(file).map_err(|e| e.to_string())?;
    // Declared devices first (tunnels may use them), rolled back if a later
    // one fails: a failed up leaves nothing it created.
    let mut device_lines = Vec::new();
    let mut created = Vec::new();
    for d in &devices {
        match crate::devices::apply(d, tun_path) {
            Ok((o, kept)) => {
                let line = match &o {
                    crate::devices::Outcome::Created => format!("{}: created", d.name),
                    crate::devices::Outcome::Unchanged => format!("{}: unchanged", d.name),
                    crate::devices::Outcome::Corrected(what) => {
                        format!("{}: corrected ({})", d.name, what.join(", "))
                    }
                };
                device_lines.push(kept.iter().fold(line, |l, k| l + "; " + k));
                if o == crate::devices::Outcome::Created {
                    created.push(d);
                }
            }
            Err(e) => {
                for c in created {
                    let _ = crate::devices::remove(c);
                }
                // Named once (`dev set`'s errors name it already).
                let e = e.to_string();
                let named = e.starts_with(&format!("{}: ", d.name));
                return Err(if named { e } else { format!("{}: {e}", d.name) });
            }
        }
    }
    if configs.is_empty() {
        return Ok(Up {
            names: Vec::new(),
            warnings: Vec::new(),
            devices: device_lines,
        });
    }
    // From here a failure takes back the devices this up created too.
    let started = (|| -> Result<Up, String> {
        // The daemon works from /, so it gets the file by its full path;
        // a link is not resolved: the tunnel is named after the file as
        // given (wg0.conf -> real/site-a.conf runs wg0, as wg-quick does).
        let file = &std::path::absolute(file).map_err(|e| format!("{}: {e}", file.display()))?;
        let scope = Scope::current()?;
        let names: Vec<String> = configs.iter().map(|c| c.name.to_string()).collect();
        dirs.ensure(&scope)?;
        // One up at a time in this namespace: a second waits for the first
        // and then finds its tunnels up (two raced, and the loser's error
        // held the winner's log lines). The lock is the run directory's
        // own (no file to leave behind); released when this returns.
        let here = dirs.run_here(&scope);
        let lock = std::fs::File::open(&here).map_err(|e| format!("{}: {e}", here.display()))?;
        let mut said = false;
        while !tapir_sys::process::try_lock(&lock)
            .map_err(|e| format!("{}: {e}", here.display()))?
        {
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                return Err("interrupted while another tapir up of this namespace ran".into());
            }
            if !said {
                eprintln!(
                    "tapir: waiting for another tapir up in {} to finish (Ctrl-C gives up)",
                    scope.describe()
                );
                said = true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        for name in &names {
            if let Some(pid) = running_pid(dirs, &scope, name) {
                return Err(format!(
                    "{name} is already up in {} (pid {pid}): tapir down {name} first",
                    scope.describe()
                ));
            }
        }
        for name in &names {
            if let Some(pid) = read_pid(&pid_file(dirs, &scope, name)) {
                wait_while_exiting(pid);
            }
        }
        let log_path = dirs
            .log_here(&scope)
            .join(format!("{}.log", names.join("+")));
        let mut cmd = Command::new(tapir);
        cmd.arg("run")
            .arg("--tun-path")
            .arg(tun_path)
            .arg("--run-dir")
            .arg(&dirs.run)
            .arg("--log-dir")
            .arg(&dirs.log)
            .arg(file);
        let (mut child, log_start) = spawn_daemon(cmd, &log_path)?;
        let pid = child.id() as i32;
        // Its records at once: `tapir down NAME` finds it while it starts
        // (a PreUp that hangs); gone again if it does not come up (the
        // tunnel takes those holding its pid as it ends, and so does this).
        let records: Vec<PathBuf> = names.iter().map(|n| pid_file(dirs, &scope, n)).collect();
        let forget = || {
            for path in &records {
                if read_pid(path) == Some(pid) {
                    let _ = std::fs::remove_file(path);
                }
            }
        };
        for path in &records {
            let mut written = write_pid_file(path, pid);
            // The namespace's directory, empty, may have just gone with an
            // earlier run's process as it ended: made again, once.
            if written
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound)
            {
                if let Some(dir) = path.parent() {
                    let _ = crate::uapi::ensure_private_dir(dir);
                }
                written = write_pid_file(path, pid);
            }
            if let Err(e) = written {
                // Not up without its record: stopped again, nothing left.
                end_daemon(&mut child);
                forget();
                return Err(format!(
                    "{}: {e}; the tunnel was stopped again",
                    path.display()
                ));
            }
        }
        let mut killed = false;
        let ready = wait_ready(
            &mut child,
            &scope,
            &names,
            &log_path,
            log_start,
            stop,
            &mut killed,
        );
        // Killed, it took nothing back: its records stay, for `tapir down
        // NAME` to clear what it left (its rules, DNS, socket).
        if ready.is_err() && !killed {
            forget();
        }
        ready?;
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        let warnings = text
            .get(log_start as usize..)
            .unwrap_or("")
            .lines()
            // And what it took back for an earlier run that died (rules,
            // hooks run): done as root, so said where up was asked.
            .filter(|l| l.contains("warning:") || l.contains("for an earlier run"))
            .map(str::to_owned)
            .collect();
        Ok(Up {
            names,
            warnings,
            devices: device_lines,
        })
    })();
    if started.is_err() {
        for c in created {
            let _ = crate::devices::remove(c);
        }
    }
    started
}

/// The `tapir run` answering on the control socket of tunnel `name` in
/// this namespace, if one does.
fn socket_owner(scope: &Scope, name: &str) -> Option<i32> {
    let s = UnixStream::connect(socket_path(scope, name)).ok()?;
    let pid = crate::uapi::peer_pid(&s)?;
    alive(scope, pid).then_some(pid)
}

/// The process running tunnel `name` in this namespace: the one in its pid
/// file (`tapir up`), or the one answering on its control socket (`tapir
/// run` by hand or by systemd).
fn running_pid(dirs: &Dirs, scope: &Scope, name: &str) -> Option<i32> {
    read_pid(&pid_file(dirs, scope, name))
        .filter(|&p| alive(scope, p) && may_run(p, name))
        .or_else(|| socket_owner(scope, name))
}

/// Whether `tapir run` process `pid` may be the one running tunnel `name`:
/// its file is `NAME.conf` (or a TOML file, which may name several). A pid
/// the kernel gave again to another tunnel's process, whose file is named
/// otherwise, is not (down would have stopped that one).
fn may_run(pid: i32, name: &str) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let file = cmdline
        .split(|&b| b == 0)
        .rfind(|a| !a.is_empty())
        .map(|a| Path::new(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(a)));
    file.is_some_and(|f| {
        f.extension().is_some_and(|x| x == "toml") || f.file_stem().is_some_and(|s| s == name)
    })
}

/// What `down` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stopped {
    /// The process (pid) ended, and with it the other tunnels it ran
    /// (those of its file), named.
    Stopped(i32, Vec<String>),
    /// It had already died (crashed, or killed): what it left was cleared.
    WasDead(i32, Vec<String>),
}

/// `tapir down FILE`: every tunnel of the file that runs here is stopped
/// and every device it declares is deleted; returns what was done, one
/// line a tunnel or device, an error for those that could not be taken
/// down (the others are taken down all the same).
pub fn down_file(file: &Path, dirs: &Dirs) -> Result<Vec<Result<String, String>>, String> {
    let (tunnels, devices) = config::load_file(file).map_err(|e| e.to_string())?;
    let scope = Scope::current()?;
    let mut done = Vec::new();
    // Each tunnel's process, found before any goes: one process runs all
    // the tunnels of a file, and stopping it takes their pid files with it.
    let pids: Vec<Option<i32>> = tunnels
        .iter()
        .map(|t| {
            let name = t.name.as_str();
            running_pid(dirs, &scope, name).or_else(|| read_pid(&pid_file(dirs, &scope, name)))
        })
        .collect();
    let mut stopped = Vec::new();
    for (t, pid) in tunnels.iter().zip(pids) {
        let name = t.name.as_str();
        done.push(match pid {
            Some(p) if stopped.contains(&p) => Ok(format!("{name} is down")),
            Some(p) => down(name, dirs).map(|_| {
                stopped.push(p);
                format!("{name} is down")
            }),
            None => Ok(format!("{name} was not up")),
        });
    }
    // A device a process holds (a VM's tap) is kept, said so: deleting it
    // would pull it from under that process. The kernel says whether one is
    // open; /proc says who, in this namespace (a holder may have moved on
    // to another after opening it, as container runtimes do).
    let held = crate::dev::holders();
    for d in &devices {
        if let Some((_, h)) = held.iter().find(|(n, _)| n == d.name.as_str()) {
            done.push(Ok(format!(
                "{}: kept: {} (pid {}) holds it open (tapir dev del {} --force deletes it anyway)",
                d.name, h.command, h.pid, d.name
            )));
            continue;
        }
        if crate::dev::is_held(d.name.as_str()) {
            done.push(Ok(format!(
                "{}: kept: a process of another network namespace holds it open (tapir dev del {} --force deletes it anyway)",
                d.name, d.name
            )));
            continue;
        }
        done.push(match crate::devices::remove(d) {
            Ok(gone) => Ok(format!(
                "{}: {}",
                d.name,
                if gone { "deleted" } else { "was not there" }
            )),
            Err(e) => Err(format!("{}: {e}", d.name)),
        });
    }
    Ok(done)
}

/// Stops the process running tunnel `name` in this network namespace (and
/// so every tunnel of its file), and clears what a dead one left: its pid
/// files and a control socket nobody answers on.
pub fn down(name: &str, dirs: &Dirs) -> Result<Stopped, String> {
    let scope = Scope::current()?;
    crate::uapi::trusted_dir(&dirs.run_here(&scope))?;
    let path = pid_file(dirs, &scope, name);
    // A pid file tapir did not write is said, not passed over.
    let recorded = crate::uapi::read_own_file(&path)?.and_then(|t| t.trim().parse().ok());
    let live = running_pid(dirs, &scope, name);
    let Some(pid) = live.or(recorded) else {
        return Err(format!(
            "{name} is not up in {} (no {}, and no tunnel answers on {})",
            scope.describe(),
            path.display(),
            socket_path(&scope, name).display()
        ));
    };
    let siblings: Vec<PathBuf> = std::fs::read_dir(dirs.run_here(&scope))
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "pid") && read_pid(p) == Some(pid))
                .collect()
        })
        .unwrap_or_default();
    // What it logs while it stops, read after (a SaveConfig that failed).
    let log = log_of(&dirs.log_here(&scope), name);
    let log_start = log
        .as_ref()
        .and_then(|l| std::fs::metadata(l).ok())
        .map_or(0, |m| m.len());
    if live.is_some() {
        kill(Pid::from_raw(pid), Signal::SIGTERM)
            .map_err(|e| format!("signalling pid {pid}: {e}"))?;
        // 10 s to stop, counted from the last moment it was seen running a
        // command of its own (a PreDown or PostDown, resolvconf): hooks have
        // no time limit, as with wg-quick (a PostDown past 10 s was cut off).
        let limit = Duration::from_secs(10);
        let (mut deadline, mut look) = (Instant::now() + limit, Instant::now());
        let mut said = false;
        while alive(&scope, pid) {
            if Instant::now() >= look {
                look = Instant::now() + Duration::from_millis(250);
                if let Some((child, cmd)) = command_of_child(pid) {
                    deadline = Instant::now() + limit;
                    let long =
                        tapir_sys::process::age(child).is_some_and(|a| a >= Duration::from_secs(2));
                    if !said && long {
                        said = true;
                        eprintln!(
                            "tapir: {name}: waiting for `{cmd}` (pid {child}), which it runs as it stops: as with wg-quick, its hooks have no time limit"
                        );
                    }
                }
            }
            if Instant::now() > deadline {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // Gone, not going: its port is free for an up right after.
    wait_while_exiting(pid);
    let also: Vec<String> = siblings
        .iter()
        .filter_map(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .filter(|n| n != name)
        .collect();
    for p in siblings {
        let _ = std::fs::remove_file(p);
    }
    // Routing rules a killed tunnel could not take back (see tunnel::ops).
    let record = dirs.run_here(&scope).join(format!("{name}.rules"));
    for r in crate::tunnel::ops::clear_leftovers(&record, name) {
        eprintln!("tapir: {name}: {r}, for the process that died");
    }
    // A bridge it made, with its tap gone (see `qemu::BridgeMarks`).
    if let Some(m) = crate::qemu::BridgeMarks::existing(&dirs.run) {
        if let Ok(mut nl) = tapir_sys::Netlink::open() {
            for line in m.sweep(&mut nl).unwrap_or_default() {
                eprintln!("tapir: {name}: {line}");
            }
        }
    }
    // A process killed outright leaves its control socket (and, outside
    // the host's namespace, the link that `wg` finds): nobody answers them.
    let socket = socket_path(&scope, name);
    if socket.exists() && UnixStream::connect(&socket).is_err() {
        use std::os::unix::fs::MetadataExt;
        let ino = std::fs::symlink_metadata(&socket).map(|m| m.ino()).ok();
        let wg = Path::new(SOCKET_DIR).join(format!("{name}.sock"));
        if wg != socket && std::fs::symlink_metadata(&wg).ok().map(|m| m.ino()) == ino {
            let _ = std::fs::remove_file(&wg);
        }
        let _ = std::fs::remove_file(&socket);
        // The name `wg` knows, to a tunnel of that name elsewhere.
        crate::uapi::hand_over(Path::new(SOCKET_DIR), name);
    }
    if !scope.is_initial() {
        // This namespace's directories, once empty (logs stay to be read).
        let _ = std::fs::remove_dir(dirs.run_here(&scope));
        let _ = std::fs::remove_dir(scope.dir(Path::new(SOCKET_DIR)));
    }
    // Down, but what was changed at run time is not saved: said, and an error.
    let unsaved: Vec<String> = log
        .and_then(|l| std::fs::read(l).ok())
        .map(|t| {
            String::from_utf8_lossy(t.get(log_start as usize..).unwrap_or_default())
                .lines()
                .filter(|l| l.contains("SaveConfig:") && !l.contains("peers written"))
                .map(|l| l.trim_start_matches("tapir: ").to_owned())
                .collect()
        })
        .unwrap_or_default();
    if !unsaved.is_empty() {
        return Err(format!(
            "{name} is down, but its peers were not saved: {}",
            unsaved.join("; ")
        ));
    }
    Ok(if live.is_some() {
        Stopped::Stopped(pid, also)
    } else {
        Stopped::WasDead(pid, also)
    })
}

fn is_zombie(pid: i32) -> bool {
    stat_fields(Path::new(&format!("/proc/{pid}/stat")))
        .is_some_and(|f| f.first().is_some_and(|st| st.starts_with('Z')))
}

/// One peer in `status`.
#[derive(Debug, Clone, Serialize, Default)]
pub struct PeerStatus {
    /// Base64 public key.
    pub public_key: String,
    /// Current endpoint.
    pub endpoint: Option<String>,
    /// Allowed IPs.
    pub allowed_ips: Vec<String>,
    /// Unix time of the last handshake.
    pub latest_handshake: Option<u64>,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Persistent keepalive, seconds (0: off).
    pub persistent_keepalive: u64,
    /// Rate limit, bits per second each way.
    pub rate: Option<u64>,
    /// Tap mode: how many MACs were learned on this peer.
    pub mac_count: Option<u64>,
    /// Tap mode: the MACs learned on this peer (the first 64).
    pub macs: Vec<String>,
    /// Tap mode: its learned MACs that new ones displaced at its cap.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub macs_evicted: Option<u64>,
    /// Packets dropped, by rule (`not_allowed`, `wrong_layer`, `rate_rx`...).
    pub drops: std::collections::BTreeMap<String, u64>,
    /// TCP transport: the connection's state and next retry, in words.
    pub connection: Option<String>,
    /// TCP transport: `connected`, `connecting`, `reconnecting`,
    /// `accepted` (the peer's connection) or `waiting` (to be contacted).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_state: Option<String>,
    /// TCP transport, reconnecting: the attempt to come (1 the first).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_attempt: Option<u32>,
    /// TCP transport, reconnecting: milliseconds to the next attempt.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_retry_ms: Option<u64>,
    /// TCP transport, reconnecting: the last attempt's error.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_error: Option<String>,
}

/// One tunnel in `status`.
#[derive(Debug, Clone, Serialize)]
pub struct TunnelStatus {
    /// Interface name.
    pub name: String,
    /// The process, if it runs.
    pub pid: Option<i32>,
    /// Whether the process runs and answers.
    pub running: bool,
    /// Our public key.
    pub public_key: Option<String>,
    /// Its port (UDP or TCP); none for a TCP tunnel that only connects out.
    pub listen_port: Option<u16>,
    /// How packets move (`None`: not running).
    pub datapath: Option<String>,
    /// tun or tap.
    pub mode: Option<String>,
    /// udp or tcp.
    pub transport: Option<String>,
    /// Transport and device counters (TCP connections, refused frames...).
    pub counters: std::collections::BTreeMap<String, u64>,
    /// Peers.
    pub peers: Vec<PeerStatus>,
    /// Its log (`tapir up`'s: `NAME.log`, or the names of its file's
    /// tunnels joined by `+`), where there is one.
    pub log: Option<PathBuf>,
    /// Why a process that runs did not answer (its control socket is
    /// root's: a user gets EACCES).
    pub unanswered: Option<String>,
}

/// The log of tunnel `name` in `dir`: `NAME.log`, or one for several
/// tunnels of a file (`a+NAME+b.log`).
fn log_of(dir: &Path, name: &str) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.extension().is_some_and(|x| x == "log")
                && p.file_stem()
                    .is_some_and(|s| s.to_string_lossy().split('+').any(|n| n == name))
        })
}

/// An endpoint as `wg show` writes it: a link-local address's zone by
/// its interface's name (`[fe80::1%eth0]:51820`), not its number.
fn zone_by_name(endpoint: String) -> String {
    let Ok(std::net::SocketAddr::V6(a)) = endpoint.parse::<std::net::SocketAddr>() else {
        return endpoint;
    };
    if a.scope_id() == 0 {
        return endpoint;
    }
    let name = tapir_sys::Netlink::open()
        .ok()
        .and_then(|mut nl| nl.links().ok())
        .and_then(|links| links.into_iter().find(|l| l.index == a.scope_id()))
        .map(|l| l.name);
    match name {
        Some(n) => format!("[{}%{n}]:{}", a.ip(), a.port()),
        None => endpoint,
    }
}

fn b64(hex: &str) -> String {
    tapir_proto::wg::keys::decode_hex32(hex)
        .map(|k| tapir_proto::wg::keys::PublicKey(k).to_base64())
        .unwrap_or_else(|_| hex.to_owned())
}

/// The state of tunnel `name`, or of every tunnel of this network
/// namespace: those with a pid file (`tapir up`) and those answering on a
/// control socket (`tapir run`).
pub fn status(name: Option<&str>, dirs: &Dirs) -> Result<Vec<TunnelStatus>, String> {
    if let Some(n) = name {
        tapir_sys::IfName::new(n).map_err(|e| e.to_string())?;
    }
    let scope = Scope::current()?;
    crate::uapi::trusted_dir(&dirs.run_here(&scope))?;
    let listed = |dir: PathBuf, suffix: &str| -> Vec<String> {
        std::fs::read_dir(dir)
            .map(|d| {
                d.flatten()
                    .filter_map(|e| {
                        e.file_name()
                            .to_str()?
                            .strip_suffix(suffix)
                            .map(str::to_owned)
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let names: Vec<String> = match name {
        Some(n) => vec![n.to_owned()],
        None => {
            let mut v = listed(dirs.run_here(&scope), ".pid");
            for n in listed(scope.dir(Path::new(SOCKET_DIR)), ".sock") {
                if !v.contains(&n) && socket_owner(&scope, &n).is_some() {
                    v.push(n);
                }
            }
            v.sort();
            v
        }
    };
    let mut out = Vec::new();
    for n in names {
        let recorded = read_pid(&pid_file(dirs, &scope, &n));
        let live = running_pid(dirs, &scope, &n);
        if name.is_some() && recorded.is_none() && live.is_none() {
            return Err(format!(
                "{n} is not up in {} (no {}, and no tunnel answers on {})",
                scope.describe(),
                pid_file(dirs, &scope, &n).display(),
                socket_path(&scope, &n).display()
            ));
        }
        let pid = live.or(recorded);
        let mut t = TunnelStatus {
            name: n.clone(),
            pid,
            running: false,
            public_key: None,
            listen_port: None,
            datapath: None,
            mode: None,
            transport: None,
            counters: Default::default(),
            peers: Vec::new(),
            log: log_of(&dirs.log_here(&scope), &n),
            unanswered: None,
        };
        if live.is_some() {
            let answer = query_from(&scope, &n, live);
            if let Err(e) = &answer {
                t.unanswered = Some(e.clone());
            }
            if let Ok(kv) = answer {
                t.running = true;
                // tapir's lines come after WireGuard's; `tapir_peer` selects the peer.
                let mut tapir_peer: Option<usize> = None;
                for (k, v) in kv {
                    if let Some(key) = k.strip_prefix("tapir_") {
                        match key {
                            "mode" => t.mode = Some(v),
                            "transport" => t.transport = Some(v),
                            "datapath" => t.datapath = Some(v),
                            "public_key" => t.public_key = Some(b64(&v)),
                            "peer" => {
                                let b = b64(&v);
                                tapir_peer = t.peers.iter().position(|p| p.public_key == b);
                            }
                            _ => match tapir_peer.and_then(|i| t.peers.get_mut(i)) {
                                Some(p) => match key {
                                    "rate" => p.rate = v.parse().ok(),
                                    "mac_count" => p.mac_count = v.parse().ok(),
                                    "macs_evicted" => p.macs_evicted = v.parse().ok(),
                                    "mac" => p.macs.push(v),
                                    "connection" => p.connection = Some(v),
                                    "connection_state" => p.connection_state = Some(v),
                                    "connection_attempt" => p.connection_attempt = v.parse().ok(),
                                    "connection_retry_ms" => p.connection_retry_ms = v.parse().ok(),
                                    "connection_error" => p.connection_error = Some(v),
                                    _ => {
                                        if let Some(rule) = key.strip_prefix("drop_") {
                                            p.drops.insert(rule.to_owned(), v.parse().unwrap_or(0));
                                        }
                                    }
                                },
                                None => {
                                    if let Ok(n) = v.parse() {
                                        t.counters.insert(key.to_owned(), n);
                                    }
                                }
                            },
                        }
                        continue;
                    }
                    match k.as_str() {
                        // A tunnel started by an older tapir still sends it.
                        "private_key" if t.public_key.is_none() => {
                            let key = zeroize::Zeroizing::new(v);
                            t.public_key = tapir_proto::wg::keys::PrivateKey::from_hex(&key)
                                .ok()
                                .map(|k| k.public_key().to_base64());
                        }
                        // 0: none (a TCP tunnel that only connects out).
                        "listen_port" => t.listen_port = v.parse().ok().filter(|&p: &u16| p != 0),
                        "public_key" => t.peers.push(PeerStatus {
                            public_key: b64(&v),
                            ..Default::default()
                        }),
                        _ => {
                            let Some(p) = t.peers.last_mut() else {
                                continue;
                            };
                            match k.as_str() {
                                "endpoint" => p.endpoint = Some(zone_by_name(v)),
                                "allowed_ip" => p.allowed_ips.push(v),
                                "last_handshake_time_sec" => {
                                    p.latest_handshake = v.parse().ok().filter(|s| *s > 0)
                                }
                                "rx_bytes" => p.rx_bytes = v.parse().unwrap_or(0),
                                "tx_bytes" => p.tx_bytes = v.parse().unwrap_or(0),
                                "persistent_keepalive_interval" => {
                                    p.persistent_keepalive = v.parse().unwrap_or(0)
                                }
                                _ => {}
                            }
                        }
                    }
                }
            }
        }
        out.push(t);
    }
    Ok(out)
}

/// "12 seconds ago", "3 minutes, 4 seconds ago", as wg shows it.
pub fn ago(then: u64, now: u64) -> String {
    let d = now.saturating_sub(then);
    let parts: Vec<String> = [
        (d / 86400, "day"),
        (d / 3600 % 24, "hour"),
        (d / 60 % 60, "minute"),
        (d % 60, "second"),
    ]
    .into_iter()
    .filter(|(n, _)| *n > 0)
    .map(|(n, unit)| format!("{n} {unit}{}", if n == 1 { "" } else { "s" }))
    .collect();
    if parts.is_empty() {
        "just now".into()
    } else {
        format!("{} ago", parts.join(", "))
    }
}

fn rate(bits: u64) -> String {
    match bits {
        b if b >= 1_000_000_000 && b % 1_000_000 == 0 => format!("{} gbit", b as f64 / 1e9),
        b if b >= 1_000_000 => format!("{} mbit", b as f64 / 1e6),
        b => format!("{} kbit", b as f64 / 1e3),
    }
}

fn bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.2} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.2} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.2} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

/// `status` for a terminal.
pub fn format(tunnels: &[TunnelStatus]) -> String {
    if tunnels.is_empty() {
        return "no tunnels are up (tapir up FILE starts one)\n".into();
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut out = String::new();
    for t in tunnels {
        out += &format!("tunnel: {}\n", t.name);
        if let (false, Some(pid), Some(why)) = (t.running, t.pid, &t.unanswered) {
            out += &format!(
                "  state: running (pid {pid}), but it did not answer: {why}{}\n\n",
                if why.contains("ermission denied") {
                    " (its control socket is root's: tapir status as root shows it all)"
                } else {
                    ""
                }
            );
            continue;
        }
        if !t.running {
            out += &format!(
                "  state: NOT RUNNING{}\n  what to do: tapir down {} clears what it left; tapir up FILE starts it again\n\n",
                t.pid
                    .map(|p| format!(
                        " (its process, pid {p}, has exited: see its log{})",
                        t.log
                            .as_ref()
                            .map(|l| format!(", {}", l.display()))
                            .unwrap_or_default()
                    ))
                    .unwrap_or_default(),
                t.name
            );
            continue;
        }
        out += &format!(
            "  pid: {}\n  public key: {}\n  mode: {}, transport: {}\n  listening port: {}\n  datapath: {}\n",
            t.pid.unwrap_or(0),
            t.public_key.as_deref().unwrap_or("?"),
            t.mode.as_deref().unwrap_or("tun"),
            t.transport.as_deref().unwrap_or("udp"),
            t.listen_port
                .map_or("none (connects out only)".to_string(), |p| p.to_string()),
            t.datapath.as_deref().unwrap_or("?")
        );
        let counters: Vec<String> = t
            .counters
            .iter()
            .filter(|(_, v)| **v > 0)
            .map(|(k, v)| format!("{} {v}", k.replace('_', " ")))
            .collect();
        if !counters.is_empty() {
            out += &format!("  counters: {}\n", counters.join(", "));
        }
        for p in &t.peers {
            out += &format!("\n  peer: {}\n", p.public_key);
            if let Some(e) = &p.endpoint {
                out += &format!("    endpoint: {e}\n");
            }
            out += &format!(
                "    allowed ips: {}\n",
                if p.allowed_ips.is_empty() {
                    "(none)".into()
                } else {
                    p.allowed_ips.join(", ")
                }
            );
            out += &format!(
                "    latest handshake: {}\n",
                p.latest_handshake.map_or("never".into(), |t| ago(t, now))
            );
            out += &format!(
                "    transfer: {} received, {} sent\n",
                bytes(p.rx_bytes),
                bytes(p.tx_bytes)
            );
            if p.persistent_keepalive > 0 {
                out += &format!(
                    "    persistent keepalive: every {} seconds\n",
                    p.persistent_keepalive
                );
            }
            if let Some(c) = &p.connection {
                out += &format!("    connection: {c}\n");
            }
            if let Some(r) = p.rate {
                out += &format!("    rate limit: {} each way\n", rate(r));
            }
            if let Some(n) = p.mac_count {
                out += &format!(
                    "    learned MACs: {n}{}{}\n",
                    if p.macs.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", p.macs.join(", "))
                    },
                    p.macs_evicted
                        .map(|e| format!("; {e} displaced at the cap by newer ones"))
                        .unwrap_or_default()
                );
            }
            if !p.drops.is_empty() {
                // Counted first: "wrong layer 3" read as OSI layer 3.
                let d: Vec<String> = p
                    .drops
                    .iter()
                    .map(|(k, v)| match k.as_str() {
                        "wrong_layer" => format!("{v} of the other mode (tun/tap)"),
                        _ => format!("{v} {}", k.replace('_', " ")),
                    })
                    .collect();
                out += &format!("    dropped: {}\n", d.join(", "));
                if p.drops.contains_key("wrong_layer") {
                    out += &format!(
                        "    warning: this peer sends {}: is it in {} mode?\n",
                        if t.mode.as_deref() == Some("tap") {
                            "IP packets"
                        } else {
                            "Ethernet frames"
                        },
                        if t.mode.as_deref() == Some("tap") {
                            "tun"
                        } else {
                            "tap"
                        }
                    );
                }
            }
        }
        out.push('\n');
    }
    out
}

/// The systemd units, as shipped in `dist/systemd`: tunnels, and the
/// oneshot for devices declared in /etc/tapir/devices.toml.
const UNITS: [(&str, &str); 2] = [
    (
        "tapir@.service",
        include_str!("../../../../dist/systemd/tapir@.service"),
    ),
    (
        "tapir-devices.service",
        include_str!("../../../../dist/systemd/tapir-devices.service"),
    ),
];

/// Writes the units into `dir`, running the binary at `tapir`; returns
/// the files written.
pub fn install_units(dir: &Path, tapir: &Path) -> Result<Vec<PathBuf>, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut written = Vec::new();
    for (name, text) in UNITS {
        let path = dir.join(name);
        let text = text.replace("/usr/local/bin/tapir", &tapir.to_string_lossy());
        if std::fs::read_to_string(&path).is_ok_and(|old| old != text) {
            eprintln!(
                "tapir: {} was there with other text: replaced (local changes belong in a drop-in: systemctl edit {name})",
                path.display()
            );
        }
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

#[cfg(test)]
mod tests {

    /// A link-local endpoint's zone by name, as `wg show` writes it.
    #[test]
    fn a_zone_is_named_as_wg_names_it() {
        assert_eq!(
            zone_by_name("[fe80::1%1]:51820".into()),
            "[fe80::1%lo]:51820"
        );
        assert_eq!(zone_by_name("192.0.2.1:51820".into()), "192.0.2.1:51820");
        assert_eq!(zone_by_name("[fd00::1]:51820".into()), "[fd00::1]:51820");
    }

    /// A pid of another tunnel's process (the kernel gives pids again) is
    /// not taken for this tunnel's: its file is named otherwise.
    #[test]
    fn a_process_runs_the_tunnel_its_file_names() {
        let mut child = std::process::Command::new("sh")
            .args(["-c", "sleep 5; true", "/etc/tapir/wg7.conf"])
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        // (Until it has run sh, its command line is still ours.)
        let deadline = Instant::now() + Duration::from_secs(5);
        while !std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.starts_with(b"sh\0")) {
            assert!(Instant::now() < deadline, "sh did not start");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(may_run(pid, "wg7"));
        assert!(!may_run(pid, "wg8"));
        let _ = child.kill();
        let _ = child.wait();
    }

    use super::*;

    #[test]
    fn ago_reads_like_wg() {
        assert_eq!(ago(100, 112), "12 seconds ago");
        assert_eq!(ago(0, 3 * 60 + 4), "3 minutes, 4 seconds ago");
        assert_eq!(ago(0, 86400 + 3600), "1 day, 1 hour ago");
        assert_eq!(ago(5, 5), "just now");
    }
}
