//! Files `record` writes (`--output`, `--table-dump`): a link or file
//! planted by another user is refused, new files are 0640, and a full disk
//! leaves whole lines, the totals and a non-zero exit.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use keepalive_tests::testkit::MonitorChild;
use keepalive_tests::*;

/// A directory removed (and unmounted, if something was mounted on it) on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str, mode: u32) -> TempDir {
        let p = std::env::temp_dir().join(format!("ka-out-{tag}-{}", std::process::id()));
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&p)
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        TempDir(p)
    }

    fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `cmd` as uid/gid 65534 with no capabilities.
fn as_nobody(cmd: &str) {
    let st = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "sh",
            "-c",
            cmd,
        ])
        .status()
        .expect("setpriv (util-linux) is needed for this test");
    assert!(st.success(), "as nobody: `{cmd}` failed");
}

/// Runs keepalive and returns its exit code and stderr.
fn run_bin(args: &[&str]) -> (i32, String) {
    let (code, err) = run_to_exit(args, Duration::from_secs(30));
    (code, err.join("\n"))
}

#[test]
fn a_symlink_planted_by_another_user_is_not_followed() {
    require_root();
    // The repro: in a world-writable sticky directory (like /tmp)
    // nobody links ka.log to a file only root may write.
    let shared = TempDir::new("sticky", 0o1777);
    let private = TempDir::new("private", 0o755);
    let target = private.join("t");
    std::fs::write(&target, "precious\n").unwrap();
    let link = shared.join("ka.log");
    as_nobody(&format!("ln -s {} {}", target.display(), link.display()));
    let link_s = link.to_str().unwrap();
    for args in [
        vec!["record", "-o", link_s],
        vec!["record", "--table-dump", link_s, "-o", "/dev/null"],
    ] {
        let (code, err) = run_bin(&args);
        assert_ne!(code, 0, "{args:?} succeeded: {err}");
        assert!(
            err.contains(&format!(
                "cannot create {link_s}: is a symbolic link; refusing to follow it"
            )),
            "{args:?}: {err}"
        );
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious\n");
        assert!(std::fs::symlink_metadata(&link).unwrap().is_symlink());
    }
}

#[test]
fn a_file_planted_by_another_user_in_a_sticky_dir_is_refused() {
    require_root();
    let shared = TempDir::new("planted", 0o1777);
    let planted = shared.join("ka.log");
    as_nobody(&format!("echo theirs > {}", planted.display()));
    let p = planted.to_str().unwrap();
    let (code, err) = run_bin(&["record", "-o", p]);
    assert_ne!(code, 0, "{err}");
    assert!(
        err.contains(&format!(
            "cannot create {p}: is owned by uid 65534 in a sticky directory"
        )),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&planted).unwrap(), "theirs\n");
    // A hard link to a file we own is refused too: writing it would
    // change the file elsewhere.
    let dir = TempDir::new("hardlink", 0o755);
    std::fs::write(dir.join("orig"), "mine\n").unwrap();
    std::fs::hard_link(dir.join("orig"), dir.join("out")).unwrap();
    let out = dir.join("out");
    let (code, err) = run_bin(&["record", "-o", out.to_str().unwrap()]);
    assert_ne!(code, 0, "{err}");
    assert!(err.contains("has 2 hard links"), "{err}");
    assert_eq!(std::fs::read_to_string(dir.join("orig")).unwrap(), "mine\n");
}

/// Starts `record` with `args` and waits until its hooks are attached.
fn start(args: &[&str]) -> MonitorChild {
    let mut cmd = Command::new(keepalive_bin());
    cmd.arg("record").args(args);
    MonitorChild::spawn(cmd, Duration::from_secs(30), || false).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Waits for `record` to exit by itself within `limit`; returns its exit
/// code and every stderr line.
fn finish(mut child: MonitorChild, limit: Duration) -> (Option<i32>, Vec<String>) {
    let status = child.wait_exit(limit).unwrap_or_else(|e| panic!("{e:#}"));
    (status.code(), child.stderr.clone())
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

#[test]
fn new_files_are_0640_even_with_umask_0() {
    require_root();
    let dir = TempDir::new("mode", 0o755);
    let (out, dump) = (dir.join("events.jsonl"), dir.join("table.jsonl"));
    let mut sh = Command::new("sh");
    sh.arg("-c").arg(format!(
        "umask 0; exec {} record -o {} --table-dump {}",
        keepalive_bin().display(),
        out.display(),
        dump.display()
    ));
    let mut child = MonitorChild::spawn(sh, Duration::from_secs(30), || false)
        .unwrap_or_else(|e| panic!("record did not start: {e:#}"));
    let st = child
        .stop_with(libc::SIGTERM, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(st.success(), "{st}: {:?}", child.stderr);
    assert_eq!(mode(&out), 0o640);
    assert_eq!(mode(&dump), 0o640);
    assert!(
        std::fs::read_to_string(&dump).unwrap().lines().count() > 0,
        "the table dump is empty"
    );
    assert_eq!(std::fs::metadata(&out).unwrap().uid(), 0);
}

#[test]
fn a_full_disk_leaves_whole_lines_totals_and_an_error_exit() {
    require_root();
    let dir = TempDir::new("full", 0o755);
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16k,mode=0755", "tmpfs"])
        .arg(&dir.0)
        .status()
        .unwrap();
    assert!(st.success(), "cannot mount a tmpfs");
    let out = dir.join("events.jsonl");
    let ns = Netns::new("full");
    let port = 20000 + (std::process::id() % 20000) as u16;
    let port_s = port.to_string();
    let child = start(&[
        "--format",
        "json",
        "--event",
        "state_change",
        "--port",
        &port_s,
        "--refresh",
        "0",
        "-o",
        out.to_str().unwrap(),
    ]);
    // ~6 state changes of ~300 bytes per connection: far more than 16 KiB.
    ns.churn_loopback(port, 200);
    let (code, stderr) = finish(child, Duration::from_secs(20));
    assert_eq!(code, Some(1), "{stderr:?}");
    let err = stderr.join("\n");
    assert!(err.contains("No space left on device"), "{err}");
    assert!(err.contains("stopped; emitted="), "no totals: {err}");
    let text = std::fs::read_to_string(&out).unwrap();
    assert!(text.len() > 8 * 1024, "only {} bytes written", text.len());
    assert!(
        text.ends_with('\n'),
        "the last line is cut: {:?}",
        &text[text.len().saturating_sub(80)..]
    );
    let lines = text.lines().count() as u64;
    for l in text.lines() {
        let v: serde_json::Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("half a line {l:?}: {e}"));
        assert_eq!(v["event"], "state_change");
    }
    assert!(
        err.contains(&format!("({lines} whole lines written,")),
        "{lines} lines in the file: {err}"
    );
}

#[test]
fn dev_full_is_an_error_with_totals() {
    require_root();
    let ns = Netns::new("devfull");
    let port = 20000 + (std::process::id() % 20000) as u16 + 1;
    let port_s = port.to_string();
    let child = start(&[
        "--event",
        "state_change",
        "--port",
        &port_s,
        "--refresh",
        "0",
        "-o",
        "/dev/full",
    ]);
    ns.churn_loopback(port, 5);
    let (code, stderr) = finish(child, Duration::from_secs(20));
    let err = stderr.join("\n");
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("writing /dev/full: No space left on device"),
        "{err}"
    );
    assert!(err.contains("stopped; emitted="), "{err}");
}
