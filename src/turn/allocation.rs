//! The TURN allocation state machine (RFC 8656), sans-IO: datagrams and `now` in, actions out.
//!
//! Owns allocations, their permissions, channels, lifetimes, quotas, bandwidth buckets, the
//! peer-address policy and the anti-amplification credit of unauthenticated sources. It never
//! reads a clock or touches a socket: `server` does, and drives it as [`Allocations`] documents.

use std::cmp::Reverse;
use std::collections::hash_map::RandomState;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::hash::BuildHasher;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

use super::auth::{AuthFailure, Authenticated, Authenticator};
use super::codec::{
    attr, classify, reason_phrase, AttrList, Attribute, ChannelData, Class, Family, IntegrityKind,
    Kind, Message, MessageWriter, Method, TransactionId, CHANNEL_MAX, CHANNEL_MIN,
};
use super::{add, inc, TurnStats};
use crate::config::{Cidr, TurnConfig};

/// Lifetime of an allocation when the client asks for none (RFC 8656 section 3.2).
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(600);
/// Longest lifetime granted.
pub const MAX_LIFETIME: Duration = Duration::from_secs(3600);
/// Lifetime of a permission (RFC 8656 section 9).
pub const PERMISSION_LIFETIME: Duration = Duration::from_secs(300);
/// Lifetime of a channel binding (RFC 8656 section 12).
pub const CHANNEL_LIFETIME: Duration = Duration::from_secs(600);
/// After a channel expires, neither its number nor its peer may be bound to another for this
/// long (RFC 8656 section 12).
pub const CHANNEL_REBIND_GUARD: Duration = Duration::from_secs(300);
/// How long a port reserved by EVEN-PORT's R bit is held (RFC 8656 section 14.6).
pub const RESERVATION_LIFETIME: Duration = Duration::from_secs(30);
/// How long an allocation may wait for its relay socket before it is dropped.
const BIND_TIMEOUT: Duration = Duration::from_secs(5);
/// Permissions and channels per allocation (an ICE agent needs a handful).
pub const MAX_PERMISSIONS: usize = 64;
pub const MAX_CHANNELS: usize = 64;
/// Protocol number of UDP in REQUESTED-TRANSPORT.
const UDP: u8 = 17;

/// Comprehension-required attributes a TURN request may carry and that sluice understands.
const KNOWN_REQUIRED: &[u16] = &[
    attr::USERNAME,
    attr::REALM,
    attr::NONCE,
    attr::CHANNEL_NUMBER,
    attr::LIFETIME,
    attr::XOR_PEER_ADDRESS,
    attr::DATA,
    attr::REQUESTED_ADDRESS_FAMILY,
    attr::EVEN_PORT,
    attr::REQUESTED_TRANSPORT,
    attr::RESERVATION_TOKEN,
];

/// Comprehension-required attributes a Binding request may carry (ICE's among them).
const KNOWN_REQUIRED_BINDING: &[u16] = &[
    attr::USERNAME,
    attr::REALM,
    attr::NONCE,
    attr::PRIORITY,
    attr::USE_CANDIDATE,
];

/// How a client reaches the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    Udp,
    Tcp,
}

/// The client's 5-tuple: what identifies an allocation (RFC 8656 section 2.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FiveTuple {
    pub transport: Transport,
    pub client: SocketAddr,
    pub server: SocketAddr,
}

/// A handle on one allocation, stable for its life and never reused for another.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AllocationId {
    index: u32,
    generation: u32,
}

/// What the I/O must open for a new allocation (answer with [`Allocations::relay_bound`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BindRelay {
    pub allocation: AllocationId,
    /// The client, so the I/O can pick the local address that routes to it.
    pub client: FiveTuple,
    pub family: Family,
    /// EVEN-PORT: the relay port must be even.
    pub even_port: bool,
    /// EVEN-PORT with R: also hold the next port, and report it as `RelayBound::reserved`.
    pub reserve_next: bool,
    /// RESERVATION-TOKEN: use the port held under this address by an earlier allocation.
    pub reserved: Option<SocketAddr>,
}

/// A relay socket the I/O opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RelayBound {
    /// The relayed transport address advertised to the client (XOR-RELAYED-ADDRESS).
    pub relay: SocketAddr,
    /// When `reserve_next` was asked: the key of the held next port.
    pub reserved: Option<SocketAddr>,
}

/// Why the I/O could not open a relay socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelayBindError {
    /// No relay address of the requested family (answered 440).
    Family,
    /// No free port (answered 508).
    Capacity,
}

/// What the state machine asks the I/O to do.
#[derive(Debug, PartialEq, Eq)]
pub enum Output {
    /// Send `bytes` to the client over its 5-tuple (a UDP datagram, or a frame on its TCP
    /// connection).
    Transmit { to: FiveTuple, bytes: Vec<u8> },
    /// Open a relay socket, then call [`Allocations::relay_bound`].
    BindRelay(BindRelay),
    /// The allocation is gone: close its relay socket.
    CloseRelay { allocation: AllocationId },
    /// A port held for a RESERVATION-TOKEN was not claimed in time: release it.
    ReleaseReservation { reserved: SocketAddr },
    /// Nothing more to do now; call [`Allocations::handle_timeout`] at this instant.
    Timeout(Instant),
}

/// A datagram to send from an allocation's relay socket, borrowed from the client's input.
#[derive(Debug, PartialEq, Eq)]
pub struct ToPeer<'a> {
    pub allocation: AllocationId,
    pub peer: SocketAddr,
    pub payload: &'a [u8],
}

/// Special-purpose address blocks a relay refuses as peers unless allowed (IANA IPv4 and IPv6
/// Special-Purpose Address Registries).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerClass {
    Loopback,
    Private,
    LinkLocal,
    Multicast,
    Unspecified,
    /// Documentation, benchmarking, shared (CGN), IETF protocol assignments, reserved.
    SpecialPurpose,
}

/// The block `ip` belongs to when it is not a globally routable unicast address.
/// IPv4-mapped (`::ffff:0:0/96`), NAT64 (`64:ff9b::/96`) and 6to4 (`2002::/16`) addresses are
/// judged by the IPv4 address they carry.
pub fn special_purpose(ip: IpAddr) -> Option<PeerClass> {
    match ip {
        IpAddr::V4(v4) => special_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = embedded_v4(v6) {
                return special_v4(v4);
            }
            let bits = u128::from(v6);
            let in_net = |net: u128, prefix: u32| (bits ^ net) >> (128 - prefix) == 0;
            if v6.is_unspecified() {
                Some(PeerClass::Unspecified)
            } else if v6.is_loopback() {
                Some(PeerClass::Loopback)
            } else if in_net(0xff00 << 112, 8) {
                Some(PeerClass::Multicast)
            } else if in_net(0xfe80 << 112, 10) || in_net(0xfec0 << 112, 10) {
                Some(PeerClass::LinkLocal)
            } else if in_net(0xfc00 << 112, 7) {
                Some(PeerClass::Private)
            } else if !in_net(0x2000 << 112, 3)
                || in_net(0x2001 << 112, 23)
                || in_net(0x2001_0db8 << 96, 32)
                || in_net(0x3fff << 112, 20)
            {
                // Outside global unicast, IETF protocol assignments (Teredo, ORCHID,
                // benchmarking), documentation.
                Some(PeerClass::SpecialPurpose)
            } else {
                None
            }
        }
    }
}

/// The IPv4 address inside an IPv4-mapped, NAT64 well-known-prefix or 6to4 address.
fn embedded_v4(v6: Ipv6Addr) -> Option<Ipv4Addr> {
    let o = v6.octets();
    let seg = v6.segments();
    if let Some(v4) = v6.to_ipv4_mapped() {
        return Some(v4);
    }
    if seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return Some(Ipv4Addr::new(o[12], o[13], o[14], o[15]));
    }
    if seg[0] == 0x2002 {
        return Some(Ipv4Addr::new(o[2], o[3], o[4], o[5]));
    }
    None
}

fn special_v4(ip: Ipv4Addr) -> Option<PeerClass> {
    let o = ip.octets();
    let bits = u32::from(ip);
    let in_net = |net: [u8; 4], prefix: u32| (bits ^ u32::from_be_bytes(net)) >> (32 - prefix) == 0;
    if o[0] == 0 {
        Some(PeerClass::Unspecified)
    } else if o[0] == 127 {
        Some(PeerClass::Loopback)
    } else if in_net([10, 0, 0, 0], 8)
        || in_net([172, 16, 0, 0], 12)
        || in_net([192, 168, 0, 0], 16)
    {
        Some(PeerClass::Private)
    } else if in_net([169, 254, 0, 0], 16) {
        Some(PeerClass::LinkLocal)
    } else if in_net([224, 0, 0, 0], 4) {
        Some(PeerClass::Multicast)
    } else if in_net([100, 64, 0, 0], 10)
        || in_net([192, 0, 0, 0], 24)
        || in_net([192, 0, 2, 0], 24)
        || in_net([192, 88, 99, 0], 24)
        || in_net([198, 18, 0, 0], 15)
        || in_net([198, 51, 100, 0], 24)
        || in_net([203, 0, 113, 0], 24)
        || in_net([240, 0, 0, 0], 4)
    {
        Some(PeerClass::SpecialPurpose)
    } else {
        None
    }
}

/// Which peers a relay may send to.
#[derive(Clone, Debug, Default)]
pub struct PeerPolicy {
    pub allow_loopback: bool,
    pub allow: Vec<Cidr>,
    /// Exact transport addresses always allowed: the SFU's own media sockets, so the embedded
    /// server reaches its SFU even on private or loopback addresses without opening the rest.
    pub exact: Vec<SocketAddr>,
}

impl PeerPolicy {
    /// May an allocation relay to `peer`? One of the `exact` addresses, or its IP by `permits`.
    pub fn permits_addr(&self, peer: SocketAddr) -> bool {
        self.exact.contains(&peer) || self.permits(peer.ip())
    }

    /// May an allocation relay to `ip`? Globally routable unicast always; loopback with
    /// `allow_loopback`; anything inside an `allow` network.
    pub fn permits(&self, ip: IpAddr) -> bool {
        let embedded = match ip {
            IpAddr::V6(v6) => embedded_v4(v6).map(IpAddr::V4),
            IpAddr::V4(_) => None,
        };
        if self
            .allow
            .iter()
            .any(|net| net.contains(ip) || embedded.is_some_and(|e| net.contains(e)))
        {
            return true;
        }
        match special_purpose(ip) {
            None => true,
            Some(PeerClass::Loopback) => self.allow_loopback,
            Some(_) => false,
        }
    }
}

/// Bytes per second with a burst, counted exactly in byte-nanoseconds.
#[derive(Clone, Debug)]
struct TokenBucket {
    rate: u64,
    /// In bytes x 1e9.
    tokens: u128,
    capacity: u128,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: u64, now: Instant) -> Self {
        // Half a second of traffic, and never less than 64 KiB, so a keyframe passes.
        let burst = (rate / 2).max(64 * 1024);
        let capacity = u128::from(burst) * 1_000_000_000;
        TokenBucket {
            rate,
            tokens: capacity,
            capacity,
            last: now,
        }
    }

    fn take(&mut self, bytes: usize, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_nanos();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * u128::from(self.rate)).min(self.capacity);
        let cost = bytes as u128 * 1_000_000_000;
        if self.tokens >= cost {
            self.tokens -= cost;
            true
        } else {
            false
        }
    }
}

#[derive(Clone, Debug)]
struct Channel {
    number: u16,
    peer: SocketAddr,
    expires: Instant,
}

#[derive(Clone, Copy, Debug)]
struct Pending {
    txid: TransactionId,
    integrity: IntegrityKind,
    fingerprint: bool,
    lifetime: Duration,
    reserve_next: bool,
}

#[derive(Debug)]
enum State {
    /// Waiting for the I/O to open the relay socket.
    Binding(Pending),
    Active {
        relay: SocketAddr,
    },
}

#[derive(Debug)]
struct Allocation {
    five: FiveTuple,
    username: String,
    quota_user: String,
    key: [u8; 16],
    family: Family,
    state: State,
    expires: Instant,
    /// The instant of this allocation's live entry in the timer heap.
    scheduled: Instant,
    allocate_txid: TransactionId,
    /// The success response, resent when the Allocate is retransmitted.
    allocate_response: Vec<u8>,
    permissions: Vec<(IpAddr, Instant)>,
    channels: Vec<Channel>,
    bucket: Option<TokenBucket>,
}

impl Allocation {
    fn has_permission(&self, ip: IpAddr, now: Instant) -> bool {
        self.permissions
            .iter()
            .any(|(p, exp)| *p == ip && *exp > now)
    }

    /// Installs or refreshes a permission; false when the table is full.
    fn permit(&mut self, ip: IpAddr, now: Instant) -> bool {
        self.permissions.retain(|(_, exp)| *exp > now);
        if let Some(p) = self.permissions.iter_mut().find(|(p, _)| *p == ip) {
            p.1 = now + PERMISSION_LIFETIME;
            return true;
        }
        if self.permissions.len() >= MAX_PERMISSIONS {
            return false;
        }
        self.permissions.push((ip, now + PERMISSION_LIFETIME));
        true
    }

    fn channel_by_number(&self, number: u16, now: Instant) -> Option<&Channel> {
        self.channels
            .iter()
            .find(|c| c.number == number && c.expires > now)
    }

    fn channel_by_peer(&self, peer: SocketAddr, now: Instant) -> Option<&Channel> {
        self.channels
            .iter()
            .find(|c| c.peer == peer && c.expires > now)
    }

    fn relay(&self) -> Option<SocketAddr> {
        match self.state {
            State::Active { relay } => Some(relay),
            State::Binding(_) => None,
        }
    }

    fn allow_bandwidth(&mut self, bytes: usize, now: Instant) -> bool {
        self.bucket.as_mut().is_none_or(|b| b.take(bytes, now))
    }
}

#[derive(Debug)]
struct Reservation {
    token: [u8; 8],
    reserved: SocketAddr,
    expires: Instant,
}

/// Bytes received from and sent to one unauthenticated UDP source.
#[derive(Clone, Copy, Debug)]
struct CreditSlot {
    source: Option<SocketAddr>,
    received: u64,
    sent: u64,
    last: Instant,
}

/// The anti-amplification ledger: before a UDP source has authenticated, the bytes sent to it
/// never exceed the bytes received from it. A fixed table keyed by a random hash of the source;
/// a collision or 30 s of silence resets a slot, which only ever lowers what may be sent.
struct Credit {
    slots: Vec<CreditSlot>,
    hasher: RandomState,
}

const CREDIT_SLOTS: usize = 4096;
const CREDIT_IDLE: Duration = Duration::from_secs(30);

impl Credit {
    fn new(now: Instant) -> Self {
        Credit {
            slots: vec![
                CreditSlot {
                    source: None,
                    received: 0,
                    sent: 0,
                    last: now,
                };
                CREDIT_SLOTS
            ],
            hasher: RandomState::new(),
        }
    }

    fn slot(&mut self, source: SocketAddr, now: Instant) -> &mut CreditSlot {
        let i = (self.hasher.hash_one(source) as usize) % CREDIT_SLOTS;
        let slot = &mut self.slots[i];
        if slot.source != Some(source) || now.saturating_duration_since(slot.last) > CREDIT_IDLE {
            *slot = CreditSlot {
                source: Some(source),
                received: 0,
                sent: 0,
                last: now,
            };
        }
        slot.last = now;
        slot
    }

    /// Records a request of `len` bytes; returns how many bytes may be sent back.
    fn receive(&mut self, source: SocketAddr, len: usize, now: Instant) -> u64 {
        let slot = self.slot(source, now);
        slot.received += len as u64;
        slot.received - slot.sent
    }

    fn spend(&mut self, source: SocketAddr, len: usize, now: Instant) {
        self.slot(source, now).sent += len as u64;
    }
}

/// The TURN server's state: every allocation, and the protocol that changes them.
///
/// # Driving it (the call-order contract)
///
/// `Allocations` does no I/O and reads no clock. The caller owns the sockets and the time:
///
/// 1. Feed input as it arrives, each call with the current `now` (never going backwards):
///    - a datagram or TCP frame from a client: [`handle_client`](Self::handle_client). If it
///      returns [`ToPeer`], send that payload from the allocation's relay socket right away;
///    - a datagram that arrived on a relay socket: [`handle_peer`](Self::handle_peer). If it
///      returns a 5-tuple, send the bytes it wrote into `out` to that client;
///    - a client's TCP connection closed: [`handle_connection_closed`](Self::handle_connection_closed);
///    - the time given by the last [`Output::Timeout`] has come: [`handle_timeout`](Self::handle_timeout).
/// 2. After every such call, drain [`poll_output`](Self::poll_output) until it returns
///    [`Output::Timeout`], acting on each output in order:
///    - [`Output::Transmit`]: send to the client;
///    - [`Output::BindRelay`]: open a relay socket as asked and report the outcome through
///      [`relay_bound`](Self::relay_bound) before feeding any other input (then keep draining:
///      it queues the Allocate response). If `relay_bound` returns false, close that socket;
///    - [`Output::CloseRelay`]: close the allocation's relay socket; the id is dead from now on;
///    - [`Output::ReleaseReservation`]: close the socket held for that reservation.
///
///    The `Timeout` is the next instant `handle_timeout` is due (it may come early; calling it
///    early is harmless).
///
/// The hot paths (ChannelData, Send indications, peer datagrams) return their result directly
/// and never queue or allocate; requests and expiries go through the queue.
pub struct Allocations {
    auth: Authenticator,
    policy: PeerPolicy,
    user_quota: usize,
    total_quota: usize,
    /// Bytes per second per allocation; `None` = no cap.
    bandwidth: Option<u64>,
    epoch: Instant,
    unix_at_epoch: u64,
    now: Instant,
    slots: Vec<Option<Allocation>>,
    generations: Vec<u32>,
    free: Vec<u32>,
    by_five: HashMap<FiveTuple, AllocationId>,
    per_user: HashMap<String, usize>,
    live: usize,
    timers: BinaryHeap<Reverse<(Instant, AllocationId)>>,
    reservations: Vec<Reservation>,
    credit: Credit,
    outputs: VecDeque<Output>,
    rng: StdRng,
    /// Transaction ids of Data indications: a random start, then a counter.
    next_txid: u128,
    stats: Arc<TurnStats>,
}

impl Allocations {
    /// A server with `cfg`'s realm, credentials, quotas, cap and peer policy. `seed` must be
    /// random (nonce key, reservation tokens); `now` and `unix_now` are the same instant on the
    /// monotonic and the wall clock (REST usernames carry wall-clock expiry times).
    pub fn new(
        cfg: &TurnConfig,
        stats: Arc<TurnStats>,
        seed: [u8; 32],
        now: Instant,
        unix_now: u64,
    ) -> Self {
        let mut rng = StdRng::from_seed(seed);
        let mut nonce_key = [0u8; 32];
        rng.fill_bytes(&mut nonce_key);
        let users: Vec<(&str, &str)> = cfg.static_user_pairs().collect();
        let next_txid = u128::from(rng.next_u64()) << 32;
        Allocations {
            auth: Authenticator::new(&cfg.realm, cfg.secret.as_deref(), &users, nonce_key),
            policy: PeerPolicy {
                allow_loopback: cfg.allow_loopback_peers,
                allow: cfg.allow_peers.clone(),
                exact: Vec::new(),
            },
            user_quota: cfg.user_quota,
            total_quota: cfg.total_quota,
            bandwidth: (cfg.bandwidth_bps > 0).then_some(cfg.bandwidth_bps / 8),
            epoch: now,
            unix_at_epoch: unix_now,
            now,
            slots: Vec::new(),
            generations: Vec::new(),
            free: Vec::new(),
            by_five: HashMap::new(),
            per_user: HashMap::new(),
            live: 0,
            timers: BinaryHeap::new(),
            reservations: Vec::new(),
            credit: Credit::new(now),
            outputs: VecDeque::new(),
            rng,
            next_txid,
            stats,
        }
    }

    /// Allocations alive or being bound.
    /// Always allow these exact peer addresses (the SFU's media sockets).
    pub fn allow_exact_peers(&mut self, peers: Vec<SocketAddr>) {
        self.policy.exact = peers;
    }

    /// Replace the REST API shared secret (see `Authenticator::set_secret`).
    pub fn set_rest_secret(&mut self, secret: Option<&str>) {
        self.auth.set_secret(secret);
    }

    pub fn len(&self) -> usize {
        self.live
    }

    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// The allocation of a client 5-tuple, if any.
    pub fn allocation_of(&self, five: &FiveTuple) -> Option<AllocationId> {
        self.by_five.get(five).copied()
    }

    /// The relayed address of an allocation, once bound.
    pub fn relay_of(&self, id: AllocationId) -> Option<SocketAddr> {
        self.get(id).and_then(Allocation::relay)
    }

    fn secs(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_secs()
    }

    fn unix(&self, now: Instant) -> u64 {
        self.unix_at_epoch + self.secs(now)
    }

    fn get(&self, id: AllocationId) -> Option<&Allocation> {
        let i = id.index as usize;
        if self.generations.get(i) != Some(&id.generation) {
            return None;
        }
        self.slots.get(i)?.as_ref()
    }

    fn get_mut(&mut self, id: AllocationId) -> Option<&mut Allocation> {
        let i = id.index as usize;
        if self.generations.get(i) != Some(&id.generation) {
            return None;
        }
        self.slots.get_mut(i)?.as_mut()
    }

    /// The next output. Ends with [`Output::Timeout`], which it returns again until new input.
    pub fn poll_output(&mut self) -> Output {
        if let Some(out) = self.outputs.pop_front() {
            return out;
        }
        let timer = self.timers.peek().map(|Reverse((t, _))| *t);
        let reservation = self.reservations.iter().map(|r| r.expires).min();
        let next = match (timer, reservation) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => self.now + MAX_LIFETIME,
        };
        Output::Timeout(next)
    }

    fn transmit(&mut self, to: FiveTuple, bytes: Vec<u8>) {
        self.outputs.push_back(Output::Transmit { to, bytes });
    }

    /// A datagram (UDP) or one frame (TCP) from a client. Returns the payload to relay to a
    /// peer for ChannelData and Send indications that pass every check.
    pub fn handle_client<'a>(
        &mut self,
        now: Instant,
        from: FiveTuple,
        bytes: &'a [u8],
    ) -> Option<ToPeer<'a>> {
        self.now = now;
        match classify(bytes) {
            Kind::ChannelData => self.on_channel_data(now, from, bytes),
            Kind::Stun => {
                let msg = Message::decode(bytes).ok()?;
                match (msg.class, msg.method) {
                    (Class::Request, _) => {
                        self.on_request(now, from, &msg);
                        None
                    }
                    (Class::Indication, Method::SEND) => self.on_send(now, from, &msg),
                    _ => None,
                }
            }
            Kind::Other => None,
        }
    }

    /// A datagram from `peer` on `allocation`'s relay socket. When it may be relayed, writes the
    /// ChannelData or Data indication into `out` (cleared first) and returns the client to send
    /// it to.
    pub fn handle_peer(
        &mut self,
        now: Instant,
        allocation: AllocationId,
        peer: SocketAddr,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Option<FiveTuple> {
        self.now = now;
        let txid = self.next_txid;
        let stats = self.stats.clone();
        let a = self.get_mut(allocation)?;
        a.relay()?;
        if !a.has_permission(peer.ip(), now) {
            inc(&stats.dropped_no_permission);
            return None;
        }
        // Room for the Data indication's header and attributes.
        if payload.len() > usize::from(u16::MAX) - 64 {
            return None;
        }
        if !a.allow_bandwidth(payload.len(), now) {
            inc(&stats.dropped_bandwidth);
            return None;
        }
        out.clear();
        let channel = a.channel_by_peer(peer, now).map(|c| c.number);
        let five = a.five;
        match channel {
            Some(number) => {
                ChannelData::encode(number, payload, five.transport == Transport::Tcp, out)
            }
            None => {
                self.next_txid = self.next_txid.wrapping_add(1);
                let mut id = [0u8; 12];
                id.copy_from_slice(&txid.to_be_bytes()[4..]);
                MessageWriter::new(out, Class::Indication, Method::DATA, TransactionId(id))
                    .attr(&Attribute::XorPeerAddress(peer))
                    .attr(&Attribute::Data(payload));
            }
        }
        inc(&stats.relayed_packets_to_client);
        add(&stats.relayed_bytes_to_client, payload.len() as u64);
        Some(five)
    }

    /// A client's TCP connection closed: its allocation goes with it.
    pub fn handle_connection_closed(&mut self, now: Instant, five: FiveTuple) {
        self.now = now;
        if let Some(id) = self.by_five.get(&five).copied() {
            self.remove(id);
        }
    }

    /// Expires allocations and reservations whose time has come.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.now = now;
        while let Some(Reverse((at, id))) = self.timers.peek().copied() {
            if at > now {
                break;
            }
            self.timers.pop();
            let Some(a) = self.get_mut(id) else {
                continue;
            };
            if a.scheduled != at {
                continue; // superseded by an earlier entry
            }
            if a.expires <= now {
                inc(&self.stats.allocations_expired);
                self.remove(id);
            } else {
                a.scheduled = a.expires;
                let at = a.expires;
                self.timers.push(Reverse((at, id)));
            }
        }
        let mut released = Vec::new();
        self.reservations.retain(|r| {
            let keep = r.expires > now;
            if !keep {
                released.push(r.reserved);
            }
            keep
        });
        for reserved in released {
            self.outputs
                .push_back(Output::ReleaseReservation { reserved });
        }
    }

    /// The I/O's answer to [`Output::BindRelay`]. Returns false if the allocation is gone (or
    /// was not waiting): the I/O must then close what it opened.
    pub fn relay_bound(
        &mut self,
        now: Instant,
        id: AllocationId,
        result: Result<RelayBound, RelayBindError>,
    ) -> bool {
        self.now = now;
        let Some(a) = self.get_mut(id) else {
            return false;
        };
        let State::Binding(pending) = a.state else {
            return false;
        };
        let five = a.five;
        let key = a.key;
        match result {
            Ok(bound) => {
                let token = bound.reserved.filter(|_| pending.reserve_next).map(|_| {
                    let mut t = [0u8; 8];
                    self.rng.fill_bytes(&mut t);
                    t
                });
                let a = self.get_mut(id).expect("checked above");
                a.state = State::Active { relay: bound.relay };
                a.expires = now + pending.lifetime;
                let mut attrs = vec![
                    Attribute::XorRelayedAddress(bound.relay),
                    Attribute::Lifetime(pending.lifetime.as_secs() as u32),
                ];
                if let Some(t) = token {
                    attrs.push(Attribute::ReservationToken(t));
                }
                attrs.push(Attribute::XorMappedAddress(five.client));
                let bytes = build(
                    Class::Success,
                    Method::ALLOCATE,
                    pending.txid,
                    &attrs,
                    Some((&key, pending.integrity)),
                    pending.fingerprint,
                );
                a.allocate_response = bytes.clone();
                self.schedule(id, now + pending.lifetime);
                if let (Some(t), Some(reserved)) = (token, bound.reserved) {
                    self.reservations.push(Reservation {
                        token: t,
                        reserved,
                        expires: now + RESERVATION_LIFETIME,
                    });
                }
                inc(&self.stats.allocations_active);
                inc(&self.stats.allocations_total);
                self.transmit(five, bytes);
                true
            }
            Err(e) => {
                let code = match e {
                    RelayBindError::Family => 440,
                    RelayBindError::Capacity => 508,
                };
                let bytes = build(
                    Class::Error,
                    Method::ALLOCATE,
                    pending.txid,
                    &[error_code(code)],
                    Some((&key, pending.integrity)),
                    pending.fingerprint,
                );
                self.remove(id);
                // Nothing was opened, so there is nothing to close.
                if let Some(Output::CloseRelay { allocation }) = self.outputs.back() {
                    if *allocation == id {
                        self.outputs.pop_back();
                    }
                }
                self.transmit(five, bytes);
                false
            }
        }
    }

    /// Points the allocation's timer at `at`, pushing a heap entry only when it moves earlier
    /// (a later expiry is found when the earlier entry pops), so refreshes cannot grow the heap.
    fn schedule(&mut self, id: AllocationId, at: Instant) {
        let Some(a) = self.get_mut(id) else {
            return;
        };
        a.expires = at;
        if at < a.scheduled {
            a.scheduled = at;
            self.timers.push(Reverse((at, id)));
        }
    }

    fn insert(&mut self, a: Allocation) -> AllocationId {
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(None);
                self.generations.push(0);
                (self.slots.len() - 1) as u32
            }
        };
        let id = AllocationId {
            index,
            generation: self.generations[index as usize],
        };
        *self.per_user.entry(a.quota_user.clone()).or_default() += 1;
        self.by_five.insert(a.five, id);
        let at = a.scheduled;
        self.slots[index as usize] = Some(a);
        self.live += 1;
        self.timers.push(Reverse((at, id)));
        id
    }

    fn remove(&mut self, id: AllocationId) {
        let i = id.index as usize;
        if self.generations.get(i) != Some(&id.generation) {
            return;
        }
        let Some(a) = self.slots[i].take() else {
            return;
        };
        self.generations[i] = self.generations[i].wrapping_add(1);
        self.free.push(id.index);
        self.live -= 1;
        self.by_five.remove(&a.five);
        if let Some(n) = self.per_user.get_mut(&a.quota_user) {
            *n -= 1;
            if *n == 0 {
                self.per_user.remove(&a.quota_user);
            }
        }
        if a.relay().is_some() {
            self.stats
                .allocations_active
                .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
        self.outputs
            .push_back(Output::CloseRelay { allocation: id });
    }

    // ---------------------------------------------------------------- requests

    fn on_request(&mut self, now: Instant, from: FiveTuple, msg: &Message<'_>) {
        match msg.method {
            Method::BINDING => return self.on_binding(now, from, msg),
            Method::ALLOCATE
            | Method::REFRESH
            | Method::CREATE_PERMISSION
            | Method::CHANNEL_BIND => {}
            _ => {
                let full = build_error(msg, 400, true, &[]);
                let compact = build_error(msg, 400, false, &[]);
                return self.send_unauthenticated(now, from, msg, [full, compact]);
            }
        }
        inc(&self.stats.turn_requests);
        let auth = self
            .auth
            .authenticate(msg, from.client.ip(), self.secs(now), self.unix(now));
        let auth = match auth {
            Ok(auth) => auth,
            Err(failure) => {
                self.stats.count_auth(failure);
                return self.refuse_auth(now, from, msg, failure);
            }
        };
        let unknown = msg.unknown_required(KNOWN_REQUIRED);
        if !unknown.is_empty() {
            return self.reply_error(from, msg, &auth, 420, &[unknown_attributes(unknown)]);
        }
        match msg.method {
            Method::ALLOCATE => self.on_allocate(now, from, msg, auth),
            Method::REFRESH => self.on_refresh(now, from, msg, auth),
            Method::CREATE_PERMISSION => self.on_create_permission(now, from, msg, auth),
            _ => self.on_channel_bind(now, from, msg, auth),
        }
    }

    /// A STUN Binding request: the reflexive address, nothing else. It is not authenticated,
    /// and its answer (32 bytes for IPv4, 44 for IPv6, plus FINGERPRINT only if the request had
    /// one) is the smallest STUN allows; it is exempt from the credit rule, which would leave a
    /// bare 20-byte request unanswered.
    fn on_binding(&mut self, now: Instant, from: FiveTuple, msg: &Message<'_>) {
        inc(&self.stats.binding_requests);
        let unknown = msg.unknown_required(KNOWN_REQUIRED_BINDING);
        if !unknown.is_empty() {
            let full = build_error(msg, 420, true, &[unknown_attributes(unknown.clone())]);
            let compact = build_error(msg, 420, false, &[unknown_attributes(unknown)]);
            return self.send_unauthenticated(now, from, msg, [full, compact]);
        }
        let bytes = build(
            Class::Success,
            Method::BINDING,
            msg.transaction_id,
            &[Attribute::XorMappedAddress(from.client)],
            None,
            msg.has_fingerprint(),
        );
        self.transmit(from, bytes);
    }

    /// Sends the first of `candidates` (largest first) that the source's credit allows. Over TCP
    /// the handshake proved the source address, so the first is sent.
    fn send_unauthenticated(
        &mut self,
        now: Instant,
        from: FiveTuple,
        msg: &Message<'_>,
        candidates: [Vec<u8>; 2],
    ) {
        if from.transport == Transport::Tcp {
            let [first, _] = candidates;
            return self.transmit(from, first);
        }
        let credit = self.credit.receive(from.client, msg.raw().len(), now);
        for bytes in candidates {
            if bytes.len() as u64 <= credit {
                self.credit.spend(from.client, bytes.len(), now);
                return self.transmit(from, bytes);
            }
        }
        inc(&self.stats.amplification_withheld);
    }

    fn refuse_auth(&mut self, now: Instant, from: FiveTuple, msg: &Message<'_>, f: AuthFailure) {
        let nonce = self.auth.nonce(from.client.ip(), self.secs(now));
        let realm = self.auth.realm().to_string();
        let extra = [Attribute::Realm(&realm), Attribute::Nonce(&nonce)];
        match f {
            AuthFailure::StaleNonce => {
                // The HMAC was good: the client knows the password, so no credit applies.
                let bytes = build_error(msg, 438, true, &extra);
                self.transmit(from, bytes);
            }
            AuthFailure::BadRequest => {
                let full = build_error(msg, 400, true, &[]);
                let compact = build_error(msg, 400, false, &[]);
                self.send_unauthenticated(now, from, msg, [full, compact]);
            }
            _ => {
                let full = build_error(msg, 401, true, &extra);
                let compact = build_error(msg, 401, false, &extra);
                self.send_unauthenticated(now, from, msg, [full, compact]);
            }
        }
    }

    /// An error response to an authenticated request, signed with the client's key.
    fn reply_error(
        &mut self,
        from: FiveTuple,
        msg: &Message<'_>,
        auth: &Authenticated,
        code: u16,
        extra: &[Attribute<'_>],
    ) {
        let mut attrs = vec![error_code(code)];
        attrs.extend_from_slice(extra);
        let bytes = build(
            Class::Error,
            msg.method,
            msg.transaction_id,
            &attrs,
            Some((&auth.key, auth.integrity)),
            msg.has_fingerprint(),
        );
        self.transmit(from, bytes);
    }

    fn reply_success(
        &mut self,
        from: FiveTuple,
        msg: &Message<'_>,
        auth: &Authenticated,
        attrs: &[Attribute<'_>],
    ) {
        let bytes = build(
            Class::Success,
            msg.method,
            msg.transaction_id,
            attrs,
            Some((&auth.key, auth.integrity)),
            msg.has_fingerprint(),
        );
        self.transmit(from, bytes);
    }

    fn on_allocate(
        &mut self,
        now: Instant,
        from: FiveTuple,
        msg: &Message<'_>,
        auth: Authenticated,
    ) {
        if let Some(id) = self.by_five.get(&from).copied() {
            let a = self.get(id).expect("indexed allocation exists");
            if a.allocate_txid == msg.transaction_id {
                // A retransmission: the same answer again (none yet while binding).
                if !a.allocate_response.is_empty() {
                    let bytes = a.allocate_response.clone();
                    self.transmit(from, bytes);
                }
                return;
            }
            return self.reply_error(from, msg, &auth, 437, &[]);
        }
        match msg.find(attr::REQUESTED_TRANSPORT) {
            Some(Ok(Attribute::RequestedTransport(UDP))) => {}
            Some(Ok(Attribute::RequestedTransport(_))) => {
                return self.reply_error(from, msg, &auth, 442, &[])
            }
            _ => return self.reply_error(from, msg, &auth, 400, &[]),
        }
        if msg.get(attr::DONT_FRAGMENT).is_some() {
            // The relay cannot promise DF; the RFC says to treat it as unknown (section 7.2).
            let list = unknown_attributes(vec![attr::DONT_FRAGMENT]);
            return self.reply_error(from, msg, &auth, 420, &[list]);
        }
        let even = match msg.find(attr::EVEN_PORT) {
            None => None,
            Some(Ok(Attribute::EvenPort(r))) => Some(r),
            Some(_) => return self.reply_error(from, msg, &auth, 400, &[]),
        };
        let token = match msg.find(attr::RESERVATION_TOKEN) {
            None => None,
            Some(Ok(Attribute::ReservationToken(t))) => Some(t),
            Some(_) => return self.reply_error(from, msg, &auth, 400, &[]),
        };
        let family = match msg.find(attr::REQUESTED_ADDRESS_FAMILY) {
            None => None,
            Some(Ok(Attribute::RequestedAddressFamily(f))) => Some(f),
            Some(_) => return self.reply_error(from, msg, &auth, 440, &[]),
        };
        if token.is_some() && (even.is_some() || family.is_some()) {
            return self.reply_error(from, msg, &auth, 400, &[]);
        }
        let lifetime = match msg.find(attr::LIFETIME) {
            Some(Ok(Attribute::Lifetime(s))) => Duration::from_secs(u64::from(s))
                .min(MAX_LIFETIME)
                .max(DEFAULT_LIFETIME),
            _ => DEFAULT_LIFETIME,
        };
        if self.live >= self.total_quota {
            inc(&self.stats.quota_total_refusals);
            return self.reply_error(from, msg, &auth, 508, &[]);
        }
        if self.per_user.get(&auth.quota_user).copied().unwrap_or(0) >= self.user_quota {
            inc(&self.stats.quota_user_refusals);
            return self.reply_error(from, msg, &auth, 486, &[]);
        }
        let reserved = match token {
            Some(t) => {
                let found = self
                    .reservations
                    .iter()
                    .position(|r| r.token == t && r.expires > now);
                match found {
                    Some(i) => Some(self.reservations.swap_remove(i).reserved),
                    None => return self.reply_error(from, msg, &auth, 508, &[]),
                }
            }
            None => None,
        };
        let family = reserved
            .map(|r| Family::of(r.ip()))
            .or(family)
            .unwrap_or(Family::V4);
        let pending = Pending {
            txid: msg.transaction_id,
            integrity: auth.integrity,
            fingerprint: msg.has_fingerprint(),
            lifetime,
            reserve_next: even == Some(true),
        };
        let id = self.insert(Allocation {
            five: from,
            username: auth.username,
            quota_user: auth.quota_user,
            key: auth.key,
            family,
            state: State::Binding(pending),
            expires: now + BIND_TIMEOUT,
            scheduled: now + BIND_TIMEOUT,
            allocate_txid: msg.transaction_id,
            allocate_response: Vec::new(),
            permissions: Vec::new(),
            channels: Vec::new(),
            bucket: self.bandwidth.map(|rate| TokenBucket::new(rate, now)),
        });
        self.outputs.push_back(Output::BindRelay(BindRelay {
            allocation: id,
            client: from,
            family,
            even_port: even.is_some(),
            reserve_next: even == Some(true),
            reserved,
        }));
    }

    /// The client's active allocation, checked against the authenticated user; replies 437 or
    /// 441 itself when there is none to use.
    fn owned_allocation(
        &mut self,
        from: FiveTuple,
        msg: &Message<'_>,
        auth: &Authenticated,
    ) -> Option<AllocationId> {
        let found = self
            .by_five
            .get(&from)
            .copied()
            .filter(|id| self.get(*id).is_some_and(|a| a.relay().is_some()));
        let Some(id) = found else {
            self.reply_error(from, msg, auth, 437, &[]);
            return None;
        };
        if self.get(id).is_some_and(|a| a.username != auth.username) {
            self.reply_error(from, msg, auth, 441, &[]);
            return None;
        }
        Some(id)
    }

    fn on_refresh(
        &mut self,
        now: Instant,
        from: FiveTuple,
        msg: &Message<'_>,
        auth: Authenticated,
    ) {
        let Some(id) = self.owned_allocation(from, msg, &auth) else {
            return;
        };
        let family = self.get(id).map(|a| a.family);
        match msg.find(attr::REQUESTED_ADDRESS_FAMILY) {
            None => {}
            Some(Ok(Attribute::RequestedAddressFamily(f))) if Some(f) == family => {}
            Some(_) => return self.reply_error(from, msg, &auth, 443, &[]),
        }
        let requested = match msg.find(attr::LIFETIME) {
            Some(Ok(Attribute::Lifetime(s))) => Duration::from_secs(u64::from(s)),
            _ => DEFAULT_LIFETIME,
        };
        if requested.is_zero() {
            self.remove(id);
            return self.reply_success(from, msg, &auth, &[Attribute::Lifetime(0)]);
        }
        let lifetime = requested.min(MAX_LIFETIME);
        self.schedule(id, now + lifetime);
        self.reply_success(
            from,
            msg,
            &auth,
            &[Attribute::Lifetime(lifetime.as_secs() as u32)],
        );
    }

    /// The XOR-PEER-ADDRESS values of a request, all well formed and allowed, or the error code.
    fn checked_peers(&self, id: AllocationId, msg: &Message<'_>) -> Result<Vec<SocketAddr>, u16> {
        let family = self.get(id).map(|a| a.family);
        let mut peers = Vec::new();
        for a in msg
            .attributes()
            .iter()
            .filter(|a| a.typ == attr::XOR_PEER_ADDRESS)
        {
            match a.decode(&msg.transaction_id) {
                Ok(Attribute::XorPeerAddress(p)) => peers.push(p),
                _ => return Err(400),
            }
        }
        if peers.is_empty() {
            return Err(400);
        }
        if peers.iter().any(|p| Some(Family::of(p.ip())) != family) {
            return Err(443);
        }
        if peers.iter().any(|p| !self.policy.permits_addr(*p)) {
            inc(&self.stats.refused_peers);
            return Err(403);
        }
        Ok(peers)
    }

    fn on_create_permission(
        &mut self,
        now: Instant,
        from: FiveTuple,
        msg: &Message<'_>,
        auth: Authenticated,
    ) {
        let Some(id) = self.owned_allocation(from, msg, &auth) else {
            return;
        };
        let peers = match self.checked_peers(id, msg) {
            Ok(p) => p,
            Err(code) => return self.reply_error(from, msg, &auth, code, &[]),
        };
        let a = self.get_mut(id).expect("owned allocation exists");
        let fits = {
            a.permissions.retain(|(_, exp)| *exp > now);
            let new = peers
                .iter()
                .filter(|p| !a.permissions.iter().any(|(ip, _)| *ip == p.ip()))
                .map(|p| p.ip())
                .collect::<std::collections::HashSet<_>>()
                .len();
            a.permissions.len() + new <= MAX_PERMISSIONS
        };
        if !fits {
            return self.reply_error(from, msg, &auth, 508, &[]);
        }
        for p in &peers {
            a.permit(p.ip(), now);
        }
        self.reply_success(from, msg, &auth, &[]);
    }

    fn on_channel_bind(
        &mut self,
        now: Instant,
        from: FiveTuple,
        msg: &Message<'_>,
        auth: Authenticated,
    ) {
        let Some(id) = self.owned_allocation(from, msg, &auth) else {
            return;
        };
        let number = match msg.find(attr::CHANNEL_NUMBER) {
            Some(Ok(Attribute::ChannelNumber(n))) if (CHANNEL_MIN..=CHANNEL_MAX).contains(&n) => n,
            _ => return self.reply_error(from, msg, &auth, 400, &[]),
        };
        let peer = match self.checked_peers(id, msg) {
            Ok(p) if p.len() == 1 => p[0],
            Ok(_) => return self.reply_error(from, msg, &auth, 400, &[]),
            Err(code) => return self.reply_error(from, msg, &auth, code, &[]),
        };
        let a = self.get_mut(id).expect("owned allocation exists");
        // Forget channels past their expiry and rebind guard.
        a.channels
            .retain(|c| c.expires + CHANNEL_REBIND_GUARD > now);
        let conflict = a
            .channels
            .iter()
            .any(|c| (c.number == number) != (c.peer == peer));
        if conflict {
            return self.reply_error(from, msg, &auth, 400, &[]);
        }
        let exists = a.channels.iter().any(|c| c.number == number);
        if !exists && a.channels.len() >= MAX_CHANNELS {
            return self.reply_error(from, msg, &auth, 508, &[]);
        }
        if !a.permit(peer.ip(), now) {
            return self.reply_error(from, msg, &auth, 508, &[]);
        }
        match a.channels.iter_mut().find(|c| c.number == number) {
            Some(c) => c.expires = now + CHANNEL_LIFETIME,
            None => a.channels.push(Channel {
                number,
                peer,
                expires: now + CHANNEL_LIFETIME,
            }),
        }
        self.reply_success(from, msg, &auth, &[]);
    }

    // ---------------------------------------------------------------- data

    fn on_send<'a>(
        &mut self,
        now: Instant,
        from: FiveTuple,
        msg: &Message<'a>,
    ) -> Option<ToPeer<'a>> {
        let id = self.by_five.get(&from).copied()?;
        let peer = match msg.find(attr::XOR_PEER_ADDRESS)? {
            Ok(Attribute::XorPeerAddress(p)) => p,
            _ => return None,
        };
        let payload = match msg.find(attr::DATA)? {
            Ok(Attribute::Data(d)) => d,
            _ => return None,
        };
        if !self.policy.permits_addr(peer) {
            inc(&self.stats.refused_peers);
            return None;
        }
        self.relay_to_peer(now, id, peer, payload)
    }

    fn on_channel_data<'a>(
        &mut self,
        now: Instant,
        from: FiveTuple,
        bytes: &'a [u8],
    ) -> Option<ToPeer<'a>> {
        let cd = ChannelData::decode(bytes).ok()?;
        let id = self.by_five.get(&from).copied()?;
        let a = self.get(id)?;
        let Some(peer) = a.channel_by_number(cd.channel, now).map(|c| c.peer) else {
            inc(&self.stats.dropped_no_permission);
            return None;
        };
        self.relay_to_peer(now, id, peer, cd.data)
    }

    fn relay_to_peer<'a>(
        &mut self,
        now: Instant,
        id: AllocationId,
        peer: SocketAddr,
        payload: &'a [u8],
    ) -> Option<ToPeer<'a>> {
        let stats = self.stats.clone();
        let a = self.get_mut(id)?;
        a.relay()?;
        if Family::of(peer.ip()) != a.family || !a.has_permission(peer.ip(), now) {
            inc(&stats.dropped_no_permission);
            return None;
        }
        if !a.allow_bandwidth(payload.len(), now) {
            inc(&stats.dropped_bandwidth);
            return None;
        }
        inc(&stats.relayed_packets_to_peer);
        add(&stats.relayed_bytes_to_peer, payload.len() as u64);
        Some(ToPeer {
            allocation: id,
            peer,
            payload,
        })
    }
}

fn error_code(code: u16) -> Attribute<'static> {
    Attribute::ErrorCode {
        code,
        reason: reason_phrase(code),
    }
}

fn unknown_attributes(types: Vec<u16>) -> Attribute<'static> {
    Attribute::UnknownAttributes(AttrList::Owned(types))
}

/// A response to `msg` (its method and transaction id).
fn build(
    class: Class,
    method: Method,
    txid: TransactionId,
    attrs: &[Attribute<'_>],
    sign: Option<(&[u8; 16], IntegrityKind)>,
    fingerprint: bool,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    let mut w = MessageWriter::new(&mut out, class, method, txid);
    for a in attrs {
        w.attr(a);
    }
    if let Some((key, kind)) = sign {
        w.integrity_of(kind, key);
    }
    if fingerprint {
        w.fingerprint();
    }
    out
}

/// An unsigned error response. `full` has the reason phrase and mirrors FINGERPRINT; the compact
/// form has neither, for when only that fits the source's credit.
fn build_error(msg: &Message<'_>, code: u16, full: bool, extra: &[Attribute<'_>]) -> Vec<u8> {
    let mut attrs = vec![Attribute::ErrorCode {
        code,
        reason: if full { reason_phrase(code) } else { "" },
    }];
    attrs.extend_from_slice(extra);
    build(
        Class::Error,
        msg.method,
        msg.transaction_id,
        &attrs,
        None,
        full && msg.has_fingerprint(),
    )
}

#[cfg(test)]
mod tests;
