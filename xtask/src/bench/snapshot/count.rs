//! Counts what a command of the snapshot benchmark listed: sockets, the
//! test namespace's ESTABLISHED ones, and those attributed to a helper.

use std::collections::HashSet;

use serde::Serialize;

use super::Tool;

/// What one command listed (from its untimed check run).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Seen {
    pub lines: u64,
    /// Sockets listed: ss's unindented lines less the header; snapshot's lines.
    pub sockets: u64,
    /// ESTABLISHED sockets of the test namespace.
    #[serde(rename = "test_established")]
    pub ours: u64,
    /// Of those, the ones attributed to a helper process.
    #[serde(rename = "owned_by_helper")]
    pub owned: u64,
    /// Distinct network namespaces among the rows (snapshot only).
    pub namespaces: u64,
}

/// Classifies the output lines of one command.
pub struct LineCounter {
    ss: bool,
    netns_inode: u64,
    helper_pids: Vec<u64>,
    namespaces: HashSet<u64>,
    seen: Seen,
}

impl LineCounter {
    pub fn new(tool: Tool, netns_inode: u64, helper_pids: &[u32]) -> LineCounter {
        LineCounter {
            ss: tool.is_ss(),
            netns_inode,
            helper_pids: helper_pids.iter().map(|&p| p.into()).collect(),
            namespaces: Default::default(),
            seen: Seen::default(),
        }
    }

    pub fn line(&mut self, line: &[u8]) {
        let s = &mut self.seen;
        s.lines += 1;
        let text = String::from_utf8_lossy(line);
        if self.ss {
            // With -i every socket has a second, indented line; the first
            // line of all is the header.
            if s.lines > 1 && !text.starts_with([' ', '\t']) && !text.trim().is_empty() {
                s.sockets += 1;
            }
            if text.starts_with("ESTAB") {
                s.ours += 1;
                if has_number(&text, "pid=", &self.helper_pids) {
                    s.owned += 1;
                }
            }
            return;
        }
        s.sockets += 1;
        let netns = numbers_after(&text, "\"netns\":").next();
        if let Some(ino) = netns {
            self.namespaces.insert(ino);
        }
        if netns == Some(self.netns_inode) && text.contains("\"state\":\"ESTABLISHED\"") {
            s.ours += 1;
            if has_number(&text, "\"pid\":", &self.helper_pids) {
                s.owned += 1;
            }
        }
    }

    pub fn finish(mut self) -> Seen {
        self.seen.namespaces = self.namespaces.len() as u64;
        self.seen
    }
}

/// The numbers right after each `key` in `text`.
fn numbers_after<'a>(text: &'a str, key: &'a str) -> impl Iterator<Item = u64> + 'a {
    text.match_indices(key).filter_map(move |(at, _)| {
        let rest = &text[at + key.len()..];
        let end = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        rest[..end].parse().ok()
    })
}

/// Whether `key` is followed by one of `ns` somewhere in `text`.
fn has_number(text: &str, key: &str, ns: &[u64]) -> bool {
    numbers_after(text, key).any(|v| ns.contains(&v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ss_lines_are_counted() {
        let mut c = LineCounter::new(Tool::SsProcs, 7, &[42]);
        for l in [
            "State  Recv-Q Send-Q Local Address:Port Peer Address:Port Process",
            "LISTEN 0      128    127.0.0.1:5001     0.0.0.0:*         users:((\"xtask\",pid=42,fd=3))",
            "\t cubic cwnd:10",
            "ESTAB  0      0      127.0.0.1:40000    127.0.0.1:5001    users:((\"xtask\",pid=42,fd=4))",
            "\t cubic wscale:7,7 rto:201",
            "ESTAB  0      0      127.0.0.1:5001     127.0.0.1:40000   users:((\"xtask\",pid=420,fd=5))",
        ] {
            c.line(format!("{l}\n").as_bytes());
        }
        let s = c.finish();
        assert_eq!((s.lines, s.sockets, s.ours, s.owned), (6, 3, 2, 1));
    }

    #[test]
    fn snapshot_lines_are_counted() {
        let mut c = LineCounter::new(Tool::Snapshot, 7, &[42]);
        for l in [
            r#"{"netns":7,"owners":[{"pid":42,"comm":"xtask"}],"state":"ESTABLISHED"}"#,
            r#"{"netns":7,"owners":[{"comm":"xtask","pid":421}],"state":"ESTABLISHED"}"#,
            r#"{"netns":7,"owners":[],"state":"LISTEN"}"#,
            r#"{"netns":77,"owners":[{"comm":"xtask","pid":42}],"state":"ESTABLISHED"}"#,
            r#"{"netns":7,"owners":[{"pid":1,"comm":"x"},{"pid":42,"comm":"y"}],"state":"ESTABLISHED"}"#,
        ] {
            c.line(format!("{l}\n").as_bytes());
        }
        let s = c.finish();
        assert_eq!(
            (s.lines, s.sockets, s.ours, s.owned, s.namespaces),
            (5, 5, 3, 2, 2)
        );
    }
}
