//! The wg-quick config parser: any text gives a config or an error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let name = tapir_sys::IfName::new("tp0").unwrap();
        let _ = tapir::config::parse(std::path::Path::new("/nonexistent/tp0.conf"), name, text, 0o600);
    }
});
