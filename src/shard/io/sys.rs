//! Raw Linux plumbing shared by both backends: UDP socket setup and GSO/GRO probing, socket
//! address and cmsg encoding, eventfd and anonymous-mmap helpers. It owns no shard state and
//! must not know about io_uring or epoll; every `unsafe` here is a thin, checked syscall wrapper.

use std::io;
use std::mem::{self, size_of};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::ptr::NonNull;
use std::time::Duration;

use tracing::{debug, info};

// Kernel constants, spelled out so the code does not depend on which libc release exports them.
pub(super) const SOL_UDP: libc::c_int = 17;
pub(super) const UDP_SEGMENT: libc::c_int = 103;
pub(super) const UDP_GRO: libc::c_int = 104;
const SO_SNDBUFFORCE: libc::c_int = 32;
const SO_RCVBUFFORCE: libc::c_int = 33;

/// Largest UDP payload one GSO send may carry (65535 - 20 byte IPv4 header - 8 byte UDP header).
pub(super) const MAX_GSO_BYTES: usize = 65_507;
/// Most segments one GSO send may carry (the kernel's UDP_MAX_SEGMENTS on every kernel with GSO).
pub(super) const MAX_GSO_SEGMENTS: usize = 64;
/// Receive payload capacity of one buffer: a GRO super-datagram is always below 64 KiB.
/// Buffers live in lazily-faulted anonymous memory, so only the pages a datagram touches are resident.
pub(super) const RX_PAYLOAD: usize = 65_536;
/// Room reserved for a source address (a `sockaddr_in6` also holds a `sockaddr_in`).
pub(super) const NAME_LEN: usize = size_of::<libc::sockaddr_in6>();
/// Room reserved for receive control data (the UDP_GRO cmsg needs 20 bytes; spare for others).
pub(super) const CTRL_LEN: usize = 64;

/// Turn a `-1`-on-error libc return value into an `io::Result`.
pub(super) fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `errno` of an error, or 0.
pub(super) fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(0)
}

// ---------------------------------------------------------------------------------------------
// cmsg layout (same arithmetic as the CMSG_* macros, for this target's `cmsghdr`)

const fn cmsg_align(n: usize) -> usize {
    (n + size_of::<usize>() - 1) & !(size_of::<usize>() - 1)
}
/// Offset of the data within a control message.
const CMSG_HDR: usize = cmsg_align(size_of::<libc::cmsghdr>());
const fn cmsg_len(data: usize) -> usize {
    CMSG_HDR + data
}
/// Bytes one control message with `data` bytes occupies, padding included.
pub(super) const fn cmsg_space(data: usize) -> usize {
    CMSG_HDR + cmsg_align(data)
}

/// Control-message buffer, aligned for `cmsghdr`.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
pub(super) struct CmsgBuf(pub [u8; CTRL_LEN]);

impl CmsgBuf {
    pub(super) const fn new() -> CmsgBuf {
        CmsgBuf([0; CTRL_LEN])
    }
}

/// Write a single `SOL_UDP/UDP_SEGMENT` control message carrying `segment` into `buf`;
/// returns the `msg_controllen` to use.
pub(super) fn write_udp_segment(buf: &mut CmsgBuf, segment: u16) -> usize {
    let space = cmsg_space(size_of::<u16>());
    buf.0[..space].fill(0);
    // Field by field, in native byte order: `cmsg_len` is a size_t, level and type are ints.
    let len = cmsg_len(size_of::<u16>());
    let (l, rest) = buf.0.split_at_mut(size_of::<usize>());
    l.copy_from_slice(&len.to_ne_bytes());
    rest[..4].copy_from_slice(&SOL_UDP.to_ne_bytes());
    rest[4..8].copy_from_slice(&UDP_SEGMENT.to_ne_bytes());
    buf.0[CMSG_HDR..CMSG_HDR + 2].copy_from_slice(&segment.to_ne_bytes());
    space
}

/// Find the GRO segment size in received control data (the `SOL_UDP/UDP_GRO` cmsg), if any.
pub(super) fn parse_gro(control: &[u8]) -> Option<usize> {
    let mut off = 0usize;
    while off + CMSG_HDR <= control.len() {
        let mut word = [0u8; size_of::<usize>()];
        word.copy_from_slice(&control[off..off + size_of::<usize>()]);
        let len = usize::from_ne_bytes(word);
        let at = off + size_of::<usize>();
        let level = i32::from_ne_bytes(control[at..at + 4].try_into().ok()?);
        let kind = i32::from_ne_bytes(control[at + 4..at + 8].try_into().ok()?);
        if len < CMSG_HDR || off + len > control.len() {
            return None;
        }
        if level == SOL_UDP && kind == UDP_GRO && len >= cmsg_len(4) {
            let d = off + CMSG_HDR;
            let seg = i32::from_ne_bytes(control[d..d + 4].try_into().ok()?);
            return usize::try_from(seg).ok().filter(|s| *s > 0);
        }
        off += cmsg_align(len);
    }
    None
}

// ---------------------------------------------------------------------------------------------
// socket addresses

/// Encode `addr` as a C socket address; returns the storage and the length to pass to the kernel.
pub(super) fn encode_addr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain old data, all-zero is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and at least as aligned as sockaddr_in
            // (that is its purpose), and `storage` is a live local we hold exclusively.
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in, sin) };
            size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above, sockaddr_storage fits and is aligned for sockaddr_in6.
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in6, sin6) };
            size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// Decode a C socket address given as raw bytes (as the kernel wrote it).
pub(super) fn decode_addr(b: &[u8]) -> Option<SocketAddr> {
    if b.len() < 2 {
        return None;
    }
    let family = libc::sa_family_t::from_ne_bytes([b[0], b[1]]) as libc::c_int;
    let port = u16::from_be_bytes([*b.get(2)?, *b.get(3)?]);
    match family {
        libc::AF_INET if b.len() >= size_of::<libc::sockaddr_in>() => {
            let ip = Ipv4Addr::new(b[4], b[5], b[6], b[7]);
            Some(SocketAddr::V4(SocketAddrV4::new(ip, port)))
        }
        libc::AF_INET6 if b.len() >= size_of::<libc::sockaddr_in6>() => {
            let flow = u32::from_ne_bytes(b[4..8].try_into().ok()?);
            let ip: [u8; 16] = b[8..24].try_into().ok()?;
            let scope = u32::from_ne_bytes(b[24..28].try_into().ok()?);
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(ip),
                port,
                flow,
                scope,
            )))
        }
        _ => None,
    }
}

/// The first `len` bytes of a `sockaddr_storage`, for [`decode_addr`].
pub(super) fn storage_bytes(s: &libc::sockaddr_storage, len: libc::socklen_t) -> &[u8] {
    let len = (len as usize).min(size_of::<libc::sockaddr_storage>());
    // SAFETY: `s` is a valid, initialised sockaddr_storage (plain bytes, no padding invariants)
    // and `len` is clamped to its size; the slice borrows `s`.
    unsafe { std::slice::from_raw_parts(s as *const _ as *const u8, len) }
}

// ---------------------------------------------------------------------------------------------
// sockets

/// One bound, non-blocking UDP socket and what the probe found for it.
pub(super) struct Sock {
    pub fd: OwnedFd,
    pub local: SocketAddr,
    /// UDP_SEGMENT sends are allowed on this socket (cleared at run time if a path rejects GSO).
    pub gso: bool,
    /// UDP_GRO is on: received datagrams may be super-datagrams with a UDP_GRO cmsg.
    pub gro: bool,
}

impl Sock {
    pub(super) fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

pub(super) fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    name: libc::c_int,
    val: libc::c_int,
) -> io::Result<()> {
    // SAFETY: passes a pointer to a live c_int and its exact size; the kernel only reads it.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            &val as *const libc::c_int as *const libc::c_void,
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    cvt(r).map(drop)
}

fn getsockopt_int(fd: RawFd, level: libc::c_int, name: libc::c_int) -> io::Result<libc::c_int> {
    let mut val: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `val` and `len` are live locals; the kernel writes at most `len` bytes into `val`.
    let r = unsafe {
        libc::getsockopt(
            fd,
            level,
            name,
            &mut val as *mut libc::c_int as *mut libc::c_void,
            &mut len,
        )
    };
    cvt(r).map(|_| val)
}

/// Request `bytes` of socket send and receive buffer: SO_*BUFFORCE first (needs CAP_NET_ADMIN,
/// ignores the sysctl caps), then the capped SO_*BUF. Returns the effective (rcv, snd) sizes.
pub(super) fn set_socket_buffers(fd: RawFd, bytes: usize) -> (usize, usize) {
    // The kernel doubles the value it is given; ask for half so the result is near `bytes`.
    let want = (bytes / 2).clamp(1, i32::MAX as usize / 2) as libc::c_int;
    if setsockopt_int(fd, libc::SOL_SOCKET, SO_RCVBUFFORCE, want).is_err() {
        let _ = setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, want);
    }
    if setsockopt_int(fd, libc::SOL_SOCKET, SO_SNDBUFFORCE, want).is_err() {
        let _ = setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUF, want);
    }
    let rcv = getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUF).unwrap_or(0);
    let snd = getsockopt_int(fd, libc::SOL_SOCKET, libc::SO_SNDBUF).unwrap_or(0);
    (rcv.max(0) as usize, snd.max(0) as usize)
}

/// Local address a socket is bound to.
fn local_addr(fd: RawFd) -> io::Result<SocketAddr> {
    // SAFETY: sockaddr_storage is plain old data, all-zero is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: the kernel writes at most `len` bytes into the live `storage` and updates `len`.
    let r =
        unsafe { libc::getsockname(fd, &mut storage as *mut _ as *mut libc::sockaddr, &mut len) };
    cvt(r)?;
    decode_addr(storage_bytes(&storage, len))
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "getsockname: unknown family"))
}

/// Create, configure and bind one non-blocking UDP socket.
fn bind_udp(addr: &SocketAddr, buffer_bytes: usize) -> io::Result<Sock> {
    let domain = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain syscall with constant arguments; a non-negative result is a new fd we own.
    let raw = unsafe {
        libc::socket(
            domain,
            libc::SOCK_DGRAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            libc::IPPROTO_UDP,
        )
    };
    let raw = cvt(raw)?;
    // SAFETY: `raw` was just returned by socket(2), is valid and owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    setsockopt_int(raw, libc::SOL_SOCKET, libc::SO_REUSEADDR, 1)?;
    if addr.is_ipv6() {
        setsockopt_int(raw, libc::IPPROTO_IPV6, libc::IPV6_V6ONLY, 1)?;
    }
    // Don't fragment, without path MTU discovery: media datagrams are sized to fit any path,
    // so the kernel sets DF and skips the IP ID it would otherwise hash and atomically bump for
    // every datagram (`__ip_select_ident`, about 2 % of a forwarding shard's CPU). A datagram
    // too big for the interface fails with EMSGSIZE (counted as a send error) instead of leaving
    // in fragments. QUIC stacks use the same mode.
    let dont_fragment = if addr.is_ipv4() {
        (
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_PROBE,
        )
    } else {
        (
            libc::IPPROTO_IPV6,
            libc::IPV6_MTU_DISCOVER,
            libc::IPV6_PMTUDISC_PROBE,
        )
    };
    if let Err(e) = setsockopt_int(raw, dont_fragment.0, dont_fragment.1, dont_fragment.2) {
        debug!(%addr, error = %e, "cannot set don't-fragment; the kernel's default applies");
    }
    if buffer_bytes > 0 {
        let (rcv, snd) = set_socket_buffers(raw, buffer_bytes);
        debug!(%addr, requested = buffer_bytes, rcvbuf = rcv, sndbuf = snd, "udp socket buffers");
    }
    let (sa, len) = encode_addr(addr);
    // SAFETY: `sa` is a valid socket address of length `len` for this socket's family.
    let r = unsafe { libc::bind(raw, &sa as *const _ as *const libc::sockaddr, len) };
    cvt(r).map_err(|e| io::Error::new(e.kind(), format!("bind {addr}: {e}")))?;
    let local = local_addr(raw)?;
    Ok(Sock {
        fd,
        local,
        gso: false,
        gro: false,
    })
}

/// What the loopback GSO probe saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum GsoProbe {
    /// A 2-segment UDP_SEGMENT send arrived intact.
    Works { coalesced_by_gro: bool },
    /// The kernel refused the GSO send (errno).
    Refused(i32),
    /// The probe could not run (no loopback, timeout): trust the per-socket setsockopt.
    Unknown,
}

/// Send one real 2-segment GSO datagram over 127.0.0.1 to a GRO-enabled receiver and check
/// what arrives. Costs a handful of syscalls, done once per `open`.
pub(super) fn probe_gso_loopback() -> GsoProbe {
    let (rx, tx) = match (
        UdpSocket::bind("127.0.0.1:0"),
        UdpSocket::bind("127.0.0.1:0"),
    ) {
        (Ok(rx), Ok(tx)) => (rx, tx),
        _ => return GsoProbe::Unknown,
    };
    let Ok(dest) = rx.local_addr() else {
        return GsoProbe::Unknown;
    };
    let _ = setsockopt_int(rx.as_raw_fd(), SOL_UDP, UDP_GRO, 1);
    if rx
        .set_read_timeout(Some(Duration::from_millis(200)))
        .is_err()
    {
        return GsoProbe::Unknown;
    }
    let a = [0xA5u8; 8];
    let b = [0x5Au8; 8];
    if let Err(e) = send_gso(tx.as_raw_fd(), &dest, &[&a, &b], 8) {
        return GsoProbe::Refused(errno(&e));
    }
    let mut got = Vec::new();
    let mut coalesced = false;
    let mut buf = [0u8; 64];
    let mut ctrl = CmsgBuf::new();
    for _ in 0..2 {
        match recv_with_control(rx.as_raw_fd(), &mut buf, &mut ctrl, 0) {
            Ok((n, gro)) => {
                coalesced |= gro.is_some() && n > 8;
                got.extend_from_slice(&buf[..n]);
                if got.len() >= 16 {
                    break;
                }
            }
            Err(_) => return GsoProbe::Unknown,
        }
    }
    if got.len() == 16 && got[..8] == a && got[8..] == b {
        GsoProbe::Works {
            coalesced_by_gro: coalesced,
        }
    } else {
        GsoProbe::Unknown
    }
}

/// One `sendmsg` of `segments` (all `seg` bytes but the last) as a single UDP_SEGMENT send.
/// Used by the probe and by tests that need a GRO-able burst.
pub(super) fn send_gso(
    fd: RawFd,
    dest: &SocketAddr,
    segments: &[&[u8]],
    seg: u16,
) -> io::Result<usize> {
    let mut iovs: Vec<libc::iovec> = segments
        .iter()
        .map(|s| libc::iovec {
            iov_base: s.as_ptr() as *mut libc::c_void,
            iov_len: s.len(),
        })
        .collect();
    let (mut name, namelen) = encode_addr(dest);
    let mut ctrl = CmsgBuf::new();
    let clen = write_udp_segment(&mut ctrl, seg);
    // SAFETY: msghdr is plain old data; all-zero is valid and every used field is set below.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_name = &mut name as *mut _ as *mut libc::c_void;
    msg.msg_namelen = namelen;
    msg.msg_iov = iovs.as_mut_ptr();
    msg.msg_iovlen = iovs.len() as _;
    msg.msg_control = ctrl.0.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = clen as _;
    // SAFETY: every pointer in `msg` refers to a live local (iovs, name, ctrl, and the borrowed
    // segments) that outlives this synchronous call; lengths match the buffers.
    let r = unsafe { libc::sendmsg(fd, &msg, 0) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// One `recvmsg` into `buf` with control data; returns the length and the GRO segment size.
fn recv_with_control(
    fd: RawFd,
    buf: &mut [u8],
    ctrl: &mut CmsgBuf,
    flags: libc::c_int,
) -> io::Result<(usize, Option<usize>)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain old data; all-zero is valid and every used field is set below.
    let mut msg: libc::msghdr = unsafe { mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = ctrl.0.as_mut_ptr() as *mut libc::c_void;
    msg.msg_controllen = CTRL_LEN as _;
    // SAFETY: `iov` points into `buf` and `msg_control` into `ctrl`, both live and writable for
    // the lengths given, for the duration of this synchronous call.
    let r = unsafe { libc::recvmsg(fd, &mut msg, flags) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let clen = (msg.msg_controllen as usize).min(CTRL_LEN);
    Ok((r as usize, parse_gro(&ctrl.0[..clen])))
}

/// Bind one socket per address and probe GSO/GRO on each. Fails if any address cannot be bound.
pub(super) fn open_sockets(addrs: &[SocketAddr], buffer_bytes: usize) -> io::Result<Vec<Sock>> {
    if addrs.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "no UDP listen address configured",
        ));
    }
    let probe = probe_gso_loopback();
    let mut socks = Vec::with_capacity(addrs.len());
    for addr in addrs {
        let mut s = bind_udp(addr, buffer_bytes)?;
        // GSO: a real setsockopt of UDP_SEGMENT (0 = no default segmentation, so it changes
        // nothing) tells whether this kernel/socket knows the option; the loopback send tells
        // whether a GSO send actually goes out.
        match setsockopt_int(s.raw(), SOL_UDP, UDP_SEGMENT, 0) {
            Ok(()) => match probe {
                GsoProbe::Refused(e) => {
                    info!(local = %s.local, errno = e, "UDP GSO: loopback GSO send refused, sending one datagram per message")
                }
                _ => s.gso = true,
            },
            Err(e) => {
                info!(local = %s.local, error = %e, "UDP GSO (UDP_SEGMENT) unavailable, sending one datagram per message")
            }
        }
        match setsockopt_int(s.raw(), SOL_UDP, UDP_GRO, 1) {
            Ok(()) => s.gro = true,
            Err(e) => {
                info!(local = %s.local, error = %e, "UDP GRO unavailable, receiving one datagram per buffer")
            }
        }
        debug!(local = %s.local, gso = s.gso, gro = s.gro, ?probe, "udp socket ready");
        socks.push(s);
    }
    Ok(socks)
}

// ---------------------------------------------------------------------------------------------
// eventfd

pub(super) fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; a non-negative result is a new fd we own.
    let raw = cvt(unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) })?;
    // SAFETY: `raw` was just returned by eventfd(2) and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Add 1 to the eventfd counter; EAGAIN (counter saturated: already rung) is ignored.
pub(super) fn eventfd_write(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64, as eventfd(2) requires.
    let _ = unsafe { libc::write(fd, &one as *const u64 as *const libc::c_void, 8) };
}

/// Read (reset) the eventfd counter; returns false once it would block.
pub(super) fn eventfd_read(fd: RawFd) -> bool {
    let mut v: u64 = 0;
    // SAFETY: reads 8 bytes into a live u64, as eventfd(2) requires.
    let r = unsafe { libc::read(fd, &mut v as *mut u64 as *mut libc::c_void, 8) };
    r == 8
}

// ---------------------------------------------------------------------------------------------
// anonymous memory

/// A private anonymous mapping: page aligned, zero-filled lazily by the kernel (so large receive
/// areas cost resident memory only where datagrams land), unmapped on drop.
pub(super) struct MmapRegion {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the region is plain memory exclusively owned by this value; moving the owner to another
// thread moves the only handle to it.
unsafe impl Send for MmapRegion {}

impl MmapRegion {
    pub(super) fn new(len: usize) -> io::Result<MmapRegion> {
        if len == 0 {
            return Ok(MmapRegion::empty());
        }
        // SAFETY: anonymous private mapping with no fixed address: cannot alias existing memory.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(MmapRegion {
            ptr: NonNull::new(p as *mut u8).expect("mmap returned null"),
            len,
        })
    }

    /// A region of length 0 that owns nothing.
    pub(super) fn empty() -> MmapRegion {
        MmapRegion {
            ptr: NonNull::dangling(),
            len: 0,
        }
    }

    pub(super) fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }
}

impl Drop for MmapRegion {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: `ptr`/`len` describe exactly the mapping created in `new`, unmapped once.
            unsafe { libc::munmap(self.ptr.as_ptr() as *mut libc::c_void, self.len) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addr_roundtrip_v4_v6() {
        for a in [
            "127.0.0.1:5004".parse::<SocketAddr>().unwrap(),
            "127.0.0.2:1".parse().unwrap(),
            "[::1]:65535".parse().unwrap(),
            SocketAddr::V6(SocketAddrV6::new("fe80::1".parse().unwrap(), 9, 7, 3)),
        ] {
            let (s, len) = encode_addr(&a);
            assert_eq!(decode_addr(storage_bytes(&s, len)), Some(a));
        }
        assert_eq!(decode_addr(&[0u8; 1]), None);
        assert_eq!(decode_addr(&[0xffu8; 32]), None);
    }

    #[test]
    fn udp_segment_cmsg_roundtrip_shape() {
        let mut b = CmsgBuf::new();
        let len = write_udp_segment(&mut b, 1200);
        assert_eq!(len, cmsg_space(2));
        // The same walker finds a GRO cmsg written in the same layout.
        let mut g = CmsgBuf::new();
        write_udp_segment(&mut g, 0);
        g.0[size_of::<usize>() + 4..size_of::<usize>() + 8].copy_from_slice(&UDP_GRO.to_ne_bytes());
        let glen = cmsg_len(4);
        g.0[..size_of::<usize>()].copy_from_slice(&glen.to_ne_bytes());
        g.0[CMSG_HDR..CMSG_HDR + 4].copy_from_slice(&1200i32.to_ne_bytes());
        assert_eq!(parse_gro(&g.0[..cmsg_space(4)]), Some(1200));
        assert_eq!(parse_gro(&b.0[..len]), None);
        assert_eq!(parse_gro(&[]), None);
        assert_eq!(parse_gro(&[0xff; 7]), None);
        // A bogus length never panics or loops.
        let mut bad = [0u8; 32];
        bad[0] = 200;
        assert_eq!(parse_gro(&bad), None);
    }

    #[test]
    fn media_sockets_set_dont_fragment_without_path_mtu_discovery() {
        let s = bind_udp(&"127.0.0.1:0".parse().unwrap(), 0).unwrap();
        assert_eq!(
            getsockopt_int(s.raw(), libc::IPPROTO_IP, libc::IP_MTU_DISCOVER).unwrap(),
            libc::IP_PMTUDISC_PROBE
        );
        // A v6 socket where the host has IPv6 loopback.
        if let Ok(s) = bind_udp(&"[::1]:0".parse().unwrap(), 0) {
            assert_eq!(
                getsockopt_int(s.raw(), libc::IPPROTO_IPV6, libc::IPV6_MTU_DISCOVER).unwrap(),
                libc::IPV6_PMTUDISC_PROBE
            );
        }
    }

    #[test]
    fn mmap_region_is_zeroed_and_writable() {
        let r = MmapRegion::new(1 << 20).unwrap();
        assert_eq!(r.len(), 1 << 20);
        // SAFETY: the region is 1 MiB of mapped read-write memory owned by `r`.
        let s = unsafe { std::slice::from_raw_parts_mut(r.as_ptr(), r.len()) };
        assert!(s.iter().step_by(4096).all(|b| *b == 0));
        s[12345] = 7;
        assert_eq!(s[12345], 7);
    }
}
