//! A shard's UDP datagram I/O: the `DatagramIo` trait, its config, the cross-thread `WakeFd`,
//! and `open`, which picks the io_uring backend or falls back to recvmmsg/sendmmsg over epoll.
//! It owns the shard's media sockets and nothing else: no peers, timers or shard-loop policy.
//!
//! Both backends behave the same towards the shard loop:
//! - `recv` never blocks and hands out single datagrams (GRO super-datagrams are split);
//! - `queue_send` takes ownership of the payload, `flush` sends everything queued, grouping
//!   consecutive equal-size datagrams to one destination into UDP_SEGMENT (GSO) sends;
//! - `wait` is the only place the shard thread sleeps;
//! - a payload whose send completed goes back to the shard through `reclaim`, so the
//!   next packets are written into memory the shard already has (`BufferPool`).

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

pub mod ifaddrs;
mod mmsg;
mod sys;
mod uring;

/// Which datagram I/O implementation a shard runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// io_uring: multishot RECVMSG into a provided buffer ring, SENDMSG SQEs (default).
    Uring,
    /// recvmmsg/sendmmsg over epoll (fallback, and the benchmark reference).
    Mmsg,
}

/// How a shard's datagram I/O is set up.
#[derive(Debug, Clone)]
pub struct IoConfig {
    pub backend: Backend,
    /// One UDP socket is bound per address; the index in this Vec is the socket id.
    pub addrs: Vec<SocketAddr>,
    /// Receive buffers: size of the provided-buffer ring (uring, rounded up to a power of two)
    /// or the recvmmsg batch (mmsg, at most 1024).
    pub recv_buffers: usize,
    /// SO_RCVBUF/SO_SNDBUF request per socket (SO_*BUFFORCE first, then the capped option).
    pub socket_buffer_bytes: usize,
}

/// An eventfd another thread can ring to wake the shard out of `wait`.
/// Cheap to clone (one `Arc`), `Send + Sync`.
#[derive(Clone, Debug)]
pub struct WakeFd {
    fd: Arc<OwnedFd>,
}

impl WakeFd {
    pub fn new() -> io::Result<WakeFd> {
        Ok(WakeFd {
            fd: Arc::new(sys::eventfd()?),
        })
    }

    /// Ring it: the shard's next (or current) `wait` returns. Never blocks.
    pub fn wake(&self) {
        sys::eventfd_write(self.fd.as_raw_fd());
    }

    /// Reset it (non-blocking): read until EAGAIN.
    pub fn drain(&self) {
        // One read resets a non-semaphore eventfd; the bound only guards against a waker
        // that rings faster than we read.
        for _ in 0..4 {
            if !sys::eventfd_read(self.fd.as_raw_fd()) {
                break;
            }
        }
    }

    fn raw(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

/// What one `flush` did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FlushStats {
    /// Datagrams taken from the send queue.
    pub datagrams: usize,
    /// sendmmsg calls (mmsg) or SENDMSG SQEs (uring, including plain resends after a GSO failure).
    pub syscalls_or_sqes: usize,
    /// Sends that carried more than one segment with UDP_SEGMENT.
    pub gso_batches: usize,
    /// Datagrams dropped on error (counted per datagram; uring also reports here the errors of
    /// sends that completed after the previous flush returned).
    pub errors: usize,
}

/// One shard's datagram I/O over its UDP sockets. See the module docs.
pub trait DatagramIo: Send {
    /// "uring" or "mmsg".
    fn name(&self) -> &'static str;
    /// The bound addresses (port 0 resolved), indexed by socket id.
    fn local_addrs(&self) -> &[SocketAddr];
    /// GSO is enabled on every socket (what the probe found, minus sockets disabled at run time).
    fn gso(&self) -> bool;
    /// GRO is enabled on every socket.
    fn gro(&self) -> bool;
    /// Non-blocking: deliver every datagram available now (bounded per call so a flood cannot
    /// starve the loop). GRO super-datagrams are split into their segments, so `on` always sees
    /// single datagrams. Returns how many datagrams were delivered.
    fn recv(&mut self, on: &mut dyn FnMut(usize, SocketAddr, &[u8])) -> io::Result<usize>;
    /// Queue one datagram; it goes out at the next flush. Ownership is taken so no bytes are copied.
    /// A bad socket id or an address family the socket cannot reach is dropped and counted as an
    /// error at the next flush.
    fn queue_send(&mut self, socket: usize, dest: SocketAddr, payload: Vec<u8>);
    /// Send everything queued, in one submission (uring) / as few sendmmsg calls as possible
    /// (mmsg). Consecutive datagrams with the same socket, destination and size (the last may be
    /// shorter) go as one UDP_SEGMENT send (at most 64 segments, 65507 bytes) when GSO is on.
    /// Errors are counted per datagram, never fatal: EAGAIN/ENOBUFS drop; EMSGSIZE/EIO/EINVAL
    /// on a GSO send disable GSO for that socket and resend the datagrams one by one.
    fn flush(&mut self) -> io::Result<FlushStats>;
    /// Block until a socket is readable, the WakeFd was rung, or `timeout` passed (None = no
    /// timeout). Returns at once if data or a wake is already pending. Drains the WakeFd.
    fn wait(&mut self, timeout: Option<Duration>) -> io::Result<()>;
    /// Whether `recv` has something to deliver or the WakeFd rang, without blocking or waiting:
    /// what a busy-polling shard asks instead of calling `wait`.
    fn ready(&mut self) -> io::Result<bool>;
    /// Hand the payloads of sends that have completed (sent or dropped) to `pool`.
    fn reclaim(&mut self, pool: &mut BufferPool);
}

/// Send buffers, recycled: a packet is protected into one (`take`), the I/O backend sends it
/// and hands it back (`DatagramIo::reclaim`), and the next packet is written into the same
/// memory. Forwarding then allocates no datagram memory per packet; before, each packet's
/// datagram was a fresh, zeroed allocation, freed at its send completion.
///
/// Only buffers of at least `BUFFER_BYTES` are kept (any datagram fits without growing), and at
/// most `MAX_SPARE` of them, so a shard holds at most 4 MiB here.
#[derive(Debug, Default)]
pub struct BufferPool {
    spare: Vec<Vec<u8>>,
}

impl BufferPool {
    /// Capacity of the buffers the pool makes, and the least it keeps.
    pub const BUFFER_BYTES: usize = 2048;
    /// Spare buffers kept at most; more are freed.
    pub const MAX_SPARE: usize = 2048;

    /// An empty buffer with room for any datagram.
    pub fn take(&mut self) -> Vec<u8> {
        self.spare
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(Self::BUFFER_BYTES))
    }

    /// Keep `buf` for a later `take`, if it is large enough and the pool is not full.
    pub fn give(&mut self, mut buf: Vec<u8>) {
        if buf.capacity() >= Self::BUFFER_BYTES && self.spare.len() < Self::MAX_SPARE {
            buf.clear();
            self.spare.push(buf);
        }
    }

    /// `give` each of `bufs`.
    pub fn give_all(&mut self, bufs: impl Iterator<Item = Vec<u8>>) {
        for buf in bufs {
            self.give(buf);
        }
    }

    /// Spare buffers held now.
    pub fn spare(&self) -> usize {
        self.spare.len()
    }
}

/// Open the configured backend. Binding errors are returned as they are. If io_uring cannot be
/// set up (ENOSYS, EPERM under seccomp or `kernel.io_uring_disabled`, a kernel without buffer
/// rings or multishot RECVMSG, ...), a `warn!` says so and why, and the mmsg backend is returned.
pub fn open(cfg: &IoConfig, wake: &WakeFd) -> io::Result<Box<dyn DatagramIo>> {
    let socks = sys::open_sockets(&cfg.addrs, cfg.socket_buffer_bytes)?;
    let io: Box<dyn DatagramIo> = match cfg.backend {
        Backend::Mmsg => Box::new(mmsg::MmsgIo::new(socks, cfg, wake)?),
        Backend::Uring => match uring::UringIo::new(socks, cfg, wake) {
            Ok(u) => Box::new(u),
            Err((e, socks)) => {
                tracing::warn!(
                    "io_uring unavailable, falling back to recvmmsg/sendmmsg over epoll: {e}"
                );
                Box::new(mmsg::MmsgIo::new(socks, cfg, wake)?)
            }
        },
    };
    tracing::info!(
        backend = io.name(),
        addrs = ?io.local_addrs(),
        gso = io.gso(),
        gro = io.gro(),
        "datagram I/O ready"
    );
    Ok(io)
}

// ---------------------------------------------------------------------------------------------
// shared by both backends

/// A datagram waiting for the next flush.
struct Queued {
    socket: usize,
    dest: SocketAddr,
    payload: Vec<u8>,
}

/// A run of queued datagrams that goes out as one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    socket: usize,
    /// Index of the first datagram in the queue.
    start: usize,
    /// Number of datagrams (segments); 1 = plain send.
    len: usize,
    /// Segment size (the first datagram's length).
    seg: usize,
}

/// The longest GSO run starting at `queue[start]`: same socket and destination, every datagram
/// `seg` bytes except possibly a shorter last one, within the kernel's segment and byte limits.
fn next_run(queue: &[Queued], start: usize, gso: bool) -> Run {
    let first = &queue[start];
    let seg = first.payload.len();
    let mut run = Run {
        socket: first.socket,
        start,
        len: 1,
        seg,
    };
    if !gso || seg == 0 || seg > u16::MAX as usize {
        return run;
    }
    let mut total = seg;
    for q in &queue[start + 1..] {
        let l = q.payload.len();
        if run.len == sys::MAX_GSO_SEGMENTS
            || q.socket != first.socket
            || q.dest != first.dest
            || l == 0
            || l > seg
            || total + l > sys::MAX_GSO_BYTES
        {
            break;
        }
        run.len += 1;
        total += l;
        if l < seg {
            break; // a shorter datagram can only be the last segment
        }
    }
    run
}

/// Call `f` on each GRO segment of `payload` (`seg` = segment size from the UDP_GRO cmsg; the
/// last segment may be shorter). Returns the number of segments.
fn for_each_segment(payload: &[u8], seg: Option<usize>, mut f: impl FnMut(&[u8])) -> usize {
    match seg {
        Some(seg) if seg > 0 && seg < payload.len() => {
            let mut n = 0;
            for chunk in payload.chunks(seg) {
                f(chunk);
                n += 1;
            }
            n
        }
        _ => {
            f(payload);
            1
        }
    }
}

/// Whether a socket bound to `local` can send to `dest` (IPv6 sockets are V6ONLY).
fn same_family(local: &SocketAddr, dest: &SocketAddr) -> bool {
    local.is_ipv4() == dest.is_ipv4()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::os::fd::AsRawFd;
    use std::time::Instant;

    fn cfg(backend: Backend, addrs: &[&str]) -> IoConfig {
        IoConfig {
            backend,
            addrs: addrs.iter().map(|a| a.parse().unwrap()).collect(),
            recv_buffers: 64,
            socket_buffer_bytes: 4 << 20,
        }
    }

    /// Whether this kernel can run the uring backend: io_uring usable and kernel >= 6.0
    /// (multishot RECVMSG). Detected independently of `open`.
    fn uring_expected() -> bool {
        let disabled = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
            .map(|s| s.trim() != "0")
            .unwrap_or(false);
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let mut it = release.trim().split(|c: char| !c.is_ascii_digit());
        let major: u32 = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        !disabled && major >= 6 && io_uring::IoUring::new(8).is_ok()
    }

    fn expected_name(backend: Backend) -> &'static str {
        match backend {
            Backend::Mmsg => "mmsg",
            Backend::Uring if uring_expected() => "uring",
            Backend::Uring => "mmsg",
        }
    }

    fn open_on(backend: Backend, addrs: &[&str]) -> (Box<dyn DatagramIo>, WakeFd) {
        let wake = WakeFd::new().unwrap();
        let io = open(&cfg(backend, addrs), &wake).unwrap();
        assert_eq!(io.name(), expected_name(backend));
        (io, wake)
    }

    fn std_receiver() -> UdpSocket {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        sys::set_socket_buffers(s.as_raw_fd(), 8 << 20);
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s
    }

    /// A payload that encodes its index, so order and integrity can be checked.
    fn payload(i: usize, len: usize) -> Vec<u8> {
        (0..len).map(|k| (i * 31 + k * 7) as u8).collect()
    }

    type Got = Vec<(usize, SocketAddr, Vec<u8>)>;

    /// wait + recv until `want` datagrams arrived or 5 s passed.
    fn recv_n(io: &mut dyn DatagramIo, want: usize) -> Got {
        let mut got = Got::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while got.len() < want && Instant::now() < deadline {
            io.wait(Some(Duration::from_millis(100))).unwrap();
            io.recv(&mut |s, a, d| got.push((s, a, d.to_vec())))
                .unwrap();
        }
        got
    }

    fn sizes(n: usize) -> Vec<usize> {
        // Mixed: runs of equal sizes (GSO material), singles, a zero-length datagram, big ones.
        (0..n)
            .map(|i| match i % 10 {
                0..=3 => 1200,
                4 => 1,
                5 => 0,
                6 => 700 + i,
                7 | 8 => 300,
                _ => 9000,
            })
            .collect()
    }

    fn send_mixed_sizes_in_order(backend: Backend) {
        let (mut io, _w) = open_on(backend, &["127.0.0.1:0"]);
        let rx = std_receiver();
        let dest = rx.local_addr().unwrap();
        let sizes = sizes(200);
        let mut buf = vec![0u8; 65536];
        let mut total = FlushStats::default();
        for chunk in 0..4 {
            let range = chunk * 50..(chunk + 1) * 50;
            for i in range.clone() {
                io.queue_send(0, dest, payload(i, sizes[i]));
            }
            let st = io.flush().unwrap();
            assert_eq!(st.datagrams, 50, "{backend:?}");
            assert_eq!(st.errors, 0, "{backend:?}");
            total.syscalls_or_sqes += st.syscalls_or_sqes;
            total.gso_batches += st.gso_batches;
            for i in range {
                let (n, from) = rx.recv_from(&mut buf).expect("datagram lost");
                assert_eq!(from, io.local_addrs()[0]);
                assert_eq!(n, sizes[i], "{backend:?}: datagram {i} length");
                assert_eq!(
                    &buf[..n],
                    &payload(i, sizes[i])[..],
                    "{backend:?}: datagram {i} bytes"
                );
            }
        }
        if io.gso() {
            assert!(total.gso_batches > 0, "{backend:?}: {total:?}");
        }
    }

    fn gso_run_of_41(backend: Backend) {
        let (mut io, _w) = open_on(backend, &["127.0.0.1:0"]);
        let rx = std_receiver();
        let dest = rx.local_addr().unwrap();
        for i in 0..40 {
            io.queue_send(0, dest, payload(i, 1200));
        }
        io.queue_send(0, dest, payload(40, 333));
        let st = io.flush().unwrap();
        assert_eq!(st.datagrams, 41);
        assert_eq!(st.errors, 0);
        if io.gso() {
            assert!(st.gso_batches >= 1, "{backend:?}: {st:?}");
            assert_eq!(st.syscalls_or_sqes, 1, "{backend:?}: {st:?}");
        }
        let mut buf = vec![0u8; 65536];
        for i in 0..41 {
            let (n, from) = rx.recv_from(&mut buf).expect("segment lost");
            assert_eq!(from, io.local_addrs()[0]);
            let len = if i == 40 { 333 } else { 1200 };
            assert_eq!(n, len, "{backend:?}: segment {i}");
            assert_eq!(&buf[..n], &payload(i, len)[..], "{backend:?}: segment {i}");
        }
    }

    fn recv_300_from_std(backend: Backend) {
        let (mut io, _w) = open_on(backend, &["127.0.0.1:0"]);
        let local = io.local_addrs()[0];
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let from = tx.local_addr().unwrap();
        let sizes: Vec<usize> = (0..300).map(|i| [1200, 1200, 80, 1400, 1][i % 5]).collect();
        for (i, len) in sizes.iter().enumerate() {
            tx.send_to(&payload(i, *len), local).unwrap();
        }
        let got = recv_n(&mut *io, 300);
        assert_eq!(got.len(), 300, "{backend:?}");
        for (i, (s, a, d)) in got.iter().enumerate() {
            assert_eq!((*s, *a), (0, from), "{backend:?}: datagram {i}");
            assert_eq!(d, &payload(i, sizes[i]), "{backend:?}: datagram {i}");
        }
    }

    fn recv_gro(backend: Backend) {
        let (mut io, _w) = open_on(backend, &["127.0.0.1:0"]);
        if !io.gro() {
            eprintln!("{backend:?}: GRO not available here, GRO receive case skipped");
            return;
        }
        let local = io.local_addrs()[0];
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        sys::set_socket_buffers(tx.as_raw_fd(), 8 << 20);
        let from = tx.local_addr().unwrap();
        let mut expect = Vec::new();
        // A fast burst of plain sends: the kernel may or may not coalesce these.
        for i in 0..100 {
            let p = payload(i, 1000);
            tx.send_to(&p, local).unwrap();
            expect.push(p);
        }
        // GSO sends arrive at a GRO socket as super-datagrams: recv must split them.
        let gso_works = matches!(sys::probe_gso_loopback(), sys::GsoProbe::Works { .. });
        if gso_works {
            for b in 0..5 {
                let segs: Vec<Vec<u8>> = (0..20)
                    .map(|k| payload(1000 + b * 20 + k, if k == 19 { 250 } else { 1000 }))
                    .collect();
                let refs: Vec<&[u8]> = segs.iter().map(|s| s.as_slice()).collect();
                sys::send_gso(tx.as_raw_fd(), &local, &refs, 1000).unwrap();
                expect.extend(segs);
            }
        }
        let got = recv_n(&mut *io, expect.len());
        assert_eq!(
            got.len(),
            expect.len(),
            "{backend:?} (gso sender: {gso_works})"
        );
        for (i, (s, a, d)) in got.iter().enumerate() {
            assert_eq!((*s, *a), (0, from));
            assert_eq!(d, &expect[i], "{backend:?}: datagram {i}");
        }
    }

    fn wait_wake_and_timeout(backend: Backend) {
        let (mut io, wake) = open_on(backend, &["127.0.0.1:0"]);
        // Nothing pending: the timeout is honoured.
        let t = Instant::now();
        io.wait(Some(Duration::from_millis(150))).unwrap();
        let e = t.elapsed();
        assert!(
            e >= Duration::from_millis(140) && e < Duration::from_millis(1500),
            "{backend:?}: {e:?}"
        );
        // A wake from another thread ends a long wait.
        let w = wake.clone();
        let th = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            w.wake();
        });
        let t = Instant::now();
        io.wait(Some(Duration::from_secs(10))).unwrap();
        let e = t.elapsed();
        th.join().unwrap();
        assert!(
            e >= Duration::from_millis(80) && e < Duration::from_secs(5),
            "{backend:?}: {e:?}"
        );
        // The wake was drained: the next wait times out again.
        let t = Instant::now();
        io.wait(Some(Duration::from_millis(50))).unwrap();
        assert!(
            t.elapsed() >= Duration::from_millis(45),
            "{backend:?}: wake not drained"
        );
        // A wake rung before wait makes it return at once.
        wake.wake();
        let t = Instant::now();
        io.wait(Some(Duration::from_secs(10))).unwrap();
        assert!(t.elapsed() < Duration::from_secs(2), "{backend:?}");
        // Pending data makes it return at once, even after a flush (send completions are not
        // reasons to return).
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        io.queue_send(0, tx.local_addr().unwrap(), vec![1, 2, 3]);
        io.flush().unwrap();
        let t = Instant::now();
        io.wait(Some(Duration::from_millis(100))).unwrap();
        let e = t.elapsed();
        assert!(
            e >= Duration::from_millis(90),
            "{backend:?}: returned on a send completion after {e:?}"
        );
        tx.send_to(b"hello", io.local_addrs()[0]).unwrap();
        let t = Instant::now();
        io.wait(Some(Duration::from_secs(10))).unwrap();
        assert!(t.elapsed() < Duration::from_secs(2), "{backend:?}");
        let mut n = 0;
        let deadline = Instant::now() + Duration::from_secs(2);
        while n == 0 && Instant::now() < deadline {
            n += io.recv(&mut |_, _, d| assert_eq!(d, b"hello")).unwrap();
            if n == 0 {
                io.wait(Some(Duration::from_millis(20))).unwrap();
            }
        }
        assert_eq!(n, 1, "{backend:?}");
        // No timeout at all: a wake still ends it.
        let w = wake.clone();
        let th = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            w.wake();
        });
        io.wait(None).unwrap();
        th.join().unwrap();
    }

    fn open_reports_backend(backend: Backend) {
        let (io, _w) = open_on(backend, &["127.0.0.1:0"]);
        assert_ne!(io.local_addrs()[0].port(), 0);
        eprintln!(
            "{backend:?} -> {} gso={} gro={} probe={:?}",
            io.name(),
            io.gso(),
            io.gro(),
            sys::probe_gso_loopback()
        );
    }

    fn two_sockets_two_addrs(backend: Backend) {
        let (mut io, _w) = open_on(backend, &["127.0.0.1:0", "127.0.0.2:0"]);
        let locals = io.local_addrs().to_vec();
        assert_eq!(locals.len(), 2);
        assert_eq!(locals[0].ip().to_string(), "127.0.0.1");
        assert_eq!(locals[1].ip().to_string(), "127.0.0.2");
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        for i in 0..20 {
            tx.send_to(&payload(i, 100 + i), locals[i % 2]).unwrap();
        }
        let got = recv_n(&mut *io, 20);
        assert_eq!(got.len(), 20, "{backend:?}");
        for (s, a, d) in &got {
            let i = (d.len()) - 100;
            assert_eq!(
                *s,
                i % 2,
                "{backend:?}: datagram {i} on the wrong socket id"
            );
            assert_eq!(*a, tx.local_addr().unwrap());
            assert_eq!(d, &payload(i, 100 + i));
        }
        // Sending through socket 1 leaves from 127.0.0.2.
        let rx = std_receiver();
        io.queue_send(1, rx.local_addr().unwrap(), b"via-2".to_vec());
        io.queue_send(0, rx.local_addr().unwrap(), b"via-1".to_vec());
        let st = io.flush().unwrap();
        assert_eq!((st.datagrams, st.errors), (2, 0));
        let mut buf = [0u8; 64];
        let (n, from) = rx.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], from), (&b"via-2"[..], locals[1]));
        let (n, from) = rx.recv_from(&mut buf).unwrap();
        assert_eq!((&buf[..n], from), (&b"via-1"[..], locals[0]));
    }

    fn bad_sends_are_counted(backend: Backend) {
        let (mut io, _w) = open_on(backend, &["127.0.0.1:0"]);
        io.queue_send(7, "127.0.0.1:9".parse().unwrap(), vec![0; 10]); // no socket 7
        io.queue_send(0, "[::1]:9".parse().unwrap(), vec![0; 10]); // v6 dest on a v4 socket
        let st = io.flush().unwrap();
        assert_eq!(st.errors, 2, "{backend:?}: {st:?}");
        let st = io.flush().unwrap();
        assert_eq!(st, FlushStats::default(), "{backend:?}");
    }

    fn many_flushes_reuse_slots(backend: Backend) {
        // Enough traffic to cycle every receive buffer and send slot several times.
        let (mut io, _w) = open_on(backend, &["127.0.0.1:0"]);
        let local = io.local_addrs()[0];
        let mut got = 0usize;
        let mut bytes_ok = true;
        for round in 0..20 {
            for i in 0..50 {
                io.queue_send(0, local, payload(round * 50 + i, 500));
            }
            let st = io.flush().unwrap();
            assert_eq!(st.errors, 0, "{backend:?}: {st:?}");
            let deadline = Instant::now() + Duration::from_secs(5);
            let want = (round + 1) * 50;
            while got < want && Instant::now() < deadline {
                io.wait(Some(Duration::from_millis(50))).unwrap();
                io.recv(&mut |_, a, d| {
                    bytes_ok &= a == local && d == payload(got, 500).as_slice();
                    got += 1;
                })
                .unwrap();
            }
        }
        assert_eq!(got, 1000, "{backend:?}");
        assert!(bytes_ok, "{backend:?}: corrupted or reordered datagram");
    }

    /// Open a backend directly on sockets the test can tweak first.
    fn open_raw(backend: Backend, tweak: impl Fn(&sys::Sock)) -> Box<dyn DatagramIo> {
        let c = cfg(backend, &["127.0.0.1:0"]);
        let socks = sys::open_sockets(&c.addrs, c.socket_buffer_bytes).unwrap();
        for s in &socks {
            tweak(s);
        }
        let wake = WakeFd::new().unwrap();
        match backend {
            Backend::Mmsg => Box::new(mmsg::MmsgIo::new(socks, &c, &wake).unwrap()),
            Backend::Uring => match uring::UringIo::new(socks, &c, &wake) {
                Ok(u) => Box::new(u),
                Err((_, socks)) => Box::new(mmsg::MmsgIo::new(socks, &c, &wake).unwrap()),
            },
        }
    }

    fn gso_refused_resends_plainly(backend: Backend) {
        // SO_NO_CHECK (no UDP checksum) makes the kernel refuse every UDP_SEGMENT send with
        // EINVAL while plain sends still work: a stand-in for a path that cannot do GSO.
        let mut io = open_raw(backend, |s| {
            sys::setsockopt_int(s.raw(), libc::SOL_SOCKET, libc::SO_NO_CHECK, 1).unwrap()
        });
        if !io.gso() {
            eprintln!("{backend:?}: no GSO here, refusal case skipped");
            return;
        }
        let rx = std_receiver();
        let dest = rx.local_addr().unwrap();
        for i in 0..10 {
            io.queue_send(0, dest, payload(i, 1000));
        }
        io.queue_send(0, dest, payload(10, 10));
        let st = io.flush().unwrap();
        assert_eq!(
            (st.datagrams, st.errors, st.gso_batches),
            (11, 0, 0),
            "{backend:?}: {st:?}"
        );
        assert!(!io.gso(), "{backend:?}: GSO still on after a refusal");
        for i in 0..5 {
            io.queue_send(0, dest, payload(11 + i, 1000));
        }
        let st = io.flush().unwrap();
        assert_eq!(
            (st.datagrams, st.errors, st.gso_batches),
            (5, 0, 0),
            "{backend:?}: {st:?}"
        );
        let mut buf = vec![0u8; 2048];
        for i in 0..16 {
            let (n, _) = rx
                .recv_from(&mut buf)
                .expect("datagram lost after GSO refusal");
            let len = if i == 10 { 10 } else { 1000 };
            assert_eq!(&buf[..n], &payload(i, len)[..], "{backend:?}: datagram {i}");
        }
    }

    fn tiny_buffer_pool_keeps_receiving(backend: Backend) {
        // 8 buffers for 400 datagrams: the uring buffer ring runs dry (multishot ends with
        // ENOBUFS and must be re-armed); mmsg needs many batches.
        let wake = WakeFd::new().unwrap();
        let mut c = cfg(backend, &["127.0.0.1:0"]);
        c.recv_buffers = 8;
        let mut io = open(&c, &wake).unwrap();
        assert_eq!(io.name(), expected_name(backend));
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        for i in 0..400 {
            tx.send_to(&payload(i, 200), io.local_addrs()[0]).unwrap();
        }
        let got = recv_n(&mut *io, 400);
        assert_eq!(got.len(), 400, "{backend:?}");
        for (i, (_, _, d)) in got.iter().enumerate() {
            assert_eq!(d, &payload(i, 200), "{backend:?}: datagram {i}");
        }
    }

    #[test]
    fn uring_setup_failure_falls_back_to_mmsg() {
        uring::FAIL_SETUP.with(|f| f.set(true));
        let wake = WakeFd::new().unwrap();
        let r = open(&cfg(Backend::Uring, &["127.0.0.1:0"]), &wake);
        uring::FAIL_SETUP.with(|f| f.set(false));
        let mut io = r.unwrap();
        assert_eq!(io.name(), "mmsg");
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.send_to(b"still works", io.local_addrs()[0]).unwrap();
        let got = recv_n(&mut *io, 1);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].2, b"still works");
    }

    #[test]
    fn bind_error_is_not_a_fallback() {
        let taken = UdpSocket::bind("127.0.0.1:0").unwrap();
        let wake = WakeFd::new().unwrap();
        let mut c = cfg(Backend::Uring, &[]);
        c.addrs = vec![taken.local_addr().unwrap()];
        // SO_REUSEADDR does not let two UDP sockets share a port unless both set it.
        assert!(open(&c, &wake).is_err());
        c.addrs.clear();
        assert!(open(&c, &wake).is_err());
    }

    fn wait_wakes_on_data_mid_wait(backend: Backend) {
        let (mut io, _w) = open_on(backend, &["127.0.0.1:0"]);
        let local = io.local_addrs()[0];
        let th = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
            tx.send_to(b"late", local).unwrap();
        });
        let t = Instant::now();
        io.wait(Some(Duration::from_secs(10))).unwrap();
        let e = t.elapsed();
        th.join().unwrap();
        assert!(
            e >= Duration::from_millis(80) && e < Duration::from_secs(5),
            "{backend:?}: {e:?}"
        );
        let got = recv_n(&mut *io, 1);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].2, b"late");
    }

    fn ready_sees_data_without_waiting(backend: Backend) {
        // What a busy-polling shard relies on: `ready` turns true for a datagram that arrived,
        // without `wait`, and false again once `recv` took it.
        let (mut io, _w) = open_on(backend, &["127.0.0.1:0"]);
        let mut got = Got::new();
        io.recv(&mut |s, a, d| got.push((s, a, d.to_vec())))
            .unwrap();
        assert!(got.is_empty());
        assert!(!io.ready().unwrap(), "{backend:?}: ready with nothing sent");
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.send_to(b"polled", io.local_addrs()[0]).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !io.ready().unwrap() {
            assert!(Instant::now() < deadline, "{backend:?}: never ready");
            std::hint::spin_loop();
        }
        io.recv(&mut |s, a, d| got.push((s, a, d.to_vec())))
            .unwrap();
        assert_eq!(got.len(), 1, "{backend:?}");
        assert_eq!(got[0].2, b"polled");
        assert!(!io.ready().unwrap(), "{backend:?}: still ready after recv");
    }

    fn flush_bigger_than_one_submission(backend: Backend) {
        // 1500 messages (sizes grow, so no GSO runs): more than the 1024-entry SQ and the
        // 1024-message sendmmsg limit.
        let (mut io, _w) = open_on(backend, &["127.0.0.1:0"]);
        let rx = std_receiver();
        let dest = rx.local_addr().unwrap();
        for i in 0..1500 {
            io.queue_send(0, dest, payload(i, 20 + i));
        }
        let st = io.flush().unwrap();
        assert_eq!(
            (st.datagrams, st.errors, st.gso_batches),
            (1500, 0, 0),
            "{backend:?}: {st:?}"
        );
        // uring: one SQE per message; mmsg: two sendmmsg calls (1024 + 476).
        let expect = if io.name() == "uring" { 1500 } else { 2 };
        assert_eq!(st.syscalls_or_sqes, expect, "{backend:?}: {st:?}");
        let mut buf = [0u8; 2048];
        for i in 0..1500 {
            let (n, _) = rx.recv_from(&mut buf).expect("datagram lost");
            assert_eq!(
                &buf[..n],
                &payload(i, 20 + i)[..],
                "{backend:?}: datagram {i}"
            );
        }
        // Slots are all recycled: another round works the same.
        for i in 0..1500 {
            io.queue_send(0, dest, payload(i, 20 + i));
        }
        assert_eq!(io.flush().unwrap().errors, 0);
        for _ in 0..1500 {
            rx.recv_from(&mut buf).expect("datagram lost");
        }
    }

    fn moved_between_threads(backend: Backend) {
        // Opened here, then used on other threads (as the shard loop does): receive requests
        // follow the thread that uses the instance, whether the previous one exited or not.
        let (io, wake) = open_on(backend, &["127.0.0.1:0"]);
        let local = io.local_addrs()[0];
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let burst = |base: usize| {
            for i in 0..10 {
                tx.send_to(&payload(base + i, 64), local).unwrap();
            }
        };
        let check = |got: &Got, base: usize| {
            assert_eq!(got.len(), 10, "{backend:?}");
            for (i, (_, _, d)) in got.iter().enumerate() {
                assert_eq!(d, &payload(base + i, 64), "{backend:?}");
            }
        };
        burst(0);
        let (mut io, got) = std::thread::spawn(move || {
            let mut io = io;
            let got = recv_n(&mut *io, 10);
            (io, got)
        })
        .join()
        .unwrap();
        check(&got, 0);
        burst(10);
        check(&recv_n(&mut *io, 10), 10);
        burst(20);
        let (mut io, got) = std::thread::spawn(move || {
            let mut io = io;
            let got = recv_n(&mut *io, 10);
            (io, got)
        })
        .join()
        .unwrap();
        check(&got, 20);
        // The wake still works after the moves.
        wake.wake();
        let t = Instant::now();
        io.wait(Some(Duration::from_secs(10))).unwrap();
        assert!(t.elapsed() < Duration::from_secs(2), "{backend:?}");
    }

    fn sent_buffers_come_back_for_reuse(backend: Backend) {
        let (mut io, _w) = open_on(backend, &["127.0.0.1:0"]);
        let rx = std_receiver();
        let dest = rx.local_addr().unwrap();
        let mut pool = BufferPool::default();
        let mut addrs = Vec::new();
        for i in 0..100 {
            let mut b = pool.take();
            b.extend_from_slice(&payload(i, 100 + i));
            addrs.push(b.as_ptr() as usize);
            io.queue_send(0, dest, b);
        }
        // Too small to be worth keeping: sent, then freed.
        io.queue_send(0, dest, payload(100, 50));
        assert_eq!(io.flush().unwrap().errors, 0, "{backend:?}");
        let mut buf = [0u8; 2048];
        for i in 0..101 {
            let (n, _) = rx.recv_from(&mut buf).expect("datagram lost");
            assert_eq!(n, if i < 100 { 100 + i } else { 50 }, "{backend:?}");
        }
        io.reclaim(&mut pool);
        assert_eq!(pool.spare(), 100, "{backend:?}: every pool buffer is back");
        let mut back: Vec<usize> = (0..100)
            .map(|_| {
                let b = pool.take();
                assert!(b.is_empty() && b.capacity() >= BufferPool::BUFFER_BYTES);
                b.as_ptr() as usize
            })
            .collect();
        back.sort_unstable();
        addrs.sort_unstable();
        assert_eq!(back, addrs, "{backend:?}: the same allocations come back");
        io.reclaim(&mut pool);
        assert_eq!(pool.spare(), 0, "{backend:?}: nothing is handed back twice");
    }

    #[test]
    fn buffer_pool_keeps_large_buffers_up_to_its_bound() {
        let mut pool = BufferPool::default();
        let b = pool.take();
        assert!(b.is_empty() && b.capacity() >= BufferPool::BUFFER_BYTES);
        pool.give(Vec::with_capacity(BufferPool::BUFFER_BYTES - 1));
        assert_eq!(
            pool.spare(),
            0,
            "a buffer that may have to grow is not kept"
        );
        let mut full = b;
        full.extend_from_slice(&[1, 2, 3]);
        pool.give(full);
        assert_eq!(pool.spare(), 1);
        assert!(pool.take().is_empty(), "kept buffers come back cleared");
        for _ in 0..BufferPool::MAX_SPARE + 10 {
            pool.give(Vec::with_capacity(BufferPool::BUFFER_BYTES));
        }
        assert_eq!(pool.spare(), BufferPool::MAX_SPARE);
    }

    macro_rules! for_both_backends {
        ($($name:ident),* $(,)?) => {
            mod uring_backend {
                $( #[test] fn $name() { super::$name(super::Backend::Uring) } )*
            }
            mod mmsg_backend {
                $( #[test] fn $name() { super::$name(super::Backend::Mmsg) } )*
            }
        };
    }

    for_both_backends!(
        send_mixed_sizes_in_order,
        gso_run_of_41,
        recv_300_from_std,
        recv_gro,
        wait_wake_and_timeout,
        open_reports_backend,
        two_sockets_two_addrs,
        bad_sends_are_counted,
        many_flushes_reuse_slots,
        gso_refused_resends_plainly,
        tiny_buffer_pool_keeps_receiving,
        wait_wakes_on_data_mid_wait,
        flush_bigger_than_one_submission,
        ready_sees_data_without_waiting,
        moved_between_threads,
        sent_buffers_come_back_for_reuse,
    );

    // --- pure helpers

    fn q(socket: usize, port: u16, len: usize) -> Queued {
        Queued {
            socket,
            dest: SocketAddr::from(([127, 0, 0, 1], port)),
            payload: vec![0; len],
        }
    }

    #[test]
    fn runs_group_equal_sizes_with_short_tail() {
        let mut v: Vec<Queued> = (0..40).map(|_| q(0, 1, 1200)).collect();
        v.push(q(0, 1, 100));
        v.push(q(0, 1, 1200));
        let r = next_run(&v, 0, true);
        assert_eq!(
            r,
            Run {
                socket: 0,
                start: 0,
                len: 41,
                seg: 1200
            }
        );
        assert_eq!(next_run(&v, 41, true).len, 1);
        assert_eq!(next_run(&v, 0, false).len, 1);
    }

    #[test]
    fn runs_break_on_socket_dest_bigger_and_limits() {
        let v = vec![
            q(0, 1, 500),
            q(0, 1, 500),
            q(1, 1, 500),
            q(1, 2, 500),
            q(1, 2, 600),
        ];
        assert_eq!(next_run(&v, 0, true).len, 2);
        assert_eq!(next_run(&v, 2, true).len, 1);
        assert_eq!(next_run(&v, 3, true).len, 1);
        // 64 segments at most.
        let v: Vec<Queued> = (0..100).map(|_| q(0, 1, 10)).collect();
        assert_eq!(next_run(&v, 0, true).len, 64);
        // 65507 bytes at most: 54 * 1200 = 64800, a 55th would exceed.
        let v: Vec<Queued> = (0..60).map(|_| q(0, 1, 1200)).collect();
        assert_eq!(next_run(&v, 0, true).len, 54);
        // Zero-length datagrams never start or join a run.
        let v = vec![q(0, 1, 0), q(0, 1, 0), q(0, 1, 5), q(0, 1, 0)];
        assert_eq!(next_run(&v, 0, true).len, 1);
        assert_eq!(next_run(&v, 2, true).len, 1);
    }

    #[test]
    fn gro_split() {
        let p: Vec<u8> = (0..2500u32).map(|i| i as u8).collect();
        let mut parts = Vec::new();
        assert_eq!(
            for_each_segment(&p, Some(1000), |s| parts.push(s.to_vec())),
            3
        );
        assert_eq!(
            parts.iter().map(Vec::len).collect::<Vec<_>>(),
            [1000, 1000, 500]
        );
        assert_eq!(parts.concat(), p);
        assert_eq!(for_each_segment(&p, None, |_| {}), 1);
        assert_eq!(for_each_segment(&p, Some(2500), |_| {}), 1);
        assert_eq!(
            for_each_segment(&[], Some(10), |s| assert!(s.is_empty())),
            1
        );
    }

    #[test]
    fn wakefd_drain_is_nonblocking() {
        let w = WakeFd::new().unwrap();
        w.drain();
        w.wake();
        w.wake();
        w.drain();
        assert!(!sys::eventfd_read(w.raw()));
    }

    #[test]
    fn io_is_send() {
        fn assert_send<T: Send>() {}
        assert_send::<Box<dyn DatagramIo>>();
        assert_send::<WakeFd>();
        fn assert_sync<T: Sync>() {}
        assert_sync::<WakeFd>();
    }
}
