//! Lines a child process writes, read on a thread so that a reader can
//! wait for one with a timeout.

use std::io::{BufRead, BufReader, Read};
use std::sync::mpsc;

/// Lines read from `r` on a thread, until it closes (the child exits) or
/// the receiver is dropped.
pub fn line_channel(r: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}
