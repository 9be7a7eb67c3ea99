//! The stack's two line protocols in one place: balloon-backend's control
//! socket ([`control`]) and the guest agent's virtio-serial port
//! ([`agent`]), as serde types; one JSON-lines connection ([`lines`]) with a
//! deadline on every read and write and a cap on every line, which both
//! clients use; and the one `/proc/meminfo` parser ([`meminfo`]).
//!
//! Everything a peer sends is untrusted: nothing here panics on input, no
//! line grows past its cap, and no call waits past its deadline.

#![forbid(unsafe_code)]

pub mod agent;
pub mod control;
pub mod lines;
pub mod meminfo;
