//! The conventions of a command-line tool: version, completions, manual
//! page, and no option offered where it means nothing.

use std::path::Path;
use std::process::Command;

const TAPIR: &str = env!("CARGO_BIN_EXE_tapir");

fn out(args: &[&str]) -> String {
    let o = Command::new(TAPIR).args(args).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn version_completions_and_manual() {
    assert_eq!(
        out(&["--version"]).trim(),
        format!("tapir {}", env!("CARGO_PKG_VERSION"))
    );
    for shell in ["bash", "zsh", "fish"] {
        let text = out(&["completions", shell]);
        assert!(
            text.contains("genkey") && text.contains("status"),
            "{shell}: {text}"
        );
    }
    let man = out(&["man"]);
    assert!(
        man.contains(".TH tapir 1") && man.contains("genkey"),
        "{man}"
    );
    // With --dir, the pages tapir.1 names are there too, with their options.
    let dir = std::env::temp_dir().join(format!("tapir-man-{}", std::process::id()));
    let text = out(&["man", "--dir", dir.to_str().unwrap()]);
    assert!(text.contains("manual pages in"), "{text}");
    let dev_add = std::fs::read_to_string(dir.join("tapir-dev-add.1")).unwrap();
    assert!(
        dev_add.contains("multi\\-queue") || dev_add.contains("multi-queue"),
        "{dev_add}"
    );
    assert!(dir.join("tapir-explain.1").exists() && dir.join("tapir.1").exists());
    std::fs::remove_dir_all(&dir).unwrap();
    // --tun-path belongs to the commands that open the tun device.
    assert!(!out(&["genkey", "--help"]).contains("--tun-path"));
    assert!(!out(&["pubkey", "--help"]).contains("--tun-path"));
    assert!(out(&["run", "--help"]).contains("--tun-path"));
    assert!(out(&["dev", "add", "--help"]).contains("--tun-path"));
}

#[test]
fn genkey_warns_about_a_file_others_can_read() {
    let dir = std::env::temp_dir().join(format!("tapir-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("k");
    let o = Command::new("sh")
        .args([
            "-c",
            &format!("umask 022; {TAPIR} genkey > {}", key.display()),
        ])
        .output()
        .unwrap();
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("warning") && err.contains("umask 077"),
        "{err}"
    );
    let o = Command::new("sh")
        .args([
            "-c",
            &format!("umask 077; {TAPIR} genkey > {}.2", key.display()),
        ])
        .output()
        .unwrap();
    assert!(
        o.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn the_systemd_unit_installs_and_verifies() {
    let dir = std::env::temp_dir().join(format!("tapir-units-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let text = out(&["install-units", "--dir", dir.to_str().unwrap()]);
    assert!(text.contains("systemctl enable --now tapir@NAME"), "{text}");
    let unit = std::fs::read_to_string(dir.join("tapir@.service")).unwrap();
    let me = std::fs::canonicalize(TAPIR).unwrap();
    assert!(
        unit.contains(&format!("ExecStart={} run /etc/tapir/%i", me.display()))
            && unit.contains("Type=notify")
            && unit.contains("CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_BIND_SERVICE"),
        "{unit}"
    );
    // A binary where the service cannot see it (PrivateTmp=, ProtectHome=):
    // said (the unit would not start, 203/EXEC); one elsewhere: nothing.
    let warned = |bin: &Path| {
        let o = Command::new(bin)
            .args([
                "install-units",
                "--dir",
                dir.join("again").to_str().unwrap(),
            ])
            .output()
            .unwrap();
        assert!(o.status.success());
        String::from_utf8_lossy(&o.stderr).contains("which the service does not see")
    };
    let hidden = Path::new("/tmp").join(format!("tapir-units-bin-{}", std::process::id()));
    std::fs::create_dir_all(&hidden).unwrap();
    let copy = hidden.join("tapir");
    std::fs::copy(TAPIR, &copy).unwrap();
    assert!(warned(&copy));
    std::fs::remove_dir_all(&hidden).unwrap();
    let unseen = ["/tmp", "/var/tmp", "/home", "/root", "/run/user"]
        .iter()
        .any(|d| me.starts_with(d));
    assert_eq!(warned(Path::new(TAPIR)), unseen);
    // systemd-analyze checks an instance of the template.
    std::fs::copy(dir.join("tapir@.service"), dir.join("tapir@wg0.service")).unwrap();
    let o = Command::new("systemd-analyze")
        .args(["verify", dir.join("tapir@wg0.service").to_str().unwrap()])
        .output()
        .expect("systemd-analyze (Debian package systemd)");
    assert!(
        o.status.success() && o.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    // The oneshot for devices declared at boot.
    let unit = std::fs::read_to_string(dir.join("tapir-devices.service")).unwrap();
    assert!(
        unit.contains(&format!(
            "ExecStart={} up /etc/tapir/devices.toml",
            me.display()
        )) && unit.contains("Type=oneshot"),
        "{unit}"
    );
    let o = Command::new("systemd-analyze")
        .args([
            "verify",
            dir.join("tapir-devices.service").to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        o.status.success() && o.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Output into a pipe already closed (`tapir status | head` once head has
/// read enough): the command ends quietly by SIGPIPE, as `ip` and `wg` do,
/// not with a panic and its backtrace.
#[test]
fn a_closed_pipe_ends_a_listing_quietly() {
    use std::os::unix::process::ExitStatusExt;
    for args in [
        &["completions", "bash"][..],
        &["genkey"],
        &["status", "--json"],
    ] {
        let (read, write) = nix::unistd::pipe().unwrap();
        drop(read);
        let o = Command::new(TAPIR)
            .args(args)
            .env("TAPIR_RUN_DIR", std::env::temp_dir().join("tapir-pipe-run"))
            .stdout(std::process::Stdio::from(write))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert_eq!(o.status.signal(), Some(libc::SIGPIPE), "{args:?}: {err}");
    }
}
