//! The tracepoint programs, by hook family: TCP tracepoints ([`tcp`]) and
//! the timer tracepoints that frame the socket timers ([`timer`]).

pub mod tcp;
pub mod timer;
