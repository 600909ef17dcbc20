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
    start_with(config, false)
}

fn start_with(config: Config, signals: bool) -> Result<Server, Box<dyn std::error::Error>> {
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
    let (events_tx, mut events_rx) = tokio::sync::mpsc::channel(16 * 1024);

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
    let listener = TcpListener::bind(config.http.listen)
        .map_err(|e| format!("http.listen {}: {e}", config.http.listen))?;
    listener.set_nonblocking(true)?;
    let http_addr = listener.local_addr()?;

    let control = Arc::new(Control {
        config,
        registry: Mutex::new(Default::default()),
        shards: handles,
        announced,
        template,
        metrics: crate::metrics::export::Exporter::new(io_backend),
        mesh,
    });
    let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
    let ctl = control.clone();
    let shards_ctl = control.clone();
    let thread = std::thread::Builder::new()
        .name("sluice-control".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            rt.block_on(async move {
                let listener =
                    tokio::net::TcpListener::from_std(listener).expect("register listener");
                let events_ctl = ctl.clone();
                tokio::spawn(async move {
                    while let Some(ev) = events_rx.recv().await {
                        events_ctl.handle_event(ev);
                    }
                });
                let app = crate::control::router(ctl.clone());
                let stop = async move {
                    tokio::select! {
                        _ = shutdown_rx => {}
                        _ = signal(signals) => {}
                    }
                };
                if let Err(e) = axum::serve(listener, app)
                    .with_graceful_shutdown(stop)
                    .await
                {
                    tracing::error!(error = %e, "http server failed");
                }
            });
            for s in &shards_ctl.shards {
                let _ = s.send(ShardCommand::Shutdown);
            }
            tracing::info!("sluice stopped");
        })?;
    tracing::info!(%http_addr, "signaling listening");
    Ok(Server {
        http_addr,
        control,
        shutdown: Some(shutdown_tx),
        thread: Some(thread),
    })
}

async fn signal(enabled: bool) {
    use tokio::signal::unix::{signal, SignalKind};
    if !enabled {
        return std::future::pending().await;
    }
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping"),
        _ = int.recv() => tracing::info!("SIGINT: stopping"),
    }
}

/// `sluice serve`: start and block until stopped.
pub fn run(config: Config) -> Result<(), Box<dyn std::error::Error>> {
    let server = start_with(config, true)?;
    server.wait();
    Ok(())
}
