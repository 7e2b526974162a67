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

/// Makes room for at least `need` file descriptors: if the soft limit is
/// lower, raises it, and the hard limit with it when that is lower too (which
/// takes privilege: CAP_SYS_RESOURCE, e.g. root), up to `/proc/sys/fs/nr_open`.
/// Without privilege the soft limit goes as far as the hard one. Returns the
/// soft limit in force afterwards.
pub fn raise_nofile_to(need: u64) -> u64 {
    let get = || {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        // SAFETY: a plain libc call with a valid, owned struct.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 { Some(limit) } else { None }
    };
    let Some(limit) = get() else { return 0 };
    if limit.rlim_cur >= need {
        return limit.rlim_cur;
    }
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(limit.rlim_max);
    let want = need.min(nr_open.max(limit.rlim_max));
    let raised = libc::rlimit { rlim_cur: want, rlim_max: limit.rlim_max.max(want) };
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        // No privilege to raise the hard limit: the soft one up to it.
        let capped = libc::rlimit { rlim_cur: want.min(limit.rlim_max), rlim_max: limit.rlim_max };
        // SAFETY: as above.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &capped) };
    }
    get().map_or(0, |l| l.rlim_cur)
}
