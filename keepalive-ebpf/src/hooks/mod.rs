//! The tracepoint programs, by hook family: TCP tracepoints ([`tcp`]) and
//! the timer tracepoints that frame the socket timers ([`timer`]); and the
//! cgroup hooks of `keepalive tune`: new connections ([`sockops`]) and
//! applications setting keepalive options ([`setsockopt`]).

pub mod setsockopt;
pub mod sockops;
pub mod tcp;
pub mod timer;
