//! Diagnostics on stderr that can never take the program down: stderr may
//! be /dev/full or a pipe whose reader left, and a lost diagnostic channel
//! must not stop the data channel (or hide a loss in it). `eprintln!`
//! panics when stderr cannot be written; these writes are dropped instead.

use std::io::Write;

/// Writes `keepalive: MESSAGE` and a newline to stderr, ignoring failure.
pub fn line(args: std::fmt::Arguments) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "keepalive: {args}");
}

/// `diag!("...", args)`: one `keepalive: ...` line on stderr, never panics.
#[macro_export]
macro_rules! diag {
    ($($arg:tt)*) => {
        $crate::output::diag::line(format_args!($($arg)*))
    };
}
