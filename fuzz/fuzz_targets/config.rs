//! The config parsers (wg-quick and TOML): any text gives configs or an
//! error naming a line within the text, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let lines = text.lines().count().max(1);
        let name = tapir_sys::IfName::new("tp0").unwrap();
        let path = std::path::Path::new("/nonexistent/tp0.conf");
        if let Err(e) = tapir::config::parse(path, name, text, 0o600) {
            assert!(e.line <= lines, "line {} of {lines}", e.line);
        }
        let path = std::path::Path::new("/nonexistent/t.toml");
        if let Err(e) = tapir::config::parse_toml(path, text, 0o600) {
            assert!(e.line <= lines + 1, "line {} of {lines}", e.line);
        }
    }
});
