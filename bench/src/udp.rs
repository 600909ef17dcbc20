//! A peer's UDP socket: waiting for datagrams on glommio, reading them in batches with their
//! kernel arrival time, and the socket options that go with it. Every `unsafe` block of the load
//! generator's networking is here.
//!
//! A peer waits until its socket is readable, then takes everything queued with one
//! `recvmmsg(MSG_DONTWAIT)`. The wait is either the shard's [`Poller`] (the default: one epoll set
//! read without blocking every `--rx-poll-us`; its comment says why) or a one-byte `MSG_PEEK`
//! receive on glommio's ring, which is submitted with the reactor's next batch and does not
//! consume the datagram (`--rx-poll-us 0`, and the `/ws` TCP socket).
//!
//! Why not `glommio::net::UdpSocket::recv_from`: for a peer that receives a few hundred packets
//! a second almost every datagram finds the socket empty, and glommio then pays a failed
//! non-blocking `recvmsg` plus an io_uring submission flushed on the spot (one more syscall).

use std::cell::{Cell, RefCell};
use std::io;
use std::net::UdpSocket;
use std::os::fd::OwnedFd;
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use glommio::net::UnixStream;

/// Datagrams taken per `recvmmsg`.
pub const BATCH: usize = 32;
/// Largest datagram kept (the SFU sends at most an MTU).
pub const DATAGRAM: usize = 2048;
const CONTROL: usize = 64;

/// Ask for a large receive buffer, so a keyframe burst survives a moment when the shard is busy
/// elsewhere. Above `net.core.rmem_max` only root may (SO_RCVBUFFORCE); a refusal is ignored.
pub fn set_recv_buffer(socket: &UdpSocket, bytes: i32) {
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        if setsockopt_int(socket.as_raw_fd(), libc::SOL_SOCKET, opt, bytes).is_ok() {
            return;
        }
    }
}

/// Have the kernel stamp each datagram with its arrival time (CLOCK_REALTIME).
pub fn enable_timestamps(socket: &UdpSocket) -> io::Result<()> {
    setsockopt_int(
        socket.as_raw_fd(),
        libc::SOL_SOCKET,
        libc::SO_TIMESTAMPNS,
        1,
    )
}

fn setsockopt_int(fd: RawFd, level: i32, opt: i32, value: i32) -> io::Result<()> {
    // SAFETY: `fd` is an open socket; the option value is a valid c_int of the size passed.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            opt,
            &value as *const i32 as *const libc::c_void,
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// A wait for a datagram that can outlive one turn of a peer's loop.
pub type ReadyWait = std::pin::Pin<Box<dyn std::future::Future<Output = io::Result<()>>>>;

/// Waits until a socket has a datagram: a peek on glommio's ring (see the module comment), or a
/// slot of the shard's [`Poller`].
pub enum Readiness {
    Ring(Rc<UnixStream>),
    Polled(Rc<PollSlot>),
}

impl Readiness {
    /// Also serves a TCP socket (the `/ws` signaling of `crate::ws`): a peek works on both.
    pub fn new(socket: &impl AsRawFd) -> io::Result<Readiness> {
        // SAFETY: dup of an open descriptor; on success the new descriptor is ours alone and is
        // owned (and closed) by the UnixStream from here on.
        let fd = unsafe { libc::dup(socket.as_raw_fd()) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is open and owned by nobody else. glommio's stream type is only used for
        // `peek`, a recv(2) with MSG_PEEK, which a datagram socket supports; no stream-specific
        // call (write, shutdown) is ever made on it.
        Ok(Readiness::Ring(Rc::new(unsafe {
            UnixStream::from_raw_fd(fd)
        })))
    }

    /// Through the shard's poller when it has one, else on the ring.
    pub fn for_socket(socket: &UdpSocket, poller: Option<&Rc<Poller>>) -> io::Result<Readiness> {
        match poller {
            Some(p) => Ok(Readiness::Polled(p.register(socket)?)),
            None => Readiness::new(socket),
        }
    }

    /// Resolves when a datagram is queued (or the socket has an error to report, such as ICMP
    /// port unreachable from the SFU: `ConnectionRefused`). The wait owns what it needs, so a
    /// peer keeps it across a timer that fired first instead of cancelling and re-arming the
    /// receive on the ring every time.
    pub fn wait(&self) -> ReadyWait {
        match self {
            Readiness::Ring(stream) => {
                let stream = stream.clone();
                Box::pin(async move {
                    let mut one = [0u8; 1];
                    stream.peek(&mut one).await.map(|_| ()).map_err(Into::into)
                })
            }
            Readiness::Polled(slot) => {
                let slot = slot.clone();
                Box::pin(std::future::poll_fn(move |cx| slot.poll_ready(cx)))
            }
        }
    }
}

/// One shard's sockets, watched with one edge-triggered epoll set that a task of the shard reads
/// without blocking every `interval`, instead of each socket arming a receive on glommio's ring.
///
/// Why: a receive armed on the ring completes through io_uring task work, and for a task that is
/// not asleep the kernel signals that work with an inter-processor interrupt from the CPU that
/// delivered the datagram. On loopback that CPU is the SFU's, so every wakeup of the load
/// generator was charged to the SFU's CPU: about a third of sluice's CPU in a 1 x 150 fan-out on
/// a VM whose host made those interrupts dear (perf/RESULTS.md, session 9). A datagram arriving
/// at a socket in an epoll set that nobody is waiting in only puts the socket on the set's ready
/// list, so the sender pays for the delivery and nothing more, as it would sending to another
/// host. The cost is up to `interval` between a datagram's arrival and its peer reading it;
/// latency is measured from the kernel's arrival stamp, so the figures do not include it.
pub struct Poller {
    epoll: OwnedFd,
    interval: Duration,
    /// By the index each socket was registered with (its epoll data).
    slots: RefCell<Vec<std::rc::Weak<PollSlot>>>,
    free: RefCell<Vec<usize>>,
}

/// A socket registered with a [`Poller`]: whether it has signalled since its peer last looked,
/// and the peer's waker. Dropping it takes the socket out of the set.
pub struct PollSlot {
    /// A duplicate of the socket's descriptor, so the registration can be removed by the
    /// descriptor it was made with even after the peer closed its own.
    fd: OwnedFd,
    index: usize,
    ready: Cell<bool>,
    waker: RefCell<Option<Waker>>,
    poller: std::rc::Weak<Poller>,
}

impl PollSlot {
    fn poll_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.ready.replace(false) {
            return Poll::Ready(Ok(()));
        }
        *self.waker.borrow_mut() = Some(cx.waker().clone());
        Poll::Pending
    }

    fn signal(&self) {
        self.ready.set(true);
        if let Some(w) = self.waker.borrow_mut().take() {
            w.wake();
        }
    }
}

impl Drop for PollSlot {
    fn drop(&mut self) {
        // SAFETY: removes our own descriptor from an epoll set we created; both stay open for
        // the call. A failure only means it was already gone.
        if let Some(p) = self.poller.upgrade() {
            unsafe {
                libc::epoll_ctl(
                    p.epoll.as_raw_fd(),
                    libc::EPOLL_CTL_DEL,
                    self.fd.as_raw_fd(),
                    std::ptr::null_mut(),
                )
            };
            p.free.borrow_mut().push(self.index);
        }
    }
}

impl Poller {
    pub fn new(interval: Duration) -> io::Result<Rc<Poller>> {
        // SAFETY: plain system call; on success the descriptor is ours and is owned below.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Rc::new(Poller {
            // SAFETY: `fd` is open and owned by nobody else.
            epoll: unsafe { OwnedFd::from_raw_fd(fd) },
            interval,
            slots: RefCell::new(Vec::new()),
            free: RefCell::new(Vec::new()),
        }))
    }

    fn register(self: &Rc<Self>, socket: &impl AsRawFd) -> io::Result<Rc<PollSlot>> {
        // SAFETY: dup of an open descriptor; on success the new one is owned by the slot.
        let fd = unsafe { libc::dup(socket.as_raw_fd()) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is open and owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let index = match self.free.borrow_mut().pop() {
            Some(i) => i,
            None => {
                let mut slots = self.slots.borrow_mut();
                slots.push(std::rc::Weak::new());
                slots.len() - 1
            }
        };
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLERR | libc::EPOLLET) as u32,
            u64: index as u64,
        };
        // SAFETY: adds an open descriptor to our open epoll set with a valid event.
        if unsafe {
            libc::epoll_ctl(
                self.epoll.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                fd.as_raw_fd(),
                &mut ev,
            )
        } != 0
        {
            let e = io::Error::last_os_error();
            self.free.borrow_mut().push(index);
            return Err(e);
        }
        let slot = Rc::new(PollSlot {
            fd,
            index,
            // Anything queued before the registration is read on the first wait.
            ready: Cell::new(true),
            waker: RefCell::new(None),
            poller: Rc::downgrade(self),
        });
        self.slots.borrow_mut()[index] = Rc::downgrade(&slot);
        Ok(slot)
    }

    /// Signal every socket that has had a datagram (or an error) since the last call; how many.
    /// Never blocks.
    pub fn poll_once(&self) -> usize {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 256];
        let mut total = 0;
        loop {
            // SAFETY: `events` is writable for the length given; timeout 0 never blocks.
            let n = unsafe {
                libc::epoll_wait(
                    self.epoll.as_raw_fd(),
                    events.as_mut_ptr(),
                    events.len() as i32,
                    0,
                )
            };
            if n <= 0 {
                return total;
            }
            for e in &events[..n as usize] {
                let slot = self
                    .slots
                    .borrow()
                    .get(e.u64 as usize)
                    .and_then(|w| w.upgrade());
                if let Some(s) = slot {
                    s.signal();
                }
            }
            total += n as usize;
            if (n as usize) < events.len() {
                return total;
            }
        }
    }
}

/// The shard's polling task: signal ready sockets, then sleep `interval` when none were.
pub async fn run_poller(poller: Rc<Poller>, stop: impl Fn() -> bool) {
    while !stop() {
        if poller.poll_once() == 0 {
            glommio::timer::sleep(poller.interval).await;
        } else {
            // Let the peers just woken read before looking again.
            futures_lite::future::yield_now().await;
        }
    }
}

/// Buffers for one `recvmmsg`, shared by every peer of a shard (a peer handles its batch
/// without yielding, so one set per shard is enough).
pub struct RecvBatch {
    data: Box<[[u8; DATAGRAM]; BATCH]>,
    control: Box<[[u64; CONTROL / 8]; BATCH]>,
    lens: [usize; BATCH],
    stamps: [Option<u64>; BATCH],
}

impl Default for RecvBatch {
    fn default() -> Self {
        RecvBatch {
            data: Box::new([[0; DATAGRAM]; BATCH]),
            control: Box::new([[0; CONTROL / 8]; BATCH]),
            lens: [0; BATCH],
            stamps: [None; BATCH],
        }
    }
}

impl RecvBatch {
    /// Take what is queued on `socket` without waiting: `Ok(0)` when nothing is.
    pub fn recv(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        // SAFETY: all-zero iovec and mmsghdr values are valid (null pointers, zero lengths) and
        // are filled in below before use.
        let mut iov: [libc::iovec; BATCH] = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut msgs: [libc::mmsghdr; BATCH] = unsafe { std::mem::zeroed() };
        for i in 0..BATCH {
            iov[i].iov_base = self.data[i].as_mut_ptr() as *mut libc::c_void;
            iov[i].iov_len = DATAGRAM;
            let h = &mut msgs[i].msg_hdr;
            h.msg_iov = &mut iov[i];
            h.msg_iovlen = 1;
            h.msg_control = self.control[i].as_mut_ptr() as *mut libc::c_void;
            h.msg_controllen = CONTROL as _;
        }
        // SAFETY: every header points at live buffers of the lengths given (iov, control), which
        // outlive the call; the socket is connected, so no source address is asked for.
        let n = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                msgs.as_mut_ptr(),
                BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
                _ => Err(e),
            };
        }
        let n = n as usize;
        for (i, m) in msgs.iter().take(n).enumerate() {
            self.lens[i] = (m.msg_len as usize).min(DATAGRAM);
            self.stamps[i] = timestamp(&m.msg_hdr);
        }
        Ok(n)
    }

    /// Datagram `i` of the last batch and its kernel arrival time (CLOCK_REALTIME ns).
    pub fn get(&self, i: usize) -> (&[u8], Option<u64>) {
        (&self.data[i][..self.lens[i]], self.stamps[i])
    }
}

/// The SCM_TIMESTAMPNS control message of a received datagram.
fn timestamp(h: &libc::msghdr) -> Option<u64> {
    // SAFETY: `h` was filled by recvmmsg; the CMSG macros walk only within msg_controllen.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(h);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                let ts = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::timespec);
                return Some(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64);
            }
            c = libc::CMSG_NXTHDR(h, c);
        }
    }
    None
}

/// A blocking-API `std` handle on a connected socket that glommio opened (glommio's stream has
/// no `into_raw_fd`): a duplicate of its descriptor, so the connection outlives glommio's stream.
/// `crate::ws` connects on the ring, then runs tungstenite over this (made non-blocking).
pub fn dup_tcp(stream: &impl AsRawFd) -> io::Result<std::net::TcpStream> {
    // SAFETY: dup of an open descriptor; on success the new one is ours alone and is owned (and
    // closed) by the TcpStream from here on.
    let fd = unsafe { libc::dup(stream.as_raw_fd()) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is an open TCP socket owned by nobody else.
    Ok(unsafe { std::net::TcpStream::from_raw_fd(fd) })
}

/// CLOCK_REALTIME in nanoseconds (the clock of kernel receive timestamps).
pub fn realtime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (UdpSocket, UdpSocket) {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.connect(tx.local_addr().unwrap()).unwrap();
        rx.set_nonblocking(true).unwrap();
        (rx, tx)
    }

    /// Wait for `ready` at most `limit`: true if it resolved.
    async fn resolves(ready: &Readiness, limit: Duration) -> bool {
        let wait = async { Some(ready.wait().await) };
        let timer = async {
            glommio::timer::sleep(limit).await;
            None
        };
        matches!(futures_lite::future::or(wait, timer).await, Some(Ok(())))
    }

    #[test]
    fn the_poller_wakes_a_waiting_peer_for_each_new_datagram_and_forgets_dropped_sockets() {
        glommio::LocalExecutorBuilder::default()
            .spawn(|| async {
                let poller = Poller::new(Duration::from_micros(200)).unwrap();
                let stop = Rc::new(Cell::new(false));
                let s = stop.clone();
                let task =
                    glommio::spawn_local(run_poller(poller.clone(), move || s.get())).detach();
                let (rx, tx) = pair();
                let ready = Readiness::for_socket(&rx, Some(&poller)).unwrap();
                let mut batch = RecvBatch::default();
                // A new registration looks once, in case something was queued before it.
                assert!(resolves(&ready, Duration::from_millis(100)).await);
                assert_eq!(batch.recv(&rx).unwrap(), 0);
                // Nothing arrives: the wait does not resolve.
                assert!(!resolves(&ready, Duration::from_millis(20)).await);
                // A datagram sent while the peer waits wakes it.
                let to = rx.local_addr().unwrap();
                let sender = glommio::spawn_local(async move {
                    glommio::timer::sleep(Duration::from_millis(5)).await;
                    tx.send_to(b"x", to).unwrap();
                    tx
                });
                assert!(resolves(&ready, Duration::from_secs(2)).await);
                let tx = sender.await;
                assert_eq!(batch.recv(&rx).unwrap(), 1);
                // Edge-triggered: a datagram that arrives after the peer drained wakes it again.
                tx.send_to(b"y", to).unwrap();
                assert!(resolves(&ready, Duration::from_secs(2)).await);
                assert_eq!(batch.recv(&rx).unwrap(), 1);
                // A dropped readiness leaves the set and frees its index for the next socket,
                // which the first socket's traffic does not wake.
                drop(ready);
                let (rx2, _tx2) = pair();
                let ready2 = Readiness::for_socket(&rx2, Some(&poller)).unwrap();
                assert!(resolves(&ready2, Duration::from_millis(100)).await);
                assert_eq!(poller.slots.borrow().len(), 1, "the index was reused");
                tx.send_to(b"z", to).unwrap();
                assert!(!resolves(&ready2, Duration::from_millis(20)).await);
                stop.set(true);
                drop(task);
            })
            .unwrap()
            .join()
            .unwrap();
    }

    #[test]
    fn a_batch_holds_every_queued_datagram_with_its_arrival_time() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.connect(tx.local_addr().unwrap()).unwrap();
        enable_timestamps(&rx).unwrap();
        set_recv_buffer(&rx, 1 << 20);
        let mut b = RecvBatch::default();
        assert_eq!(b.recv(&rx).unwrap(), 0, "nothing queued: no wait, no error");
        let before = realtime_ns();
        for i in 0..40u8 {
            tx.send_to(&[i; 100], rx.local_addr().unwrap()).unwrap();
        }
        let after = realtime_ns();
        assert_eq!(b.recv(&rx).unwrap(), BATCH);
        let (d, ts) = b.get(3);
        assert_eq!(d, &[3u8; 100][..]);
        let ts = ts.expect("a kernel timestamp");
        // The same clock, read around the sends (with slack for the VM's clock being slewed).
        let slack = 100_000_000;
        assert!(
            before <= ts + slack && ts <= after + slack,
            "{before} <= {ts} <= {after}"
        );
        assert_eq!(b.recv(&rx).unwrap(), 40 - BATCH);
        assert_eq!(b.get(0).0[0], BATCH as u8);
    }
}
