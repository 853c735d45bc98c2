//! Users and groups by name or number, as `ip tuntap add ... user U group G` takes them.

use nix::unistd::{Gid, Group, Uid, User};

/// Resolves a user name or numeric uid.
pub fn uid(spec: &str) -> Result<u32, String> {
    if let Ok(n) = spec.parse::<u32>() {
        return valid(n, "uid");
    }
    match User::from_name(spec) {
        Ok(Some(u)) => Ok(u.uid.as_raw()),
        Ok(None) => Err(format!(
            "no user named {spec:?}: give an existing user name or a numeric uid"
        )),
        Err(e) => Err(format!("cannot look up user {spec:?}: {e}")),
    }
}

/// Resolves a group name or numeric gid.
pub fn gid(spec: &str) -> Result<u32, String> {
    if let Ok(n) = spec.parse::<u32>() {
        return valid(n, "gid");
    }
    match Group::from_name(spec) {
        Ok(Some(g)) => Ok(g.gid.as_raw()),
        Ok(None) => Err(format!(
            "no group named {spec:?}: give an existing group name or a numeric gid"
        )),
        Err(e) => Err(format!("cannot look up group {spec:?}: {e}")),
    }
}

/// `n`, unless it is 4294967295: -1, which the kernel takes for "none"
/// and refuses as an owner.
fn valid(n: u32, what: &str) -> Result<u32, String> {
    if n == u32::MAX {
        Err(format!(
            "{what} {n} is -1, which means none, not an owner: give a real {what} (or leave the option out for none)"
        ))
    } else {
        Ok(n)
    }
}

/// The name of user `uid`, if it has one.
pub fn user_name(uid: u32) -> Option<String> {
    User::from_uid(Uid::from_raw(uid))
        .ok()
        .flatten()
        .map(|u| u.name)
}

/// The name of group `gid`, if it has one.
pub fn group_name(gid: u32) -> Option<String> {
    Group::from_gid(Gid::from_raw(gid))
        .ok()
        .flatten()
        .map(|g| g.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers() {
        assert_eq!(uid("root"), Ok(0));
        assert_eq!(uid("1234"), Ok(1234));
        assert!(uid("4294967295").unwrap_err().contains("is -1"));
        assert!(gid("4294967295").unwrap_err().contains("is -1"));
        assert_eq!(gid("root"), Ok(0));
        assert_eq!(user_name(0).as_deref(), Some("root"));
        let e = uid("no-such-user-tapir").unwrap_err();
        assert!(e.contains("no user named"), "{e}");
        let e = gid("no-such-group-tapir").unwrap_err();
        assert!(e.contains("no group named"), "{e}");
    }
}
