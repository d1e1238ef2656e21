//! decree's integration tests start real clusters ([`decree_cluster`], re-exported
//! here) and check the invariants of TESTING.md over them ([`check`]).

pub mod check;

pub use decree_cluster::*;
