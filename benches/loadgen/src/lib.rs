//! What the load client and the floor server share.

/// Each connection is a file descriptor: lifts the soft limit to the hard one.
pub fn raise_nofile_limit() {
    // SAFETY: plain libc calls with a valid, owned struct.
    unsafe {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}
