//! The TURN server's I/O: the UDP socket and TCP listener on `turn.listen`, one UDP socket per
//! allocation from `turn.relay_ports`, and the timer, driving [`Allocations`] on the control
//! thread's tokio runtime.
//!
//! Owns sockets only; every protocol decision is the state machine's. Never touches the shards.
//! One mutex holds all mutable state: the runtime is single-threaded, so it is never contended
//! (it only satisfies `tokio::spawn`'s `Send`), and no lock is held across an `.await`.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket as StdUdpSocket};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;

use super::allocation::{
    AllocationId, Allocations, BindRelay, FiveTuple, Output, RelayBindError, RelayBound, Transport,
};
use super::codec::{frame_len, Family};
use super::{inc, TurnStats};
use crate::config::TurnConfig;

/// Datagrams handled per readiness wake-up before yielding to other tasks.
const BATCH: usize = 64;
/// Frames queued towards one TCP client before newer ones are dropped.
const TCP_QUEUE: usize = 512;
/// Concurrent client TCP connections.
const MAX_TCP_CONNECTIONS: usize = 4096;
/// A TCP connection without an allocation is closed after this long without a byte.
const TCP_IDLE: Duration = Duration::from_secs(60);
/// Tries to find a free relay port (or even/odd pair) before answering 508.
const PORT_TRIES: usize = 64;
/// Kernel buffers of the listening UDP socket.
const SOCKET_BUFFER: usize = 4 << 20;
/// Kernel receive buffer of each relay socket.
const RELAY_SOCKET_BUFFER: usize = 1 << 20;

/// A bound (not yet running) TURN server: bind first to report address errors at start, then
/// [`run`](TurnServer::run) it.
pub struct TurnServer {
    cfg: TurnConfig,
    udp: StdUdpSocket,
    tcp: std::net::TcpListener,
    own_peers: Vec<SocketAddr>,
}

impl TurnServer {
    /// Binds UDP and TCP on `cfg.listen` (port 0: one free port for both).
    pub fn bind(cfg: TurnConfig) -> io::Result<TurnServer> {
        let mut last = None;
        for _ in 0..if cfg.listen.port() == 0 { 16 } else { 1 } {
            let udp = bind_udp(cfg.listen)?;
            let port = udp.local_addr()?.port();
            match bind_tcp(SocketAddr::new(cfg.listen.ip(), port)) {
                Ok(tcp) => {
                    return Ok(TurnServer {
                        cfg,
                        udp,
                        tcp,
                        own_peers: Vec::new(),
                    })
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("no port")))
    }

    /// The address UDP and TCP listen on.
    /// Peers always allowed, exactly (address and port): the SFU's own media sockets.
    pub fn allow_own_peers(&mut self, peers: Vec<SocketAddr>) {
        self.own_peers = peers;
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.udp.local_addr()
    }

    /// Serves until `shutdown` turns true (or its sender is dropped). Relay sockets and client
    /// connections are closed on the way out.
    pub async fn run(
        self,
        stats: Arc<TurnStats>,
        shutdown: watch::Receiver<bool>,
    ) -> io::Result<()> {
        // The sender lives until `run` returns, so the secret simply never changes.
        let (_keep, secrets) = watch::channel(self.cfg.secret.clone());
        self.run_with_secrets(stats, shutdown, secrets).await
    }

    /// Like `run`, and the REST shared secret follows `secrets` (SIGHUP reload).
    pub async fn run_with_secrets(
        self,
        stats: Arc<TurnStats>,
        mut shutdown: watch::Receiver<bool>,
        secrets: watch::Receiver<Option<String>>,
    ) -> io::Result<()> {
        let local = self.udp.local_addr()?;
        let udp = UdpSocket::from_std(self.udp)?;
        let tcp = TcpListener::from_std(self.tcp)?;
        let now = Instant::now();
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut machine = Allocations::new(&self.cfg, stats.clone(), rand::random(), now, unix);
        machine.allow_exact_peers(self.own_peers);
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                machine,
                relays: HashMap::new(),
                reserved: HashMap::new(),
                tcp: HashMap::new(),
                buf: vec![0; 65_536],
                out: Vec::with_capacity(2048),
                next_timeout: now + Duration::from_secs(3600),
            }),
            udp,
            local,
            cfg: self.cfg,
            stats,
            timer: Notify::new(),
        });
        tracing::info!(
            %local,
            realm = %shared.cfg.realm,
            relay_ports = %shared.cfg.relay_ports,
            rest_secret = shared.cfg.secret.is_some(),
            static_users = shared.cfg.static_users.len(),
            allow_loopback_peers = shared.cfg.allow_loopback_peers,
            "TURN listening (UDP and TCP)"
        );
        let result = tokio::select! {
            r = udp_loop(shared.clone()) => r,
            r = accept_loop(shared.clone(), tcp, shutdown.clone()) => r,
            _ = timer_loop(shared.clone()) => Ok(()),
            _ = secret_loop(shared.clone(), secrets) => Ok(()),
            _ = wait_shutdown(&mut shutdown) => Ok(()),
        };
        let mut inner = shared.lock();
        for (_, relay) in inner.relays.drain() {
            relay.task.abort();
        }
        inner.reserved.clear();
        inner.tcp.clear();
        drop(inner);
        tracing::info!("TURN stopped");
        result
    }
}

/// Apply secret changes; never returns (after the sender is gone it just waits).
async fn secret_loop(shared: Arc<Shared>, mut secrets: watch::Receiver<Option<String>>) {
    while secrets.changed().await.is_ok() {
        let secret = secrets.borrow_and_update().clone();
        shared.lock().machine.set_rest_secret(secret.as_deref());
        tracing::info!(set = secret.is_some(), "TURN shared secret replaced");
    }
    std::future::pending::<()>().await
}

/// Binds and runs a TURN server with `cfg` until `shutdown` turns true. A bind error is returned
/// at the first poll, before anything is served. With `cfg.enabled` false it returns at once.
pub async fn run(
    cfg: TurnConfig,
    stats: Arc<TurnStats>,
    shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    if !cfg.enabled {
        return Ok(());
    }
    let listen = cfg.listen;
    let server = TurnServer::bind(cfg)
        .map_err(|e| io::Error::new(e.kind(), format!("turn.listen {listen}: {e}")))?;
    server.run(stats, shutdown).await
}

async fn wait_shutdown(rx: &mut watch::Receiver<bool>) {
    while !*rx.borrow_and_update() {
        if rx.changed().await.is_err() {
            return;
        }
    }
}

fn bind_udp(addr: SocketAddr) -> io::Result<StdUdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(false).ok();
    }
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    socket.bind(&addr.into())?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

fn bind_tcp(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false).ok();
    }
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

struct Relay {
    socket: Arc<UdpSocket>,
    task: JoinHandle<()>,
}

struct Inner {
    machine: Allocations,
    relays: HashMap<AllocationId, Relay>,
    /// Ports held for RESERVATION-TOKENs, by local address.
    reserved: HashMap<SocketAddr, StdUdpSocket>,
    /// Writers of client TCP connections, by client address.
    tcp: HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>,
    /// Receive buffer shared by every socket (only one is read at a time).
    buf: Vec<u8>,
    /// Scratch for peer-to-client framing.
    out: Vec<u8>,
    next_timeout: Instant,
}

struct Shared {
    inner: Mutex<Inner>,
    udp: UdpSocket,
    local: SocketAddr,
    cfg: TurnConfig,
    stats: Arc<TurnStats>,
    /// Woken when the state machine's next timeout moves.
    timer: Notify,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Sends to a client over its transport; drops when the socket or queue is full.
fn send_to_client(
    udp: &UdpSocket,
    tcp: &HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>,
    to: FiveTuple,
    bytes: &[u8],
) {
    match to.transport {
        Transport::Udp => {
            let _ = udp.try_send_to(bytes, to.client);
        }
        Transport::Tcp => {
            if let Some(tx) = tcp.get(&to.client) {
                let _ = tx.try_send(bytes.to_vec());
            }
        }
    }
}

/// Acts on every queued output of the state machine (see the contract on [`Allocations`]).
fn drain(shared: &Arc<Shared>, inner: &mut Inner) {
    loop {
        match inner.machine.poll_output() {
            Output::Transmit { to, bytes } => send_to_client(&shared.udp, &inner.tcp, to, &bytes),
            Output::BindRelay(req) => {
                let opened = open_relay(&shared.cfg, &mut inner.reserved, &req);
                let result = opened.as_ref().map(|(_, bound)| *bound).map_err(|e| *e);
                let accepted = inner
                    .machine
                    .relay_bound(Instant::now(), req.allocation, result);
                if let (true, Ok((socket, bound))) = (accepted, opened) {
                    match UdpSocket::from_std(socket) {
                        Ok(socket) => {
                            let socket = Arc::new(socket);
                            let task = tokio::spawn(relay_loop(
                                shared.clone(),
                                req.allocation,
                                socket.clone(),
                            ));
                            tracing::debug!(client = %req.client.client, relay = %bound.relay, "allocation");
                            inner.relays.insert(req.allocation, Relay { socket, task });
                        }
                        Err(e) => tracing::warn!(error = %e, "registering a relay socket"),
                    }
                }
            }
            Output::CloseRelay { allocation } => {
                if let Some(relay) = inner.relays.remove(&allocation) {
                    relay.task.abort();
                }
            }
            Output::ReleaseReservation { reserved } => {
                inner.reserved.remove(&reserved);
            }
            Output::Timeout(at) => {
                // Wake the timer only when the deadline moves earlier: a later one is found
                // when the timer fires early (harmless), and waking per datagram would cost.
                if at < inner.next_timeout {
                    shared.timer.notify_one();
                }
                inner.next_timeout = at;
                return;
            }
        }
    }
}

/// The local address to relay from for `client`: the listen address when it is specific, else
/// the source address the kernel would use to reach the client.
fn relay_ip(listen: IpAddr, client: SocketAddr, family: Family) -> Result<IpAddr, RelayBindError> {
    let ip = if listen.is_unspecified() {
        let any: IpAddr = match family {
            Family::V4 => Ipv4Addr::UNSPECIFIED.into(),
            Family::V6 => Ipv6Addr::UNSPECIFIED.into(),
        };
        if Family::of(client.ip()) != family {
            return Err(RelayBindError::Family);
        }
        let probe = StdUdpSocket::bind((any, 0)).map_err(|_| RelayBindError::Family)?;
        probe.connect(client).map_err(|_| RelayBindError::Family)?;
        probe.local_addr().map_err(|_| RelayBindError::Family)?.ip()
    } else {
        listen
    };
    if Family::of(ip) != family {
        return Err(RelayBindError::Family);
    }
    Ok(ip)
}

/// Opens the relay socket `req` asks for (and the held next port with EVEN-PORT's R bit).
fn open_relay(
    cfg: &TurnConfig,
    reserved: &mut HashMap<SocketAddr, StdUdpSocket>,
    req: &BindRelay,
) -> Result<(StdUdpSocket, RelayBound), RelayBindError> {
    let advertise = |local: SocketAddr| {
        let public = cfg
            .public_host
            .as_deref()
            .and_then(|h| {
                h.trim_matches(|c| c == '[' || c == ']')
                    .parse::<IpAddr>()
                    .ok()
            })
            .filter(|ip| Family::of(*ip) == Family::of(local.ip()));
        SocketAddr::new(public.unwrap_or(local.ip()), local.port())
    };
    if let Some(key) = req.reserved {
        let socket = reserved.remove(&key).ok_or(RelayBindError::Capacity)?;
        socket
            .set_nonblocking(true)
            .map_err(|_| RelayBindError::Capacity)?;
        return Ok((
            socket,
            RelayBound {
                relay: advertise(key),
                reserved: None,
            },
        ));
    }
    let ip = relay_ip(cfg.listen.ip(), req.client.client, req.family)?;
    let range = cfg.relay_ports;
    let mut rng = rand::thread_rng();
    for _ in 0..PORT_TRIES {
        let mut port = rng.gen_range(range.low..=range.high);
        if req.even_port && port % 2 == 1 {
            if port == range.high {
                continue;
            }
            port += 1;
        }
        let Ok(socket) = bind_relay((ip, port).into()) else {
            continue;
        };
        let mut held = None;
        if req.reserve_next {
            if port == range.high {
                continue;
            }
            match StdUdpSocket::bind((ip, port + 1)) {
                Ok(next) => held = Some(next),
                Err(_) => continue,
            }
        }
        if socket.set_nonblocking(true).is_err() {
            continue;
        }
        let local = SocketAddr::new(ip, port);
        let reserved_key = held.map(|next| {
            let key = SocketAddr::new(ip, port + 1);
            reserved.insert(key, next);
            key
        });
        return Ok((
            socket,
            RelayBound {
                relay: advertise(local),
                reserved: reserved_key,
            },
        ));
    }
    Err(RelayBindError::Capacity)
}

/// A relay socket, with a receive buffer that rides out a scheduling hiccup of the control thread
/// at the bandwidth cap (the kernel default holds ~270 small datagrams).
fn bind_relay(addr: SocketAddr) -> io::Result<StdUdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    let _ = socket.set_recv_buffer_size(RELAY_SOCKET_BUFFER);
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// Datagrams from clients on the listening UDP socket.
async fn udp_loop(shared: Arc<Shared>) -> io::Result<()> {
    loop {
        shared.udp.readable().await?;
        let mut guard = shared.lock();
        let inner = &mut *guard;
        for _ in 0..BATCH {
            let (n, from) = match shared.udp.try_recv_from(&mut inner.buf) {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // ICMP errors surfacing on the socket: not fatal.
                Err(_) => continue,
            };
            let five = FiveTuple {
                transport: Transport::Udp,
                client: from,
                server: shared.local,
            };
            let now = Instant::now();
            if let Some(to_peer) = inner.machine.handle_client(now, five, &inner.buf[..n]) {
                if let Some(relay) = inner.relays.get(&to_peer.allocation) {
                    let _ = relay.socket.try_send_to(to_peer.payload, to_peer.peer);
                }
            }
            drain(&shared, inner);
        }
    }
}

/// Datagrams from peers on one allocation's relay socket, until the allocation closes it.
async fn relay_loop(shared: Arc<Shared>, id: AllocationId, socket: Arc<UdpSocket>) {
    loop {
        if socket.readable().await.is_err() {
            return;
        }
        let mut guard = shared.lock();
        let Inner {
            machine,
            tcp,
            buf,
            out,
            ..
        } = &mut *guard;
        let now = Instant::now();
        for _ in 0..BATCH {
            let (n, peer) = match socket.try_recv_from(buf) {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(_) => continue,
            };
            if let Some(client) = machine.handle_peer(now, id, peer, &buf[..n], out) {
                send_to_client(&shared.udp, tcp, client, out);
            }
        }
    }
}

async fn timer_loop(shared: Arc<Shared>) {
    loop {
        let next = shared.lock().next_timeout;
        tokio::select! {
            _ = tokio::time::sleep_until(tokio::time::Instant::from_std(next)) => {
                let mut guard = shared.lock();
                guard.machine.handle_timeout(Instant::now());
                drain(&shared, &mut guard);
            }
            _ = shared.timer.notified() => {}
        }
    }
}

async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    shutdown: watch::Receiver<bool>,
) -> io::Result<()> {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of descriptors and the like: wait a little rather than spin.
                tracing::warn!(error = %e, "TURN accept");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if shared.lock().tcp.len() >= MAX_TCP_CONNECTIONS {
            continue;
        }
        let _ = stream.set_nodelay(true);
        tokio::spawn(tcp_connection(
            shared.clone(),
            stream,
            peer,
            shutdown.clone(),
        ));
    }
}

/// One client TCP connection: frames STUN messages and ChannelData out of the byte stream.
async fn tcp_connection(
    shared: Arc<Shared>,
    stream: TcpStream,
    client: SocketAddr,
    mut shutdown: watch::Receiver<bool>,
) {
    let Ok(server) = stream.local_addr() else {
        return;
    };
    let five = FiveTuple {
        transport: Transport::Tcp,
        client,
        server,
    };
    let (mut rd, mut wr) = stream.into_split();
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(TCP_QUEUE);
    shared.lock().tcp.insert(client, tx);
    inc(&shared.stats.tcp_connections);
    let writer = tokio::spawn(async move {
        while let Some(frame) = rx.recv().await {
            if wr.write_all(&frame).await.is_err() {
                break;
            }
        }
    });

    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut chunk = vec![0u8; 16 * 1024];
    'conn: loop {
        let read = tokio::select! {
            r = tokio::time::timeout(TCP_IDLE, rd.read(&mut chunk)) => r,
            _ = wait_shutdown(&mut shutdown) => break 'conn,
        };
        let n = match read {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => n,
            Err(_) => {
                if shared.lock().machine.allocation_of(&five).is_some() {
                    continue;
                }
                break;
            }
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut start = 0;
        let mut guard = shared.lock();
        let inner = &mut *guard;
        let stream_ok = loop {
            match frame_len(&buf[start..]) {
                Ok(Some(len)) => {
                    let frame = &buf[start..start + len];
                    let now = Instant::now();
                    if let Some(to_peer) = inner.machine.handle_client(now, five, frame) {
                        if let Some(relay) = inner.relays.get(&to_peer.allocation) {
                            let _ = relay.socket.try_send_to(to_peer.payload, to_peer.peer);
                        }
                    }
                    drain(&shared, inner);
                    start += len;
                }
                Ok(None) => break true,
                Err(_) => break false, // not STUN/TURN: drop the connection
            }
        };
        drop(guard);
        if !stream_ok {
            break 'conn;
        }
        buf.drain(..start);
    }
    {
        let mut guard = shared.lock();
        guard.tcp.remove(&client);
        guard.machine.handle_connection_closed(Instant::now(), five);
        drain(&shared, &mut guard);
    }
    shared
        .stats
        .tcp_connections
        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    let _ = writer.await;
}
