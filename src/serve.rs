//! Process assembly: resolve addresses, start the shards, then run the control thread (tokio
//! current-thread runtime with axum) until a signal or `Server::shutdown`.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::config::{Config, IoBackend};
use crate::control::negotiate::PeerTemplate;
use crate::control::{Control, SharedControl};
use crate::mesh::{Doorbell, Mesh};
use crate::shard::io::{Backend, IoConfig, WakeFd};
use crate::shard::{self, ShardCommand, ShardConfig, ShardHandle, ShardSetup};

/// A running sluice: its HTTP address and a way to stop it. Used by `run` and by tests.
pub struct Server {
    pub http_addr: SocketAddr,
    pub control: SharedControl,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Media socket addresses of every shard.
    pub fn media_addrs(&self) -> Vec<SocketAddr> {
        self.control
            .shards
            .iter()
            .flat_map(|s| s.local_addrs.iter().copied())
            .collect()
    }

    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Block until the control thread ends (after a signal).
    pub fn wait(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The IPv4 addresses to bind media sockets on: configured, or every local interface address.
fn media_ips(config: &Config) -> Vec<IpAddr> {
    if !config.media.listen_ips.is_empty() {
        return config.media.listen_ips.clone();
    }
    let mut ips = crate::shard::io::ifaddrs::local_ipv4().unwrap_or_default();
    if ips.is_empty() {
        ips.push(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    ips.sort();
    ips.dedup();
    ips
}

/// Start shards and the control thread.
pub fn start(config: Config) -> Result<Server, Box<dyn std::error::Error>> {
    start_with(config, None)
}

fn start_with(
    mut config: Config,
    hooks: Option<Hooks>,
) -> Result<Server, Box<dyn std::error::Error>> {
    let shards = config.effective_shards();
    if shards == 0 || shards > 64 {
        return Err(format!("media.shards must be 1..=64, got {shards}").into());
    }
    let ips = media_ips(&config);
    let template = PeerTemplate::new()?;

    let wakes: Vec<WakeFd> = (0..shards)
        .map(|_| WakeFd::new())
        .collect::<Result<_, _>>()?;
    let doorbells: Vec<Arc<Doorbell>> = wakes
        .iter()
        .map(|w| Arc::new(Doorbell::new(w.clone())))
        .collect();
    let mesh = Arc::new(Mesh::new(doorbells.clone(), config.media.ring_capacity));
    let (events_tx, events_rx) = tokio::sync::mpsc::channel(16 * 1024);

    let cores = core_affinity::get_core_ids().map(|c| c.len()).unwrap_or(1);
    let mut handles: Vec<ShardHandle> = Vec::with_capacity(shards);
    let mut announced = Vec::with_capacity(shards);
    for id in 0..shards {
        let port = config.media.port_base + id as u16;
        let addrs: Vec<SocketAddr> = ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect();
        let ann: Vec<SocketAddr> = addrs
            .iter()
            .map(|a| SocketAddr::new(config.media.public_ip.unwrap_or(a.ip()), port))
            .collect();
        let cfg = ShardConfig {
            io: IoConfig {
                backend: match config.media.io {
                    IoBackend::Uring => Backend::Uring,
                    IoBackend::Mmsg => Backend::Mmsg,
                },
                addrs,
                recv_buffers: 512,
                socket_buffer_bytes: 8 << 20,
            },
            announced: ann.clone(),
            pin_core: config.media.pin_cores.then_some(id % cores.max(1)),
            connect_timeout: Duration::from_millis(config.media.connect_timeout_ms),
            ice_timeout: Duration::from_millis(config.media.ice_timeout_ms),
            keyframe_min_interval: Duration::from_millis(config.media.keyframe_min_interval_ms),
            send_chunk: config.media.send_chunk,
            busy_poll: Duration::from_micros(config.media.busy_poll_us),
        };
        let handle = shard::spawn(ShardSetup {
            id,
            config: cfg,
            wake: wakes[id].clone(),
            doorbell: doorbells[id].clone(),
            mesh: mesh.endpoints(id),
            events: events_tx.clone(),
            command_capacity: 16 * 1024,
        })
        .map_err(|e| format!("shard {id}: binding media port {port}: {e}"))?;
        announced.push(ann);
        handles.push(handle);
    }
    drop(events_tx);
    tracing::info!(
        shards,
        io = handles[0].io_backend,
        media = ?handles.iter().map(|h| h.local_addrs.clone()).collect::<Vec<_>>(),
        "media shards started"
    );

    let io_backend = handles[0].io_backend;

    // The embedded TURN server, bound now so a port in use fails the start.
    let turn = if config.turn.enabled {
        if config.turn.secret.is_none() && config.turn.static_users.is_empty() {
            tracing::warn!(
                "turn.secret is not set: using a random secret for this process (credentials are \
                 handed out in WHIP/WHEP Link headers; set turn.secret to share them with other services)"
            );
            config.turn.secret = Some(crate::turn::credentials::random_secret());
        }
        // The embedded TURN server exists to reach this SFU: its own media sockets (exactly those
        // addresses and ports) are allowed peers even when private or loopback.
        let mut server = crate::turn::server::TurnServer::bind(config.turn.clone())
            .map_err(|e| format!("turn.listen {}: {e}", config.turn.listen))?;
        let mut own: Vec<SocketAddr> = announced.iter().flatten().copied().collect();
        own.extend(handles.iter().flat_map(|h| h.local_addrs.iter().copied()));
        own.sort();
        own.dedup();
        server.allow_own_peers(own);
        Some(server)
    } else {
        None
    };
    let turn_addr = match &turn {
        Some(t) => Some(t.local_addr()?),
        None => None,
    };
    if config.auth.jwt_secret.is_none() {
        tracing::warn!(
            "auth.jwt_secret is not set: anyone who can reach {} may publish and watch. Set it (or SLUICE_AUTH_JWT_SECRET) to require tokens",
            config.http.listen
        );
    }
    let listener = TcpListener::bind(config.http.listen)
        .map_err(|e| format!("http.listen {}: {e}", config.http.listen))?;
    listener.set_nonblocking(true)?;
    let http_addr = listener.local_addr()?;

    let control = Arc::new(Control {
        rooms: Mutex::new(crate::control::room_hub::RoomHub::new(
            crate::control::room_config(&config),
        )),
        live: Mutex::new(crate::control::Live::new(config.clone())),
        draining: std::sync::atomic::AtomicBool::new(false),
        config,
        registry: Mutex::new(Default::default()),
        shards: handles,
        announced,
        template,
        metrics: crate::metrics::export::Exporter::new(io_backend),
        mesh,
        turn_stats: Arc::new(crate::turn::TurnStats::default()),
        turn_addr,
        simulcast_tracks: Mutex::new(Default::default()),
    });
    let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
    let ctl = control.clone();
    let thread = std::thread::Builder::new()
        .name("sluice-control".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            rt.block_on(control_thread(
                ctl,
                listener,
                events_rx,
                shutdown_rx,
                hooks,
                turn,
            ));
        })?;
    tracing::info!(%http_addr, "signaling listening");
    Ok(Server {
        http_addr,
        control,
        shutdown: Some(shutdown_tx),
        thread: Some(thread),
    })
}

/// What only the binary can provide: re-reading the configuration's sources and changing the log
/// filter. With hooks, the control thread also handles SIGTERM/SIGINT (drain) and SIGHUP (reload).
pub struct Hooks {
    pub reload_config: ReloadConfig,
    pub set_log_level: SetLogLevel,
}

/// Re-reads the configuration from the sources `serve` started with.
pub type ReloadConfig = Box<dyn Fn() -> Result<Config, Vec<crate::config::ConfigError>> + Send>;
/// Replaces the log filter.
pub type SetLogLevel = Box<dyn Fn(&str) -> Result<(), String> + Send>;

async fn control_thread(
    ctl: SharedControl,
    listener: TcpListener,
    mut events_rx: tokio::sync::mpsc::Receiver<crate::shard::ShardEvent>,
    shutdown_rx: tokio::sync::oneshot::Receiver<()>,
    hooks: Option<Hooks>,
    turn: Option<crate::turn::server::TurnServer>,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let listener = tokio::net::TcpListener::from_std(listener).expect("register listener");
    let (turn_stop, turn_stop_rx) = tokio::sync::watch::channel(false);
    let turn_secret = ctl.live.lock().expect("live").turn_secret.clone();
    let (turn_secrets, turn_secrets_rx) = tokio::sync::watch::channel(turn_secret);
    let turn_task = turn.map(|t| {
        let stats = ctl.turn_stats.clone();
        tokio::spawn(async move {
            if let Err(e) = t
                .run_with_secrets(stats, turn_stop_rx, turn_secrets_rx)
                .await
            {
                tracing::error!(error = %e, "TURN server failed");
            }
        })
    });
    let events_ctl = ctl.clone();
    tokio::spawn(async move {
        while let Some(ev) = events_rx.recv().await {
            events_ctl.handle_event(ev);
        }
    });
    tokio::spawn(crate::control::ws::run_timers(ctl.clone()));
    let (stop_http, http_stopped) = tokio::sync::oneshot::channel::<()>();
    let app = crate::control::router(ctl.clone());
    let http = tokio::spawn(async move {
        let stop = async move {
            let _ = http_stopped.await;
        };
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stop)
            .await
        {
            tracing::error!(error = %e, "http server failed");
        }
    });
    sd_notify("READY=1");

    let drain = match hooks {
        None => {
            let _ = shutdown_rx.await;
            false
        }
        Some(hooks) => {
            let (Ok(mut term), Ok(mut int), Ok(mut hup)) = (
                signal(SignalKind::terminate()),
                signal(SignalKind::interrupt()),
                signal(SignalKind::hangup()),
            ) else {
                tracing::error!("cannot install signal handlers");
                return;
            };
            let mut shutdown_rx = shutdown_rx;
            loop {
                tokio::select! {
                    _ = &mut shutdown_rx => break false,
                    _ = term.recv() => { tracing::info!("SIGTERM: draining"); break true }
                    _ = int.recv() => { tracing::info!("SIGINT: draining"); break true }
                    _ = hup.recv() => {
                        reload(&ctl, &hooks);
                        let secret = ctl.live.lock().expect("live").turn_secret.clone();
                        turn_secrets.send_if_modified(|s| {
                            let changed = *s != secret;
                            *s = secret;
                            changed
                        });
                    }
                }
            }
        }
    };
    if drain {
        drain_sessions(&ctl).await;
    }
    // Room participants hear `left` (server_shutdown) before their sockets close.
    {
        let mut hub = ctl.rooms.lock().expect("rooms");
        hub.close_all(&ctl);
    }
    tokio::task::yield_now().await;
    let _ = stop_http.send(());
    let _ = http.await;
    // TURN relays media of the sessions kept through the drain, so it stops last.
    let _ = turn_stop.send(true);
    if let Some(t) = turn_task {
        let _ = t.await;
    }
    for s in &ctl.shards {
        let _ = s.send(ShardCommand::Shutdown);
    }
    tracing::info!("sluice stopped");
}

/// Refuse new sessions, keep the running ones until they end or the drain timeout passes.
async fn drain_sessions(ctl: &SharedControl) {
    use std::sync::atomic::Ordering;
    ctl.draining.store(true, Ordering::SeqCst);
    ctl.metrics.draining.set(1);
    sd_notify("STOPPING=1");
    let timeout = Duration::from_millis(ctl.live.lock().expect("live").drain_timeout_ms);
    let until = tokio::time::Instant::now() + timeout;
    loop {
        let left = ctl.registry.lock().expect("registry").sessions();
        if left == 0 {
            tracing::info!("drained: no sessions left");
            break;
        }
        if tokio::time::Instant::now() >= until {
            tracing::info!(
                sessions = left,
                ?timeout,
                "drain timeout: closing remaining sessions"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// SIGHUP: re-read the configuration and apply what can change live; say what changed.
fn reload(ctl: &SharedControl, hooks: &Hooks) {
    let new = match (hooks.reload_config)() {
        Ok(c) => c,
        Err(errors) => {
            for e in errors {
                tracing::error!("reload refused: {e}");
            }
            return;
        }
    };
    let old = ctl.live.lock().expect("live").config.clone();
    let mut changed = Vec::new();
    if new.log.level != old.log.level {
        match (hooks.set_log_level)(&new.log.level) {
            Ok(()) => changed.push(format!(
                "log.level {:?} -> {:?}",
                old.log.level, new.log.level
            )),
            Err(e) => tracing::error!("log.level {:?} not applied: {e}", new.log.level),
        }
    }
    if new.limits.max_peers != old.limits.max_peers {
        changed.push(format!(
            "limits.max_peers {} -> {}",
            old.limits.max_peers, new.limits.max_peers
        ));
    }
    if new.auth.jwt_secret != old.auth.jwt_secret {
        changed.push(match (&old.auth.jwt_secret, &new.auth.jwt_secret) {
            (None, Some(_)) => "auth.jwt_secret set: tokens now required".to_string(),
            (Some(_), None) => "auth.jwt_secret removed: sluice is now OPEN".to_string(),
            _ => "auth.jwt_secret replaced".to_string(),
        });
    }
    if new.turn.secret != old.turn.secret && new.turn.secret.is_some() {
        changed.push("turn.secret replaced".to_string());
    }
    if new.limits.drain_timeout_ms != old.limits.drain_timeout_ms {
        changed.push(format!(
            "limits.drain_timeout_ms {} -> {}",
            old.limits.drain_timeout_ms, new.limits.drain_timeout_ms
        ));
    }
    let restart_only: Vec<&str> = [
        ("http", new.http != old.http),
        ("media", new.media != old.media),
        (
            "limits.max_body_bytes",
            new.limits.max_body_bytes != old.limits.max_body_bytes,
        ),
    ]
    .into_iter()
    .filter(|(_, differs)| *differs)
    .map(|(k, _)| k)
    .collect();
    if !restart_only.is_empty() {
        tracing::warn!(keys = ?restart_only, "changed in the configuration but only applied at restart");
    }
    let mut live = ctl.live.lock().expect("live");
    // A TURN secret generated at start stays unless the file now sets one.
    let keep_turn_secret = new.turn.secret.is_none();
    let turn_secret = live.turn_secret.clone();
    live.apply(new);
    if keep_turn_secret {
        live.turn_secret = turn_secret;
    }
    drop(live);
    if changed.is_empty() {
        tracing::info!("reload: nothing that can change live has changed");
    } else {
        tracing::info!("reload applied: {}", changed.join("; "));
    }
}

/// Tell systemd (Type=notify) about our state, when it supervises us.
fn sd_notify(state: &str) {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let path = path.to_string_lossy().into_owned();
    let addr = match path.strip_prefix('@') {
        Some(name) => UnixAddr::from_abstract_name(name.as_bytes()),
        None => UnixAddr::from_pathname(&path),
    };
    let sent = addr.and_then(|a| UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &a));
    if let Err(e) = sent {
        tracing::warn!(error = %e, "sd_notify({state}) failed");
    }
}

/// `sluice serve`: start and block until stopped.
pub fn run(config: Config, hooks: Hooks) -> Result<(), Box<dyn std::error::Error>> {
    let server = start_with(config, Some(hooks))?;
    server.wait();
    Ok(())
}
