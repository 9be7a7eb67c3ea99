//! What operators send: control-socket request lines and host-policy
//! configuration files. Anything is answered with a value or a precise
//! error, never a panic.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(message) = balloon_backend::control::parse_request(data) {
        assert!(message.starts_with("bad request: "));
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Err(error) = host_policy_config::Config::parse(Path::new("fuzz.toml"), text) {
            assert!(error.to_string().starts_with("fuzz.toml"));
        }
    }
});
