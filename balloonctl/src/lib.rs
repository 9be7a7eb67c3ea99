//! balloonctl: the operator's command line for the balloons of one host.

#![forbid(unsafe_code)]

pub mod cli;
pub mod commands;
pub mod error;
pub mod inventory;
pub mod size;
pub mod table;
pub mod watch;
