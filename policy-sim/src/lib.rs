//! policy-sim: every balloon policy (balloon-policy's `decide_with`, the
//! guest-agent gate included, as the daemon runs it) on synthetic hosts.
//! `host-policy simulate` is its command line.
//!
//! - `guest_model`: one guest, one second at a time (free page reporting,
//!   the balloon driver, deflate-on-OOM, swap, stalls, the guest agent).
//! - `simulate`: scenario files, runs, their metrics, CSV and SVG, policy
//!   comparisons and safe-density searches.
//! - `family`: generated distributions of scenarios and their summary.
//! - `plot`: runs side by side as SVG (also used by xtask's real-guest
//!   benchmark).

#![forbid(unsafe_code)]

pub mod error;
pub mod family;
pub mod guest_model;
pub mod plot;
pub mod simulate;

pub use error::SimError;
