//! recvmmsg/sendmmsg backend over a level-triggered epoll: owns its sockets, one epoll fd, the
//! receive batch (headers, addresses, control buffers, payload memory) and the send arrays.
//! It must not touch the WakeFd beyond watching and draining it, and sleeps only in `wait`.
//!
//! Readiness model: epoll is **level-triggered** and used only to sleep. `recv` does not trust
//! readiness bits: it calls recvmmsg(MSG_DONTWAIT) on every socket until a short batch (one
//! syscall per socket per turn when idle; a shard has one or two sockets), so nothing readable can
//! be missed whether or not `wait` ran. `wait` returns at once while any socket is readable or the
//! eventfd is set, and drains the eventfd.

use std::io;
use std::mem::{self, size_of};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use tracing::{debug, info, trace};

use super::sys::{self, CmsgBuf, MmapRegion, Sock};
use super::{
    for_each_segment, next_run, same_family, BufferPool, DatagramIo, FlushStats, IoConfig, Queued,
    Run, WakeFd,
};

/// recvmmsg/sendmmsg accept at most UIO_MAXIOV messages per call.
const MAX_VLEN: usize = 1024;
/// recvmmsg calls per socket per `recv` at most, so a flood cannot starve the shard loop.
const MAX_BATCHES_PER_RECV: usize = 16;
/// epoll_event.u64 of the eventfd (sockets use their id).
const WAKE_TOKEN: u64 = u64::MAX;

pub(super) struct MmsgIo {
    socks: Vec<Sock>,
    locals: Vec<SocketAddr>,
    epfd: OwnedFd,
    wake: WakeFd,
    use_pwait2: bool,
    events: Vec<libc::epoll_event>,
    // Receive batch: fixed arrays whose pointers are wired once in `new` and never move (the
    // Vecs are never resized).
    rx_mem: MmapRegion,
    rx_msgs: Vec<libc::mmsghdr>,
    rx_iovs: Vec<libc::iovec>,
    rx_names: Vec<libc::sockaddr_storage>,
    rx_ctrl: Vec<CmsgBuf>,
    // Send side: rebuilt each flush, capacity reused.
    queue: Vec<Queued>,
    runs: Vec<Run>,
    retry: Vec<Run>,
    tx_msgs: Vec<libc::mmsghdr>,
    tx_iovs: Vec<libc::iovec>,
    tx_names: Vec<libc::sockaddr_storage>,
    tx_ctrl: Vec<CmsgBuf>,
    /// GSO runs refused by the kernel during the current flush.
    refused_runs: usize,
    pending_errors: usize,
    /// Payloads of finished sends, until `reclaim`.
    done: Vec<Vec<u8>>,
}

// SAFETY: the raw pointers inside the mmsghdr/iovec arrays point only into memory owned by this
// value (its Vecs, its mmap region, and payload Vecs in its queue); nothing is shared with another
// thread, so moving the whole value to another thread is sound. All use goes through `&mut self`.
unsafe impl Send for MmsgIo {}

impl MmsgIo {
    pub(super) fn new(socks: Vec<Sock>, cfg: &IoConfig, wake: &WakeFd) -> io::Result<MmsgIo> {
        // SAFETY: plain syscall; a non-negative result is a new fd we own.
        let raw = sys::cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        // SAFETY: `raw` was just returned by epoll_create1 and is owned by nobody else.
        let epfd = unsafe { OwnedFd::from_raw_fd(raw) };
        for (id, s) in socks.iter().enumerate() {
            epoll_add(&epfd, s.raw(), id as u64)?;
        }
        epoll_add(&epfd, wake.raw(), WAKE_TOKEN)?;

        let batch = cfg.recv_buffers.clamp(1, MAX_VLEN);
        let rx_mem = MmapRegion::new(batch * sys::RX_PAYLOAD)?;
        // SAFETY: plain-old-data C structs: all-zero is a valid value for each.
        let zero_msg: libc::mmsghdr = unsafe { mem::zeroed() };
        // SAFETY: as above.
        let zero_name: libc::sockaddr_storage = unsafe { mem::zeroed() };
        let mut io = MmsgIo {
            locals: socks.iter().map(|s| s.local).collect(),
            socks,
            epfd,
            wake: wake.clone(),
            use_pwait2: true,
            events: vec![libc::epoll_event { events: 0, u64: 0 }; 16],
            rx_mem,
            rx_msgs: vec![zero_msg; batch],
            rx_iovs: Vec::with_capacity(batch),
            rx_names: vec![zero_name; batch],
            rx_ctrl: vec![CmsgBuf::new(); batch],
            queue: Vec::with_capacity(256),
            runs: Vec::with_capacity(256),
            retry: Vec::new(),
            tx_msgs: Vec::with_capacity(256),
            tx_iovs: Vec::with_capacity(256),
            tx_names: Vec::with_capacity(256),
            tx_ctrl: Vec::with_capacity(256),
            refused_runs: 0,
            pending_errors: 0,
            done: Vec::with_capacity(256),
        };
        for i in 0..batch {
            io.rx_iovs.push(libc::iovec {
                // SAFETY: `i * RX_PAYLOAD` is inside the `batch * RX_PAYLOAD` byte region.
                iov_base: unsafe { io.rx_mem.as_ptr().add(i * sys::RX_PAYLOAD) }
                    as *mut libc::c_void,
                iov_len: sys::RX_PAYLOAD,
            });
        }
        for i in 0..batch {
            let h = &mut io.rx_msgs[i].msg_hdr;
            h.msg_name = &mut io.rx_names[i] as *mut _ as *mut libc::c_void;
            h.msg_iov = &mut io.rx_iovs[i];
            h.msg_iovlen = 1;
            h.msg_control = io.rx_ctrl[i].0.as_mut_ptr() as *mut libc::c_void;
        }
        Ok(io)
    }

    fn reset_rx(&mut self, n: usize) {
        for m in &mut self.rx_msgs[..n] {
            m.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            m.msg_hdr.msg_controllen = sys::CTRL_LEN as _;
            m.msg_hdr.msg_flags = 0;
            m.msg_len = 0;
        }
    }

    /// Build the message arrays for `self.runs` and send them, socket by socket, with as few
    /// sendmmsg calls as possible. GSO runs the kernel refuses are queued in `self.retry` as
    /// single datagrams.
    fn send_runs(&mut self, stats: &mut FlushStats) {
        let n = self.runs.len();
        self.tx_msgs.clear();
        self.tx_iovs.clear();
        self.tx_names.clear();
        self.tx_ctrl.clear();
        // First fill every array (they may reallocate while growing) ...
        for r in &self.runs {
            let q = &self.queue[r.start];
            for d in &self.queue[r.start..r.start + r.len] {
                self.tx_iovs.push(libc::iovec {
                    iov_base: d.payload.as_ptr() as *mut libc::c_void,
                    iov_len: d.payload.len(),
                });
            }
            let (name, namelen) = sys::encode_addr(&q.dest);
            self.tx_names.push(name);
            let mut ctrl = CmsgBuf::new();
            let clen = if r.len > 1 {
                sys::write_udp_segment(&mut ctrl, r.seg as u16)
            } else {
                0
            };
            self.tx_ctrl.push(ctrl);
            // SAFETY: plain-old-data C struct: all-zero is a valid value.
            let mut m: libc::mmsghdr = unsafe { mem::zeroed() };
            m.msg_hdr.msg_namelen = namelen;
            m.msg_hdr.msg_iovlen = r.len as _;
            m.msg_hdr.msg_controllen = clen as _;
            self.tx_msgs.push(m);
        }
        // ... then wire the pointers, now that nothing moves any more.
        let mut iov = 0;
        for (k, r) in self.runs.iter().enumerate() {
            let h = &mut self.tx_msgs[k].msg_hdr;
            h.msg_name = &mut self.tx_names[k] as *mut _ as *mut libc::c_void;
            h.msg_iov = &mut self.tx_iovs[iov];
            if r.len > 1 {
                h.msg_control = self.tx_ctrl[k].0.as_mut_ptr() as *mut libc::c_void;
            }
            iov += r.len;
        }

        let mut i = 0;
        while i < n {
            let socket = self.runs[i].socket;
            let mut j = i + 1;
            while j < n && self.runs[j].socket == socket && j - i < MAX_VLEN {
                j += 1;
            }
            // SAFETY: tx_msgs[i..j] are initialised mmsghdrs whose name, iovec and control
            // pointers point into tx_names/tx_iovs/tx_ctrl and the queued payload Vecs, all owned
            // by `self`, not resized since wiring, and alive for this synchronous call.
            let rc = unsafe {
                libc::sendmmsg(
                    self.socks[socket].raw(),
                    self.tx_msgs.as_mut_ptr().add(i),
                    (j - i) as libc::c_uint,
                    libc::MSG_DONTWAIT,
                )
            };
            stats.syscalls_or_sqes += 1;
            if rc > 0 {
                i += rc as usize;
                continue;
            }
            let err = if rc == 0 {
                libc::EIO
            } else {
                io::Error::last_os_error()
                    .raw_os_error()
                    .unwrap_or(libc::EIO)
            };
            let r = self.runs[i];
            match err {
                libc::EINTR => {}
                libc::EAGAIN | libc::ENOBUFS => {
                    // The socket or device queue is full: the rest of this socket's batch would
                    // fail the same way. Drop it rather than spin.
                    let dropped: usize = self.runs[i..j].iter().map(|r| r.len).sum();
                    trace!(socket, err, dropped, "send queue full, datagrams dropped");
                    self.pending_errors += dropped;
                    i = j;
                }
                libc::EIO | libc::EMSGSIZE | libc::EINVAL if r.len > 1 => {
                    if self.socks[socket].gso {
                        self.socks[socket].gso = false;
                        info!(local = %self.locals[socket], errno = err, segments = r.len,
                              "GSO send refused on this path: GSO disabled for the socket, resending plainly");
                    }
                    self.refused_runs += 1;
                    for k in r.start..r.start + r.len {
                        let seg = self.queue[k].payload.len();
                        self.retry.push(Run {
                            socket,
                            start: k,
                            len: 1,
                            seg,
                        });
                    }
                    i += 1;
                }
                _ => {
                    trace!(socket, err, "sendmmsg error, datagram dropped");
                    self.pending_errors += r.len;
                    i += 1;
                }
            }
        }
    }

    fn epoll_wait(&mut self, timeout: Option<Duration>) -> io::Result<usize> {
        let max = self.events.len() as libc::c_int;
        if self.use_pwait2 {
            let ts = timeout.map(|t| libc::timespec {
                tv_sec: t.as_secs().min(i64::MAX as u64) as libc::time_t,
                tv_nsec: t.subsec_nanos() as libc::c_long,
            });
            let tsp = ts
                .as_ref()
                .map_or(std::ptr::null(), |t| t as *const libc::timespec);
            // SAFETY: `events` is a live buffer of `max` entries the kernel may fill; `tsp` is
            // null or points to a live timespec; no signal mask is passed.
            let r = unsafe {
                libc::epoll_pwait2(
                    self.epfd.as_raw_fd(),
                    self.events.as_mut_ptr(),
                    max,
                    tsp,
                    std::ptr::null(),
                )
            };
            if r >= 0 {
                return Ok(r as usize);
            }
            let e = io::Error::last_os_error();
            if sys::errno(&e) != libc::ENOSYS {
                return Err(e);
            }
            debug!("epoll_pwait2 unavailable, using epoll_wait (millisecond timeouts)");
            self.use_pwait2 = false;
        }
        // Round up so a sub-millisecond timeout sleeps instead of spinning.
        let ms = timeout.map_or(-1, |t| {
            let ms = t.as_nanos().div_ceil(1_000_000);
            ms.min(i32::MAX as u128) as libc::c_int
        });
        // SAFETY: `events` is a live buffer of `max` entries the kernel may fill.
        let r =
            unsafe { libc::epoll_wait(self.epfd.as_raw_fd(), self.events.as_mut_ptr(), max, ms) };
        sys::cvt(r).map(|r| r as usize)
    }
}

fn epoll_add(epfd: &OwnedFd, fd: libc::c_int, token: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: token,
    };
    // SAFETY: both fds are valid and `ev` is a live epoll_event the kernel only reads.
    let r = unsafe { libc::epoll_ctl(epfd.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) };
    sys::cvt(r).map(drop)
}

impl DatagramIo for MmsgIo {
    fn name(&self) -> &'static str {
        "mmsg"
    }

    fn local_addrs(&self) -> &[SocketAddr] {
        &self.locals
    }

    fn gso(&self) -> bool {
        self.socks.iter().all(|s| s.gso)
    }

    fn gro(&self) -> bool {
        self.socks.iter().all(|s| s.gro)
    }

    fn recv(&mut self, on: &mut dyn FnMut(usize, SocketAddr, &[u8])) -> io::Result<usize> {
        let batch = self.rx_msgs.len();
        let mut delivered = 0;
        for id in 0..self.socks.len() {
            let fd = self.socks[id].raw();
            for _ in 0..MAX_BATCHES_PER_RECV {
                self.reset_rx(batch);
                // SAFETY: rx_msgs holds `batch` mmsghdrs wired in `new` to rx_names, rx_iovs (into
                // rx_mem) and rx_ctrl, all owned by `self` and never resized; lengths were reset
                // above so the kernel writes only within those buffers.
                let n = unsafe {
                    libc::recvmmsg(
                        fd,
                        self.rx_msgs.as_mut_ptr(),
                        batch as libc::c_uint,
                        libc::MSG_DONTWAIT,
                        std::ptr::null_mut(),
                    )
                };
                if n < 0 {
                    let e = io::Error::last_os_error();
                    match sys::errno(&e) {
                        libc::EAGAIN | libc::EINTR => {}
                        _ => debug!(socket = id, error = %e, "recvmmsg"),
                    }
                    break;
                }
                let n = n as usize;
                for k in 0..n {
                    let m = &self.rx_msgs[k];
                    let h = &m.msg_hdr;
                    if h.msg_flags & libc::MSG_TRUNC != 0 {
                        debug!(socket = id, "truncated datagram dropped");
                        continue;
                    }
                    let Some(src) =
                        sys::decode_addr(sys::storage_bytes(&self.rx_names[k], h.msg_namelen))
                    else {
                        continue;
                    };
                    // msg_controllen is size_t on glibc but socklen_t on musl.
                    #[allow(clippy::unnecessary_cast)]
                    let clen = (h.msg_controllen as usize).min(sys::CTRL_LEN);
                    let gro = sys::parse_gro(&self.rx_ctrl[k].0[..clen]);
                    let len = (m.msg_len as usize).min(sys::RX_PAYLOAD);
                    // SAFETY: the kernel wrote `len` (<= RX_PAYLOAD) bytes at this message's slot
                    // in rx_mem; nothing else writes there until the next recvmmsg, after `on`.
                    let data = unsafe {
                        std::slice::from_raw_parts(
                            self.rx_mem.as_ptr().add(k * sys::RX_PAYLOAD),
                            len,
                        )
                    };
                    delivered += for_each_segment(data, gro, |d| on(id, src, d));
                }
                if n < batch {
                    break;
                }
            }
        }
        Ok(delivered)
    }

    fn queue_send(&mut self, socket: usize, dest: SocketAddr, payload: Vec<u8>) {
        match self.locals.get(socket) {
            Some(local) if same_family(local, &dest) => self.queue.push(Queued {
                socket,
                dest,
                payload,
            }),
            _ => self.pending_errors += 1,
        }
    }

    fn flush(&mut self) -> io::Result<FlushStats> {
        let mut stats = FlushStats {
            datagrams: self.queue.len(),
            ..FlushStats::default()
        };
        self.runs.clear();
        let mut i = 0;
        while i < self.queue.len() {
            let r = next_run(&self.queue, i, self.socks[self.queue[i].socket].gso);
            if r.len > 1 {
                stats.gso_batches += 1;
            }
            self.runs.push(r);
            i += r.len;
        }
        self.retry.clear();
        self.refused_runs = 0;
        self.send_runs(&mut stats);
        if !self.retry.is_empty() {
            // GSO refused: those runs go out as single datagrams instead.
            stats.gso_batches -= self.refused_runs.min(stats.gso_batches);
            mem::swap(&mut self.runs, &mut self.retry);
            self.retry.clear();
            self.send_runs(&mut stats);
            // Single datagrams are never put back in `retry`.
            self.retry.clear();
        }
        // sendmmsg has copied every payload (or dropped it): they can be reused.
        self.done.extend(self.queue.drain(..).map(|q| q.payload));
        stats.errors = mem::take(&mut self.pending_errors);
        Ok(stats)
    }

    fn wait(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            let n = match self.epoll_wait(left) {
                Ok(n) => n,
                Err(e) if sys::errno(&e) == libc::EINTR => {
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return Ok(());
                    }
                    continue;
                }
                Err(e) => return Err(e),
            };
            if self.events[..n].iter().any(|ev| {
                let token = ev.u64; // copy out of the packed struct
                token == WAKE_TOKEN
            }) {
                self.wake.drain();
            }
            return Ok(());
        }
    }

    fn ready(&mut self) -> io::Result<bool> {
        let n = match self.epoll_wait(Some(Duration::ZERO)) {
            Ok(n) => n,
            Err(e) if sys::errno(&e) == libc::EINTR => 0,
            Err(e) => return Err(e),
        };
        if self.events[..n].iter().any(|ev| {
            let token = ev.u64; // copy out of the packed struct
            token == WAKE_TOKEN
        }) {
            self.wake.drain();
        }
        Ok(n > 0)
    }

    fn reclaim(&mut self, pool: &mut BufferPool) {
        pool.give_all(self.done.drain(..));
    }
}
