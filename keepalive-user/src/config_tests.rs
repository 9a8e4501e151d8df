//! Unit tests of `config.rs`.

use super::*;

#[test]
fn file_values_apply_and_flags_override() {
    let f = Loaded::parse(
        "[thresholds]\nidle = \"5m\"\nclose_wait = \"90s\"\ndead_retransmits = 5\n",
        "k.toml",
    )
    .unwrap();
    let t = thresholds(&ThresholdFlags::default(), Some(&f)).unwrap();
    assert_eq!(t.idle_ms, 300_000);
    assert_eq!(t.close_wait_ms, 90_000);
    assert_eq!(t.dead_retransmits, 5);
    assert_eq!(t.middlebox_idle_ms, 350_000, "default kept");
    let flags = ThresholdFlags {
        idle_ms: Some(1_000),
        ..Default::default()
    };
    assert_eq!(thresholds(&flags, Some(&f)).unwrap().idle_ms, 1_000);
}

#[test]
fn bad_duration_names_file_and_line() {
    let f = Loaded::parse("# comment\n[thresholds]\n\nidle = \"soon\"\n", "k.toml").unwrap();
    let e = thresholds(&ThresholdFlags::default(), Some(&f))
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("k.toml:4: thresholds.idle: invalid duration `soon`"),
        "{e}"
    );
}

#[test]
fn syntax_errors_and_unknown_keys_name_the_line() {
    let e = Loaded::parse("[thresholds]\nidle = \n", "k.toml")
        .err()
        .unwrap()
        .to_string();
    assert!(e.starts_with("k.toml:2: "), "{e}");
    let e = Loaded::parse("[thresholds]\n\nidel = \"5m\"\n", "k.toml")
        .err()
        .unwrap()
        .to_string();
    assert!(e.starts_with("k.toml:3: ") && e.contains("idel"), "{e}");
    let e = Loaded::parse("[thresholds]\ndead_retransmits = \"x\"\n", "k.toml")
        .err()
        .unwrap()
        .to_string();
    assert!(e.starts_with("k.toml:2: "), "{e}");
}

#[test]
fn serve_table_is_checked_value_by_value() {
    let f = Loaded::parse(
        "[serve]\nmetrics = \"[::1]:9100\"\nmetrics_labels = [\"comm\"]\noutput = \"/var/log/k.jsonl\"\nrotate_size = \"10MiB\"\nrotate_keep = 3\nevents = [\"timeout\", \"verdict\"]\nlog_format = \"json\"\nrefresh = \"2s\"\nring_size = 65536\naddr = [\"10.0.0.0/8\"]\n\n[[rule]]\nname = \"db\"\nremote_port = 5432\n",
        "k.toml",
    )
    .unwrap();
    let s = f.serve().unwrap();
    assert_eq!(s.metrics, Some("[::1]:9100".parse().unwrap()));
    assert_eq!(s.metrics_labels, Some(vec!["comm".to_string()]));
    assert_eq!(s.output, Some(PathBuf::from("/var/log/k.jsonl")));
    assert_eq!(s.rotate_size, Some(10 << 20));
    assert_eq!(s.rotate_keep, Some(3));
    assert_eq!(s.events, Some(vec![Kind::Timeout, Kind::Verdict]));
    assert_eq!(s.log_format, Some(LogFormat::Json));
    assert_eq!(s.refresh_ms, Some(2000));
    assert_eq!(s.ring_size, Some(65536));
    assert_eq!(s.cidrs.unwrap().len(), 1);
    let s = Loaded::parse("[serve]\nrotate_size = 4096\n", "k.toml")
        .unwrap()
        .serve()
        .unwrap();
    assert_eq!(s.rotate_size, Some(4096));
}

#[test]
fn serve_errors_name_file_line_and_key() {
    let err = |text: &str| {
        Loaded::parse(text, "k.toml")
            .and_then(|l| l.serve())
            .unwrap_err()
            .to_string()
    };
    let e = err("[serve]\n\nmetrics = \"localhost\"\n");
    assert!(
        e.starts_with("k.toml:3: serve.metrics: invalid address `localhost`"),
        "{e}"
    );
    let e = err("[serve]\nrotate_size = \"lots\"\n");
    assert!(
        e.starts_with("k.toml:2: serve.rotate_size: invalid size `lots`"),
        "{e}"
    );
    let e = err("[serve]\nevents = [\"probe\"]\n");
    assert!(
        e.starts_with("k.toml:2: serve.events: unknown event kind `probe`"),
        "{e}"
    );
    let e = err("[serve]\nlog_format = \"xml\"\n");
    assert!(
        e.starts_with("k.toml:2: serve.log_format: unknown log format `xml`"),
        "{e}"
    );
    let e = err("[serve]\nring_size = 1000\n");
    assert!(
        e.starts_with("k.toml:2: serve.ring_size: ring size must be a power of two"),
        "{e}"
    );
    let e = err("[serve]\nmetrics_labels = [\"pid\"]\n");
    assert!(
        e.starts_with("k.toml:2: serve.metrics_labels: unknown label `pid`"),
        "{e}"
    );
    let e = err("[serve]\nrefresh = \"often\"\n");
    assert!(
        e.starts_with("k.toml:2: serve.refresh: invalid duration"),
        "{e}"
    );
    let e = err("[serve]\naddr = [\"10.0.0.300\"]\n");
    assert!(
        e.starts_with("k.toml:2: serve.addr: invalid address"),
        "{e}"
    );
    let e = err("[serve]\nmetric = \"x\"\n");
    assert!(e.starts_with("k.toml:2: ") && e.contains("metric"), "{e}");
    let e = err("[serve]\nrotate_keep = -1\n");
    assert!(e.starts_with("k.toml:2: "), "{e}");
    let e = err("[serve]\nrotate_keep = 5000\n");
    assert!(
        e.starts_with("k.toml:2: serve.rotate_keep: must be at most 1000"),
        "{e}"
    );
    let e = err("[serve]\nrotate_size = 100\n");
    assert!(
        e.starts_with("k.toml:2: serve.rotate_size: must be at least 4096"),
        "{e}"
    );
}

#[test]
fn empty_file_is_all_defaults() {
    let f = Loaded::parse("", "k.toml").unwrap();
    assert_eq!(
        thresholds(&ThresholdFlags::default(), Some(&f)).unwrap(),
        Thresholds::default()
    );
}
