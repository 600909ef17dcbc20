//! Clocks and CPU accounting: the host monotonic clock that every probe is stamped with (readable
//! by any process on the host, unlike `Instant`), this process's CPU time, and another process's
//! CPU time and memory from `/proc`.

use std::time::Duration;

/// CLOCK_MONOTONIC in nanoseconds: the same clock in every process of the host, so a publisher
/// and a subscriber in different processes (or threads) can subtract their readings.
pub fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// User plus system CPU time this process has used, every thread included.
pub fn self_cpu() -> Duration {
    // SAFETY: an all-zero rusage is a valid value to be overwritten.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable rusage.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// The CPUs this process may run on (what `taskset` gave it), in order.
pub fn allowed_cpus() -> Vec<usize> {
    cpus_allowed_of(0).unwrap_or_else(|| {
        (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect()
    })
}

/// The CPUs process `pid` (its main thread; 0: the calling thread) may run on, in order.
pub fn cpus_allowed_of(pid: u32) -> Option<Vec<usize>> {
    // SAFETY: an all-zero cpu_set_t is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is valid and its size is passed.
    let r = unsafe {
        libc::sched_getaffinity(
            pid as libc::pid_t,
            std::mem::size_of::<libc::cpu_set_t>(),
            &mut set,
        )
    };
    if r != 0 {
        return None;
    }
    let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
        // SAFETY: `i` is below CPU_SETSIZE.
        .filter(|&i| unsafe { libc::CPU_ISSET(i, &set) })
        .collect();
    (!cpus.is_empty()).then_some(cpus)
}

/// Raise the open-file limit to its hard maximum (each simulated peer holds two descriptors)
/// and return the limit now in force.
pub fn raise_fd_limit() -> u64 {
    // SAFETY: an all-zero rlimit is a valid value to be overwritten.
    let mut l: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: `l` is a valid, writable rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) } != 0 {
        return 0;
    }
    if l.rlim_cur < l.rlim_max {
        let want = libc::rlimit {
            rlim_cur: l.rlim_max,
            rlim_max: l.rlim_max,
        };
        // SAFETY: `want` is a valid rlimit no higher than the hard limit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &want) } == 0 {
            return want.rlim_cur as u64;
        }
    }
    l.rlim_cur as u64
}

/// CPU and memory of another process (the SFU), read from `/proc/PID`.
#[derive(Debug, Clone, Copy)]
pub struct ProcSample {
    /// CPU time of every thread seen so far, exited ones at their last reading (utime + stime
    /// of all threads in clock ticks, when per-thread figures are not available).
    pub cpu: Duration,
    /// Resident set size.
    pub rss_bytes: u64,
}

/// `pid`'s CPU time from its threads' nanosecond clocks, kept across readings so that it never
/// falls: a thread that exits keeps counting with its last reading. (Summing the live threads
/// alone goes backwards when one exits, as in a test process that hosts the SFU next to other
/// tests.)
#[derive(Debug, Default)]
pub struct ThreadCpu {
    live: std::collections::HashMap<u64, u64>,
    exited_ns: u64,
}

impl ThreadCpu {
    pub fn read(&mut self, pid: u32) -> Option<Duration> {
        let mut now = std::collections::HashMap::with_capacity(self.live.len());
        for entry in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
            let entry = entry.ok()?;
            let Some(tid) = entry
                .file_name()
                .to_str()
                .and_then(|t| t.parse::<u64>().ok())
            else {
                continue;
            };
            let Ok(text) = std::fs::read_to_string(entry.path().join("schedstat")) else {
                continue; // the thread just exited
            };
            let ns = text.split_whitespace().next()?.parse::<u64>().ok()?;
            now.insert(tid, ns);
        }
        for (tid, last) in self.live.drain() {
            match now.get(&tid) {
                // The same thread. (A new thread that reused the id and has already run longer
                // than the old one's last reading is taken for it: rare, and only undercounts.)
                Some(ns) if *ns >= last => {}
                _ => self.exited_ns += last,
            }
        }
        self.live = now;
        Some(Duration::from_nanos(
            self.exited_ns + self.live.values().sum::<u64>(),
        ))
    }
}

pub fn proc_sample(pid: u32, threads: &mut ThreadCpu) -> std::io::Result<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let ticks = parse_stat_cpu(&stat).ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidData, "unparsable /proc/PID/stat")
    })?;
    // Nanoseconds per thread beat 10 ms clock ticks for short windows.
    let cpu = threads.read(pid).unwrap_or(ticks);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    Ok(ProcSample {
        cpu,
        rss_bytes: rss_kb * 1024,
    })
}

/// Time the hypervisor ran something else while these CPUs had work (the `steal` column of
/// `/proc/stat`), summed over them. Zero on bare metal; `None` if `/proc/stat` is unreadable.
pub fn steal_of(cpus: &[usize]) -> Option<Duration> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    parse_steal(&stat, cpus).map(|ticks| Duration::from_nanos(ticks * 1_000_000_000 / hz))
}

/// Steal ticks of `cpus` in the text of `/proc/stat` (`cpuN user nice system idle iowait irq
/// softirq steal ...`).
fn parse_steal(stat: &str, cpus: &[usize]) -> Option<u64> {
    let mut total = 0;
    let mut found = 0;
    for line in stat.lines() {
        let mut fields = line.split_whitespace();
        let Some(cpu) = fields
            .next()
            .and_then(|n| n.strip_prefix("cpu"))
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        if cpus.contains(&cpu) {
            total += fields.nth(7)?.parse::<u64>().ok()?;
            found += 1;
        }
    }
    (found == cpus.len()).then_some(total)
}

/// utime + stime from the text of `/proc/PID/stat` (fields 14 and 15, after the command name,
/// which may itself hold spaces and parentheses).
fn parse_stat_cpu(stat: &str) -> Option<Duration> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // `rest` starts at field 3 (state); utime is field 14.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    let ticks = utime + stime;
    Some(Duration::from_nanos(ticks * 1_000_000_000 / hz))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_clock_moves_forward() {
        let a = mono_ns();
        std::thread::sleep(Duration::from_millis(2));
        let b = mono_ns();
        assert!(b >= a + 2_000_000);
    }

    #[test]
    fn stat_cpu_survives_odd_command_names() {
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
        let line = "1234 (my (odd) prog) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0";
        let cpu = parse_stat_cpu(line).unwrap();
        assert_eq!(cpu, Duration::from_nanos(300 * 1_000_000_000 / hz));
    }

    #[test]
    fn steal_parses() {
        let stat = "cpu  2773773 11445 396006 2031360 710972 0 33592 93452 0 0\n\
                    cpu0 1303967 5350 186964 1091566 385718 0 22162 42570 0 0\n\
                    cpu1 1469805 6095 209041 939793 325254 0 11429 50881 0 0\n\
                    intr 1 2 3\n";
        assert_eq!(parse_steal(stat, &[0]), Some(42570));
        assert_eq!(parse_steal(stat, &[0, 1]), Some(42570 + 50881));
        assert_eq!(
            parse_steal(stat, &[2]),
            None,
            "a CPU /proc/stat does not list"
        );
        let own = cpus_allowed_of(std::process::id()).unwrap();
        assert!(steal_of(&own).is_some());
    }

    #[test]
    fn own_process_is_readable() {
        let s = proc_sample(std::process::id(), &mut ThreadCpu::default()).unwrap();
        assert!(s.rss_bytes > 0);
        assert!(!allowed_cpus().is_empty());
    }

    #[test]
    fn per_thread_cpu_agrees_with_getrusage() {
        // Burn CPU (not wall time: the machine may be busy) so both clocks have something to show.
        let start = self_cpu();
        let mut x = 0u64;
        while self_cpu() < start + Duration::from_millis(30) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let threads = ThreadCpu::default().read(std::process::id()).unwrap();
        let rusage = self_cpu();
        // The running thread's share is folded in at the next tick; exited test threads are
        // in getrusage only.
        assert!(threads >= Duration::from_millis(10), "{threads:?}");
        assert!(
            threads <= rusage + Duration::from_millis(20),
            "{threads:?} {rusage:?}"
        );
    }

    #[test]
    fn thread_cpu_keeps_what_an_exited_thread_used() {
        let (burnt_tx, burnt_rx) = std::sync::mpsc::channel();
        let (exit_tx, exit_rx) = std::sync::mpsc::channel::<()>();
        let worker = std::thread::spawn(move || {
            let start = self_cpu();
            let mut x = 0u64;
            while self_cpu() < start + Duration::from_millis(30) {
                x = std::hint::black_box(x.wrapping_add(1));
            }
            burnt_tx.send(()).unwrap();
            let _ = exit_rx.recv();
        });
        burnt_rx.recv().unwrap();
        let mut cpu = ThreadCpu::default();
        let with_worker = cpu.read(std::process::id()).unwrap();
        exit_tx.send(()).unwrap();
        worker.join().unwrap();
        // The worker's 30 ms stay counted; the live threads alone would have lost them.
        let after = cpu.read(std::process::id()).unwrap();
        assert!(after >= with_worker, "{with_worker:?} then {after:?}");
        // The process burnt 30 ms while the worker spun, some of it in other tests' threads:
        // the worker's own share, which a sum of the live threads now lacks, is well over 5 ms.
        let live_only = ThreadCpu::default().read(std::process::id()).unwrap();
        assert!(
            live_only + Duration::from_millis(5) <= after,
            "{live_only:?} {after:?}"
        );
    }
}
