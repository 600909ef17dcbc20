//! io_uring backend: owns one io_uring, its provided-buffer ring and receive memory, the slab of
//! in-flight sends, and its sockets. It must never touch memory the kernel still owns (a receive
//! buffer before its CQE, a send slot before its completion); the shard sleeps only in `wait`.
//!
//! Receive: one multishot RECVMSG per socket, all drawing from one provided buffer ring; each
//! buffer goes back to the ring right after `on` saw it; a multishot that ends (no
//! IORING_CQE_F_MORE, e.g. the ring ran dry) is re-armed on the next `recv`/`wait`.
//! Send: one SENDMSG SQE per run (UDP_SEGMENT cmsg for GSO runs), all pushed and submitted once
//! per flush; the slot holding payloads, iovecs, msghdr, address and cmsg lives until its CQE.
//! Wait: a multishot POLL_ADD watches the WakeFd; `submit_with_args` carries the timeout.
//! Threads: io_uring runs a request's receive work on the thread that submitted it, so the
//! multishot requests are (re-)armed by whichever thread calls `recv`/`wait`, never by `open`.

use std::collections::VecDeque;
use std::io;
use std::mem;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use tracing::{debug, info, trace, warn};

use super::sys::{self, CmsgBuf, MmapRegion, Sock};
use super::{
    for_each_segment, next_run, same_family, BufferPool, DatagramIo, FlushStats, IoConfig, Queued,
    WakeFd,
};

// user_data = kind << 56 | index (socket id or send slot).
const KIND_SHIFT: u32 = 56;
const INDEX_MASK: u64 = (1 << KIND_SHIFT) - 1;
const KIND_RECV: u64 = 1;
const KIND_WAKE: u64 = 2;
const KIND_SEND: u64 = 3;
const KIND_CANCEL: u64 = 4;

const fn user_data(kind: u64, index: usize) -> u64 {
    (kind << KIND_SHIFT) | (index as u64 & INDEX_MASK)
}

const SQ_ENTRIES: u32 = 1024;
/// Buffer group id of the provided buffer ring.
const BGID: u16 = 7;
/// Kernel limit on buffer ring entries.
const MAX_RING_ENTRIES: usize = 32_768;
/// Bytes before the payload in a receive buffer: io_uring_recvmsg_out, name, control.
const RX_HEADER: usize = 16 + sys::NAME_LEN + sys::CTRL_LEN;
/// Rounds of "reap CQ, deliver" per `recv` at most, so a flood cannot starve the shard loop.
const MAX_RECV_ROUNDS: usize = 4;
/// Consecutive failed re-arms of a socket's multishot before giving up on it (avoids a hot loop
/// on a persistent error; logged).
const MAX_ARM_FAILURES: u32 = 16;

#[derive(Debug, Clone, Copy)]
struct Cqe {
    ud: u64,
    res: i32,
    flags: u32,
}

/// Everything one SENDMSG needs the kernel to read, kept alive and unmoved (boxed) until its CQE.
struct SendSlot {
    msg: libc::msghdr,
    name: libc::sockaddr_storage,
    ctrl: CmsgBuf,
    iovs: Vec<libc::iovec>,
    bufs: Vec<Vec<u8>>,
    socket: usize,
    dest: SocketAddr,
}

impl SendSlot {
    fn new() -> SendSlot {
        SendSlot {
            // SAFETY: plain-old-data C structs: all-zero is a valid value for each.
            msg: unsafe { mem::zeroed() },
            // SAFETY: as above.
            name: unsafe { mem::zeroed() },
            ctrl: CmsgBuf::new(),
            iovs: Vec::with_capacity(4),
            bufs: Vec::with_capacity(4),
            socket: 0,
            dest: SocketAddr::from(([0, 0, 0, 0], 0)),
        }
    }
}

pub(super) struct UringIo {
    // Declared first so it is dropped first (after `Drop::drop` made sure nothing is in flight).
    ring: IoUring,
    socks: Vec<Sock>,
    locals: Vec<SocketAddr>,
    wake: WakeFd,

    // --- receive
    /// The msghdr template of every multishot RECVMSG (only its name/control lengths matter).
    recv_hdr: Box<libc::msghdr>,
    /// `entries` receive buffers of `slot_len` bytes each.
    bufs: MmapRegion,
    /// The provided buffer ring: `entries` io_uring_buf entries shared with the kernel.
    br: MmapRegion,
    entries: usize,
    slot_len: usize,
    /// Our copy of the buffer ring tail (published with a release store).
    br_tail: u16,
    /// A multishot RECVMSG is outstanding on socket i.
    armed: Vec<bool>,
    arm_failures: Vec<u32>,
    poll_armed: bool,
    /// Receive CQEs reaped but not yet delivered (by `wait` or `flush`).
    stash: VecDeque<Cqe>,
    /// Scratch for reaping.
    cqes: Vec<Cqe>,
    /// The WakeFd rang since the last `wait` returned.
    woken: bool,
    /// First arming error (checked by `new` to detect an unsupporting kernel).
    arm_error: Option<i32>,
    /// The thread that armed the multishot requests. io_uring runs a request's receive work on
    /// the thread that submitted it, so they are re-armed when another thread takes over.
    armer: Option<std::thread::ThreadId>,

    // --- send
    queue: Vec<Queued>,
    /// Boxed on purpose: the kernel holds pointers into a slot until its CQE, so a slot must not
    /// move when the Vec grows.
    #[allow(clippy::vec_box)]
    slots: Vec<Box<SendSlot>>,
    free: Vec<usize>,
    in_flight: usize,
    pending_errors: usize,
    pending_sqes: usize,
    refused_runs: usize,
    closing: bool,
    /// Payloads of completed sends, until `reclaim`.
    done: Vec<Vec<u8>>,
}

// SAFETY: the raw pointers inside UringIo (msghdrs, iovecs, buffer addresses) point only into
// memory owned by this value (boxed slots, its mmap regions, payload Vecs it owns); the IoUring is
// Send. Nothing is shared with another thread, and all use goes through `&mut self`, so moving the
// whole value to another thread is sound.
unsafe impl Send for UringIo {}

fn unsupported(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::Unsupported, what)
}

fn context(what: &str, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

impl UringIo {
    /// Set up the ring, the buffer ring and the multishot receives. On failure the sockets are
    /// handed back so the caller can fall back to another backend.
    pub(super) fn new(
        socks: Vec<Sock>,
        cfg: &IoConfig,
        wake: &WakeFd,
    ) -> Result<UringIo, (io::Error, Vec<Sock>)> {
        let entries = cfg
            .recv_buffers
            .clamp(1, MAX_RING_ENTRIES)
            .next_power_of_two();
        let (ring, bufs, br, slot_len) = match setup_ring(entries) {
            Ok(parts) => parts,
            Err(e) => return Err((e, socks)),
        };
        let cq = ring.params().cq_entries() as usize;
        let n = socks.len();
        // SAFETY: plain-old-data C struct: all-zero is a valid value.
        let mut recv_hdr: Box<libc::msghdr> = Box::new(unsafe { mem::zeroed() });
        recv_hdr.msg_namelen = sys::NAME_LEN as libc::socklen_t;
        recv_hdr.msg_controllen = sys::CTRL_LEN as _;
        let mut io = UringIo {
            ring,
            locals: socks.iter().map(|s| s.local).collect(),
            socks,
            wake: wake.clone(),
            recv_hdr,
            bufs,
            br,
            entries,
            slot_len,
            br_tail: 0,
            armed: vec![false; n],
            arm_failures: vec![0; n],
            poll_armed: false,
            stash: VecDeque::with_capacity(entries + 64),
            cqes: Vec::with_capacity(cq),
            woken: false,
            arm_error: None,
            armer: None,
            queue: Vec::with_capacity(256),
            slots: Vec::new(),
            free: Vec::new(),
            in_flight: 0,
            pending_errors: 0,
            pending_sqes: 0,
            refused_runs: 0,
            closing: false,
            done: Vec::with_capacity(256),
        };
        // Hand every buffer to the kernel.
        for bid in 0..entries {
            io.return_buf(bid as u16);
        }
        io.publish_tail();
        // Arm for real: a kernel without multishot RECVMSG (< 6.0) or multishot POLL_ADD rejects
        // them. Then cancel them again and collect every final CQE: the probe armed from the
        // opening thread, and the shard thread arms for itself on its first `recv`/`wait`.
        io.arm_pending();
        let failure = match io.submit_now() {
            Err(e) => Some(context("io_uring submit", e)),
            Ok(()) => {
                let quiet = io.cancel_armed(false);
                match io.arm_error {
                    Some(errno) => Some(unsupported(format!(
                        "multishot RECVMSG / POLL_ADD rejected by the kernel: {} (needs Linux 6.0+)",
                        io::Error::from_raw_os_error(errno)
                    ))),
                    None if !quiet => Some(unsupported("io_uring did not cancel the probe requests".into())),
                    None => None,
                }
            }
        };
        if let Some(e) = failure {
            let socks = mem::take(&mut io.socks);
            drop(io);
            return Err((e, socks));
        }
        debug!(entries, slot_len, cq, "io_uring datagram I/O ready");
        Ok(io)
    }

    // --- buffer ring

    /// Put buffer `bid` back at the ring tail (published by `publish_tail`).
    fn return_buf(&mut self, bid: u16) {
        let idx = self.br_tail as usize & (self.entries - 1);
        // SAFETY: the ring region holds `entries` BufRingEntry (16 bytes each) and
        // idx < entries. The slot at the unpublished tail is not read by the kernel: it only reads
        // between its head and our published tail, and we never return more buffers than it took.
        let entry = unsafe { &mut *(self.br.as_ptr() as *mut types::BufRingEntry).add(idx) };
        // SAFETY: bid < entries, so the offset stays inside the `bufs` region.
        let addr = unsafe { self.bufs.as_ptr().add(bid as usize * self.slot_len) };
        entry.set_addr(addr as u64);
        entry.set_len(self.slot_len as u32);
        entry.set_bid(bid);
        self.br_tail = self.br_tail.wrapping_add(1);
    }

    /// Make returned buffers visible to the kernel.
    fn publish_tail(&mut self) {
        // SAFETY: the ring region starts with a BufRingEntry whose `resv` field is the shared tail
        // (a u16, so an AtomicU16 of the same size and alignment); the kernel reads it
        // concurrently, hence the atomic release store after the entries were written.
        unsafe {
            let tail = types::BufRingEntry::tail(self.br.as_ptr() as *const types::BufRingEntry);
            (*(tail as *const AtomicU16)).store(self.br_tail, Ordering::Release);
        }
    }

    // --- submission

    /// Push one SQE, submitting first if the SQ is full. Returns false if it could not be queued.
    ///
    /// # Safety
    /// Every pointer in `entry` must stay valid and unmoved until its CQE (or, for requests that
    /// never complete on their own, until the ring is torn down).
    unsafe fn push_sqe(&mut self, entry: &squeue::Entry) -> bool {
        // SAFETY: forwarded from the caller's contract.
        if unsafe { self.ring.submission().push(entry) }.is_ok() {
            return true;
        }
        if let Err(e) = self.submit_now() {
            debug!(error = %e, "io_uring submit with a full SQ failed");
            return false;
        }
        // SAFETY: as above.
        unsafe { self.ring.submission().push(entry) }.is_ok()
    }

    /// Submit what is in the SQ (without waiting).
    fn submit_now(&mut self) -> io::Result<()> {
        loop {
            match self.ring.submit() {
                Ok(_) => return Ok(()),
                Err(e) => match sys::errno(&e) {
                    libc::EINTR => continue,
                    // Out of kernel resources or CQ backlogged: the SQEs stay queued and go with
                    // the next submission.
                    libc::EAGAIN | libc::EBUSY => return Ok(()),
                    _ => return Err(e),
                },
            }
        }
    }

    /// Re-arm the WakeFd poll and every socket's multishot receive that ended.
    fn arm_pending(&mut self) {
        if self.closing {
            return;
        }
        let me = std::thread::current().id();
        if self.armer != Some(me) {
            if (self.poll_armed || self.armed.iter().any(|a| *a)) && !self.cancel_armed(false) {
                warn!("io_uring: could not move the receive requests to this thread; left as they are");
                return;
            }
            self.armer = Some(me);
        }
        if !self.poll_armed {
            let e = opcode::PollAdd::new(types::Fd(self.wake.raw()), libc::POLLIN as u32)
                .multi(true)
                .build()
                .user_data(user_data(KIND_WAKE, 0));
            // SAFETY: POLL_ADD carries no pointers; the eventfd stays open while `self.wake` lives.
            self.poll_armed = unsafe { self.push_sqe(&e) };
        }
        for s in 0..self.socks.len() {
            if self.armed[s] || self.arm_failures[s] >= MAX_ARM_FAILURES {
                continue;
            }
            let e =
                opcode::RecvMsgMulti::new(types::Fd(self.socks[s].raw()), &*self.recv_hdr, BGID)
                    .build()
                    .user_data(user_data(KIND_RECV, s));
            // SAFETY: the only pointer is `recv_hdr`, boxed and owned by `self` until the ring is
            // gone; the buffers come from the registered ring, alive as long as the ring.
            self.armed[s] = unsafe { self.push_sqe(&e) };
        }
    }

    // --- completion

    /// Move every available CQE out of the ring: sends are completed, wakes recorded, receives
    /// stashed for `recv`.
    fn reap(&mut self) {
        for _ in 0..8 {
            self.cqes.clear();
            for e in self.ring.completion() {
                self.cqes.push(Cqe {
                    ud: e.user_data(),
                    res: e.result(),
                    flags: e.flags(),
                });
            }
            if self.cqes.is_empty() {
                break;
            }
            for k in 0..self.cqes.len() {
                let c = self.cqes[k];
                self.handle(c);
            }
        }
    }

    fn handle(&mut self, c: Cqe) {
        let index = (c.ud & INDEX_MASK) as usize;
        let more = cqueue::more(c.flags);
        match c.ud >> KIND_SHIFT {
            KIND_RECV => {
                if !more && index < self.armed.len() {
                    // The multishot ended (ring ran dry, cancelled, error): re-armed by the next
                    // `recv`/`wait`, once the stashed buffers went back to the ring.
                    self.armed[index] = false;
                    match -c.res {
                        e if e <= 0 => {}
                        libc::ENOBUFS => trace!(socket = index, "receive buffer ring ran dry"),
                        libc::ECANCELED => {}
                        e => {
                            debug!(
                                socket = index,
                                errno = e,
                                "io_uring multishot receive failed"
                            );
                            self.arm_error.get_or_insert(e);
                            self.arm_failures[index] += 1;
                            if self.arm_failures[index] == MAX_ARM_FAILURES {
                                warn!(local = %self.locals[index], errno = e,
                                      "io_uring multishot receive keeps failing; socket no longer read");
                            }
                        }
                    }
                }
                // Only a CQE holding a buffer has something to deliver.
                if cqueue::buffer_select(c.flags).is_some() {
                    self.stash.push_back(c);
                }
            }
            KIND_WAKE => {
                if !more {
                    self.poll_armed = false;
                }
                if c.res < 0 {
                    if c.res != -libc::ECANCELED {
                        self.arm_error.get_or_insert(-c.res);
                    }
                    return;
                }
                self.wake.drain();
                self.woken = true;
            }
            KIND_SEND => self.complete_send(index, c.res),
            _ => {} // KIND_CANCEL
        }
    }

    /// Deliver one receive CQE to `on` and give its buffer back. Returns datagrams delivered.
    fn deliver(&mut self, c: Cqe, on: &mut dyn FnMut(usize, SocketAddr, &[u8])) -> usize {
        let socket = (c.ud & INDEX_MASK) as usize;
        let Some(bid) = cqueue::buffer_select(c.flags).filter(|b| (*b as usize) < self.entries)
        else {
            return 0;
        };
        if c.res < 0 {
            self.return_buf(bid);
            return 0;
        }
        self.arm_failures[socket] = 0;
        let len = (c.res as usize).min(self.slot_len);
        debug_assert!((bid as usize + 1) * self.slot_len <= self.bufs.len());
        // SAFETY: the kernel wrote `len` bytes into buffer `bid` (inside `bufs`) and gave it to us
        // with this CQE; it will not write there again until we return it below, after the last
        // use of this slice.
        let buf = unsafe {
            std::slice::from_raw_parts(self.bufs.as_ptr().add(bid as usize * self.slot_len), len)
        };
        let mut n = 0;
        match types::RecvMsgOut::parse(buf, &self.recv_hdr) {
            Ok(out) if out.is_payload_truncated() => debug!(socket, "truncated datagram dropped"),
            Ok(out) => {
                if let Some(src) = sys::decode_addr(out.name_data()) {
                    let gro = sys::parse_gro(out.control_data());
                    n = for_each_segment(out.payload_data(), gro, |d| on(socket, src, d));
                }
            }
            Err(()) => debug!(socket, len, "malformed multishot recvmsg buffer"),
        }
        self.return_buf(bid);
        n
    }

    // --- send

    /// Fill a free slot with one message (several payloads = one GSO send of `seg`-byte segments)
    /// and push its SENDMSG. Returns false (and counts the datagrams as errors) if it could not
    /// be queued.
    fn start_send(
        &mut self,
        socket: usize,
        dest: SocketAddr,
        seg: usize,
        payloads: impl Iterator<Item = Vec<u8>>,
    ) -> bool {
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(Box::new(SendSlot::new()));
                self.slots.len() - 1
            }
        };
        let fd = self.socks[socket].raw();
        let slot = &mut *self.slots[idx];
        slot.socket = socket;
        slot.dest = dest;
        slot.bufs.clear();
        slot.bufs.extend(payloads);
        slot.iovs.clear();
        for b in &slot.bufs {
            slot.iovs.push(libc::iovec {
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            });
        }
        let (name, namelen) = sys::encode_addr(&dest);
        slot.name = name;
        // SAFETY: plain-old-data C struct: all-zero is a valid value.
        slot.msg = unsafe { mem::zeroed() };
        slot.msg.msg_name = &mut slot.name as *mut _ as *mut libc::c_void;
        slot.msg.msg_namelen = namelen;
        slot.msg.msg_iov = slot.iovs.as_mut_ptr();
        slot.msg.msg_iovlen = slot.iovs.len() as _;
        if slot.bufs.len() > 1 {
            let clen = sys::write_udp_segment(&mut slot.ctrl, seg as u16);
            slot.msg.msg_control = slot.ctrl.0.as_mut_ptr() as *mut libc::c_void;
            slot.msg.msg_controllen = clen as _;
        }
        // MSG_DONTWAIT: a full socket buffer fails the send (dropped, counted) instead of
        // parking it in the kernel until space frees up.
        let entry = opcode::SendMsg::new(types::Fd(fd), &slot.msg)
            .flags(libc::MSG_DONTWAIT as u32)
            .build()
            .user_data(user_data(KIND_SEND, idx));
        // SAFETY: the msghdr, address, cmsg, iovec array and payload Vecs all live in the boxed
        // slot `idx` (its heap address never changes), which is neither modified nor freed until
        // this SQE's CQE is handled in `complete_send` (or Drop waits for it).
        if unsafe { self.push_sqe(&entry) } {
            self.in_flight += 1;
            true
        } else {
            let slot = &mut self.slots[idx];
            self.pending_errors += slot.bufs.len();
            self.done.append(&mut slot.bufs);
            slot.iovs.clear();
            self.free.push(idx);
            false
        }
    }

    fn complete_send(&mut self, idx: usize, res: i32) {
        let Some(slot) = self.slots.get_mut(idx) else {
            return;
        };
        self.in_flight -= 1;
        let segments = slot.bufs.len();
        if res < 0 {
            let err = -res;
            if segments > 1
                && matches!(err, libc::EIO | libc::EMSGSIZE | libc::EINVAL)
                && !self.closing
            {
                let (socket, dest) = (slot.socket, slot.dest);
                let bufs = mem::take(&mut slot.bufs);
                slot.iovs.clear();
                self.free.push(idx);
                self.refused_runs += 1;
                if self.socks[socket].gso {
                    self.socks[socket].gso = false;
                    info!(local = %self.locals[socket], errno = err, segments,
                          "GSO send refused on this path: GSO disabled for the socket, resending plainly");
                }
                for b in bufs {
                    if self.start_send(socket, dest, 0, std::iter::once(b)) {
                        self.pending_sqes += 1;
                    }
                }
                return;
            }
            trace!(
                socket = slot.socket,
                err,
                segments,
                "send failed, datagrams dropped"
            );
            self.pending_errors += segments.max(1);
        }
        // The kernel is done with the payloads (UDP copied them): they can be reused.
        self.done.append(&mut slot.bufs);
        slot.iovs.clear();
        self.free.push(idx);
    }

    /// Cancel the armed multishot receives and the WakeFd poll (and, with `sends`, wait for the
    /// in-flight sends) until their last CQEs arrived, at most 2 s. Received data that completes
    /// meanwhile stays stashed for `recv`. Returns whether everything is quiet.
    fn cancel_armed(&mut self, sends: bool) -> bool {
        let mut targets: Vec<u64> = (0..self.armed.len())
            .filter(|s| self.armed[*s])
            .map(|s| user_data(KIND_RECV, s))
            .collect();
        if self.poll_armed {
            targets.push(user_data(KIND_WAKE, 0));
        }
        for t in targets {
            let e = opcode::AsyncCancel::new(t)
                .build()
                .user_data(user_data(KIND_CANCEL, 0));
            // SAFETY: ASYNC_CANCEL carries no pointers.
            unsafe { self.push_sqe(&e) };
        }
        let _ = self.submit_now();
        let busy = |io: &UringIo| {
            io.poll_armed || io.armed.iter().any(|a| *a) || (sends && io.in_flight > 0)
        };
        let deadline = Instant::now() + Duration::from_secs(2);
        while busy(self) && Instant::now() < deadline {
            let _ = self.enter_wait(Some(Duration::from_millis(10)));
            self.reap();
        }
        !busy(self)
    }

    /// Wait (at most `timeout`) until at least one CQE is available; timeouts and signals are
    /// not errors.
    fn enter_wait(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        let r = match timeout {
            None => self.ring.submitter().submit_and_wait(1),
            Some(t) => {
                let ts = types::Timespec::from(t);
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(1, &args)
            }
        };
        match r {
            Ok(_) => Ok(()),
            Err(e) => match sys::errno(&e) {
                libc::ETIME | libc::EINTR | libc::EAGAIN | libc::EBUSY => Ok(()),
                _ => Err(e),
            },
        }
    }
}

#[cfg(test)]
thread_local! {
    /// Test hook: make io_uring setup fail on this thread as it would under seccomp.
    pub(super) static FAIL_SETUP: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Create the ring and the registered buffer ring, checking the features this backend needs.
fn setup_ring(entries: usize) -> io::Result<(IoUring, MmapRegion, MmapRegion, usize)> {
    #[cfg(test)]
    if FAIL_SETUP.with(|f| f.get()) {
        return Err(context(
            "io_uring_setup (test hook)",
            io::Error::from_raw_os_error(libc::EPERM),
        ));
    }
    let cq = (entries * 2)
        .max(4 * SQ_ENTRIES as usize)
        .next_power_of_two() as u32;
    let ring = IoUring::builder()
        .setup_cqsize(cq)
        .setup_clamp()
        .setup_submit_all()
        .setup_coop_taskrun()
        .setup_taskrun_flag()
        .build(SQ_ENTRIES)
        .map_err(|e| {
            context(
                "io_uring_setup (needs Linux 5.19+, not disabled by sysctl or seccomp)",
                e,
            )
        })?;
    let p = ring.params();
    if !p.is_feature_ext_arg() || !p.is_feature_nodrop() || !p.is_feature_fast_poll() {
        return Err(unsupported(
            "io_uring lacks EXT_ARG/NODROP/FAST_POLL (needs Linux 5.11+)".to_string(),
        ));
    }
    let mut probe = io_uring::Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| context("io_uring probe", e))?;
    for (code, name) in [
        (opcode::RecvMsgMulti::CODE, "RECVMSG"),
        (opcode::SendMsg::CODE, "SENDMSG"),
        (opcode::PollAdd::CODE, "POLL_ADD"),
        (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
    ] {
        if !probe.is_supported(code) {
            return Err(unsupported(format!("io_uring opcode {name} not supported")));
        }
    }
    let slot_len = (RX_HEADER + sys::RX_PAYLOAD).next_multiple_of(64);
    let bufs =
        MmapRegion::new(entries * slot_len).map_err(|e| context("mmap receive buffers", e))?;
    let br = MmapRegion::new(entries * mem::size_of::<types::BufRingEntry>())
        .map_err(|e| context("mmap buffer ring", e))?;
    // SAFETY: `br` is page aligned, holds `entries` entries, and is kept alive (and unmoved: it
    // is an mmap) in the UringIo next to the ring, which is dropped before it; Drop waits until
    // no request can still pick a buffer.
    unsafe {
        ring.submitter()
            .register_buf_ring_with_flags(br.as_ptr() as u64, entries as u16, BGID, 0)
    }
    .map_err(|e| context("io_uring provided buffer ring (needs Linux 5.19+)", e))?;
    Ok((ring, bufs, br, slot_len))
}

impl DatagramIo for UringIo {
    fn name(&self) -> &'static str {
        "uring"
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
        // With COOP_TASKRUN, completions may be waiting as task work: one enter runs it.
        let need_enter = {
            let sq = self.ring.submission();
            !sq.is_empty() || sq.taskrun() || sq.cq_overflow()
        };
        if need_enter {
            self.submit_now()?;
        }
        let mut delivered = 0;
        for _ in 0..MAX_RECV_ROUNDS {
            self.reap();
            if self.stash.is_empty() {
                break;
            }
            while let Some(c) = self.stash.pop_front() {
                delivered += self.deliver(c, on);
            }
            self.publish_tail();
        }
        self.arm_pending();
        if !self.ring.submission().is_empty() {
            self.submit_now()?;
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
        self.reap();
        self.refused_runs = 0;
        let mut queue = mem::take(&mut self.queue);
        let mut i = 0;
        while i < queue.len() {
            let (socket, dest) = (queue[i].socket, queue[i].dest);
            let run = next_run(&queue, i, self.socks[socket].gso);
            let payloads = queue[i..i + run.len]
                .iter_mut()
                .map(|q| mem::take(&mut q.payload));
            if self.start_send(socket, dest, run.seg, payloads) {
                stats.syscalls_or_sqes += 1;
                if run.len > 1 {
                    stats.gso_batches += 1;
                }
            }
            i += run.len;
        }
        queue.clear();
        self.queue = queue;
        // One submission for the whole batch; UDP sends complete inline, so reap right away to
        // free the slots (and resend plainly if a GSO send was refused).
        for _ in 0..2 {
            if self.ring.submission().is_empty() {
                break;
            }
            self.submit_now()?;
            self.reap();
        }
        stats.gso_batches -= self.refused_runs.min(stats.gso_batches);
        stats.syscalls_or_sqes += mem::take(&mut self.pending_sqes);
        stats.errors = mem::take(&mut self.pending_errors);
        Ok(stats)
    }

    fn wait(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        let deadline = timeout.map(|t| Instant::now() + t);
        self.reap();
        while self.stash.is_empty() && !self.woken {
            self.arm_pending();
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            self.enter_wait(left)?;
            // Send completions alone are no reason to return: loop until data, a wake, or time.
            self.reap();
            if deadline.is_some_and(|d| Instant::now() >= d) {
                break;
            }
        }
        self.woken = false;
        Ok(())
    }

    fn ready(&mut self) -> io::Result<bool> {
        // What the WakeFd announces (commands, cross-shard packets), the polling shard checks
        // for itself.
        self.woken = false;
        if !self.stash.is_empty() {
            return Ok(true);
        }
        // With COOP_TASKRUN, arrived data may still be task work: `recv` enters to run it.
        let pending_work = {
            let sq = self.ring.submission();
            sq.taskrun() || sq.cq_overflow()
        };
        Ok(pending_work || !self.ring.completion().is_empty())
    }

    fn reclaim(&mut self, pool: &mut BufferPool) {
        pool.give_all(self.done.drain(..));
    }
}

impl Drop for UringIo {
    fn drop(&mut self) {
        // The kernel may still write into receive buffers (armed multishots) or read send slots
        // (in-flight sends): cancel what is armed and wait for the last CQEs before any of that
        // memory is freed. Cancelling by user_data works on every kernel this backend accepts.
        self.closing = true;
        if !self.cancel_armed(true) {
            warn!(
                in_flight = self.in_flight,
                "io_uring requests still outstanding at close; leaking their buffers rather than freeing them under the kernel"
            );
            mem::forget(mem::replace(&mut self.bufs, MmapRegion::empty()));
            mem::forget(mem::replace(&mut self.br, MmapRegion::empty()));
            mem::forget(mem::take(&mut self.slots));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_data_roundtrip() {
        let ud = user_data(KIND_SEND, 12345);
        assert_eq!(ud >> KIND_SHIFT, KIND_SEND);
        assert_eq!((ud & INDEX_MASK) as usize, 12345);
        assert_eq!(user_data(KIND_RECV, 0) >> KIND_SHIFT, KIND_RECV);
    }

    #[test]
    fn slot_fits_header_and_largest_datagram() {
        // io_uring_recvmsg_out is 16 bytes; a GRO super-datagram is < 64 KiB.
        assert_eq!(mem::size_of::<io_uring::types::BufRingEntry>(), 16);
        assert!(RX_HEADER + 65_535 <= (RX_HEADER + sys::RX_PAYLOAD).next_multiple_of(64));
    }
}
