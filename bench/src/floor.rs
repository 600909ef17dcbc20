//! `sluice-loadgen floor`: what the kernel alone charges for an SFU's fan-out egress, with no SFU.
//!
//! One sender thread does exactly the system-call part of a 1 x N fan-out and nothing else: for
//! every publisher packet (at `--rate` per second) it sends one datagram of `--size` bytes to
//! each of N receiver sockets on loopback, from one unconnected socket, `--batch` destinations
//! per `sendmmsg` (sluice submits its sends in chunks of `media.send_chunk` subscribers), and
//! sleeps between packets as an SFU idles. A receiver thread drains the N sockets through an
//! epoll set that it polls as the load generator's clients do (`--rx-poll-us`), so each
//! datagram costs the sending CPU its loopback delivery, as it costs sluice.
//!
//! The sender's own CPU time over the datagrams it sent is the kernel's cost per egress packet
//! on this machine: `egress_pps_per_cpu_second` is the ceiling for any SFU that sends each packet
//! with its own `sendmsg`, before it does any work of its own. `perf/capacity.sh` runs it on the
//! SFU's CPU, in the same run as sluice, so the two figures make a ratio.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use serde::Serialize;

#[derive(Debug, Clone)]
pub struct FloorConfig {
    pub subscribers: usize,
    /// Publisher packets per second; each goes to every subscriber.
    pub rate: f64,
    /// Datagram size in bytes.
    pub size: usize,
    /// Destinations per `sendmmsg`.
    pub batch: usize,
    pub duration: Duration,
    /// Pin the sender (the SFU's CPU) and the receiver (the load generator's) here.
    pub send_cpu: Option<usize>,
    pub recv_cpu: Option<usize>,
    /// The receiver looks for datagrams this often (as the clients do, `--rx-poll-us`); none:
    /// it sleeps in `epoll_wait`, and each wakeup is charged to the sender.
    pub rx_poll: Option<std::time::Duration>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FloorSummary {
    pub scenario: &'static str,
    pub duration_s: f64,
    pub subscribers: usize,
    pub size_bytes: usize,
    pub batch: usize,
    /// As the clients' `--rx-poll-us` (0: the receiver slept in `epoll_wait`).
    pub rx_poll_us: u64,
    pub packets_sent: u64,
    pub packets_received: u64,
    pub delivered_ratio: f64,
    pub egress_pps: f64,
    /// The sender thread's CPU time (user and system) over the window.
    pub sender_cpu_seconds: f64,
    pub sender_user_seconds: f64,
    /// Datagrams sent per second of the sender's CPU: the kernel's ceiling.
    pub egress_pps_per_cpu_second: f64,
    pub ns_per_packet: f64,
}

impl FloorSummary {
    pub fn table(&self) -> String {
        format!(
            "floor: {} subscribers, {} B datagrams, {} per sendmmsg, {:.1} s\n  \
             sent {} ({:.0} pps), received {} ({:.3} %)\n  \
             sender CPU {:.3} s ({:.3} s user): {:.0} egress pps per CPU-second, {:.0} ns per packet\n",
            self.subscribers,
            self.size_bytes,
            self.batch,
            self.duration_s,
            self.packets_sent,
            self.egress_pps,
            self.packets_received,
            self.delivered_ratio * 100.0,
            self.sender_cpu_seconds,
            self.sender_user_seconds,
            self.egress_pps_per_cpu_second,
            self.ns_per_packet,
        )
    }
}

/// The summary of a window: `sent` datagrams for `cpu` seconds of the sender's CPU.
pub fn summarize(
    cfg: &FloorConfig,
    window: Duration,
    sent: u64,
    received: u64,
    cpu: (f64, f64),
) -> FloorSummary {
    let secs = window.as_secs_f64().max(1e-9);
    let (user, system) = cpu;
    let total = user + system;
    FloorSummary {
        scenario: "floor",
        duration_s: secs,
        subscribers: cfg.subscribers,
        size_bytes: cfg.size,
        batch: cfg.batch,
        rx_poll_us: cfg.rx_poll.map_or(0, |d| d.as_micros() as u64),
        packets_sent: sent,
        packets_received: received,
        delivered_ratio: if sent == 0 {
            0.0
        } else {
            received as f64 / sent as f64
        },
        egress_pps: sent as f64 / secs,
        sender_cpu_seconds: total,
        sender_user_seconds: user,
        egress_pps_per_cpu_second: if total > 0.0 {
            sent as f64 / total
        } else {
            0.0
        },
        ns_per_packet: if sent == 0 {
            0.0
        } else {
            total * 1e9 / sent as f64
        },
    }
}

/// The `[start, end)` ranges of destinations that one publisher packet's sends are split into.
pub fn chunks(subscribers: usize, batch: usize) -> impl Iterator<Item = (usize, usize)> {
    let batch = batch.max(1);
    (0..subscribers)
        .step_by(batch)
        .map(move |s| (s, (s + batch).min(subscribers)))
}

pub fn run(cfg: &FloorConfig) -> Result<FloorSummary, String> {
    if cfg.subscribers == 0 || cfg.size == 0 || cfg.size > 65_000 || cfg.batch == 0 {
        return Err("--subscribers, --size (up to 65000) and --batch must be positive".into());
    }
    if !(cfg.rate > 0.0 && cfg.rate.is_finite()) {
        return Err("--rate must be positive".into());
    }
    let receivers: Vec<UdpSocket> = (0..cfg.subscribers)
        .map(|_| {
            let s = UdpSocket::bind("127.0.0.1:0")?;
            s.set_nonblocking(true)?;
            crate::udp::set_recv_buffer(&s, 1 << 20);
            Ok(s)
        })
        .collect::<std::io::Result<_>>()
        .map_err(|e| format!("receiver sockets: {e}"))?;
    let dests: Vec<SocketAddr> = receivers
        .iter()
        .map(|s| s.local_addr())
        .collect::<std::io::Result<_>>()
        .map_err(|e| e.to_string())?;
    let sender = UdpSocket::bind("127.0.0.1:0").map_err(|e| format!("sender socket: {e}"))?;

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let recv_stop = stop.clone();
    let recv_cpu = cfg.recv_cpu;
    let rx_poll = cfg.rx_poll;
    let receiver = std::thread::Builder::new()
        .name("floor-recv".into())
        .spawn(move || {
            if let Some(cpu) = recv_cpu {
                pin(cpu)?;
            }
            receive(&receivers, &recv_stop, rx_poll)
        })
        .map_err(|e| e.to_string())?;

    let send_cfg = cfg.clone();
    let sent = std::thread::Builder::new()
        .name("floor-send".into())
        .spawn(move || {
            if let Some(cpu) = send_cfg.send_cpu {
                pin(cpu)?;
            }
            send(&send_cfg, &sender, &dests)
        })
        .map_err(|e| e.to_string())?
        .join()
        .map_err(|_| "the sender panicked".to_string())?;
    // Let the last datagrams land before the receiver stops counting.
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let received = receiver
        .join()
        .map_err(|_| "the receiver panicked".to_string())??;
    let (window, sent, cpu) = sent?;
    Ok(summarize(cfg, window, sent, received, cpu))
}

fn pin(cpu: usize) -> Result<(), String> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes inside it (checked
    // bound), and sched_setaffinity(0, ...) reads it for the calling thread only.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if cpu >= libc::CPU_SETSIZE as usize {
            return Err(format!("CPU {cpu} is out of range"));
        }
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(format!(
                "pinning to CPU {cpu}: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(())
}

/// The calling thread's (user, system) CPU seconds.
fn thread_cpu() -> (f64, f64) {
    // SAFETY: getrusage fills the zeroed struct it is given; RUSAGE_THREAD is the caller.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_THREAD, &mut ru);
        ru
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (secs(ru.ru_utime), secs(ru.ru_stime))
}

fn sockaddr(addr: &SocketAddr) -> libc::sockaddr_in {
    let SocketAddr::V4(v4) = addr else {
        unreachable!("receivers bind 127.0.0.1");
    };
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: v4.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*v4.ip()).to_be(),
        },
        sin_zero: [0; 8],
    }
}

type Sent = (Duration, u64, (f64, f64));

fn send(cfg: &FloorConfig, socket: &UdpSocket, dests: &[SocketAddr]) -> Result<Sent, String> {
    let payload = vec![0x5a_u8; cfg.size];
    let mut names: Vec<libc::sockaddr_in> = dests.iter().map(sockaddr).collect();
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr() as *mut libc::c_void,
        iov_len: payload.len(),
    };
    let fd = socket.as_raw_fd();
    let interval = Duration::from_secs_f64(1.0 / cfg.rate);
    let start = Instant::now();
    let cpu0 = thread_cpu();
    let mut next = start;
    let mut sent = 0u64;
    while next - start < cfg.duration {
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        for (a, b) in chunks(dests.len(), cfg.batch) {
            let mut msgs: Vec<libc::mmsghdr> = names[a..b]
                .iter_mut()
                .map(|name| libc::mmsghdr {
                    msg_hdr: libc::msghdr {
                        msg_name: (name as *mut libc::sockaddr_in).cast(),
                        msg_namelen: std::mem::size_of::<libc::sockaddr_in>() as u32,
                        msg_iov: &mut iov,
                        msg_iovlen: 1,
                        msg_control: std::ptr::null_mut(),
                        msg_controllen: 0,
                        msg_flags: 0,
                    },
                    msg_len: 0,
                })
                .collect();
            let mut off = 0;
            while off < msgs.len() {
                // SAFETY: every header points at a live sockaddr_in in `names` and at `iov`,
                // which points at `payload`; all outlive the call.
                let n = unsafe {
                    libc::sendmmsg(fd, msgs[off..].as_mut_ptr(), (msgs.len() - off) as u32, 0)
                };
                if n < 0 {
                    let e = std::io::Error::last_os_error();
                    if e.kind() == std::io::ErrorKind::Interrupted {
                        continue;
                    }
                    return Err(format!("sendmmsg: {e}"));
                }
                off += n as usize;
            }
            sent += msgs.len() as u64;
        }
        next += interval;
    }
    let window = start.elapsed();
    let cpu1 = thread_cpu();
    Ok((window, sent, (cpu1.0 - cpu0.0, cpu1.1 - cpu0.1)))
}

fn receive(
    sockets: &[UdpSocket],
    stop: &std::sync::atomic::AtomicBool,
    poll: Option<Duration>,
) -> Result<u64, String> {
    // SAFETY: plain epoll calls on descriptors this function's caller owns for its duration;
    // the event buffer is a live local array.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if ep < 0 {
        return Err(format!("epoll: {}", std::io::Error::last_os_error()));
    }
    for (i, s) in sockets.iter().enumerate() {
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLET) as u32,
            u64: i as u64,
        };
        // SAFETY: as above.
        if unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, s.as_raw_fd(), &mut ev) } != 0 {
            let e = std::io::Error::last_os_error();
            // SAFETY: `ep` is ours and closed once.
            unsafe { libc::close(ep) };
            return Err(format!("epoll_ctl: {e}"));
        }
    }
    let mut events = [libc::epoll_event { events: 0, u64: 0 }; 64];
    let mut buf = vec![0u8; 65_536];
    let mut received = 0u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        // Polling, nobody waits in the set, so a datagram's arrival wakes nobody (see
        // `crate::udp::Poller`); sleeping in it, each wakeup costs the sender an interrupt.
        let timeout = if poll.is_some() { 0 } else { 50 };
        // SAFETY: as above.
        let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, timeout) };
        if n <= 0 {
            if let Some(p) = poll {
                std::thread::sleep(p);
            }
            continue;
        }
        for ev in &events[..n as usize] {
            let s = &sockets[ev.u64 as usize];
            while s.recv(&mut buf).is_ok() {
                received += 1;
            }
        }
    }
    // SAFETY: `ep` is ours and closed once.
    unsafe { libc::close(ep) };
    Ok(received)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(subscribers: usize, batch: usize) -> FloorConfig {
        FloorConfig {
            subscribers,
            rate: 200.0,
            size: 900,
            batch,
            duration: Duration::from_millis(300),
            send_cpu: None,
            recv_cpu: None,
            rx_poll: Some(Duration::from_micros(200)),
        }
    }

    #[test]
    fn chunks_cover_every_destination_once_in_batches() {
        assert_eq!(chunks(10, 4).collect::<Vec<_>>(), [(0, 4), (4, 8), (8, 10)]);
        assert_eq!(chunks(4, 4).collect::<Vec<_>>(), [(0, 4)]);
        assert_eq!(chunks(3, 16).collect::<Vec<_>>(), [(0, 3)]);
        assert_eq!(chunks(0, 16).count(), 0);
    }

    #[test]
    fn summary_is_packets_over_the_senders_cpu() {
        let s = summarize(
            &cfg(150, 16),
            Duration::from_secs(10),
            330_000,
            329_670,
            (0.5, 1.5),
        );
        assert_eq!(s.egress_pps, 33_000.0);
        assert_eq!(s.sender_cpu_seconds, 2.0);
        assert_eq!(s.egress_pps_per_cpu_second, 165_000.0);
        assert!(
            (s.ns_per_packet - 6060.6).abs() < 0.1,
            "{}",
            s.ns_per_packet
        );
        assert!((s.delivered_ratio - 0.999).abs() < 1e-9);
        let none = summarize(&cfg(1, 1), Duration::from_secs(1), 0, 0, (0.0, 0.0));
        assert_eq!(none.delivered_ratio, 0.0);
        assert_eq!(none.egress_pps_per_cpu_second, 0.0);
    }

    #[test]
    fn a_short_loopback_run_delivers_every_datagram_and_costs_cpu() {
        let s = run(&cfg(8, 3)).expect("runs on loopback");
        // 300 ms at 200 packets/s is about 60 publisher packets, 8 datagrams each.
        assert!(s.packets_sent >= 8 * 40, "{}", s.table());
        assert_eq!(s.packets_sent % 8, 0, "whole fan-outs only");
        assert_eq!(s.packets_received, s.packets_sent, "{}", s.table());
        assert!(s.sender_cpu_seconds > 0.0, "{}", s.table());
    }

    #[test]
    fn bad_parameters_are_refused() {
        assert!(run(&cfg(0, 16)).is_err());
        assert!(run(&cfg(4, 0)).is_err());
        let mut c = cfg(4, 4);
        c.rate = 0.0;
        assert!(run(&c).is_err());
    }
}
