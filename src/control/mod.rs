//! The control thread: HTTP signaling (WHIP, WHEP), the registry of streams and sessions, and
//! placement of peers on shards. It negotiates each peer, then moves its `Rtc` to the owning shard
//! and never touches media sockets.

pub mod auth;
mod http;
pub mod negotiate;
pub mod placement;
pub mod registry;
pub mod room_hub;
pub mod rooms;
pub mod ws;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use crate::config::Config;
use crate::shard::{ShardCommand, ShardEvent, ShardHandle};
pub use http::router;
use negotiate::PeerTemplate;
use registry::{Registry, RouteUpdate};

/// State shared by the HTTP handlers. The control thread is single-threaded; the mutex only
/// satisfies axum's `Send` bounds and is never contended.
pub struct Control {
    /// The configuration sluice started with (what needs a restart to change).
    pub config: Config,
    /// What SIGHUP can change while running.
    pub live: Mutex<Live>,
    /// Set once a drain began: new sessions are refused.
    pub draining: std::sync::atomic::AtomicBool,
    pub registry: Mutex<Registry>,
    pub shards: Vec<ShardHandle>,
    /// Per shard: the candidate addresses announced in answers.
    pub announced: Vec<Vec<SocketAddr>>,
    pub template: PeerTemplate,
    pub metrics: crate::metrics::export::Exporter,
    pub mesh: Arc<crate::mesh::Mesh>,
    pub turn_stats: Arc<crate::turn::TurnStats>,
    /// Where the embedded TURN server listens (UDP and TCP), when it runs.
    pub turn_addr: Option<SocketAddr>,
    /// `/ws` rooms and their peers. Lock before `registry` when both are needed.
    pub rooms: Mutex<room_hub::RoomHub>,
    /// Video tracks whose latest WHIP publisher sends simulcast: their WHEP viewers get a
    /// bandwidth estimator.
    pub simulcast_tracks: Mutex<std::collections::HashSet<crate::mesh::TrackId>>,
}

pub type SharedControl = Arc<Control>;

/// Settings that a reload (SIGHUP) changes without dropping sessions.
#[derive(Debug, Clone)]
pub struct Live {
    pub config: Config,
    pub max_peers: usize,
    pub drain_timeout_ms: u64,
    /// HS256 secret of WHIP/WHEP/`/ws` tokens; `None` = open.
    pub jwt_secret: Option<String>,
    /// TURN REST API shared secret for the credentials handed out in Link headers.
    pub turn_secret: Option<String>,
}

impl Live {
    pub fn new(config: Config) -> Live {
        Live {
            max_peers: config.limits.max_peers,
            drain_timeout_ms: config.limits.drain_timeout_ms,
            jwt_secret: config.auth.jwt_secret.clone(),
            turn_secret: config.turn.secret.clone(),
            config,
        }
    }

    pub fn apply(&mut self, config: Config) {
        *self = Live::new(config);
    }
}

/// The rooms' limits from the configuration.
pub fn room_config(config: &Config) -> rooms::RoomConfig {
    rooms::RoomConfig {
        max_participants: config.limits.max_participants_per_room,
        ..Default::default()
    }
}

impl Control {
    /// Tell every shard about route changes.
    pub fn broadcast(&self, updates: Vec<RouteUpdate>) {
        for update in updates {
            for shard in &self.shards {
                let cmd = match &update {
                    RouteUpdate::Route {
                        track,
                        publisher,
                        codecs,
                    } => ShardCommand::TrackRoute {
                        track: *track,
                        publisher: *publisher,
                        codecs: codecs.clone(),
                    },
                    RouteUpdate::Interest {
                        track,
                        shard,
                        interested,
                    } => ShardCommand::TrackInterest {
                        track: *track,
                        shard: *shard,
                        interested: *interested,
                    },
                };
                if shard.send(cmd).is_err() {
                    tracing::error!(
                        shard = shard.id,
                        "shard command queue full: a route update was lost"
                    );
                }
            }
        }
    }

    /// React to what the shards report.
    pub fn handle_event(self: &Arc<Self>, event: ShardEvent) {
        match event {
            ShardEvent::Connected { session, shard } => {
                tracing::info!(%session, shard, "peer connected");
                self.registry
                    .lock()
                    .expect("registry")
                    .mark_connected(&session);
                self.rooms
                    .lock()
                    .expect("rooms")
                    .session_connected(self, session);
            }
            ShardEvent::Closed { session, reason } => {
                let removed = self.registry.lock().expect("registry").remove(&session);
                if let Some((info, updates)) = removed {
                    tracing::info!(%session, stream = %info.stream, reason = reason.as_str(), "peer closed");
                    self.broadcast(updates);
                }
                self.rooms
                    .lock()
                    .expect("rooms")
                    .session_closed(self, session);
            }
            ShardEvent::ChannelData {
                session,
                binary,
                data,
            } => self
                .rooms
                .lock()
                .expect("rooms")
                .channel_data(self, session, binary, &data),
            ShardEvent::AudioLevel { session, dbov, .. } => self
                .rooms
                .lock()
                .expect("rooms")
                .audio_level(self, session, dbov),
            ShardEvent::LinkStats {
                session,
                loss,
                rtt_ms,
            } => self
                .rooms
                .lock()
                .expect("rooms")
                .link_stats(self, session, loss, rtt_ms),
        }
    }
}
