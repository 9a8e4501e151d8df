//! The subcommands, each a thin layer over the engine, the table and the
//! outputs: parse options, wire the pieces, report.

pub mod check;
pub mod record;
pub mod serve;
pub mod snapshot;
pub mod top;
pub mod tune;
