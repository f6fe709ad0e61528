//! Namespaced hosts for multi-process scenarios (the daemon's [`colony_daemon::netlab`]).

pub use colony_daemon::netlab::*;
