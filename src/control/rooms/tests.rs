//! The room state machine on virtual time: clients are simulated by the messages they send, the
//! caller (control thread and shards) by the replies the tests make to each action.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::*;

/// A test bench: the rooms, a virtual clock and scripted clients.
struct Bench {
    rooms: Rooms,
    now: Instant,
}

fn config() -> RoomConfig {
    RoomConfig {
        max_participants: 4,
        ..RoomConfig::default()
    }
}

/// Messages sent to `to`, as JSON values.
fn sent_to(actions: &[Action], to: ParticipantId) -> Vec<Value> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Send { to: list, message } if list.contains(&to) => {
                Some(serde_json::from_str(&message.to_json()).unwrap())
            }
            _ => None,
        })
        .collect()
}

fn types(messages: &[Value]) -> Vec<String> {
    messages
        .iter()
        .map(|m| m["type"].as_str().unwrap().to_owned())
        .collect()
}

/// A short name for each action, to check order.
fn shape(actions: &[Action]) -> Vec<String> {
    actions
        .iter()
        .map(|a| match a {
            Action::Send { to, message } => {
                let v: Value = serde_json::from_str(&message.to_json()).unwrap();
                let to: Vec<String> = to.iter().map(ToString::to_string).collect();
                format!("send {} -> {}", v["type"].as_str().unwrap(), to.join(","))
            }
            Action::Publish {
                publisher, track, ..
            } => format!("publish {publisher} {track}"),
            Action::Unpublish { publisher, track } => format!("unpublish {publisher} {track}"),
            Action::Subscribe { subscriber, track } => format!("subscribe {subscriber} {track}"),
            Action::Unsubscribe { subscriber, track } => {
                format!("unsubscribe {subscriber} {track}")
            }
            Action::Renegotiate {
                participant,
                tracks,
            } => format!("renegotiate {participant} {}", tracks.len()),
            Action::NegotiatePublish { participant, .. } => format!("negotiate {participant}"),
            Action::ApplyAnswer { participant, .. } => format!("apply-answer {participant}"),
            Action::RemoteCandidate { participant, .. } => format!("candidate {participant}"),
            Action::Data { from, .. } => format!("data {from}"),
            Action::Close {
                participant,
                reason,
            } => format!("close {participant} {}", reason.as_str()),
            Action::RoomFreed { room } => format!("freed {room}"),
            Action::LayerCap {
                subscriber,
                track,
                max,
            } => format!(
                "layer-cap {subscriber} {track} {:?} {:?}",
                max.quality, max.max_height
            ),
        })
        .collect()
}

fn renegotiations(actions: &[Action]) -> Vec<(ParticipantId, Vec<TrackId>)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Renegotiate {
                participant,
                tracks,
            } => Some((*participant, tracks.iter().map(|t| t.track).collect())),
            _ => None,
        })
        .collect()
}

fn subscribes(actions: &[Action]) -> Vec<(ParticipantId, TrackId)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Subscribe { subscriber, track } => Some((*subscriber, *track)),
            _ => None,
        })
        .collect()
}

fn open_permissions() -> Permissions {
    Permissions {
        publish: true,
        subscribe: true,
    }
}

impl Bench {
    fn new(config: RoomConfig) -> Bench {
        Bench {
            rooms: Rooms::new(config),
            now: Instant::now(),
        }
    }

    fn advance(&mut self, ms: u64) {
        self.now += Duration::from_millis(ms);
    }

    fn request(&self, room: &str, identity: &str) -> JoinRequest {
        JoinRequest {
            room: room.into(),
            identity: Some(identity.into()),
            name: None,
            kind: ParticipantKind::Websocket,
            permissions: open_permissions(),
            auto_subscribe: true,
            ice_servers: vec![IceServer {
                urls: vec!["turn:127.0.0.1:3478".into()],
                username: Some("u".into()),
                credential: Some("c".into()),
            }],
            joined_at_unix_ms: 1_700_000_000_000,
        }
    }

    /// Join and complete the first subscribe negotiation.
    fn join(&mut self, room: &str, identity: &str) -> (ParticipantId, Vec<Action>) {
        let joined = self
            .rooms
            .join(self.request(room, identity), self.now)
            .unwrap();
        let mut actions = joined.actions;
        actions.extend(self.settle(&actions.clone()));
        (joined.participant, actions)
    }

    fn text(&mut self, id: ParticipantId, message: Value) -> Vec<Action> {
        self.rooms.handle_text(id, &message.to_string(), self.now)
    }

    /// Play the caller and the clients for every `Renegotiate` in `actions` (and the ones that
    /// follow): make an offer, have the client answer it. Returns the actions this caused.
    fn settle(&mut self, actions: &[Action]) -> Vec<Action> {
        let mut all = Vec::new();
        let mut pending = renegotiations(actions);
        while let Some((id, tracks)) = pending.pop() {
            let mids = tracks
                .iter()
                .enumerate()
                .map(|(i, t)| (i.to_string(), *t))
                .collect();
            let offer = self
                .rooms
                .subscriber_offer(id, "v=0 offer".into(), mids, self.now);
            let Some(seq) = sent_to(&offer, id)
                .iter()
                .find(|m| m["type"] == "offer")
                .map(|m| m["seq"].as_u64().unwrap())
            else {
                continue;
            };
            let answer = self.text(id, json!({"type":"answer","sdp":"v=0 answer","seq":seq}));
            pending.extend(renegotiations(&answer));
            all.extend(offer);
            all.extend(answer);
        }
        all
    }

    /// Offer and answer a publish with `(mid, kind, source)` m-lines.
    fn publish(&mut self, id: ParticipantId, tracks: &[(&str, Kind, Source)]) -> Vec<Action> {
        let declared: Vec<Value> = tracks
            .iter()
            .map(|(mid, _, source)| json!({"mid": mid, "source": source}))
            .collect();
        let negotiate = self.text(
            id,
            json!({"type":"offer","sdp":"v=0 pub","tracks":declared}),
        );
        assert_eq!(shape(&negotiate), [format!("negotiate {id}")]);
        let negotiated = tracks
            .iter()
            .map(|(mid, kind, _)| NegotiatedTrack {
                mid: (*mid).into(),
                kind: *kind,
                id: None,
            })
            .collect();
        self.rooms
            .publish_answered(id, "v=0 answer".into(), negotiated, self.now)
    }

    fn tracks_of(&self, id: ParticipantId) -> Vec<TrackId> {
        self.rooms
            .participant(id)
            .unwrap()
            .tracks()
            .iter()
            .map(|t| t.info.id)
            .collect()
    }
}

const AV: &[(&str, Kind, Source)] = &[
    ("0", Kind::Audio, Source::Mic),
    ("1", Kind::Video, Source::Camera),
];

#[test]
fn join_and_leave_are_announced_in_order() {
    let mut b = Bench::new(config());
    let joined = b.rooms.join(b.request("demo", "ann"), b.now).unwrap();
    let a = joined.participant;
    assert_eq!(
        shape(&joined.actions),
        ["send joined -> p1", "renegotiate p1 0"]
    );
    let welcome = &sent_to(&joined.actions, a)[0];
    assert_eq!(welcome["v"], 1);
    assert_eq!(welcome["room"], "demo");
    assert_eq!(welcome["participant"]["id"], "p1");
    assert_eq!(welcome["participant"]["identity"], "ann");
    assert_eq!(welcome["participant"]["name"], "ann");
    assert_eq!(welcome["participant"]["joinedAt"], 1_700_000_000_000u64);
    assert_eq!(welcome["participants"], json!([]));
    assert_eq!(welcome["dataChannel"], DATA_CHANNEL_LABEL);
    assert_eq!(welcome["iceServers"][0]["urls"][0], "turn:127.0.0.1:3478");
    assert_eq!(
        welcome["permissions"],
        json!({"publish":true,"subscribe":true})
    );
    assert_eq!(welcome["limits"]["maxMessageBytes"], 65536);
    b.settle(&joined.actions);

    let (bob, actions) = b.join("demo", "bob");
    assert_eq!(
        shape(&actions)[..3],
        [
            "send joined -> p2",
            "send participant_joined -> p1",
            "renegotiate p2 0"
        ]
    );
    assert_eq!(
        sent_to(&actions, bob)[0]["participants"][0]["identity"],
        "ann"
    );
    let (cid, _) = b.join("demo", "cat");

    let left = b.text(bob, json!({"type":"leave"}));
    assert_eq!(
        shape(&left),
        [
            "send participant_left -> p1,p3",
            "send left -> p2",
            "close p2 left"
        ]
    );
    assert_eq!(sent_to(&left, a)[0]["participant"], "p2");
    assert_eq!(sent_to(&left, a)[0]["reason"], "left");
    assert!(b.rooms.participant(bob).is_none());
    // Inputs for a participant who left are ignored.
    assert!(b.text(bob, json!({"type":"ping"})).is_empty());

    // A closed socket: no `left` to it, since nobody would read it.
    let gone = b.rooms.leave(cid, LeaveReason::Disconnected, b.now);
    assert_eq!(
        shape(&gone),
        ["send participant_left -> p1", "close p3 disconnected"]
    );
    assert_eq!(b.rooms.room("demo").unwrap().len(), 1);
}

#[test]
fn empty_room_is_freed() {
    let mut b = Bench::new(config());
    let (a, _) = b.join("demo", "ann");
    let (c, _) = b.join("other", "cat");
    assert_eq!(b.rooms.len(), 2);
    let out = b.rooms.leave(a, LeaveReason::Disconnected, b.now);
    assert_eq!(shape(&out), ["close p1 disconnected", "freed demo"]);
    assert!(b.rooms.room("demo").is_none());
    assert_eq!(b.rooms.room_of(a), None);
    assert_eq!(
        b.rooms.summaries(),
        [RoomSummary {
            room: "other".into(),
            participants: 1,
            tracks: 0
        }]
    );
    // A new join recreates it.
    let (again, _) = b.join("demo", "ann");
    assert_ne!(again, a, "participant ids are never reused");
    let shutdown = b.rooms.close_all(b.now);
    assert!(shape(&shutdown).contains(&format!("close {c} server_shutdown")));
    assert!(b.rooms.is_empty());
    assert_eq!(b.rooms.participant_count(), 0);
}

#[test]
fn publishing_subscribes_the_others_and_renegotiates_them() {
    let mut b = Bench::new(config());
    let (a, _) = b.join("demo", "ann");
    let (bob, _) = b.join("demo", "bob");
    let out = b.publish(a, AV);
    let [audio, video] = b.tracks_of(a)[..] else {
        panic!()
    };
    assert_eq!(audio.kind(), Kind::Audio);
    assert_eq!(video.kind(), Kind::Video);
    assert_eq!(
        shape(&out),
        [
            format!("publish p1 {audio}"),
            format!("publish p1 {video}"),
            "send answer -> p1".into(),
            "send track_published -> p2".into(),
            "send track_published -> p2".into(),
            format!("subscribe p2 {audio}"),
            format!("subscribe p2 {video}"),
            "renegotiate p2 2".into(),
        ]
    );
    let answer = &sent_to(&out, a)[0];
    assert_eq!(answer["sdp"], "v=0 answer");
    assert_eq!(
        answer["tracks"],
        json!([{"mid":"0","track":audio.to_string()},{"mid":"1","track":video.to_string()}])
    );
    let published = &sent_to(&out, bob)[1];
    assert_eq!(published["participant"], "p1");
    assert_eq!(published["track"]["kind"], "video");
    assert_eq!(published["track"]["source"], "camera");
    assert_eq!(published["track"]["muted"], false);

    // The subscribe offer names whose track is on which mid.
    let Action::Renegotiate { tracks, .. } = &out[7] else {
        panic!()
    };
    assert_eq!(tracks[1].publisher, a);
    assert_eq!(tracks[1].kind, Kind::Video);
    let offer = b.rooms.subscriber_offer(
        bob,
        "v=0 sub".into(),
        vec![("0".into(), audio), ("1".into(), video)],
        b.now,
    );
    let offer = &sent_to(&offer, bob)[0];
    assert_eq!(offer["type"], "offer");
    assert_eq!(
        offer["tracks"][1],
        json!({"mid":"1","track":video.to_string(),"participant":"p1"})
    );
    let seq = offer["seq"].as_u64().unwrap();
    let applied = b.text(bob, json!({"type":"answer","sdp":"ans","seq":seq}));
    assert_eq!(
        applied,
        [Action::ApplyAnswer {
            participant: bob,
            sdp: "ans".into()
        }]
    );

    // Re-offering the same m-lines keeps the tracks: no event, only the answer.
    let again = b.publish(a, AV);
    assert_eq!(shape(&again), ["send answer -> p1"]);
    assert_eq!(b.tracks_of(a), [audio, video]);

    // Dropping the video m-line unpublishes it and renegotiates bob.
    let out = b.publish(a, &AV[..1]);
    assert_eq!(
        shape(&out),
        [
            format!("unsubscribe p2 {video}"),
            format!("unpublish p1 {video}"),
            "send answer -> p1".into(),
            "send track_unpublished -> p2".into(),
            "renegotiate p2 1".into(),
        ]
    );
    assert_eq!(renegotiations(&out), [(bob, vec![audio])]);

    // The same mid turned into a screen share is a new track.
    let out = b.publish(
        a,
        &[
            ("0", Kind::Audio, Source::Mic),
            ("1", Kind::Video, Source::Screen),
        ],
    );
    let screen = b.tracks_of(a)[1];
    assert_ne!(screen, video);
    assert!(shape(&out).contains(&format!("publish p1 {screen}")));
    assert_eq!(
        b.rooms.participant(a).unwrap().tracks()[1].info.source,
        Source::Screen
    );
}

#[test]
fn late_joiner_gets_everyone_and_everything() {
    let mut b = Bench::new(config());
    let (a, _) = b.join("demo", "ann");
    let (bob, _) = b.join("demo", "bob");
    let pa = b.publish(a, AV);
    b.settle(&pa);
    let pb = b.publish(bob, AV);
    b.settle(&pb);
    let all: Vec<TrackId> = [b.tracks_of(a), b.tracks_of(bob)].concat();

    let joined = b.rooms.join(b.request("demo", "cat"), b.now).unwrap();
    let c = joined.participant;
    let welcome = &sent_to(&joined.actions, c)[0];
    let others = welcome["participants"].as_array().unwrap();
    assert_eq!(others.len(), 2);
    assert_eq!(others[0]["identity"], "ann");
    assert_eq!(others[1]["identity"], "bob");
    assert_eq!(others[0]["tracks"].as_array().unwrap().len(), 2);
    assert_eq!(others[1]["tracks"][1]["id"], all[3].to_string());
    let mut subscribed: Vec<TrackId> = subscribes(&joined.actions).iter().map(|s| s.1).collect();
    subscribed.sort();
    let mut expected = all.clone();
    expected.sort();
    assert_eq!(subscribed, expected);
    // One offer with all four tracks, after the subscriptions.
    assert_eq!(renegotiations(&joined.actions), [(c, expected)]);
    assert!(matches!(
        joined.actions.last(),
        Some(Action::Renegotiate { .. })
    ));
}

#[test]
fn selective_subscription() {
    let mut b = Bench::new(config());
    let (a, _) = b.join("demo", "ann");
    let pa = b.publish(a, AV);
    b.settle(&pa);
    let [audio, video] = b.tracks_of(a)[..] else {
        panic!()
    };
    let mut request = b.request("demo", "cat");
    request.auto_subscribe = false;
    let joined = b.rooms.join(request, b.now).unwrap();
    let c = joined.participant;
    assert!(subscribes(&joined.actions).is_empty());
    assert_eq!(renegotiations(&joined.actions), [(c, vec![])]);
    b.settle(&joined.actions);

    let out = b.text(c, json!({"type":"subscribe","tracks":[video.to_string()]}));
    assert_eq!(
        shape(&out),
        [format!("subscribe p2 {video}"), "renegotiate p2 1".into()]
    );
    b.settle(&out);
    // Subscribing again changes nothing.
    assert!(b
        .text(c, json!({"type":"subscribe","tracks":[video.to_string()]}))
        .is_empty());
    // A later track of ann is not added automatically.
    let more = b.publish(a, &[AV[0], AV[1], ("2", Kind::Video, Source::Screen)]);
    assert!(subscribes(&more).is_empty());

    let out = b.text(
        c,
        json!({"type":"unsubscribe","tracks":[video.to_string()]}),
    );
    assert_eq!(
        shape(&out),
        [format!("unsubscribe p2 {video}"), "renegotiate p2 0".into()]
    );

    // Unknown tracks and one's own are refused by name; the known ones still apply.
    let (d, _) = b.join("demo", "dan");
    let out = b.text(
        d,
        json!({"type":"unsubscribe","tracks":[audio.to_string(), "t999"]}),
    );
    assert_eq!(
        shape(&out)[..2],
        [format!("unsubscribe p3 {audio}"), "send error -> p3".into()]
    );
    let err = &sent_to(&out, d)[0];
    assert_eq!(err["code"], "unknown_track");
    assert!(err["message"].as_str().unwrap().contains("t999"));
    let own = b.text(a, json!({"type":"subscribe","tracks":[audio.to_string()]}));
    assert_eq!(sent_to(&own, a)[0]["code"], "unknown_track");
}

#[test]
fn one_server_offer_in_flight_at_a_time() {
    let mut b = Bench::new(config());
    let (a, _) = b.join("demo", "ann");
    let (bob, _) = b.join("demo", "bob");
    let out = b.publish(a, &AV[..1]);
    assert_eq!(renegotiations(&out).len(), 1);
    let audio = b.tracks_of(a)[0];
    let offer = b
        .rooms
        .subscriber_offer(bob, "o1".into(), vec![("0".into(), audio)], b.now);
    let seq = sent_to(&offer, bob)[0]["seq"].as_u64().unwrap();

    // Ann adds video while bob's answer is pending: bob is subscribed, not renegotiated yet.
    let out = b.publish(a, AV);
    let video = b.tracks_of(a)[1];
    assert_eq!(subscribes(&out), [(bob, video)]);
    assert!(renegotiations(&out).is_empty());

    // A stale answer is refused and changes nothing.
    let stale = b.text(bob, json!({"type":"answer","sdp":"x","seq":seq + 7}));
    assert_eq!(sent_to(&stale, bob)[0]["code"], "unexpected_answer");
    assert_eq!(stale.len(), 1);

    // The answer is applied, then the next offer is asked for with the full set.
    let out = b.text(bob, json!({"type":"answer","sdp":"a1","seq":seq}));
    assert_eq!(shape(&out), ["apply-answer p2", "renegotiate p2 2"]);
    assert_eq!(renegotiations(&out), [(bob, vec![audio, video])]);
    let offer = b.rooms.subscriber_offer(bob, "o2".into(), vec![], b.now);
    assert_eq!(sent_to(&offer, bob)[0]["seq"], seq + 1);
    // An offer nobody asked for is ignored.
    assert!(b
        .rooms
        .subscriber_offer(bob, "o3".into(), vec![], b.now)
        .is_empty());
}

#[test]
fn unanswered_offer_times_out() {
    let mut b = Bench::new(config());
    let (a, _) = b.join("demo", "ann");
    let joined = b.rooms.join(b.request("demo", "bob"), b.now).unwrap();
    let bob = joined.participant;
    b.rooms.subscriber_offer(bob, "o".into(), vec![], b.now);
    assert_eq!(
        b.rooms.poll_timeout(b.now),
        Some(b.now + Duration::from_secs(15))
    );
    b.advance(14_999);
    assert!(b.rooms.handle_timeout(b.now).is_empty());
    b.advance(1);
    let out = b.rooms.handle_timeout(b.now);
    assert_eq!(
        shape(&out),
        [
            "send participant_left -> p1",
            "send left -> p2",
            "close p2 timeout"
        ]
    );
    assert_eq!(sent_to(&out, a)[0]["reason"], "timeout");
    assert_eq!(b.rooms.poll_timeout(b.now), None);
}

#[test]
fn leaving_publisher_is_unsubscribed_everywhere() {
    let mut b = Bench::new(config());
    let (a, _) = b.join("demo", "ann");
    let (bob, _) = b.join("demo", "bob");
    let (c, _) = b.join("demo", "cat");
    let pa = b.publish(a, AV);
    b.settle(&pa);
    let [audio, video] = b.tracks_of(a)[..] else {
        panic!()
    };
    let out = b.rooms.peer_closed(a, PcKind::Publish, b.now);
    assert_eq!(
        shape(&out),
        [
            format!("unsubscribe p2 {audio}"),
            format!("unsubscribe p3 {audio}"),
            format!("unpublish p1 {audio}"),
            format!("unsubscribe p2 {video}"),
            format!("unsubscribe p3 {video}"),
            format!("unpublish p1 {video}"),
            "send participant_left -> p2,p3".into(),
            "send left -> p1".into(),
            "close p1 peer_closed".into(),
            "renegotiate p2 0".into(),
            "renegotiate p3 0".into(),
        ]
    );
    assert_eq!(sent_to(&out, bob)[0]["reason"], "peer_closed");
    assert_eq!(b.rooms.room("demo").unwrap().track_count(), 0);
    // A subscriber leaving drops its own subscriptions from the data plane.
    let pb = b.publish(bob, &AV[..1]);
    b.settle(&pb);
    let bob_audio = b.tracks_of(bob)[0];
    let out = b.rooms.leave(c, LeaveReason::Disconnected, b.now);
    assert_eq!(shape(&out)[0], format!("unsubscribe p3 {bob_audio}"));
}

#[test]
fn mute_and_unmute_reach_the_others_once() {
    let mut b = Bench::new(config());
    let (a, _) = b.join("demo", "ann");
    let (bob, _) = b.join("demo", "bob");
    b.publish(a, AV);
    let video = b.tracks_of(a)[1];
    let out = b.text(a, json!({"type":"mute","track":video.to_string()}));
    assert_eq!(shape(&out), ["send track_muted -> p2"]);
    assert_eq!(
        sent_to(&out, bob)[0],
        json!({"v":1,"type":"track_muted","participant":"p1","track":video.to_string()})
    );
    assert!(b
        .text(a, json!({"type":"mute","track":video.to_string()}))
        .is_empty());
    assert!(b.rooms.participant(a).unwrap().tracks()[1].info.muted);
    let out = b.text(a, json!({"type":"unmute","track":video.to_string()}));
    assert_eq!(shape(&out), ["send track_unmuted -> p2"]);
    // Only one's own tracks.
    let out = b.text(bob, json!({"type":"mute","track":video.to_string()}));
    assert_eq!(sent_to(&out, bob)[0]["code"], "unknown_track");
    assert_eq!(out.len(), 1);
    // Declared muted at publication: published muted.
    let (c, _) = b.join("demo", "cat");
    b.text(
        c,
        json!({"type":"offer","sdp":"v=0","tracks":[{"mid":"0","muted":true}]}),
    );
    let out = b.rooms.publish_answered(
        c,
        "ans".into(),
        vec![NegotiatedTrack {
            mid: "0".into(),
            kind: Kind::Audio,
            id: None,
        }],
        b.now,
    );
    let announced = &sent_to(&out, a)[0];
    assert_eq!(announced["track"]["muted"], true);
    assert_eq!(announced["track"]["source"], "mic");
}

#[test]
fn speakers_top_three_at_most_every_300ms() {
    let mut b = Bench::new(RoomConfig {
        max_participants: 10,
        ..RoomConfig::default()
    });
    let ids: Vec<ParticipantId> = ["a", "b", "c", "d", "e"]
        .iter()
        .map(|n| b.join("demo", n).0)
        .collect();
    let out = b.rooms.audio_level(ids[0], 40, b.now);
    let first = &sent_to(&out, ids[4])[0];
    assert_eq!(first["type"], "speakers");
    assert_eq!(
        first["speakers"],
        json!([{"participant":"p1","level":0.01}])
    );
    assert_eq!(
        sent_to(&out, ids[0]).len(),
        1,
        "everyone hears it, the speaker too"
    );

    b.advance(100);
    let mut out = Vec::new();
    for (i, dbov) in [(1, 20), (2, 30), (3, 10), (4, 127)] {
        out.extend(b.rooms.audio_level(ids[i], dbov, b.now));
    }
    assert!(out.is_empty(), "within 300 ms of the last one");
    assert_eq!(
        b.rooms.poll_timeout(b.now),
        Some(b.now + Duration::from_millis(200))
    );
    b.advance(200);
    let out = b.rooms.handle_timeout(b.now);
    let speakers = &sent_to(&out, ids[0])[0]["speakers"];
    let order: Vec<&str> = speakers
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["participant"].as_str().unwrap())
        .collect();
    assert_eq!(order, ["p4", "p2", "p3"], "loudest first, three at most");
    // Nothing changes: nothing is sent.
    b.advance(400);
    assert!(b.rooms.audio_level(ids[3], 12, b.now).is_empty());
    // A speaker leaving updates the list.
    let out = b.rooms.leave(ids[3], LeaveReason::Disconnected, b.now);
    let speakers = sent_to(&out, ids[0]);
    assert_eq!(types(&speakers), ["participant_left", "speakers"]);
    assert_eq!(speakers[1]["speakers"][0]["participant"], "p2");
}

#[test]
fn connection_quality_is_announced_on_change() {
    let mut b = Bench::new(config());
    let (a, _) = b.join("demo", "ann");
    let (bob, _) = b.join("demo", "bob");
    let out = b.rooms.link_stats(a, 0.0, 40, b.now);
    assert_eq!(shape(&out), ["send connection_quality -> p1,p2"]);
    assert_eq!(sent_to(&out, bob)[0]["quality"], "excellent");
    assert!(b.rooms.link_stats(a, 0.01, 50, b.now).is_empty());
    let out = b.rooms.link_stats(a, 0.15, 50, b.now);
    assert_eq!(sent_to(&out, a)[0]["quality"], "poor");
}

#[test]
fn full_room_refuses_cleanly() {
    let mut b = Bench::new(RoomConfig {
        max_participants: 2,
        ..RoomConfig::default()
    });
    let (a, _) = b.join("demo", "ann");
    let (bob, _) = b.join("demo", "bob");
    for i in 0..20 {
        let refusal = b
            .rooms
            .join(b.request("demo", &format!("x{i}")), b.now)
            .unwrap_err();
        assert_eq!(refusal, JoinRefusal::RoomFull { max: 2 });
        assert_eq!(refusal.code().as_str(), "room_full");
        assert_eq!(refusal.http_status(), 503);
        assert_eq!(refusal.close_code(), 4503);
        let msg = serde_json::to_value(refusal.to_message()).unwrap();
        assert_eq!(msg["code"], "room_full");
    }
    assert_eq!(b.rooms.room("demo").unwrap().len(), 2);
    // Other rooms are not affected.
    assert!(b.rooms.join(b.request("other", "x"), b.now).is_ok());

    // The same identity reconnecting replaces its old session, even in a full room.
    let joined = b.rooms.join(b.request("demo", "bob"), b.now).unwrap();
    let shapes = shape(&joined.actions);
    assert_eq!(
        shapes[..3],
        [
            "send participant_left -> p1",
            "send left -> p2",
            "close p2 replaced"
        ]
    );
    assert_eq!(shapes[3], format!("send joined -> {}", joined.participant));
    assert_eq!(sent_to(&joined.actions, a)[0]["reason"], "replaced");
    assert!(b.rooms.participant(bob).is_none());
    assert_eq!(b.rooms.room("demo").unwrap().len(), 2);
}

#[test]
fn bad_names_are_refused() {
    let mut b = Bench::new(config());
    let mut r = b.request("bad room", "ann");
    assert_eq!(
        b.rooms.join(r.clone(), b.now).unwrap_err(),
        JoinRefusal::BadName("the room name")
    );
    r.room = "a~b".into();
    assert!(b.rooms.join(r.clone(), b.now).is_err());
    r.room = "ok".into();
    r.identity = Some("ann\n".into());
    assert_eq!(
        b.rooms.join(r.clone(), b.now).unwrap_err().code(),
        ErrorCode::BadName
    );
    r.identity = None;
    r.name = Some("x\u{0}".into());
    assert!(b.rooms.join(r.clone(), b.now).is_err());
    r.name = Some(String::new());
    let joined = b.rooms.join(r, b.now).unwrap();
    let p = b.rooms.participant(joined.participant).unwrap();
    assert_eq!(p.identity, format!("guest-{}", joined.participant.0));
    assert_eq!(p.name, p.identity);
    assert!(b.rooms.is_empty() || b.rooms.len() == 1);
}

#[test]
fn malformed_and_oversized_messages_get_errors_and_touch_nobody_else() {
    let mut b = Bench::new(RoomConfig {
        max_message_bytes: 1024,
        ..config()
    });
    let (a, _) = b.join("demo", "ann");
    let (bob, _) = b.join("demo", "bob");
    let big = json!({"type":"ping","pad":"x".repeat(2000)}).to_string();
    let cases: Vec<(String, &str)> = vec![
        ("{nope".into(), "bad_message"),
        ("[]".into(), "bad_message"),
        (r#"{"type":"teleport"}"#.into(), "unknown_type"),
        (r#"{"v":9,"type":"ping"}"#.into(), "unsupported_version"),
        (r#"{"type":"offer"}"#.into(), "bad_message"),
        (
            r#"{"type":"subscribe","tracks":"all"}"#.into(),
            "bad_message",
        ),
        (r#"{"type":"join","room":"demo"}"#.into(), "already_joined"),
        (
            r#"{"type":"answer","sdp":"x","seq":1}"#.into(),
            "unexpected_answer",
        ),
        (
            r#"{"type":"offer","sdp":" ","tracks":[]}"#.into(),
            "bad_message",
        ),
        (
            r#"{"type":"offer","sdp":"v=0","tracks":[{"mid":"0"},{"mid":"0"}]}"#.into(),
            "bad_message",
        ),
        (
            r#"{"type":"offer","sdp":"v=0","tracks":[{"mid":"0","simulcast":[{"rid":"a b"}]}]}"#
                .into(),
            "bad_message",
        ),
        (big, "too_large"),
    ];
    for (text, code) in cases {
        let out = b.rooms.handle_text(a, &text, b.now);
        assert_eq!(out.len(), 1, "{text:.60}: {:?}", shape(&out));
        let reply = &sent_to(&out, a)[0];
        assert_eq!(reply["type"], "error");
        assert_eq!(reply["code"], code, "{text:.60}");
        assert!(sent_to(&out, bob).is_empty());
    }
    let out = b.rooms.handle_binary(a, 10, b.now);
    assert_eq!(sent_to(&out, a)[0]["code"], "bad_message");
    // Both are still in the room and ann's socket still works.
    assert_eq!(b.rooms.room("demo").unwrap().len(), 2);
    let pong = b.text(a, json!({"type":"ping","ts":42}));
    assert_eq!(sent_to(&pong, a)[0], json!({"v":1,"type":"pong","ts":42}));
}

#[test]
fn message_flood_is_rate_limited_quietly() {
    let mut b = Bench::new(config());
    let (a, _) = b.join("demo", "ann");
    let (bob, _) = b.join("demo", "bob");
    b.advance(10_000); // a full bucket
    let mut pongs = 0;
    let mut limited = 0;
    for _ in 0..500 {
        for action in b.rooms.handle_text(a, r#"{"type":"ping"}"#, b.now) {
            let Action::Send { to, message } = action else {
                panic!("{action:?}")
            };
            assert_eq!(to, [a]);
            match message {
                ServerMessage::Pong { .. } => pongs += 1,
                ServerMessage::Error {
                    code: ErrorCode::RateLimited,
                    ..
                } => limited += 1,
                other => panic!("{other:?}"),
            }
        }
    }
    assert_eq!(pongs, 50, "the burst");
    assert_eq!(limited, 1, "one error per second, not one per message");
    b.advance(1000);
    let out = b.text(a, json!({"type":"ping"}));
    assert_eq!(types(&sent_to(&out, a)), ["pong"]);
    assert_eq!(b.rooms.room("demo").unwrap().len(), 2);
    assert!(b.rooms.participant(bob).is_some());
}

#[test]
fn data_is_relayed_tagged_with_the_sender() {
    let mut b = Bench::new(config());
    let (a, _) = b.join("demo", "ann");
    let (bob, _) = b.join("demo", "bob");
    let (c, _) = b.join("demo", "cat");
    let whip = b
        .rooms
        .join(JoinRequest::whip("demo", None, 0), b.now)
        .unwrap()
        .participant;
    let out = b.rooms.data(bob, false, b"hello", b.now);
    let [Action::Data {
        from,
        to,
        binary,
        frame,
    }] = &out[..]
    else {
        panic!("{out:?}")
    };
    assert_eq!((*from, to.clone(), *binary), (bob, vec![a, c], false));
    assert_eq!(&frame[..], b"p2\nhello");
    assert!(!to.contains(&whip), "a WHIP publisher has no data channel");
    let out = b.rooms.data(a, true, &[0, 1, 10, 255], b.now);
    let Action::Data { frame, binary, .. } = &out[0] else {
        panic!()
    };
    assert!(*binary);
    assert_eq!(&frame[..], b"p1\n\x00\x01\x0a\xff");

    // Oversized: an error to the sender only.
    let big = vec![b'x'; 16 * 1024 + 1];
    let out = b.rooms.data(a, false, &big, b.now);
    assert_eq!(shape(&out), ["send error -> p1"]);
    assert_eq!(sent_to(&out, a)[0]["code"], "too_large");
    // Over the rate: dropped, one error.
    let mut relayed = 0;
    let mut errors = 0;
    for _ in 0..200 {
        for action in b.rooms.data(c, false, b"x", b.now) {
            match action {
                Action::Data { .. } => relayed += 1,
                Action::Send { .. } => errors += 1,
                other => panic!("{other:?}"),
            }
        }
    }
    assert_eq!((relayed, errors), (60, 1));
    // Alone in a room: nothing to relay.
    let (solo, _) = b.join("solo", "sam");
    assert!(b.rooms.data(solo, false, b"echo?", b.now).is_empty());
}

#[test]
fn whip_publisher_is_a_participant_and_participants_are_watchable() {
    let mut b = Bench::new(config());
    let (a, _) = b.join("demo", "ann");
    let joined = b
        .rooms
        .join(JoinRequest::whip("demo", Some("obs".into()), 5), b.now)
        .unwrap();
    let w = joined.participant;
    // No socket: nothing is sent to it, no subscribe connection; the others hear of it.
    assert_eq!(shape(&joined.actions), ["send participant_joined -> p1"]);
    assert_eq!(
        sent_to(&joined.actions, a)[0]["participant"]["kind"],
        "whip"
    );
    assert_eq!(
        sent_to(&joined.actions, a)[0]["participant"]["name"],
        "demo"
    );
    // Its tracks come from the registry, with the registry's ids.
    let (ra, rv) = (TrackId::new(3, Kind::Audio), TrackId::new(3, Kind::Video));
    let out = b.rooms.whip_published(
        w,
        vec![
            NegotiatedTrack {
                mid: "0".into(),
                kind: Kind::Audio,
                id: Some(ra),
            },
            NegotiatedTrack {
                mid: "1".into(),
                kind: Kind::Video,
                id: Some(rv),
            },
        ],
        b.now,
    );
    assert_eq!(
        shape(&out),
        [
            format!("publish p2 {ra}"),
            format!("publish p2 {rv}"),
            "send track_published -> p1".into(),
            "send track_published -> p1".into(),
            format!("subscribe p1 {ra}"),
            format!("subscribe p1 {rv}"),
            "renegotiate p1 2".into(),
        ]
    );
    // One WHIP publisher per stream; identities do not cross kinds.
    assert_eq!(
        b.rooms
            .join(JoinRequest::whip("demo", None, 0), b.now)
            .unwrap_err(),
        JoinRefusal::StreamTaken
    );
    let r = b.rooms.join(b.request("demo", "obs"), b.now).unwrap_err();
    assert_eq!(
        (r.clone(), r.http_status()),
        (JoinRefusal::IdentityTaken, 409)
    );

    // WHEP `demo~ann`: camera and mic; `screen`: the screen share.
    let pa = b.publish(a, &[AV[0], AV[1], ("2", Kind::Video, Source::Screen)]);
    b.settle(&pa);
    let [mic, cam, screen] = b.tracks_of(a)[..] else {
        panic!()
    };
    assert_eq!(
        b.rooms.watch("demo", "ann", false),
        Ok(WatchTarget {
            participant: a,
            audio: Some(mic),
            video: Some(cam)
        })
    );
    assert_eq!(
        b.rooms.watch("demo", "ann", true),
        Ok(WatchTarget {
            participant: a,
            audio: None,
            video: Some(screen)
        })
    );
    assert_eq!(b.rooms.watch("demo", "obs", false).unwrap().video, Some(rv));
    assert_eq!(
        b.rooms.watch("demo", "zed", false),
        Err(WatchError::NotFound)
    );
    assert_eq!(
        b.rooms.watch("nope", "ann", false),
        Err(WatchError::NotFound)
    );
    let (quiet, _) = b.join("demo", "quiet");
    assert_eq!(b.rooms.participant(quiet).unwrap().tracks().len(), 0);
    assert_eq!(
        b.rooms.watch("demo", "quiet", false),
        Err(WatchError::NothingPublished)
    );
    assert_eq!(
        parse_watch_name("demo~ann"),
        Some(WatchName::Participant {
            room: "demo",
            identity: "ann"
        })
    );

    // WHIP `DELETE`: the participant leaves and its tracks with it.
    let out = b.rooms.leave(w, LeaveReason::Left, b.now);
    assert!(shape(&out).contains(&format!("unpublish p2 {rv}")));
    assert!(
        !shape(&out).iter().any(|s| s.starts_with("send left")),
        "no socket to tell"
    );
}

#[test]
fn rights_limit_what_a_participant_does() {
    let mut b = Bench::new(config());
    let (a, _) = b.join("demo", "ann");
    let mut viewer = b.request("demo", "viv");
    viewer.permissions.publish = false;
    let v = b.rooms.join(viewer, b.now).unwrap().participant;
    let out = b.text(
        v,
        json!({"type":"offer","sdp":"v=0","tracks":[{"mid":"0"}]}),
    );
    assert_eq!(shape(&out), ["send error -> p2"]);
    assert_eq!(sent_to(&out, v)[0]["code"], "forbidden");

    let mut talker = b.request("demo", "tom");
    talker.permissions.subscribe = false;
    let t = b.rooms.join(talker, b.now).unwrap().participant;
    let out = b.publish(a, AV);
    let subs = subscribes(&out);
    assert!(subs.iter().all(|(s, _)| *s == v), "{subs:?}");
    let video = b.tracks_of(a)[1];
    let out = b.text(t, json!({"type":"subscribe","tracks":[video.to_string()]}));
    assert_eq!(sent_to(&out, t)[0]["code"], "forbidden");
    // Data and events still reach a participant without media rights.
    let out = b.rooms.data(a, false, b"hi", b.now);
    assert!(matches!(&out[0], Action::Data { to, .. } if to.contains(&t)));
}

#[test]
fn publish_negotiation_is_serialized() {
    let mut b = Bench::new(config());
    let (a, _) = b.join("demo", "ann");
    let offer = json!({"type":"offer","sdp":"v=0","tracks":[{"mid":"0"}]});
    assert_eq!(shape(&b.text(a, offer.clone())), ["negotiate p1"]);
    let busy = b.text(a, offer.clone());
    assert_eq!(sent_to(&busy, a)[0]["code"], "negotiation_in_progress");
    let failed = b.rooms.publish_failed(a, "no common codec", b.now);
    let err = &sent_to(&failed, a)[0];
    assert_eq!(
        (err["code"].as_str(), err["message"].as_str()),
        (Some("negotiation_failed"), Some("no common codec"))
    );
    // A late answer for the failed offer is ignored; a new offer is taken.
    assert!(b
        .rooms
        .publish_answered(a, "late".into(), vec![], b.now)
        .is_empty());
    assert_eq!(shape(&b.text(a, offer)), ["negotiate p1"]);

    // Tracks beyond the limit are not published and the client is told.
    let many: Vec<NegotiatedTrack> = (0..10)
        .map(|i| NegotiatedTrack {
            mid: i.to_string(),
            kind: Kind::Audio,
            id: None,
        })
        .collect();
    let out = b.rooms.publish_answered(a, "ans".into(), many, b.now);
    assert_eq!(b.tracks_of(a).len(), 8);
    assert_eq!(sent_to(&out, a)[1]["code"], "too_many_tracks");
    let too_many: Vec<Value> = (0..9).map(|i| json!({"mid": i.to_string()})).collect();
    let out = b.text(a, json!({"type":"offer","sdp":"v=0","tracks":too_many}));
    assert_eq!(sent_to(&out, a)[0]["code"], "too_many_tracks");
}

#[test]
fn candidates_and_subscriber_failures() {
    let mut b = Bench::new(config());
    let (a, _) = b.join("demo", "ann");
    let out = b.text(a, json!({"type":"candidate","pc":"publish","candidate":"candidate:1 1 udp 1 10.0.0.1 9 typ host","sdpMid":"0"}));
    assert_eq!(
        out,
        [Action::RemoteCandidate {
            participant: a,
            pc: PcKind::Publish,
            candidate: "candidate:1 1 udp 1 10.0.0.1 9 typ host".into(),
            mid: Some("0".into())
        }]
    );
    // End of candidates: nothing to do.
    assert!(b
        .text(
            a,
            json!({"type":"candidate","pc":"subscribe","candidate":""})
        )
        .is_empty());
    b.rooms.peer_connected(a, PcKind::Subscribe, b.now);
    assert!(b.rooms.participant(a).unwrap().connected(PcKind::Subscribe));
    assert!(!b.rooms.participant(a).unwrap().connected(PcKind::Publish));
    let out = b.rooms.subscriber_failed(a, b.now);
    assert_eq!(
        shape(&out),
        [
            "send left -> p1",
            "close p1 negotiation_failed",
            "freed demo"
        ]
    );
}

#[test]
fn unchanged_renegotiation_goes_idle_and_catches_up() {
    let mut b = Bench::new(config());
    let (a, _) = b.join("demo", "ann");
    let (bob, _) = b.join("demo", "bob");
    let out = b.publish(a, &AV[..1]);
    assert_eq!(renegotiations(&out).len(), 1);
    // The caller found nothing to change: no offer goes out, and bob is idle again.
    let out = b.rooms.subscriber_unchanged(bob, b.now);
    assert!(sent_to(&out, bob).is_empty(), "{out:?}");
    // So the next change renegotiates at once.
    let out = b.publish(a, AV);
    assert_eq!(renegotiations(&out).len(), 1, "{out:?}");
    // Changes while the request was outstanding are caught up after it.
    let _ = b.publish(a, &AV[..1]);
    let out = b.rooms.subscriber_unchanged(bob, b.now);
    assert_eq!(renegotiations(&out).len(), 1, "{out:?}");
    // Ignored when nothing was requested.
    let _ = b.rooms.subscriber_unchanged(a, b.now);
}

#[test]
fn layer_caps_apply_to_subscribed_tracks_only() {
    let mut b = Bench::new(config());
    let (a, _) = b.join("demo", "ann");
    let pa = b.publish(a, AV);
    b.settle(&pa);
    let (c, joined) = b.join("demo", "cat");
    b.settle(&joined);
    let video = b.tracks_of(a)[1];
    let out = b.text(
        c,
        json!({"type":"layer","track":video.to_string(),"layer":"low","maxHeight":360}),
    );
    assert_eq!(
        shape(&out),
        [format!("layer-cap {c} {video} Some(Low) Some(360)")]
    );
    // No cap at all lifts it.
    let out = b.text(c, json!({"type":"layer","track":video.to_string()}));
    assert_eq!(shape(&out), [format!("layer-cap {c} {video} None None")]);
    // Bad values and tracks one does not receive are refused by name.
    let bad = b.text(
        c,
        json!({"type":"layer","track":video.to_string(),"layer":"ultra"}),
    );
    assert_eq!(sent_to(&bad, c)[0]["code"], "bad_message");
    let bad = b.text(
        c,
        json!({"type":"layer","track":video.to_string(),"maxHeight":0}),
    );
    assert_eq!(sent_to(&bad, c)[0]["code"], "bad_message");
    let own = b.text(a, json!({"type":"layer","track":video.to_string()}));
    assert_eq!(sent_to(&own, a)[0]["code"], "unknown_track");
}
