//! Unit tests of `file.rs`.

use super::*;
use std::os::unix::fs::PermissionsExt;

fn tmpdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "ka-file-{tag}-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn creates_0640_and_writes_whole_lines() {
    let d = tmpdir("mode");
    let p = d.join("out");
    let mut f = LineFile::create(&p, FileOptions::default()).unwrap();
    f.write_line(b"one").unwrap();
    f.write_line(b"two\n").unwrap();
    f.flush().unwrap();
    assert_eq!(f.lines_written(), 2);
    let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(mode, FILE_MODE & !current_umask());
    assert_eq!(std::fs::read_to_string(&p).unwrap(), "one\ntwo\n");
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn refuses_a_symlink_and_leaves_its_target_alone() {
    let d = tmpdir("link");
    let target = d.join("target");
    std::fs::write(&target, "precious\n").unwrap();
    let link = d.join("out");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let e = LineFile::create(&link, FileOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("symbolic link"), "{e}");
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious\n");
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn refuses_a_hard_link() {
    let d = tmpdir("hard");
    let target = d.join("target");
    std::fs::write(&target, "precious\n").unwrap();
    std::fs::hard_link(&target, d.join("out")).unwrap();
    let e = LineFile::create(&d.join("out"), FileOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("hard links"), "{e}");
    assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious\n");
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn truncates_or_appends_an_existing_file() {
    let d = tmpdir("trunc");
    let p = d.join("out");
    std::fs::write(&p, "old\n").unwrap();
    let mut f = LineFile::create(&p, FileOptions::default()).unwrap();
    f.write_line(b"new").unwrap();
    drop(f);
    assert_eq!(std::fs::read_to_string(&p).unwrap(), "new\n");
    let opts = FileOptions {
        append: true,
        ..Default::default()
    };
    let mut f = LineFile::create(&p, opts).unwrap();
    f.write_line(b"more").unwrap();
    drop(f);
    assert_eq!(std::fs::read_to_string(&p).unwrap(), "new\nmore\n");
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn reopen_follows_a_moved_file() {
    let d = tmpdir("reopen");
    let p = d.join("out");
    let mut f = LineFile::create(&p, FileOptions::default()).unwrap();
    f.write_line(b"before").unwrap();
    f.flush().unwrap();
    std::fs::rename(&p, d.join("out.old")).unwrap();
    f.write_line(b"still old").unwrap();
    f.reopen().unwrap();
    f.write_line(b"after").unwrap();
    f.flush().unwrap();
    assert_eq!(
        std::fs::read_to_string(d.join("out.old")).unwrap(),
        "before\nstill old\n"
    );
    assert_eq!(std::fs::read_to_string(&p).unwrap(), "after\n");
    assert_eq!(
        std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
        FILE_MODE & !current_umask()
    );
    std::fs::remove_dir_all(d).unwrap();
}

/// Our umask, read without changing it (tests run in parallel).
fn current_umask() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let v = status
        .lines()
        .find_map(|l| l.strip_prefix("Umask:"))
        .unwrap();
    u32::from_str_radix(v.trim(), 8).unwrap()
}

#[test]
fn rotates_by_size_keeping_n_files() {
    let d = tmpdir("rotate");
    let p = d.join("out");
    let opts = FileOptions {
        append: false,
        rotate_size: Some(4096),
        rotate_keep: 2,
    };
    let mut f = LineFile::create(&p, opts).unwrap();
    let line = [b'x'; 999]; // 1000 bytes with the newline
    for _ in 0..20 {
        f.write_line(&line).unwrap();
        f.flush().unwrap();
    }
    drop(f);
    let len = |s: &str| std::fs::metadata(d.join(s)).map(|m| m.len()).ok();
    // 4 lines per file: 20 lines = 5 files, the 2 newest rotated kept.
    assert_eq!(len("out"), Some(4000));
    assert_eq!(len("out.1"), Some(4000));
    assert_eq!(len("out.2"), Some(4000));
    assert_eq!(len("out.3"), None);
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn rotation_after_the_file_was_moved_away_starts_a_new_one() {
    let d = tmpdir("rotate-moved");
    let p = d.join("out");
    let opts = FileOptions {
        append: true,
        rotate_size: Some(4096),
        rotate_keep: 3,
    };
    let mut f = LineFile::create(&p, opts).unwrap();
    let line = [b'x'; 999];
    for _ in 0..3 {
        f.write_line(&line).unwrap();
    }
    f.flush().unwrap();
    // logrotate moves the file; a rotation comes before the SIGHUP.
    std::fs::rename(&p, d.join("moved")).unwrap();
    for _ in 0..5 {
        f.write_line(&line).unwrap();
    }
    f.flush().unwrap();
    drop(f);
    let lines = |s: &str| {
        std::fs::read_to_string(d.join(s))
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    assert_eq!(lines("moved"), 4, "up to the rotation");
    assert_eq!(lines("out"), 4, "after it");
    assert_eq!(lines("out.1"), 0);
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn rotation_without_keep_empties_the_file() {
    let d = tmpdir("rotate0");
    let p = d.join("out");
    let opts = FileOptions {
        append: false,
        rotate_size: Some(4096),
        rotate_keep: 0,
    };
    let mut f = LineFile::create(&p, opts).unwrap();
    for _ in 0..10 {
        f.write_line(&[b'y'; 999]).unwrap();
    }
    drop(f);
    assert_eq!(std::fs::metadata(&p).unwrap().len(), 2000);
    assert!(!d.join("out.1").exists());
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn dev_full_fails_with_counts() {
    let mut f = LineFile::create(Path::new("/dev/full"), FileOptions::default()).unwrap();
    f.write_line(b"a").unwrap();
    f.write_line(b"b").unwrap();
    let e = f.flush().unwrap_err();
    assert_eq!(e.source.raw_os_error(), Some(libc::ENOSPC));
    assert_eq!((e.lines_written, e.lines_unwritten), (0, 2));
    f.write_line(b"c").unwrap();
    assert_eq!(f.lines_unwritten(), 3);
}

#[test]
fn a_failing_line_leaves_nothing_behind() {
    let d = tmpdir("fail");
    let p = d.join("out");
    let mut f = LineFile::create(&p, FileOptions::default()).unwrap();
    f.write_line(b"kept").unwrap();
    let e = f.line_with(|b| {
        b.extend_from_slice(b"{\"half\":");
        Err(io::Error::other("serialiser failed"))
    });
    assert!(e.is_err());
    f.write_line(b"also kept").unwrap();
    drop(f);
    assert_eq!(std::fs::read_to_string(&p).unwrap(), "kept\nalso kept\n");
    std::fs::remove_dir_all(d).unwrap();
}

#[test]
fn rotation_settings_are_checked() {
    let bad = FileOptions {
        rotate_size: Some(10),
        ..Default::default()
    };
    assert!(bad.validate().unwrap_err().contains("--rotate-size"));
    let bad = FileOptions {
        rotate_keep: 5000,
        ..Default::default()
    };
    assert!(bad.validate().unwrap_err().contains("--rotate-keep"));
}
