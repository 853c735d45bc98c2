//! `docs/guide.md` is run, so it cannot drift from the tool. Each `## `
//! section runs in a network namespace of its own, in a directory of its
//! own; in its ```` ```console ```` blocks, `$ CMD` lines are run through
//! `sh` (a trailing ` &` runs in the background until the section ends),
//! must succeed unless marked `# fails`, and the lines after each are what
//! its output must show, in order; a `...` in one stands for anything. A ```` ```FORMAT file=NAME ```` block is
//! written to NAME first.

mod support;

use std::path::Path;
use std::process::{Child, Stdio};

use netlab::{Lab, require_root};

/// What a section asks for, in order.
enum Step {
    File(String, String),
    Run { cmd: String, expect: Vec<String> },
}

fn sections(text: &str) -> Vec<(String, Vec<Step>)> {
    let mut out: Vec<(String, Vec<Step>)> = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if let Some(title) = line.strip_prefix("## ") {
            out.push((title.to_owned(), Vec::new()));
            continue;
        }
        let Some(info) = line.strip_prefix("```") else {
            continue;
        };
        let body: Vec<&str> = lines
            .by_ref()
            .take_while(|l| !l.starts_with("```"))
            .collect();
        let Some((_, steps)) = out.last_mut() else {
            continue;
        };
        if let Some(name) = info
            .split_whitespace()
            .find_map(|w| w.strip_prefix("file="))
        {
            steps.push(Step::File(name.to_owned(), body.join("\n") + "\n"));
        } else if info.trim() == "console" {
            for l in body {
                if let Some(cmd) = l.strip_prefix("$ ") {
                    steps.push(Step::Run {
                        cmd: cmd.to_owned(),
                        expect: Vec::new(),
                    });
                } else if let Some(Step::Run { expect, .. }) = steps.last_mut() {
                    if !l.trim().is_empty() {
                        expect.push(l.trim().to_owned());
                    }
                }
            }
        }
    }
    out
}

/// Whether `line` holds the fragments of `pattern` (split at `...`) in order.
fn matches(pattern: &str, line: &str) -> bool {
    let mut at = 0;
    for frag in pattern
        .split("...")
        .map(str::trim)
        .filter(|f| !f.is_empty())
    {
        match line[at..].find(frag) {
            Some(i) => at += i + frag.len(),
            None => return false,
        }
    }
    true
}

#[test]
fn every_example_of_the_guide_does_what_it_shows() {
    require_root!();
    let guide = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/guide.md");
    let text = std::fs::read_to_string(&guide).expect("docs/guide.md");
    let all = sections(&text);
    assert!(all.len() >= 8, "the guide has {} sections", all.len());
    for (title, steps) in all {
        let lab = Lab::new();
        let ns = lab.netns("g");
        let dir = std::env::temp_dir().join(format!("tapir-guide-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_tapir"), dir.join("bin/tapir")).unwrap();
        let path = format!(
            "{}:{}",
            dir.join("bin").display(),
            std::env::var("PATH").unwrap()
        );
        let mut background: Vec<Child> = Vec::new();
        for step in steps {
            match step {
                Step::File(name, body) => {
                    let p = dir.join(&name);
                    std::fs::write(&p, body).unwrap();
                    std::process::Command::new("chmod")
                        .args(["600", p.to_str().unwrap()])
                        .status()
                        .unwrap();
                }
                Step::Run { cmd, expect } => {
                    let mut c = ns.cmd("sh");
                    c.current_dir(&dir)
                        .env("PATH", &path)
                        .env("TAPIR_RUN_DIR", dir.join("run"))
                        .env("TAPIR_LOG_DIR", dir.join("log"));
                    if let Some(bg) = cmd.strip_suffix(" &") {
                        c.args(["-c", &format!("exec {bg}")])
                            .stdout(Stdio::null())
                            .stderr(Stdio::null());
                        background.push(c.spawn().unwrap());
                        std::thread::sleep(std::time::Duration::from_millis(300));
                        continue;
                    }
                    let out = c.args(["-c", &format!("{cmd} 2>&1")]).output().unwrap();
                    let got = String::from_utf8_lossy(&out.stdout).into_owned();
                    // A command fails the guide unless it says it fails.
                    assert!(
                        out.status.success() || cmd.contains("# fails"),
                        "guide, section {title:?}: `{cmd}` failed ({}):\n{got}",
                        out.status
                    );
                    let mut lines = got.lines();
                    for want in &expect {
                        assert!(
                            lines.any(|l| matches(want, l)),
                            "guide, section {title:?}: `{cmd}` did not show {want:?} (in order); it printed:\n{got}"
                        );
                    }
                }
            }
        }
        for mut b in background {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(b.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = b.wait();
        }
        let _ = std::fs::remove_dir_all(&dir);
        drop(lab);
    }
}
