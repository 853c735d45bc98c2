//! wg-quick files from the wild (`tests/fixtures/wild`): each loads, or
//! fails with the reason its first line expects (`# expect: ok` or
//! `# expect: error: TEXT`).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

#[test]
fn every_file_loads_or_fails_with_a_clear_reason() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/wild");
    let tmp = std::env::temp_dir().join(format!("tapir-wild-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{}: no '# expect:' line", path.display()))
            .trim()
            .to_owned();
        // As a user keeps them: readable by root only.
        let copy = tmp.join(path.file_name().unwrap());
        std::fs::write(&copy, &text).unwrap();
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o600)).unwrap();
        let result = tapir::config::load(&copy);
        match expect.strip_prefix("error: ") {
            None => {
                assert_eq!(expect, "ok", "{}", path.display());
                let c = result.unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                assert!(
                    c.warnings.is_empty(),
                    "{}: {:?}",
                    path.display(),
                    c.warnings
                );
            }
            Some(want) => {
                let e = match result {
                    Ok(_) => panic!("{}: loaded, expected {want:?}", path.display()),
                    Err(e) => e.to_string(),
                };
                assert!(e.contains(want), "{}: {e}", path.display());
                // Errors name the file, and a line when there is one.
                assert!(e.starts_with(&copy.display().to_string()), "{e}");
            }
        }
        seen += 1;
    }
    assert!(seen >= 12, "the corpus shrank: {seen} files");
    std::fs::remove_dir_all(&tmp).unwrap();
}
