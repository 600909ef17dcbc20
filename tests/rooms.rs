//! Conferencing rooms over `/ws`, end to end in process: str0m clients join a room, publish,
//! receive each other's media and data-channel messages, mute, leave, and join late; WHIP and
//! WHEP share the rooms' namespace; token auth, bad input and the participant limit are refused
//! cleanly while the room keeps working.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::room::*;
use common::*;
use serde_json::json;
use sluice::config::IoBackend;
use sluice::control::auth::{mint, Claims};

const SECRET: &str = "room-secret-0123456789abcdef";
const T: Duration = Duration::from_secs(15);

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn token(sub: &str, room: &str, publish: bool, subscribe: bool, ttl: i64) -> String {
    let mut c = Claims::new(sub, room, publish, subscribe, now(), 3600);
    c.exp = (now() as i64 + ttl) as u64;
    mint(SECRET.as_bytes(), &c)
}

fn metrics(server: &sluice::serve::Server) -> String {
    ureq::get(&format!("http://{}/metrics", server.http_addr))
        .call()
        .unwrap()
        .into_string()
        .unwrap()
}

fn sees_media(c: &RoomClient, from: &str) -> bool {
    c.state.received(from, true) > 5 && c.state.received(from, false) > 5
}

#[test]
fn three_join_exchange_media_and_data_then_one_leaves_and_one_joins_late() {
    let server = start(config(2, IoBackend::Mmsg));
    let addr = server.http_addr;
    let mut ann = RoomClient::join(addr, "standup", "ann", true);
    let bob = RoomClient::join(addr, "standup", "bob", true);
    let cat = RoomClient::join(addr, "standup", "cat", true);
    let all = [&ann, &bob, &cat];
    assert!(wait_until(T, || all.iter().all(|c| !c.me().is_empty())));
    let ids: Vec<String> = all.iter().map(|c| c.me()).collect();

    // Each receives the other two's audio and video.
    for (i, c) in all.iter().enumerate() {
        for (j, other) in ids.iter().enumerate() {
            if i != j {
                assert!(
                    wait_until(T, || sees_media(c, other)),
                    "{} does not receive {other}: {:?}",
                    ids[i],
                    c.state.media.lock().unwrap()
                );
            }
        }
    }

    // A data-channel message reaches both others, tagged with the sender.
    assert!(wait_until(T, || all.iter().all(|c| c
        .state
        .channel_open
        .load(std::sync::atomic::Ordering::Relaxed))));
    ann.send_data("hello room");
    for c in [&bob, &cat] {
        assert!(
            wait_until(T, || c
                .state
                .data
                .lock()
                .unwrap()
                .contains(&(ids[0].clone(), "hello room".into()))),
            "{:?}",
            c.state.data.lock().unwrap()
        );
    }
    assert!(ann.state.data.lock().unwrap().is_empty(), "no echo");

    // Speaking: ann's audio level makes her the active speaker.
    *ann.state.level.lock().unwrap() = 10;
    assert!(
        wait_until(T, || bob
            .state
            .of_type("speakers")
            .iter()
            .any(|m| m["speakers"][0]["participant"] == ids[0].as_str())),
        "no speakers update naming ann"
    );

    // Mute shows on the others.
    let audio = ann.state.tracks.lock().unwrap()[0].clone();
    ann.send(json!({"type":"mute","track":audio}));
    for c in [&bob, &cat] {
        assert!(wait_until(T, || c
            .state
            .of_type("track_muted")
            .iter()
            .any(|m| m["track"] == audio.as_str())));
    }

    // Ann leaves: the others see it and stop receiving her tracks.
    ann.send(json!({"type":"leave"}));
    assert!(wait_until(T, || ann.state.closed.lock().unwrap().is_some()));
    ann.stop();
    for c in [&bob, &cat] {
        assert!(wait_until(T, || c
            .state
            .of_type("participant_left")
            .iter()
            .any(|m| m["participant"] == ids[0].as_str())));
    }
    std::thread::sleep(Duration::from_millis(500));
    let frozen = bob.state.received(&ids[0], true);
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(
        bob.state.received(&ids[0], true),
        frozen,
        "still receiving ann"
    );

    // Dan joins late and gets everyone still there.
    let dan = RoomClient::join(addr, "standup", "dan", true);
    assert!(wait_until(T, || !dan.me().is_empty()));
    let joined = dan.state.of_type("joined");
    assert_eq!(joined[0]["participants"].as_array().unwrap().len(), 2);
    for other in [&ids[1], &ids[2]] {
        assert!(
            wait_until(T, || sees_media(&dan, other)),
            "dan does not receive {other}"
        );
    }
    assert!(wait_until(T, || sees_media(&bob, &dan.me())));

    let rooms: serde_json::Value = ureq::get(&format!("http://{addr}/api/rooms"))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(rooms["rooms"][0]["room"], "standup");
    assert_eq!(rooms["rooms"][0]["participants"], 3);
    let m = metrics(&server);
    assert!(m.contains("sluice_room_participants 3"), "{m}");
    assert!(m.contains("sluice_room_data_messages_total 2"), "{m}");
}

#[test]
fn whip_publisher_is_a_participant_and_a_participant_plays_over_whep() {
    let server = start(config(2, IoBackend::Mmsg));
    let addr = server.http_addr;
    let bob = RoomClient::join(addr, "live", "bob", true);
    assert!(wait_until(T, || !bob.me().is_empty()));
    let whip = Client::publish(&server, "live").unwrap();
    assert!(whip.wait_connected(T));
    let joined = bob.state.of_type("participant_joined");
    assert!(wait_until(T, || !bob
        .state
        .of_type("participant_joined")
        .is_empty()));
    let whip_id = bob.state.of_type("participant_joined")[0]["participant"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    drop(joined);
    assert_eq!(
        bob.state.of_type("participant_joined")[0]["participant"]["kind"],
        "whip"
    );
    assert!(
        wait_until(T, || sees_media(&bob, &whip_id)),
        "bob does not receive the WHIP publisher: {:?}",
        bob.state.media.lock().unwrap()
    );

    // bob watched through WHEP as live~bob.
    assert!(wait_until(T, || bob.state.tracks.lock().unwrap().len() == 2));
    let viewer = Client::play(&server, "live~bob").unwrap();
    assert!(viewer.wait_connected(T));
    assert!(
        wait_until(T, || {
            let r = viewer.received();
            r.iter().filter(|p| p.video).count() > 5 && r.iter().filter(|p| !p.video).count() > 5
        }),
        "the WHEP viewer of live~bob gets no media"
    );
    // Nobody called carol: 404.
    let err = Client::play(&server, "live~carol").err().unwrap();
    assert!(err.starts_with("404"), "{err}");

    // The WHIP publisher leaves: bob sees it go.
    assert_eq!(whip.delete(), 200);
    assert!(wait_until(T, || bob
        .state
        .of_type("participant_left")
        .iter()
        .any(|m| m["participant"] == whip_id.as_str())));
}

#[test]
fn ws_auth_refusals_are_clear_and_counted() {
    let mut c = config(1, IoBackend::Mmsg);
    c.auth.jwt_secret = Some(SECRET.into());
    let server = start(c);
    let addr = server.http_addr;

    // No token at all: `unauthorized`, close 4401.
    let mut ws = open_ws(addr, None).unwrap();
    send(&mut ws, json!({"type":"join","room":"r1"}));
    let (seen, closed) = read_until(&mut ws, T, |_| false);
    assert_eq!(seen[0]["code"], "unauthorized", "{seen:?}");
    assert!(seen[0]["message"]
        .as_str()
        .unwrap()
        .contains("missing_token"));
    assert_eq!(closed.unwrap().0, 4401);

    // An expired token in the URL: HTTP 401 before the upgrade.
    let err = open_ws(addr, Some(&token("ann", "r1", true, true, -5)))
        .err()
        .unwrap();
    assert!(
        err.starts_with("401") && err.contains("token_expired"),
        "{err}"
    );
    // A bad signature: 401 too.
    let forged = token("ann", "r1", true, true, 600).replace('.', ".x");
    assert!(open_ws(addr, Some(&forged))
        .err()
        .unwrap()
        .starts_with("401"));

    // A valid token for another room: `forbidden`, close 4403.
    let mut ws = open_ws(addr, Some(&token("ann", "other", true, true, 600))).unwrap();
    send(&mut ws, json!({"type":"join","room":"r1"}));
    let (seen, closed) = read_until(&mut ws, T, |_| false);
    assert_eq!(seen[0]["code"], "forbidden", "{seen:?}");
    assert!(seen[0]["message"].as_str().unwrap().contains("wrong_room"));
    assert_eq!(closed.unwrap().0, 4403);

    // The token in the join message works too; its `sub` is the identity.
    let mut ws = open_ws(addr, None).unwrap();
    let t = token("zoe", "r1", false, true, 600);
    send(&mut ws, json!({"type":"join","room":"r1","token":t}));
    let (seen, _) = read_until(&mut ws, T, |m| m["type"] == "joined");
    let joined = seen.last().unwrap();
    assert_eq!(joined["participant"]["identity"], "zoe");
    assert_eq!(joined["permissions"]["publish"], false);
    // Without the publish right, an offer is refused (and the socket stays).
    send(
        &mut ws,
        json!({"type":"offer","sdp":"v=0\r\n","tracks":[{"mid":"0"}]}),
    );
    let (seen, closed) = read_until(&mut ws, T, |m| m["type"] == "error");
    assert_eq!(seen.last().unwrap()["code"], "forbidden", "{seen:?}");
    assert!(closed.is_none());
    send(&mut ws, json!({"type":"ping","ts":1}));
    let (seen, _) = read_until(&mut ws, T, |m| m["type"] == "pong");
    assert_eq!(seen.last().unwrap()["type"], "pong");

    let m = metrics(&server);
    for reason in [
        "missing_token",
        "token_expired",
        "wrong_room",
        "publish_not_allowed",
        "bad_signature",
    ] {
        let line = format!("sluice_auth_failures_total{{reason=\"{reason}\"}} 1");
        assert!(m.contains(&line), "{line} not in\n{m}");
    }
}

#[test]
fn bad_messages_and_a_join_flood_are_refused_while_the_room_works() {
    let mut c = config(1, IoBackend::Mmsg);
    c.limits.max_participants_per_room = 3;
    let server = start(c);
    let addr = server.http_addr;
    let ann = RoomClient::join(addr, "busy", "ann", true);
    let bob = RoomClient::join(addr, "busy", "bob", true);
    assert!(wait_until(T, || sees_media(&bob, &ann.me())));

    // Garbage and wrong shapes: an error each, the socket stays.
    let mut ws = open_ws(addr, None).unwrap();
    send(
        &mut ws,
        json!({"type":"join","room":"busy","identity":"eve"}),
    );
    let (_, closed) = read_until(&mut ws, T, |m| m["type"] == "joined");
    assert!(closed.is_none());
    for (text, code) in [
        ("not json at all", "bad_message"),
        ("[1,2,3]", "bad_message"),
        (r#"{"type":"fly"}"#, "unknown_type"),
        (r#"{"type":"mute","track":42}"#, "bad_message"),
        (r#"{"v":9,"type":"ping"}"#, "unsupported_version"),
        (r#"{"type":"mute","track":"t999"}"#, "unknown_track"),
        (r#"{"type":"join","room":"busy"}"#, "already_joined"),
    ] {
        ws.send(tungstenite::Message::Text(text.into())).unwrap();
        let (seen, closed) = read_until(&mut ws, T, |m| m["type"] == "error");
        assert_eq!(seen.last().unwrap()["code"], code, "{text}: {seen:?}");
        assert!(closed.is_none(), "{text} closed the socket");
    }
    // Oversized: an error, then the socket is closed (4413).
    let big = format!(r#"{{"type":"ping","pad":"{}"}}"#, "x".repeat(70_000));
    ws.send(tungstenite::Message::Text(big.into())).unwrap();
    let (seen, closed) = read_until(&mut ws, T, |_| false);
    assert_eq!(seen.last().unwrap()["code"], "too_large", "{seen:?}");
    assert_eq!(closed.unwrap().0, 4413);

    // A flood of joins beyond the limit (3): clean `room_full` refusals with 4503.
    let mut refused = 0;
    let mut admitted = Vec::new();
    for i in 0..8 {
        let mut ws = open_ws(addr, None).unwrap();
        send(
            &mut ws,
            json!({"type":"join","room":"busy","identity":format!("flood{i}")}),
        );
        let (seen, closed) = read_until(&mut ws, T, |m| m["type"] == "joined");
        match seen.last().map(|m| m["type"].clone()) {
            Some(t) if t == "joined" => admitted.push(ws),
            _ => {
                assert_eq!(seen.last().unwrap()["code"], "room_full", "{seen:?}");
                assert_eq!(closed.unwrap().0, 4503);
                refused += 1;
            }
        }
    }
    // eve's socket closed, so one place was free.
    assert_eq!(admitted.len(), 1);
    assert_eq!(refused, 7);

    // The room still works for the others.
    let before = bob.state.received(&ann.me(), true);
    assert!(wait_until(T, || bob.state.received(&ann.me(), true) > before + 10));
    assert!(ann.state.closed.lock().unwrap().is_none());
    assert!(bob.state.closed.lock().unwrap().is_none());
    let m = metrics(&server);
    assert!(
        m.contains("sluice_room_joins_total{result=\"room_full\"} 7"),
        "{m}"
    );
    assert!(
        m.contains("sluice_room_ws_messages_total{result=\"unknown_type\",type=\"fly\"}")
            || m.contains("result=\"unknown_type\""),
        "{m}"
    );
}

/// Video packets `from` sent on each layer that `c` received over the next `window`.
fn layers_over(c: &RoomClient, from: &str, window: Duration) -> [u64; 3] {
    let get = || {
        c.state
            .video_layers
            .lock()
            .unwrap()
            .get(from)
            .copied()
            .unwrap_or_default()
    };
    let before = get();
    std::thread::sleep(window);
    let after = get();
    std::array::from_fn(|i| after[i] - before[i])
}

/// Wait until, over a 600 ms window, `c` receives `from`'s video on `layer` only.
fn only_layer(c: &RoomClient, from: &str, layer: usize, timeout: Duration) -> bool {
    let end = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < end {
        let l = layers_over(c, from, Duration::from_millis(600));
        if l[layer] > 0 && l.iter().enumerate().all(|(i, n)| i == layer || *n == 0) {
            return true;
        }
    }
    false
}

#[test]
fn a_simulcast_participant_reaches_each_subscriber_as_one_layer_and_layer_caps_it() {
    let server = start(config(2, IoBackend::Mmsg));
    let ann = RoomClient::join_simulcast(server.http_addr, "sim", "ann");
    let bob = RoomClient::join(server.http_addr, "sim", "bob", false);
    let ann_id = {
        assert!(wait_until(Duration::from_secs(10), || !ann.me().is_empty()));
        ann.me()
    };
    assert!(
        wait_until(Duration::from_secs(15), || sees_media(&bob, &ann_id)),
        "bob receives ann"
    );
    // Room subscribers have no estimate: with no cap they get the top layer, one layer only.
    assert!(
        only_layer(&bob, &ann_id, 2, Duration::from_secs(10)),
        "bob gets only ann's top layer: {:?}",
        layers_over(&bob, &ann_id, Duration::from_millis(600))
    );
    let video = ann
        .state
        .tracks
        .lock()
        .unwrap()
        .iter()
        .find(|t| t.trim_start_matches('t').parse::<u64>().unwrap() & 1 == 1)
        .cloned()
        .expect("ann's video track");
    bob.send(json!({"v":1,"type":"layer","track":video,"layer":"low"}));
    assert!(
        only_layer(&bob, &ann_id, 0, Duration::from_secs(10)),
        "layer low: {:?}",
        layers_over(&bob, &ann_id, Duration::from_millis(600))
    );
    bob.send(json!({"v":1,"type":"layer","track":video,"maxHeight":100000}));
    let errors = bob.state.of_type("error");
    assert!(
        wait_until(Duration::from_secs(3), || bob.state.of_type("error").len()
            > errors.len()),
        "an out-of-range maxHeight is refused"
    );
    bob.send(json!({"v":1,"type":"layer","track":video}));
    assert!(
        only_layer(&bob, &ann_id, 2, Duration::from_secs(10)),
        "cap lifted: {:?}",
        layers_over(&bob, &ann_id, Duration::from_millis(600))
    );
    let m = metrics(&server);
    assert!(
        m.lines()
            .any(|l| l.starts_with("sluice_simulcast_layer_switches_total")
                && l.contains("reason=\"cap\"")
                && !l.ends_with(" 0")),
        "cap switches counted"
    );
}
