//! Diagnostics on stderr that can never take the program down: stderr may
//! be /dev/full or a pipe whose reader left, and a lost diagnostic channel
//! must not stop the data channel (or hide a loss in it). `eprintln!`
//! panics when stderr cannot be written; these writes are dropped instead.

use std::io::Write;

/// Writes `keepalive: MESSAGE` and a newline to stderr, ignoring failure.
/// Control characters in it (a file name or a value quoted from a config
/// file can hold a newline or an escape sequence) are escaped, so it stays
/// one line and sends nothing a terminal would act on.
pub fn line(args: std::fmt::Arguments) {
    let msg = args.to_string();
    let msg = crate::events::comm::escape_controls(&msg);
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "keepalive: {msg}");
}

/// `diag!("...", args)`: one `keepalive: ...` line on stderr, never panics.
#[macro_export]
macro_rules! diag {
    ($($arg:tt)*) => {
        $crate::output::diag::line(format_args!($($arg)*))
    };
}
