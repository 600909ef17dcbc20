//! A peer's UDP socket: waiting for datagrams on glommio, reading them in batches with their
//! kernel arrival time, and the socket options that go with it. Every `unsafe` block of the load
//! generator's networking is here.
//!
//! Why not `glommio::net::UdpSocket::recv_from`: for a peer that receives a few hundred packets
//! a second almost every datagram finds the socket empty, and glommio then pays a failed
//! non-blocking `recvmsg` plus an io_uring submission flushed on the spot (one more syscall). Here
//! a peer waits with a one-byte `MSG_PEEK` receive on glommio's ring, which is submitted with the
//! reactor's next batch (shared by every peer of the shard) and does not consume the datagram,
//! then takes everything queued with one `recvmmsg(MSG_DONTWAIT)`.

use std::io;
use std::net::UdpSocket;
use std::os::unix::io::{AsRawFd, FromRawFd, RawFd};

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

/// Waits on glommio's ring until a socket has a datagram (see the module comment).
pub struct Readiness(std::rc::Rc<UnixStream>);

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
        Ok(Readiness(std::rc::Rc::new(unsafe {
            UnixStream::from_raw_fd(fd)
        })))
    }

    /// Resolves when a datagram is queued (or the socket has an error to report, such as ICMP
    /// port unreachable from the SFU: `ConnectionRefused`). The wait owns what it needs, so a
    /// peer keeps it across a timer that fired first instead of cancelling and re-arming the
    /// receive on the ring every time.
    pub fn wait(&self) -> ReadyWait {
        let stream = self.0.clone();
        Box::pin(async move {
            let mut one = [0u8; 1];
            stream.peek(&mut one).await.map(|_| ()).map_err(Into::into)
        })
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
