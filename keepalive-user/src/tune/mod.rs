//! `keepalive tune`: apply a keepalive policy to live TCP connections
//! (new ones from sock_ops, existing ones from a socket walk), report every
//! change, and put the original values back on exit.

pub mod policy;
