//! Randomness from the kernel, by the `getrandom(2)` system call: no file
//! to open (a chroot or a missing `/dev` cannot take it away), and no
//! short reads to mind.

use std::io;

/// Fills `buf` with random bytes.
pub fn fill(buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: getrandom writes at most `rest.len()` bytes into `rest`,
        // a live, exclusively borrowed buffer.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(io::Error::new(e.kind(), format!("getrandom: {e}")));
        }
        done += n as usize;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn fills_whole_buffers_with_something_other_than_zeros() {
        let mut a = [0u8; 4096];
        super::fill(&mut a).unwrap();
        assert!(a.iter().filter(|b| **b == 0).count() < 100);
        let mut b = [0u8; 32];
        super::fill(&mut b).unwrap();
        assert_ne!(a[..32], b);
    }
}
