//! Test support for the VMM: the in-guest agent ([`agent`]) and the host-side harness that
//! boots guests and talks to it ([`harness`]).

pub mod agent;
pub mod harness;
