//! Interface names as the kernel accepts them, checked before any system call.

use std::fmt;
use std::str::FromStr;

/// The kernel's limit: `IFNAMSIZ` is 16 bytes including the terminating NUL.
pub const IFNAME_MAX: usize = 15;

/// Why a string is not a valid interface name (or name template).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NameError {
    /// The name is empty.
    #[error("interface name is empty: give a name of 1 to 15 bytes, such as tun0")]
    Empty,
    /// The name is longer than the kernel allows.
    #[error("interface name {name:?} is {len} bytes long: the kernel allows at most 15")]
    TooLong {
        /// The offending name.
        name: String,
        /// Its length in bytes.
        len: usize,
    },
    /// The name contains a character the kernel refuses (`/`, `:`, whitespace, NUL).
    #[error(
        "interface name {name:?} contains {ch:?}: names may not contain '/', ':', whitespace or control characters"
    )]
    BadChar {
        /// The offending name.
        name: String,
        /// The first refused character.
        ch: char,
    },
    /// `.` and `..` are reserved (they would clash with directory entries in
    /// sysfs), and so are `all` and `default` (net.ipv4.conf.all, .default).
    #[error("interface name {0:?} is reserved: choose another name")]
    Reserved(String),
    /// A template may hold `%d` at most once and no other `%` sequence.
    #[error(
        "interface name template {0:?} is invalid: use at most one '%d' (as in tap%d) and no other '%'"
    )]
    BadTemplate(String),
}

/// A valid Linux interface name, or a name template such as `tap%d` whose
/// `%d` the kernel replaces with the first free number.
///
/// The rules are those of the kernel's `dev_valid_name()`: 1 to 15 bytes, not
/// `.` or `..`, no `/`, `:` or whitespace. A template may hold `%d` once.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IfName(String);

impl IfName {
    /// Checks `name` against the kernel's rules.
    pub fn new(name: &str) -> Result<Self, NameError> {
        if name.is_empty() {
            return Err(NameError::Empty);
        }
        if name.len() > IFNAME_MAX {
            return Err(NameError::TooLong {
                name: name.to_owned(),
                len: name.len(),
            });
        }
        if matches!(name, "." | ".." | "all" | "default") {
            return Err(NameError::Reserved(name.to_owned()));
        }
        if let Some(ch) = name
            .chars()
            .find(|&c| c == '/' || c == ':' || c.is_whitespace() || c.is_control())
        {
            return Err(NameError::BadChar {
                name: name.to_owned(),
                ch,
            });
        }
        let percents = name.matches('%').count();
        if percents > 1 || (percents == 1 && name.matches("%d").count() != 1) {
            return Err(NameError::BadTemplate(name.to_owned()));
        }
        Ok(Self(name.to_owned()))
    }

    /// Whether this is a template (`tap%d`) for the kernel to complete.
    pub fn is_template(&self) -> bool {
        self.0.contains("%d")
    }

    /// The name as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name as the kernel's `ifr_name`: NUL-padded to `IFNAMSIZ`.
    pub(crate) fn to_ifr_name(&self) -> [libc::c_char; libc::IFNAMSIZ] {
        let mut out = [0 as libc::c_char; libc::IFNAMSIZ];
        for (dst, &src) in out.iter_mut().zip(self.0.as_bytes()) {
            *dst = src as libc::c_char;
        }
        out
    }

    /// Reads a name back from a kernel `ifr_name` field.
    pub(crate) fn from_ifr_name(raw: &[libc::c_char; libc::IFNAMSIZ]) -> Result<Self, NameError> {
        let bytes: Vec<u8> = raw
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        Self::new(&String::from_utf8_lossy(&bytes))
    }
}

impl FromStr for IfName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Display for IfName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for IfName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_what_the_kernel_accepts() {
        for ok in [
            "tun0",
            "tap%d",
            "a",
            "123456789012345",
            "br-lan.10",
            "wg_0",
            "tap-é",
        ] {
            assert!(IfName::new(ok).is_ok(), "{ok}");
        }
        assert!(IfName::new("tap%d").unwrap().is_template());
        assert!(!IfName::new("tap0").unwrap().is_template());
    }

    #[test]
    fn refuses_with_the_rule() {
        assert_eq!(IfName::new(""), Err(NameError::Empty));
        let e = IfName::new("1234567890123456").unwrap_err();
        assert_eq!(
            e.to_string(),
            "interface name \"1234567890123456\" is 16 bytes long: the kernel allows at most 15"
        );
        // 12 characters but 21 bytes: the limit is in bytes.
        assert_eq!("tapééééééé12".chars().count(), 12);
        assert!(matches!(
            IfName::new("tapééééééé12"),
            Err(NameError::TooLong { len: 19, .. })
        ));
        for (bad, ch) in [
            ("a/b", '/'),
            ("a b", ' '),
            ("a:1", ':'),
            ("a\tb", '\t'),
            ("a\nb", '\n'),
        ] {
            assert_eq!(
                IfName::new(bad),
                Err(NameError::BadChar {
                    name: bad.into(),
                    ch
                })
            );
        }
        assert!(matches!(IfName::new("."), Err(NameError::Reserved(_))));
        assert!(matches!(IfName::new(".."), Err(NameError::Reserved(_))));
        assert!(matches!(IfName::new("all"), Err(NameError::Reserved(_))));
        assert!(matches!(
            IfName::new("default"),
            Err(NameError::Reserved(_))
        ));
        for bad in ["tap%s", "t%d%d", "tap%", "%%d"] {
            assert!(
                matches!(IfName::new(bad), Err(NameError::BadTemplate(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn ifr_name_round_trip() {
        let name = IfName::new("123456789012345").unwrap();
        let raw = name.to_ifr_name();
        assert_eq!(raw[15], 0, "always NUL-terminated");
        assert_eq!(IfName::from_ifr_name(&raw).unwrap(), name);
    }
}
