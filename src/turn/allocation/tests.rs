//! The allocation state machine on virtual time. Every address is on 127.0.0.0/8, except where
//! the peer policy itself is under test (addresses as values only; nothing is sent anywhere).

use super::*;
use crate::turn::auth::{long_term_key, rest_password, NONCE_LIFETIME_S};

const SECRET: &str = "test-secret";
const UNIX0: u64 = 1_700_000_000;
const SERVER: &str = "127.0.0.1:3478";

fn config() -> TurnConfig {
    TurnConfig {
        secret: Some(SECRET.into()),
        allow_loopback_peers: true,
        bandwidth_bps: 0,
        ..TurnConfig::default()
    }
}

fn udp(port: u16) -> FiveTuple {
    FiveTuple {
        transport: Transport::Udp,
        client: SocketAddr::from(([127, 0, 0, 1], port)),
        server: SERVER.parse().unwrap(),
    }
}

fn tcp(port: u16) -> FiveTuple {
    FiveTuple {
        transport: Transport::Tcp,
        ..udp(port)
    }
}

fn peer(last: u8, port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, last], port))
}

/// Credentials of one REST user.
#[derive(Clone)]
struct Creds {
    username: String,
    key: [u8; 16],
}

fn rest_user(user: &str, expiry: u64) -> Creds {
    let username = format!("{expiry}:{user}");
    let password = rest_password(SECRET, &username);
    Creds {
        key: long_term_key(&username, "sluice", &password),
        username,
    }
}

struct Harness {
    m: Allocations,
    stats: Arc<TurnStats>,
    t0: Instant,
    now: Instant,
    next_txid: u32,
    /// Latest nonce per client port.
    nonces: HashMap<u16, String>,
    next_relay_port: u16,
}

/// A decoded copy of a response, for assertions.
#[derive(Debug)]
struct Reply {
    class: Class,
    method: Method,
    txid: TransactionId,
    bytes: Vec<u8>,
}

impl Reply {
    fn msg(&self) -> Message<'_> {
        Message::decode(&self.bytes).unwrap()
    }
    fn error(&self) -> Option<u16> {
        match self.msg().find(attr::ERROR_CODE) {
            Some(Ok(Attribute::ErrorCode { code, .. })) => Some(code),
            _ => None,
        }
    }
    fn text(&self, typ: u16) -> Option<String> {
        match self.msg().find(typ) {
            Some(Ok(Attribute::Nonce(s) | Attribute::Realm(s))) => Some(s.to_string()),
            _ => None,
        }
    }
    fn lifetime(&self) -> Option<u32> {
        match self.msg().find(attr::LIFETIME) {
            Some(Ok(Attribute::Lifetime(s))) => Some(s),
            _ => None,
        }
    }
    fn address(&self, typ: u16) -> Option<SocketAddr> {
        match self.msg().find(typ) {
            Some(Ok(
                Attribute::XorMappedAddress(a)
                | Attribute::XorRelayedAddress(a)
                | Attribute::XorPeerAddress(a),
            )) => Some(a),
            _ => None,
        }
    }
}

impl Harness {
    fn new(cfg: TurnConfig) -> Self {
        let stats = Arc::new(TurnStats::default());
        let t0 = Instant::now();
        Harness {
            m: Allocations::new(&cfg, stats.clone(), [42; 32], t0, UNIX0),
            stats,
            t0,
            now: t0,
            next_txid: 1,
            nonces: HashMap::new(),
            next_relay_port: 50_000,
        }
    }

    fn advance(&mut self, d: Duration) -> Vec<Output> {
        self.now += d;
        self.m.handle_timeout(self.now);
        self.drain()
    }

    fn txid(&mut self) -> TransactionId {
        self.next_txid += 1;
        let mut t = [0u8; 12];
        t[8..].copy_from_slice(&self.next_txid.to_be_bytes());
        TransactionId(t)
    }

    /// Every output up to (not including) the Timeout; checks the Timeout is never in the past.
    fn drain(&mut self) -> Vec<Output> {
        let mut out = Vec::new();
        loop {
            match self.m.poll_output() {
                Output::Timeout(at) => {
                    assert!(at >= self.now || at >= self.t0, "timeout in the past");
                    return out;
                }
                o => out.push(o),
            }
        }
    }

    fn replies(outputs: &[Output]) -> Vec<Reply> {
        outputs
            .iter()
            .filter_map(|o| match o {
                Output::Transmit { bytes, .. } => {
                    let m = Message::decode(bytes).expect("our output decodes");
                    Some(Reply {
                        class: m.class,
                        method: m.method,
                        txid: m.transaction_id,
                        bytes: bytes.clone(),
                    })
                }
                _ => None,
            })
            .collect()
    }

    /// A request with the given attributes, signed with `creds` and the client's latest nonce.
    fn request(
        &mut self,
        method: Method,
        attrs: &[Attribute<'_>],
        creds: Option<&Creds>,
        port: u16,
        txid: TransactionId,
    ) -> Vec<u8> {
        let nonce = self.nonces.get(&port).cloned().unwrap_or_default();
        let mut out = Vec::new();
        let mut w = MessageWriter::new(&mut out, Class::Request, method, txid);
        for a in attrs {
            w.attr(a);
        }
        if let Some(c) = creds {
            w.attr(&Attribute::Username(&c.username))
                .attr(&Attribute::Realm("sluice"))
                .attr(&Attribute::Nonce(&nonce))
                .integrity(&c.key);
        }
        w.fingerprint();
        out
    }

    /// Feeds bytes from a client; returns the outputs and remembers any nonce it was given.
    fn feed(&mut self, from: FiveTuple, bytes: &[u8]) -> Vec<Output> {
        let relayed = self.m.handle_client(self.now, from, bytes);
        assert!(relayed.is_none(), "a request relayed data");
        let out = self.drain();
        for r in Self::replies(&out) {
            if let Some(n) = r.text(attr::NONCE) {
                self.nonces.insert(from.client.port(), n);
            }
        }
        out
    }

    /// Sends one signed request (getting a nonce first if needed) and returns the single reply.
    fn call(
        &mut self,
        from: FiveTuple,
        method: Method,
        attrs: &[Attribute<'_>],
        creds: &Creds,
    ) -> (Reply, Vec<Output>) {
        let port = from.client.port();
        if !self.nonces.contains_key(&port) {
            // Like a client, retransmit until the 401 comes (a small request over UDP earns
            // its answer only once its source has sent as many bytes as the answer has).
            let txid = self.txid();
            let bare = self.request(method, attrs, None, port, txid);
            for _ in 0..4 {
                let out = self.feed(from, &bare);
                let r = Self::replies(&out);
                if let Some(r) = r.first() {
                    assert_eq!(r.error(), Some(401));
                    break;
                }
            }
            assert!(self.nonces.contains_key(&port), "never challenged");
        }
        let mut txid = self.txid();
        let bytes = self.request(method, attrs, Some(creds), port, txid);
        let mut out = self.feed(from, &bytes);
        if Self::replies(&out).first().and_then(Reply::error) == Some(438) {
            // Stale nonce: the reply carried a fresh one; try again with it.
            txid = self.txid();
            let bytes = self.request(method, attrs, Some(creds), port, txid);
            out = self.feed(from, &bytes);
        }
        let mut replies = Self::replies(&out);
        assert!(replies.len() <= 1, "{out:?}");
        let reply = match replies.pop() {
            Some(r) => r,
            None => Reply {
                class: Class::Indication,
                method,
                txid,
                bytes: Vec::new(),
            },
        };
        if !reply.bytes.is_empty() && reply.error() != Some(401) {
            assert_eq!(reply.txid, txid);
            // Signed with the user's key, with the same algorithm.
            assert_eq!(
                reply.msg().verify_integrity(&creds.key),
                Ok(IntegrityKind::Sha1)
            );
            assert!(reply.msg().has_fingerprint());
        }
        (reply, out)
    }

    /// Allocate, bind the relay, and return its id and relayed address.
    fn allocate(&mut self, from: FiveTuple, creds: &Creds) -> (AllocationId, SocketAddr) {
        let (reply, out) = self.call(
            from,
            Method::ALLOCATE,
            &[Attribute::RequestedTransport(17)],
            creds,
        );
        assert!(
            reply.bytes.is_empty(),
            "no answer before the relay is bound"
        );
        let [Output::BindRelay(req)] = out.as_slice() else {
            panic!("expected BindRelay, got {out:?}");
        };
        assert_eq!(req.client, from);
        assert_eq!(req.family, Family::V4);
        self.next_relay_port += 1;
        let relay = SocketAddr::from(([127, 0, 0, 1], self.next_relay_port));
        assert!(self.m.relay_bound(
            self.now,
            req.allocation,
            Ok(RelayBound {
                relay,
                reserved: None
            })
        ));
        let out = self.drain();
        let r = Self::replies(&out);
        assert_eq!(r.len(), 1);
        assert_eq!(
            (r[0].class, r[0].method),
            (Class::Success, Method::ALLOCATE)
        );
        assert_eq!(r[0].address(attr::XOR_RELAYED_ADDRESS), Some(relay));
        assert_eq!(r[0].address(attr::XOR_MAPPED_ADDRESS), Some(from.client));
        assert_eq!(r[0].lifetime(), Some(600));
        (req.allocation, relay)
    }

    fn permit(&mut self, from: FiveTuple, creds: &Creds, p: SocketAddr) -> Reply {
        self.call(
            from,
            Method::CREATE_PERMISSION,
            &[Attribute::XorPeerAddress(p)],
            creds,
        )
        .0
    }

    fn bind_channel(
        &mut self,
        from: FiveTuple,
        creds: &Creds,
        number: u16,
        p: SocketAddr,
    ) -> Reply {
        self.call(
            from,
            Method::CHANNEL_BIND,
            &[
                Attribute::ChannelNumber(number),
                Attribute::XorPeerAddress(p),
            ],
            creds,
        )
        .0
    }

    /// Peer to client: the framed bytes, if relayed.
    fn peer_sends(
        &mut self,
        id: AllocationId,
        p: SocketAddr,
        payload: &[u8],
    ) -> Option<(FiveTuple, Vec<u8>)> {
        let mut out = Vec::new();
        let to = self.m.handle_peer(self.now, id, p, payload, &mut out)?;
        Some((to, out))
    }

    fn send_indication(&mut self, from: FiveTuple, p: SocketAddr, payload: &[u8]) -> bool {
        let txid = self.txid();
        let mut bytes = Vec::new();
        MessageWriter::new(&mut bytes, Class::Indication, Method::SEND, txid)
            .attr(&Attribute::XorPeerAddress(p))
            .attr(&Attribute::Data(payload));
        match self.m.handle_client(self.now, from, &bytes) {
            Some(to) => {
                assert_eq!((to.peer, to.payload), (p, payload));
                true
            }
            None => false,
        }
    }

    fn channel_data(&mut self, from: FiveTuple, number: u16, payload: &[u8]) -> Option<SocketAddr> {
        let mut bytes = Vec::new();
        ChannelData::encode(number, payload, false, &mut bytes);
        let to = self.m.handle_client(self.now, from, &bytes)?;
        assert_eq!(to.payload, payload);
        Some(to.peer)
    }
}

fn alice() -> Creds {
    rest_user("alice", UNIX0 + 86_400)
}

#[test]
fn binding_request_gets_the_reflexive_address() {
    let mut h = Harness::new(config());
    let mut req = Vec::new();
    let txid = h.txid();
    MessageWriter::new(&mut req, Class::Request, Method::BINDING, txid);
    let out = h.feed(udp(40001), &req);
    let r = Harness::replies(&out);
    assert_eq!(r.len(), 1);
    assert_eq!((r[0].class, r[0].txid), (Class::Success, txid));
    assert_eq!(
        r[0].address(attr::XOR_MAPPED_ADDRESS),
        Some(udp(40001).client)
    );
    // The smallest answer STUN has: header plus XOR-MAPPED-ADDRESS.
    assert_eq!(r[0].bytes.len(), 32);
    assert_eq!(
        h.stats
            .binding_requests
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[test]
fn allocate_is_challenged_then_granted_and_retransmits_are_answered_alike() {
    let mut h = Harness::new(config());
    let me = udp(40001);
    // Unauthenticated: 401 with REALM and NONCE, no MESSAGE-INTEGRITY.
    let txid = h.txid();
    let bare = h.request(
        Method::ALLOCATE,
        &[
            Attribute::RequestedTransport(17),
            Attribute::Lifetime(777),
            Attribute::EvenPort(false),
            Attribute::RequestedAddressFamily(Family::V4),
        ],
        None,
        40001,
        txid,
    );
    let out = h.feed(me, &bare);
    let r = Harness::replies(&out);
    assert_eq!(r[0].error(), Some(401));
    assert_eq!(r[0].text(attr::REALM).as_deref(), Some("sluice"));
    assert_eq!(r[0].text(attr::NONCE).map(|n| n.len()), Some(8));
    assert!(!r[0].msg().has_integrity());

    // With credentials: BindRelay, then the success with the requested lifetime.
    let creds = alice();
    let txid = h.txid();
    let attrs = [Attribute::RequestedTransport(17), Attribute::Lifetime(777)];
    let signed = h.request(Method::ALLOCATE, &attrs, Some(&creds), 40001, txid);
    let out = h.feed(me, &signed);
    let [Output::BindRelay(req)] = out.as_slice() else {
        panic!("{out:?}")
    };
    let relay = peer(1, 50_001);
    // A retransmission while the relay is being bound is not answered twice.
    assert!(h.feed(me, &signed).is_empty());
    assert!(h.m.relay_bound(
        h.now,
        req.allocation,
        Ok(RelayBound {
            relay,
            reserved: None
        })
    ));
    let r = Harness::replies(&h.drain());
    assert_eq!(r[0].lifetime(), Some(777));
    assert_eq!(
        r[0].msg().verify_integrity(&creds.key),
        Ok(IntegrityKind::Sha1)
    );
    let first = r[0].bytes.clone();

    // The same transaction again: the same bytes. A new transaction: 437.
    let out = h.feed(me, &signed);
    assert_eq!(Harness::replies(&out)[0].bytes, first);
    let (reply, _) = h.call(
        me,
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(17)],
        &creds,
    );
    assert_eq!(reply.error(), Some(437));
    assert_eq!(h.m.len(), 1);
    assert_eq!(
        h.stats
            .allocations_total
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[test]
fn allocate_refusals() {
    let mut h = Harness::new(config());
    let creds = alice();
    let (r, _) = h.call(udp(1), Method::ALLOCATE, &[], &creds);
    assert_eq!(r.error(), Some(400), "no REQUESTED-TRANSPORT");
    let (r, _) = h.call(
        udp(1),
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(6)],
        &creds,
    );
    assert_eq!(r.error(), Some(442), "TCP relaying");
    let (r, _) = h.call(
        udp(1),
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(17), Attribute::DontFragment],
        &creds,
    );
    assert_eq!(r.error(), Some(420));
    let Some(Ok(Attribute::UnknownAttributes(list))) = r.msg().find(attr::UNKNOWN_ATTRIBUTES)
    else {
        panic!()
    };
    assert_eq!(list.types(), vec![attr::DONT_FRAGMENT]);
    let (r, _) = h.call(
        udp(1),
        Method::ALLOCATE,
        &[
            Attribute::RequestedTransport(17),
            Attribute::Other {
                typ: 0x0042,
                value: b"?",
            },
        ],
        &creds,
    );
    assert_eq!(
        r.error(),
        Some(420),
        "unknown comprehension-required attribute"
    );
    let (r, _) = h.call(
        udp(1),
        Method::ALLOCATE,
        &[
            Attribute::RequestedTransport(17),
            Attribute::ReservationToken([1; 8]),
        ],
        &creds,
    );
    assert_eq!(r.error(), Some(508), "unknown reservation token");
    assert!(h.m.is_empty());

    // The relay cannot be opened: 508 (no port) or 440 (no address of that family).
    for (err, code) in [
        (RelayBindError::Capacity, 508),
        (RelayBindError::Family, 440),
    ] {
        let (_, out) = h.call(
            udp(1),
            Method::ALLOCATE,
            &[Attribute::RequestedTransport(17)],
            &creds,
        );
        let [Output::BindRelay(req)] = out.as_slice() else {
            panic!("{out:?}")
        };
        assert!(!h.m.relay_bound(h.now, req.allocation, Err(err)));
        let out = h.drain();
        assert_eq!(out.len(), 1, "only the error, no CloseRelay: {out:?}");
        assert_eq!(Harness::replies(&out)[0].error(), Some(code));
        assert!(h.m.is_empty());
        // A late answer for a dead allocation is refused (the I/O closes the socket).
        assert!(!h.m.relay_bound(
            h.now,
            req.allocation,
            Ok(RelayBound {
                relay: peer(1, 9),
                reserved: None
            })
        ));
    }
}

#[test]
fn allocation_expires_unless_refreshed() {
    let mut h = Harness::new(config());
    let creds = alice();
    let me = udp(40001);
    let (id, _) = h.allocate(me, &creds);
    assert_eq!(h.permit(me, &creds, peer(2, 7000)).class, Class::Success);

    // Refresh at 500 s for 600 s more: alive at 1000 s, gone at 1100 s.
    h.advance(Duration::from_secs(500));
    let (r, _) = h.call(me, Method::REFRESH, &[Attribute::Lifetime(600)], &creds);
    assert_eq!(r.lifetime(), Some(600));
    let out = h.advance(Duration::from_secs(499));
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(
        h.m.relay_of(id),
        Some(SocketAddr::from(([127, 0, 0, 1], 50_001)))
    );
    let out = h.advance(Duration::from_secs(101));
    assert_eq!(out, vec![Output::CloseRelay { allocation: id }]);
    assert!(h.m.is_empty());
    assert_eq!(h.m.relay_of(id), None);
    assert!(h.peer_sends(id, peer(2, 7000), b"late").is_none());
    assert_eq!(
        h.stats
            .allocations_expired
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_eq!(
        h.stats
            .allocations_active
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    // Refreshing a gone allocation: 437.
    let (r, _) = h.call(me, Method::REFRESH, &[], &creds);
    assert_eq!(r.error(), Some(437));
}

#[test]
fn refresh_lifetimes_zero_and_cap() {
    let mut h = Harness::new(config());
    let creds = alice();
    let me = udp(40001);
    let (id, _) = h.allocate(me, &creds);
    let (r, _) = h.call(me, Method::REFRESH, &[Attribute::Lifetime(100_000)], &creds);
    assert_eq!(r.lifetime(), Some(3600), "capped");
    let (r, _) = h.call(me, Method::REFRESH, &[], &creds);
    assert_eq!(r.lifetime(), Some(600), "default");
    // A shorter lifetime pulls the expiry in.
    let (r, _) = h.call(me, Method::REFRESH, &[Attribute::Lifetime(30)], &creds);
    assert_eq!(r.lifetime(), Some(30));
    assert_eq!(
        h.advance(Duration::from_secs(31)),
        vec![Output::CloseRelay { allocation: id }]
    );

    let (id, _) = h.allocate(me, &creds);
    let (r, out) = h.call(me, Method::REFRESH, &[Attribute::Lifetime(0)], &creds);
    assert_eq!((r.class, r.lifetime()), (Class::Success, Some(0)));
    assert!(out.contains(&Output::CloseRelay { allocation: id }));
    assert!(h.m.is_empty());

    // Another user may not touch it: 441. Wrong family: 443.
    let (_, _) = h.allocate(me, &creds);
    let bob = rest_user("bob", UNIX0 + 100);
    let (r, _) = h.call(me, Method::REFRESH, &[], &bob);
    assert_eq!(r.error(), Some(441));
    let (r, _) = h.call(
        me,
        Method::REFRESH,
        &[Attribute::RequestedAddressFamily(Family::V6)],
        &creds,
    );
    assert_eq!(r.error(), Some(443));
}

#[test]
fn permissions_last_300_seconds_and_are_refreshed() {
    let mut h = Harness::new(config());
    let creds = alice();
    let me = udp(40001);
    let (id, _) = h.allocate(me, &creds);
    let p = peer(2, 7000);
    // No permission yet: nothing passes either way.
    assert!(!h.send_indication(me, p, b"x"));
    assert!(h.peer_sends(id, p, b"x").is_none());

    assert_eq!(h.permit(me, &creds, p).class, Class::Success);
    assert!(h.send_indication(me, p, b"hello"));
    // Any port of the permitted IP may answer; the client gets a Data indication.
    let (to, bytes) = h.peer_sends(id, peer(2, 7001), b"back").unwrap();
    assert_eq!(to, me);
    let m = Message::decode(&bytes).unwrap();
    assert_eq!((m.class, m.method), (Class::Indication, Method::DATA));
    assert_eq!(
        m.find(attr::XOR_PEER_ADDRESS),
        Some(Ok(Attribute::XorPeerAddress(peer(2, 7001))))
    );
    assert_eq!(m.find(attr::DATA), Some(Ok(Attribute::Data(&b"back"[..]))));
    // Another IP has none.
    assert!(h.peer_sends(id, peer(3, 7000), b"x").is_none());

    h.advance(Duration::from_secs(299));
    assert!(h.send_indication(me, p, b"still"));
    h.advance(Duration::from_secs(1));
    assert!(!h.send_indication(me, p, b"expired"));
    assert!(h.peer_sends(id, p, b"expired").is_none());

    // Refreshed by a new CreatePermission, for another 300 s.
    let (r, _) = h.call(me, Method::REFRESH, &[Attribute::Lifetime(3600)], &creds);
    assert_eq!(r.lifetime(), Some(3600));
    assert_eq!(h.permit(me, &creds, p).class, Class::Success);
    h.advance(Duration::from_secs(200));
    assert_eq!(h.permit(me, &creds, p).class, Class::Success);
    h.advance(Duration::from_secs(200));
    assert!(h.send_indication(me, p, b"refreshed"));
    assert!(
        h.stats
            .dropped_no_permission
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 4
    );
}

#[test]
fn channels_last_600_seconds_and_carry_channel_data() {
    let mut h = Harness::new(config());
    let creds = alice();
    let me = udp(40001);
    let (id, _) = h.allocate(me, &creds);
    let (r, _) = h.call(me, Method::REFRESH, &[Attribute::Lifetime(3600)], &creds);
    assert_eq!(r.lifetime(), Some(3600));
    let p = peer(2, 7000);
    assert_eq!(h.bind_channel(me, &creds, 0x4001, p).class, Class::Success);
    assert_eq!(h.channel_data(me, 0x4001, b"media"), Some(p));
    assert_eq!(h.channel_data(me, 0x4002, b"unbound"), None);
    // The peer's datagrams come back as ChannelData (UDP: unpadded).
    let (_, bytes) = h.peer_sends(id, p, b"abc").unwrap();
    assert_eq!(bytes, [0x40, 0x01, 0x00, 0x03, b'a', b'b', b'c']);

    // ChannelBind installed a permission, which lapses at 300 s even though the channel lives.
    h.advance(Duration::from_secs(300));
    assert_eq!(h.channel_data(me, 0x4001, b"no perm"), None);
    assert!(h.peer_sends(id, p, b"no perm").is_none());
    // Re-binding refreshes both.
    assert_eq!(h.bind_channel(me, &creds, 0x4001, p).class, Class::Success);
    h.advance(Duration::from_secs(299));
    assert_eq!(h.channel_data(me, 0x4001, b"ok"), Some(p));
    // Keep the permission alive, let the channel (bound at 300 s) lapse at 900 s.
    assert_eq!(h.permit(me, &creds, p).class, Class::Success);
    h.advance(Duration::from_secs(300));
    assert_eq!(h.permit(me, &creds, p).class, Class::Success);
    h.advance(Duration::from_secs(1));
    assert_eq!(h.channel_data(me, 0x4001, b"expired"), None);
    // Without the channel, the peer's data comes as a Data indication.
    let (_, bytes) = h.peer_sends(id, p, b"abc").unwrap();
    assert_eq!(Message::decode(&bytes).unwrap().method, Method::DATA);
    // Within the 5-minute guard, neither the number nor the peer may go elsewhere...
    assert_eq!(
        h.bind_channel(me, &creds, 0x4001, peer(3, 7000)).error(),
        Some(400)
    );
    assert_eq!(h.bind_channel(me, &creds, 0x4003, p).error(), Some(400));
    // ...but the same pair may be bound again, and after the guard anything goes.
    h.advance(Duration::from_secs(300));
    assert_eq!(
        h.bind_channel(me, &creds, 0x4001, peer(3, 7000)).class,
        Class::Success
    );
    assert_eq!(h.bind_channel(me, &creds, 0x4003, p).class, Class::Success);
}

#[test]
fn channel_bind_checks() {
    let mut h = Harness::new(config());
    let creds = alice();
    let me = udp(40001);
    h.allocate(me, &creds);
    let p = peer(2, 7000);
    assert_eq!(h.bind_channel(me, &creds, 0x3fff, p).error(), Some(400));
    assert_eq!(h.bind_channel(me, &creds, 0x7fff, p).error(), Some(400));
    assert_eq!(h.bind_channel(me, &creds, 0x8000, p).error(), Some(400));
    assert_eq!(h.bind_channel(me, &creds, 0x4000, p).class, Class::Success);
    assert_eq!(
        h.bind_channel(me, &creds, 0x4fff, peer(2, 7001)).class,
        Class::Success
    );
    // One peer, one number.
    assert_eq!(h.bind_channel(me, &creds, 0x4001, p).error(), Some(400));
    assert_eq!(
        h.bind_channel(me, &creds, 0x4000, peer(2, 7002)).error(),
        Some(400)
    );
    let (r, _) = h.call(
        me,
        Method::CHANNEL_BIND,
        &[Attribute::ChannelNumber(0x4002)],
        &creds,
    );
    assert_eq!(r.error(), Some(400), "no peer");
    // IPv6 peer on an IPv4 relay.
    let v6 = SocketAddr::from((Ipv6Addr::LOCALHOST, 7000));
    assert_eq!(h.bind_channel(me, &creds, 0x4002, v6).error(), Some(443));
    assert_eq!(h.permit(me, &creds, v6).error(), Some(443));
    // No allocation on this 5-tuple: 437.
    assert_eq!(
        h.bind_channel(udp(40002), &creds, 0x4002, p).error(),
        Some(437)
    );
}

#[test]
fn channel_data_over_tcp_is_padded() {
    let mut h = Harness::new(config());
    let creds = alice();
    let me = tcp(40001);
    let (id, _) = h.allocate(me, &creds);
    let p = peer(2, 7000);
    h.bind_channel(me, &creds, 0x4001, p);
    let (to, bytes) = h.peer_sends(id, p, b"abcde").unwrap();
    assert_eq!(to, me);
    assert_eq!(bytes.len(), 12);
    // Closing the connection deletes the allocation.
    h.m.handle_connection_closed(h.now, me);
    assert_eq!(h.drain(), vec![Output::CloseRelay { allocation: id }]);
    assert!(h.m.is_empty());
}

#[test]
fn quotas_per_user_and_in_total() {
    let mut h = Harness::new(TurnConfig {
        user_quota: 2,
        total_quota: 3,
        ..config()
    });
    let alice = alice();
    let bob = rest_user("bob", UNIX0 + 100);
    let carol = rest_user("carol", UNIX0 + 100);
    let (a1, _) = h.allocate(udp(1), &alice);
    // Another REST username (other expiry) of the same user shares the quota.
    let alice2 = rest_user("alice", UNIX0 + 999);
    h.allocate(udp(2), &alice2);
    let (r, _) = h.call(
        udp(3),
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(17)],
        &alice,
    );
    assert_eq!(r.error(), Some(486));
    h.allocate(udp(4), &bob);
    let (r, _) = h.call(
        udp(5),
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(17)],
        &carol,
    );
    assert_eq!(r.error(), Some(508), "total quota");
    assert_eq!(
        h.stats
            .quota_user_refusals
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    assert_eq!(
        h.stats
            .quota_total_refusals
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // Deleting one frees both quotas.
    let (r, _) = h.call(udp(1), Method::REFRESH, &[Attribute::Lifetime(0)], &alice);
    assert_eq!(r.class, Class::Success);
    assert_eq!(h.m.relay_of(a1), None);
    h.allocate(udp(5), &carol);
    h.call(udp(4), Method::REFRESH, &[Attribute::Lifetime(0)], &bob);
    h.allocate(udp(3), &alice);
    assert_eq!(h.m.len(), 3);
}

#[test]
fn stale_nonce_gets_438_with_a_fresh_nonce() {
    let mut h = Harness::new(config());
    let creds = alice();
    let me = udp(40001);
    let (_, _) = h.allocate(me, &creds);
    let (r, _) = h.call(me, Method::REFRESH, &[Attribute::Lifetime(3600)], &creds);
    assert_eq!(r.lifetime(), Some(3600));
    let old = h.nonces[&40001].clone();
    h.advance(Duration::from_secs(NONCE_LIFETIME_S));
    let txid = h.txid();
    let refresh = h.request(Method::REFRESH, &[], Some(&creds), 40001, txid);
    let out = h.feed(me, &refresh);
    let r = Harness::replies(&out);
    assert_eq!(r[0].error(), Some(438));
    assert_eq!(r[0].text(attr::REALM).as_deref(), Some("sluice"));
    let fresh = r[0].text(attr::NONCE).unwrap();
    assert_ne!(fresh, old);
    assert_eq!(h.stats.auth_failures_for(AuthFailure::StaleNonce), 1);
    // Retried with the new nonce, it succeeds.
    let (r, _) = h.call(me, Method::REFRESH, &[], &creds);
    assert_eq!(r.class, Class::Success);
}

#[test]
fn bad_credentials_are_refused_and_counted() {
    let mut h = Harness::new(TurnConfig {
        static_users: vec!["bob:pw".into()],
        ..config()
    });
    let me = udp(40001);
    let allocate = [Attribute::RequestedTransport(17)];
    let wrong_key = Creds {
        key: [0; 16],
        ..alice()
    };
    let expired = rest_user("alice", UNIX0 - 1);
    let unknown = Creds {
        username: "mallory".into(),
        key: [0; 16],
    };
    for (creds, reason) in [
        (wrong_key, AuthFailure::BadIntegrity),
        (expired, AuthFailure::Expired),
        (unknown, AuthFailure::UnknownUser),
    ] {
        let (r, out) = h.call(me, Method::ALLOCATE, &allocate, &creds);
        let _ = out;
        let _ = r;
        assert_eq!(h.stats.auth_failures_for(reason), 1, "{reason:?}");
    }
    assert!(h.m.is_empty());
    // A static user works.
    let bob = Creds {
        username: "bob".into(),
        key: long_term_key("bob", "sluice", "pw"),
    };
    h.allocate(me, &bob);
    // After the secret's REST expiry passes, even an existing allocation's requests fail.
    let soon = rest_user("dave", UNIX0 + 60);
    let (id, _) = h.allocate(udp(2), &soon);
    h.advance(Duration::from_secs(61));
    let txid = h.txid();
    let refresh = h.request(Method::REFRESH, &[], Some(&soon), 2, txid);
    let out = h.feed(udp(2), &refresh);
    assert_eq!(Harness::replies(&out)[0].error(), Some(401));
    assert!(
        h.m.relay_of(id).is_some(),
        "the allocation lives until it expires"
    );
}

/// Unauthenticated UDP requests never get back more bytes than their source sent.
#[test]
fn no_amplification_before_authentication() {
    let mut h = Harness::new(TurnConfig {
        realm: "a-rather-long-realm.example.org".into(),
        ..config()
    });
    let me = udp(40001);
    let mut sent_by_client = 0usize;
    let mut sent_to_client = 0usize;
    let mut answered = Vec::new();
    // A bare 28-byte Allocate (what libwebrtc sends first), 20 times over.
    for i in 0..20 {
        let txid = h.txid();
        let mut bytes = Vec::new();
        MessageWriter::new(&mut bytes, Class::Request, Method::ALLOCATE, txid)
            .attr(&Attribute::RequestedTransport(17));
        assert_eq!(bytes.len(), 28);
        sent_by_client += bytes.len();
        let out = h.feed(me, &bytes);
        for r in Harness::replies(&out) {
            assert_eq!(r.error(), Some(401));
            assert!(r.text(attr::NONCE).is_some());
            sent_to_client += r.bytes.len();
            answered.push(i);
        }
        assert!(
            sent_to_client <= sent_by_client,
            "round {i}: {sent_to_client} > {sent_by_client}"
        );
    }
    assert!(
        !answered.is_empty() && answered[0] > 0,
        "the first is withheld: {answered:?}"
    );
    assert!(
        answered.len() >= 5,
        "retransmissions earn answers: {answered:?}"
    );
    assert!(
        h.stats
            .amplification_withheld
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );

    // With the default realm, libwebrtc's 28-byte Allocate is answered at its first
    // retransmission (the compact 401 is 52 bytes, 2 x 28 = 56).
    let mut h = Harness::new(config());
    let txid = h.txid();
    let mut bytes = Vec::new();
    MessageWriter::new(&mut bytes, Class::Request, Method::ALLOCATE, txid)
        .attr(&Attribute::RequestedTransport(17));
    assert!(h.feed(udp(40005), &bytes).is_empty());
    let r = Harness::replies(&h.feed(udp(40005), &bytes));
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].bytes.len(), 52);

    // Other unauthenticated refusals too: unknown method, integrity without NONCE (400).
    let mut h = Harness::new(config());
    let me = udp(40002);
    let mut budget = 0usize;
    let mut spent = 0usize;
    for i in 0..10 {
        let txid = h.txid();
        let mut bytes = Vec::new();
        let method = if i % 2 == 0 {
            Method(0x0fff)
        } else {
            Method::REFRESH
        };
        let mut w = MessageWriter::new(&mut bytes, Class::Request, method, txid);
        if i % 2 == 1 {
            w.attr(&Attribute::Username("x")).integrity(b"k");
        }
        budget += bytes.len();
        for r in Harness::replies(&h.feed(me, &bytes)) {
            assert_eq!(r.error(), Some(400));
            spent += r.bytes.len();
        }
        assert!(spent <= budget);
    }
    assert!(spent > 0);

    // coturn's 60-byte Allocate gets its 401 at once (the compact form, 52 bytes, fits).
    let mut h = Harness::new(config());
    let txid = h.txid();
    let bytes = h.request(
        Method::ALLOCATE,
        &[
            Attribute::RequestedTransport(17),
            Attribute::Lifetime(777),
            Attribute::EvenPort(true),
            Attribute::RequestedAddressFamily(Family::V4),
        ],
        None,
        40003,
        txid,
    );
    assert_eq!(bytes.len(), 60);
    let r = Harness::replies(&h.feed(udp(40003), &bytes));
    assert_eq!(r.len(), 1);
    assert!(r[0].bytes.len() <= 60);

    // Over TCP the handshake proved the address: answered at once, in full.
    let mut h = Harness::new(config());
    let txid = h.txid();
    let mut bytes = Vec::new();
    MessageWriter::new(&mut bytes, Class::Request, Method::ALLOCATE, txid)
        .attr(&Attribute::RequestedTransport(17));
    let r = Harness::replies(&h.feed(tcp(40004), &bytes));
    assert_eq!(r.len(), 1);
    assert!(r[0].bytes.len() > bytes.len());
}

#[test]
fn peer_policy_refuses_special_purpose_addresses() {
    // Addresses as values only: the state machine never sends anything in this test.
    let default = PeerPolicy::default();
    let refused = [
        "127.0.0.1",
        "127.255.0.9",
        "0.0.0.0",
        "0.1.2.3",
        "10.1.2.3",
        "172.16.0.1",
        "172.31.255.255",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "192.0.0.8",
        "192.0.2.1",
        "198.18.0.1",
        "198.51.100.1",
        "203.0.113.1",
        "224.0.0.251",
        "239.255.255.250",
        "240.0.0.1",
        "255.255.255.255",
        "::",
        "::1",
        "::ffff:127.0.0.1",
        "::ffff:10.0.0.1",
        "64:ff9b::7f00:1",
        "2002:7f00:1::1",
        "fe80::1",
        "fec0::1",
        "fc00::1",
        "fd12:3456::1",
        "ff02::1",
        "2001:db8::1",
        "2001::1",
        "3fff::1",
        "100::1",
        "::2",
    ];
    for ip in refused {
        let ip: IpAddr = ip.parse().unwrap();
        assert!(
            special_purpose(ip).is_some(),
            "{ip} should be special-purpose"
        );
        assert!(!default.permits(ip), "{ip} permitted by default");
    }
    for ip in [
        "1.1.1.1",
        "172.32.0.1",
        "192.169.0.1",
        "2606:4700::1111",
        "::ffff:1.1.1.1",
    ] {
        let ip: IpAddr = ip.parse().unwrap();
        assert_eq!(special_purpose(ip), None, "{ip}");
        assert!(default.permits(ip));
    }
    assert_eq!(
        special_purpose("127.0.0.1".parse().unwrap()),
        Some(PeerClass::Loopback)
    );
    assert_eq!(
        special_purpose("::ffff:127.0.0.1".parse().unwrap()),
        Some(PeerClass::Loopback)
    );
    assert_eq!(
        special_purpose("10.0.0.1".parse().unwrap()),
        Some(PeerClass::Private)
    );
    assert_eq!(
        special_purpose("fe80::1".parse().unwrap()),
        Some(PeerClass::LinkLocal)
    );
    assert_eq!(
        special_purpose("ff02::1".parse().unwrap()),
        Some(PeerClass::Multicast)
    );
    assert_eq!(
        special_purpose("::".parse().unwrap()),
        Some(PeerClass::Unspecified)
    );

    // allow_loopback opens loopback only; the allow-list opens its networks (v4-mapped too).
    let loopback = PeerPolicy {
        allow_loopback: true,
        allow: vec![],
        exact: vec![],
    };
    assert!(loopback.permits("127.0.0.1".parse().unwrap()));
    assert!(loopback.permits("::1".parse().unwrap()));
    assert!(loopback.permits("::ffff:127.0.0.2".parse().unwrap()));
    assert!(!loopback.permits("10.0.0.1".parse().unwrap()));
    let listed = PeerPolicy {
        allow_loopback: false,
        allow: vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()],
        exact: vec![],
    };
    assert!(listed.permits("10.9.9.9".parse().unwrap()));
    assert!(listed.permits("::ffff:10.9.9.9".parse().unwrap()));
    assert!(listed.permits("fd00::5".parse().unwrap()));
    assert!(!listed.permits("192.168.0.1".parse().unwrap()));
    assert!(!listed.permits("127.0.0.1".parse().unwrap()));

    // The SFU's own media socket is allowed exactly: that address and port, nothing else.
    let own = PeerPolicy {
        allow_loopback: false,
        allow: vec![],
        exact: vec!["127.0.0.1:40000".parse().unwrap()],
    };
    assert!(own.permits_addr("127.0.0.1:40000".parse().unwrap()));
    assert!(!own.permits_addr("127.0.0.1:40001".parse().unwrap()));
    assert!(!own.permits_addr("127.0.0.2:40000".parse().unwrap()));
}

#[test]
fn refused_peers_get_403_by_default() {
    let mut h = Harness::new(TurnConfig {
        allow_loopback_peers: false,
        ..config()
    });
    let creds = alice();
    let me = udp(40001);
    let (id, _) = h.allocate(me, &creds);
    let p = peer(1, 7000);
    assert_eq!(h.permit(me, &creds, p).error(), Some(403));
    assert_eq!(h.bind_channel(me, &creds, 0x4001, p).error(), Some(403));
    assert!(!h.send_indication(me, p, b"x"));
    assert!(h.peer_sends(id, p, b"x").is_none());
    // A request naming several peers is refused whole when one is refused.
    let (r, _) = h.call(
        me,
        Method::CREATE_PERMISSION,
        &[
            Attribute::XorPeerAddress(p),
            Attribute::XorPeerAddress(peer(2, 1)),
        ],
        &creds,
    );
    assert_eq!(r.error(), Some(403));
    assert_eq!(
        h.stats
            .refused_peers
            .load(std::sync::atomic::Ordering::Relaxed),
        4
    );

    // The same with loopback allowed.
    let mut h = Harness::new(config());
    let (_, _) = h.allocate(me, &creds);
    assert_eq!(h.permit(me, &creds, p).class, Class::Success);
}

#[test]
fn bandwidth_cap_per_allocation() {
    // 1 Mbit/s = 125 000 B/s, burst 64 KiB.
    let mut h = Harness::new(TurnConfig {
        bandwidth_bps: 1_000_000,
        ..config()
    });
    let creds = alice();
    let me = udp(40001);
    let (id, _) = h.allocate(me, &creds);
    let p = peer(2, 7000);
    h.bind_channel(me, &creds, 0x4001, p);
    let packet = [0u8; 1000];
    let mut passed = 0;
    for _ in 0..200 {
        if h.channel_data(me, 0x4001, &packet).is_some() {
            passed += 1;
        }
    }
    assert_eq!(passed, 65, "the burst, then nothing");
    // Peer traffic draws from the same bucket.
    assert!(h.peer_sends(id, p, &packet).is_none());
    // 100 ms later, 12 500 bytes more.
    h.advance(Duration::from_millis(100));
    let mut passed = 0;
    for _ in 0..50 {
        if h.peer_sends(id, p, &packet).is_some() {
            passed += 1;
        }
    }
    assert_eq!(
        passed,
        12 + 1,
        "refilled at the cap's rate (with the burst's remainder)"
    );
    assert!(
        h.stats
            .dropped_bandwidth
            .load(std::sync::atomic::Ordering::Relaxed)
            > 100
    );
}

#[test]
fn even_port_reservations() {
    let mut h = Harness::new(config());
    let creds = alice();
    let (r, out) = h.call(
        udp(1),
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(17), Attribute::EvenPort(true)],
        &creds,
    );
    assert!(r.bytes.is_empty());
    let [Output::BindRelay(req)] = out.as_slice() else {
        panic!("{out:?}")
    };
    assert!(req.even_port && req.reserve_next);
    let held = peer(1, 50_011);
    assert!(h.m.relay_bound(
        h.now,
        req.allocation,
        Ok(RelayBound {
            relay: peer(1, 50_010),
            reserved: Some(held)
        })
    ));
    let r = Harness::replies(&h.drain());
    let Some(Ok(Attribute::ReservationToken(token))) = r[0].msg().find(attr::RESERVATION_TOKEN)
    else {
        panic!("no token")
    };
    // A second allocation claims the held port with the token.
    let (_, out) = h.call(
        udp(2),
        Method::ALLOCATE,
        &[
            Attribute::RequestedTransport(17),
            Attribute::ReservationToken(token),
        ],
        &creds,
    );
    let [Output::BindRelay(req2)] = out.as_slice() else {
        panic!("{out:?}")
    };
    assert_eq!(req2.reserved, Some(held));
    // Used once only.
    let (r, _) = h.call(
        udp(3),
        Method::ALLOCATE,
        &[
            Attribute::RequestedTransport(17),
            Attribute::ReservationToken(token),
        ],
        &creds,
    );
    assert_eq!(r.error(), Some(508));
    // An unclaimed reservation is released after 30 s.
    let (_, out) = h.call(
        udp(4),
        Method::ALLOCATE,
        &[Attribute::RequestedTransport(17), Attribute::EvenPort(true)],
        &creds,
    );
    let [Output::BindRelay(req3)] = out.as_slice() else {
        panic!("{out:?}")
    };
    let held3 = peer(1, 50_021);
    h.m.relay_bound(
        h.now,
        req3.allocation,
        Ok(RelayBound {
            relay: peer(1, 50_020),
            reserved: Some(held3),
        }),
    );
    h.drain();
    let out = h.advance(RESERVATION_LIFETIME);
    assert!(
        out.contains(&Output::ReleaseReservation { reserved: held3 }),
        "{out:?}"
    );
}

#[test]
fn timeouts_point_at_the_next_expiry() {
    let mut h = Harness::new(config());
    let creds = alice();
    h.allocate(udp(1), &creds);
    let Output::Timeout(at) = h.m.poll_output() else {
        panic!()
    };
    // The bind-timeout entry comes first; handling it early is harmless and re-arms.
    assert!(at <= h.now + DEFAULT_LIFETIME);
    h.advance(at - h.now);
    let Output::Timeout(at) = h.m.poll_output() else {
        panic!()
    };
    assert_eq!(at, h.t0 + DEFAULT_LIFETIME);
    // Many refreshes do not grow the timer heap.
    for _ in 0..100 {
        h.call(udp(1), Method::REFRESH, &[], &creds);
    }
    assert!(h.m.timers.len() <= 2, "{}", h.m.timers.len());
}

#[test]
fn garbage_is_ignored() {
    let mut h = Harness::new(config());
    let creds = alice();
    let (id, _) = h.allocate(udp(1), &creds);
    for bytes in [
        &b""[..],
        b"\x80garbage",
        b"\x40\x01\x00\x10short",
        &[0u8; 19],
        &[0u8; 24],
    ] {
        assert!(h.m.handle_client(h.now, udp(1), bytes).is_none());
    }
    assert!(h.drain().is_empty());
    // Success/error responses from a client are ignored.
    let mut resp = Vec::new();
    MessageWriter::new(
        &mut resp,
        Class::Success,
        Method::BINDING,
        TransactionId([0; 12]),
    );
    assert!(h.feed(udp(1), &resp).is_empty());
    assert!(h.m.relay_of(id).is_some());
}
