//! Fuzzing (proptest) of everything keepalive reads from outside: the
//! configuration and policy files a user hands it, and the raw records the
//! kernel writes to the ring buffer. Each must end in a value or a one-line
//! error naming FILE:LINE, never a panic; a decoded event must render as
//! one line of text and as valid JSON.
//!
//! Inputs are arbitrary text, TOML-shaped text, and mutations of the seed
//! corpus in `tests/fuzz/{config,policy}/` (kept in the repository, with
//! proptest's regressions in `proptest-regressions/`). `cargo test` runs a
//! few hundred cases; a long run:
//! `PROPTEST_CASES=1000000 cargo test --release -p keepalive-user --lib fuzz`.

use proptest::prelude::*;

use crate::config::{Loaded, ThresholdFlags, thresholds};
use crate::events::{ResetReasons, decode};
use crate::output::Clock;
use crate::output::json::{self, EventOut};
use crate::output::text::event_text;
use keepalive_common::RawEvent;

const CORPUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fuzz");

fn corpus(kind: &str) -> Vec<String> {
    let mut files: Vec<_> = std::fs::read_dir(format!("{CORPUS}/{kind}"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
        .iter()
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect()
}

/// One edit of a corpus file: (where, what byte, insert/replace/delete).
type Edit = (usize, u8, u8);

fn mutate(seed: &str, edits: &[Edit]) -> String {
    let mut b = seed.as_bytes().to_vec();
    for &(at, byte, op) in edits {
        let at = if b.is_empty() { 0 } else { at % (b.len() + 1) };
        match op % 3 {
            0 => b.insert(at, byte),
            1 if at < b.len() => b[at] = byte,
            2 if at < b.len() => {
                b.remove(at);
            }
            _ => b.push(byte),
        }
    }
    String::from_utf8_lossy(&b).into_owned()
}

/// A file error must be one line that starts with `name:LINE: ` with a
/// line in the file.
fn assert_file_error(e: &anyhow::Error, name: &str, text: &str) {
    let msg = format!("{e:#}");
    assert!(!msg.contains('\n'), "multi-line error: {msg:?}");
    let rest = msg
        .strip_prefix(&format!("{name}:"))
        .unwrap_or_else(|| panic!("error without {name}: {msg:?}"));
    let line: usize = rest
        .split(':')
        .next()
        .and_then(|l| l.parse().ok())
        .unwrap_or_else(|| panic!("error without a line: {msg:?}"));
    assert!(
        line >= 1 && line <= text.split('\n').count() + 1,
        "line {line} of a {}-line file: {msg:?}",
        text.split('\n').count()
    );
}

fn check_config(text: &str) {
    match Loaded::parse(text, "f.toml") {
        Ok(l) => {
            if let Err(e) = thresholds(&ThresholdFlags::default(), Some(&l)) {
                assert_file_error(&e, "f.toml", text);
            }
            if let Err(e) = l.serve() {
                assert_file_error(&e, "f.toml", text);
            }
        }
        Err(e) => assert_file_error(&e, "f.toml", text),
    }
}

fn check_policy(text: &str) {
    if let Err(e) = crate::tune::policy::parse(text, "p.toml") {
        assert_file_error(&e, "p.toml", text);
    }
}

/// TOML-shaped text: known and unknown keys with values of every type.
fn tomlish() -> impl Strategy<Value = String> {
    let key = prop_oneof![
        Just("idle".to_string()),
        Just("middlebox_timeout".to_string()),
        Just("close_wait".to_string()),
        Just("dead_retransmits".to_string()),
        Just("name".to_string()),
        Just("remote_port".to_string()),
        Just("local_port".to_string()),
        Just("keepalive".to_string()),
        Just("interval".to_string()),
        Just("count".to_string()),
        Just("cgroup".to_string()),
        Just("comm".to_string()),
        Just("refresh".to_string()),
        Just("max_conns".to_string()),
        Just("ring_size".to_string()),
        Just("output".to_string()),
        Just("rotate_size".to_string()),
        Just("rotate_keep".to_string()),
        "[a-z_]{1,12}",
    ];
    let value = prop_oneof![
        "\"[0-9]{0,25}(ns|us|ms|s|m|h|d|days|w|y|)\"",
        "\"[ -~]{0,20}\"",
        "-?[0-9]{1,25}",
        Just("true".to_string()),
        Just("[1, \"a\"]".to_string()),
        Just("{ a = 1 }".to_string()),
        "[ -~]{0,10}",
    ];
    let table = prop_oneof![
        Just("[thresholds]".to_string()),
        Just("[serve]".to_string()),
        Just("[[rule]]".to_string()),
        Just("[rule]".to_string()),
        Just(String::new()),
    ];
    prop::collection::vec((table, prop::collection::vec((key, value), 0..6)), 0..4).prop_map(
        |sections| {
            let mut s = String::new();
            for (table, pairs) in sections {
                s += &table;
                s += "\n";
                for (k, v) in pairs {
                    s += &format!("{k} = {v}\n");
                }
            }
            s
        },
    )
}

fn reasons() -> ResetReasons {
    ResetReasons(vec![
        Some("NOT_SPECIFIED".into()),
        None,
        Some("a\nb\u{1b}[0m".into()),
    ])
}

/// Decodes `raw` and renders it both ways.
fn check_raw(raw: &RawEvent) {
    let Some(ev) = decode(raw, &reasons()) else {
        return;
    };
    let clock = Clock::fixed(0);
    let text = event_text(&ev, &clock);
    assert!(!text.chars().any(char::is_control), "{text:?}");
    let json = json::to_string(&EventOut::new(&ev, &clock));
    assert!(!json.contains('\n'));
    let back: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(back.is_object());
}

fn raw_from(bytes: &[u8]) -> RawEvent {
    assert_eq!(bytes.len(), size_of::<RawEvent>());
    // SAFETY: RawEvent is plain old data (integers and byte arrays), valid
    // for any bit pattern, and `bytes` has exactly its size.
    unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) }
}

proptest! {
    #![proptest_config(ProptestConfig {
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::SourceParallel("proptest-regressions"),
        )),
        ..ProptestConfig::default()
    })]

    #[test]
    fn fuzz_config_any_text(text in "(?s).{0,300}") {
        check_config(&text);
    }

    #[test]
    fn fuzz_config_tomlish(text in tomlish()) {
        check_config(&text);
    }

    #[test]
    fn fuzz_config_corpus_mutations(
        which in any::<prop::sample::Index>(),
        edits in prop::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 0..8),
    ) {
        let seeds = corpus("config");
        check_config(&mutate(which.get::<String>(&seeds), &edits));
    }

    #[test]
    fn fuzz_policy_tomlish(text in tomlish()) {
        check_policy(&text);
    }

    #[test]
    fn fuzz_policy_corpus_mutations(
        which in any::<prop::sample::Index>(),
        edits in prop::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 0..8),
    ) {
        let seeds = corpus("policy");
        check_policy(&mutate(which.get::<String>(&seeds), &edits));
    }

    #[test]
    fn fuzz_decode_any_bytes(bytes in prop::collection::vec(any::<u8>(), size_of::<RawEvent>())) {
        check_raw(&raw_from(&bytes));
    }

    #[test]
    fn fuzz_decode_every_kind(
        bytes in prop::collection::vec(any::<u8>(), size_of::<RawEvent>()),
        kind in 0u8..9,
        family in prop_oneof![Just(2u8), Just(10u8), any::<u8>()],
    ) {
        let mut raw = raw_from(&bytes);
        raw.kind = kind;
        raw.family = family;
        check_raw(&raw);
    }
}

#[test]
fn the_corpus_parses_without_panicking() {
    for text in corpus("config") {
        check_config(&text);
    }
    for text in corpus("policy") {
        check_policy(&text);
    }
}
