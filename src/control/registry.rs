//! The registry of streams and sessions: who publishes what, who watches it, and on which shard.
//! Sans-IO: every change returns the route updates the shards must hear; the caller sends them.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use str0m::format::PayloadParams;

use crate::mesh::TrackId;
use crate::{SessionId, ShardId};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionKind {
    Publish,
    Play,
}

impl SessionKind {
    pub fn path(self) -> &'static str {
        match self {
            SessionKind::Publish => "whip",
            SessionKind::Play => "whep",
        }
    }
}

#[derive(Debug, Clone)]
pub struct SessionInfo {
    pub stream: String,
    pub kind: SessionKind,
    pub shard: ShardId,
    pub etag: String,
    pub tracks: Vec<TrackId>,
    pub connected: bool,
    /// The client's current ICE ufrag; a PATCH with another one is an ICE restart.
    pub remote_ufrag: String,
    /// The client's offer, replayed with new credentials on an ICE restart.
    pub offer: String,
}

#[derive(Debug, Default)]
struct Stream {
    id: u64,
    publisher: Option<SessionId>,
    publisher_shard: Option<ShardId>,
    /// The current publisher's codecs per track.
    codecs: HashMap<TrackId, Arc<[PayloadParams]>>,
    viewers: HashSet<SessionId>,
}

/// A change every shard must apply.
#[derive(Debug, Clone)]
pub enum RouteUpdate {
    Route {
        track: TrackId,
        publisher: Option<ShardId>,
        codecs: Arc<[PayloadParams]>,
    },
    Interest {
        track: TrackId,
        shard: ShardId,
        interested: bool,
    },
}

#[derive(Debug, PartialEq, Eq)]
pub enum RegistryError {
    /// The stream already has a publisher.
    Conflict,
    /// Nobody publishes the stream.
    NotPublished,
}

/// What a viewer can subscribe to on a stream: its track ids and the publisher's codecs.
#[derive(Debug, Clone)]
pub struct Published {
    pub stream_id: u64,
    pub tracks: Vec<(TrackId, Arc<[PayloadParams]>)>,
}

#[derive(Debug, Default)]
pub struct Registry {
    streams: HashMap<String, Stream>,
    /// Subscribers per (track, shard), WHEP viewers and room participants alike, so shards hear
    /// only 0 <-> 1 transitions. Track ids are unique in the process.
    interest: HashMap<(TrackId, ShardId), u32>,
    sessions: HashMap<SessionId, SessionInfo>,
    next_stream_id: u64,
}

impl Registry {
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// (publish sessions, play sessions).
    pub fn session_counts(&self) -> (u64, u64) {
        let publish = self
            .sessions
            .values()
            .filter(|s| s.kind == SessionKind::Publish)
            .count() as u64;
        (publish, self.sessions.len() as u64 - publish)
    }

    pub fn session(&self, id: &SessionId) -> Option<&SessionInfo> {
        self.sessions.get(id)
    }

    /// Record the client's offer (its ICE ufrag is what a restart changes), and a new ETag
    /// after an ICE restart.
    pub fn set_offer(&mut self, id: &SessionId, offer: String, etag: Option<String>) {
        if let Some(s) = self.sessions.get_mut(id) {
            s.remote_ufrag = offer
                .lines()
                .find_map(|l| l.trim().strip_prefix("a=ice-ufrag:"))
                .unwrap_or_default()
                .trim()
                .to_owned();
            s.offer = offer;
            if let Some(e) = etag {
                s.etag = e;
            }
        }
    }

    pub fn mark_connected(&mut self, id: &SessionId) {
        if let Some(s) = self.sessions.get_mut(id) {
            s.connected = true;
        }
    }

    /// The stream id a new publisher of `name` would get, or `Conflict` if it has one.
    pub fn prepare_publish(&mut self, name: &str) -> Result<u64, RegistryError> {
        if let Some(s) = self.streams.get(name) {
            return match s.publisher {
                Some(_) => Err(RegistryError::Conflict),
                None => Ok(s.id),
            };
        }
        Ok(self.next_stream_id + 1)
    }

    fn stream_entry(&mut self, name: &str) -> &mut Stream {
        if !self.streams.contains_key(name) {
            self.next_stream_id += 1;
            let id = self.next_stream_id;
            self.streams.insert(
                name.to_owned(),
                Stream {
                    id,
                    ..Default::default()
                },
            );
        }
        self.streams.get_mut(name).expect("inserted above")
    }

    /// Record a negotiated publisher. Every shard learns where its tracks are published now.
    pub fn add_publisher(
        &mut self,
        session: SessionId,
        name: &str,
        shard: ShardId,
        etag: String,
        tracks: Vec<(TrackId, Arc<[PayloadParams]>)>,
    ) -> Result<Vec<RouteUpdate>, RegistryError> {
        let stream = self.stream_entry(name);
        if stream.publisher.is_some() {
            return Err(RegistryError::Conflict);
        }
        stream.publisher = Some(session);
        stream.publisher_shard = Some(shard);
        stream.codecs.clear();
        let mut updates = Vec::new();
        for (track, codecs) in &tracks {
            stream.codecs.insert(*track, codecs.clone());
            updates.push(RouteUpdate::Route {
                track: *track,
                publisher: Some(shard),
                codecs: codecs.clone(),
            });
        }
        self.sessions.insert(
            session,
            SessionInfo {
                stream: name.to_owned(),
                kind: SessionKind::Publish,
                shard,
                etag,
                tracks: tracks.iter().map(|(t, _)| *t).collect(),
                connected: false,
                remote_ufrag: String::new(),
                offer: String::new(),
            },
        );
        Ok(updates)
    }

    /// What a new viewer of `name` can receive.
    pub fn published(&self, name: &str) -> Result<Published, RegistryError> {
        let s = self
            .streams
            .get(name)
            .filter(|s| s.publisher.is_some())
            .ok_or(RegistryError::NotPublished)?;
        let mut tracks: Vec<_> = s.codecs.iter().map(|(t, c)| (*t, c.clone())).collect();
        tracks.sort_by_key(|(t, _)| *t);
        Ok(Published {
            stream_id: s.id,
            tracks,
        })
    }

    /// Record a negotiated viewer subscribed to `tracks` of `name`.
    pub fn add_viewer(
        &mut self,
        session: SessionId,
        name: &str,
        shard: ShardId,
        etag: String,
        tracks: Vec<TrackId>,
    ) -> Vec<RouteUpdate> {
        let stream = self.stream_entry(name);
        stream.viewers.insert(session);
        let mut updates = Vec::new();
        for &track in &tracks {
            updates.extend(self.add_interest(track, shard));
        }
        self.sessions.insert(
            session,
            SessionInfo {
                stream: name.to_owned(),
                kind: SessionKind::Play,
                shard,
                etag,
                tracks,
                connected: false,
                remote_ufrag: String::new(),
                offer: String::new(),
            },
        );
        updates
    }

    /// Forget a session. A publisher's tracks become unrouted (viewers stay, waiting for the next
    /// publisher of the same name); a stream with neither is freed.
    pub fn remove(&mut self, session: &SessionId) -> Option<(SessionInfo, Vec<RouteUpdate>)> {
        let info = self.sessions.remove(session)?;
        let mut updates = Vec::new();
        let Some(stream) = self.streams.get_mut(&info.stream) else {
            return Some((info, updates));
        };
        match info.kind {
            SessionKind::Publish => {
                if stream.publisher == Some(*session) {
                    stream.publisher = None;
                    stream.publisher_shard = None;
                    for track in &info.tracks {
                        updates.push(RouteUpdate::Route {
                            track: *track,
                            publisher: None,
                            codecs: Arc::from(Vec::new()),
                        });
                    }
                }
            }
            SessionKind::Play => {
                stream.viewers.remove(session);
            }
        }
        if stream.publisher.is_none() && stream.viewers.is_empty() {
            self.streams.remove(&info.stream);
        }
        if info.kind == SessionKind::Play {
            for &track in &info.tracks {
                updates.extend(self.remove_interest(track, info.shard));
            }
        }
        Some((info, updates))
    }

    /// One more subscriber of `track` on `shard` (a viewer, or a room participant).
    pub fn add_interest(&mut self, track: TrackId, shard: ShardId) -> Option<RouteUpdate> {
        let n = self.interest.entry((track, shard)).or_insert(0);
        *n += 1;
        (*n == 1).then_some(RouteUpdate::Interest {
            track,
            shard,
            interested: true,
        })
    }

    /// One subscriber of `track` on `shard` fewer.
    pub fn remove_interest(&mut self, track: TrackId, shard: ShardId) -> Option<RouteUpdate> {
        let n = self.interest.get_mut(&(track, shard))?;
        *n -= 1;
        if *n > 0 {
            return None;
        }
        self.interest.remove(&(track, shard));
        Some(RouteUpdate::Interest {
            track,
            shard,
            interested: false,
        })
    }

    /// `(name, has publisher, viewers)` for every stream, sorted by name.
    pub fn list(&self) -> Vec<(String, bool, usize)> {
        let mut v: Vec<_> = self
            .streams
            .iter()
            .map(|(n, s)| (n.clone(), s.publisher.is_some(), s.viewers.len()))
            .collect();
        v.sort();
        v
    }

    pub fn streams(&self) -> usize {
        self.streams.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codecs() -> Arc<[PayloadParams]> {
        Arc::from(Vec::new())
    }

    #[test]
    fn second_publisher_conflicts_until_first_leaves() {
        let mut r = Registry::default();
        let a = SessionId(1);
        let id = r.prepare_publish("cam").unwrap();
        let t = TrackId::new(id, true);
        let up = r
            .add_publisher(a, "cam", 0, "e".into(), vec![(t, codecs())])
            .unwrap();
        assert!(matches!(
            up[0],
            RouteUpdate::Route {
                publisher: Some(0),
                ..
            }
        ));
        assert_eq!(r.prepare_publish("cam"), Err(RegistryError::Conflict));
        let (_, up) = r.remove(&a).unwrap();
        assert!(matches!(
            up[0],
            RouteUpdate::Route {
                publisher: None,
                ..
            }
        ));
        assert_eq!(r.streams(), 0, "nobody left: stream freed");
        assert!(r.prepare_publish("cam").is_ok());
    }

    #[test]
    fn viewers_keep_the_stream_and_its_track_ids() {
        let mut r = Registry::default();
        let id = r.prepare_publish("s").unwrap();
        let t = TrackId::new(id, false);
        r.add_publisher(SessionId(1), "s", 1, "e".into(), vec![(t, codecs())])
            .unwrap();
        let p = r.published("s").unwrap();
        assert_eq!(p.tracks[0].0, t);
        let up = r.add_viewer(SessionId(2), "s", 0, "e".into(), vec![t]);
        assert_eq!(up.len(), 1, "first viewer on shard 0: interest");
        let up = r.add_viewer(SessionId(3), "s", 0, "e".into(), vec![t]);
        assert!(up.is_empty(), "second viewer on the same shard: no news");
        r.remove(&SessionId(1)).unwrap();
        assert_eq!(r.published("s").unwrap_err(), RegistryError::NotPublished);
        // The next publisher of the same name gets the same stream, so the same track ids.
        assert_eq!(r.prepare_publish("s").unwrap(), id);
        r.add_publisher(SessionId(4), "s", 0, "e".into(), vec![(t, codecs())])
            .unwrap();
        let (_, up) = r.remove(&SessionId(2)).unwrap();
        assert!(up.is_empty());
        let (_, up) = r.remove(&SessionId(3)).unwrap();
        assert!(matches!(
            up[0],
            RouteUpdate::Interest {
                interested: false,
                ..
            }
        ));
        assert_eq!(r.list(), vec![("s".to_string(), true, 0)]);
    }
}
