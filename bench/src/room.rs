//! The messages of sluice's `/ws` room protocol (version 1, docs/signaling.md "Rooms over
//! `/ws`") that a load-generator participant sends and reads. Pure data: unit tested here.

use serde_json::{json, Value};

/// Protocol version sent with every message.
const VERSION: u64 = 1;

/// Participants of the meeting scenario are `loadgen-<index>`, so every participant can tell
/// which of the others a server participant id is (from `joined` and `participant_joined`).
pub fn identity(index: u32) -> String {
    format!("loadgen-{index}")
}

/// The load-generator index of an identity made by [`identity`].
pub fn index_of(identity: &str) -> Option<u32> {
    identity.strip_prefix("loadgen-")?.parse().ok()
}

pub fn join(room: &str, identity: &str) -> String {
    json!({"v": VERSION, "type": "join", "room": room, "identity": identity, "name": identity})
        .to_string()
}

/// The publish connection's offer: `video` is the camera, `audio` the microphone.
pub fn publish_offer(sdp: &str, video: Option<&str>, audio: Option<&str>) -> String {
    let mut tracks = Vec::new();
    if let Some(mid) = video {
        tracks.push(json!({"mid": mid, "source": "camera"}));
    }
    if let Some(mid) = audio {
        tracks.push(json!({"mid": mid, "source": "mic"}));
    }
    json!({"v": VERSION, "type": "offer", "sdp": sdp, "tracks": tracks}).to_string()
}

/// The answer to the server's subscribe offer `seq`.
pub fn answer(sdp: &str, seq: u64) -> String {
    json!({"v": VERSION, "type": "answer", "sdp": sdp, "seq": seq}).to_string()
}

pub fn leave() -> String {
    json!({"v": VERSION, "type": "leave"}).to_string()
}

/// A server participant: its id and identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Who {
    pub id: String,
    pub identity: String,
}

/// The server messages a participant acts on; the rest are `Other`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ServerMsg {
    Joined {
        me: String,
        others: Vec<Who>,
    },
    ParticipantJoined(Who),
    /// The answer to our publish offer.
    Answer {
        sdp: String,
    },
    /// A subscribe offer: `tracks` are (mid, participant id) of each m-line.
    Offer {
        seq: u64,
        sdp: String,
        tracks: Vec<(String, String)>,
    },
    Error {
        code: String,
        message: String,
    },
    /// The server removed us (or answered our `leave`).
    Left {
        reason: String,
    },
    /// Anything else (`track_published`, `speakers`, `pong`, ...): nothing to do.
    Other,
}

fn text(v: &Value, field: &str) -> Result<String, String> {
    v.get(field)
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| format!("no string field {field:?}"))
}

fn who(v: &Value) -> Result<Who, String> {
    Ok(Who {
        id: text(v, "id")?,
        identity: text(v, "identity").unwrap_or_default(),
    })
}

/// Parse one text frame from the server.
pub fn parse(frame: &str) -> Result<ServerMsg, String> {
    let v: Value = serde_json::from_str(frame).map_err(|e| format!("not JSON: {e}"))?;
    let kind = text(&v, "type")?;
    let msg = match kind.as_str() {
        "joined" => ServerMsg::Joined {
            me: text(&v["participant"], "id")?,
            others: v["participants"]
                .as_array()
                .map(|a| a.iter().map(who).collect::<Result<Vec<_>, _>>())
                .transpose()?
                .unwrap_or_default(),
        },
        "participant_joined" => ServerMsg::ParticipantJoined(who(&v["participant"])?),
        "answer" => ServerMsg::Answer {
            sdp: text(&v, "sdp")?,
        },
        "offer" => ServerMsg::Offer {
            seq: v["seq"].as_u64().ok_or("offer without a numeric seq")?,
            sdp: text(&v, "sdp")?,
            tracks: v["tracks"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|t| Ok((text(t, "mid")?, text(t, "participant")?)))
                        .collect::<Result<Vec<_>, String>>()
                })
                .transpose()?
                .unwrap_or_default(),
        },
        "error" => ServerMsg::Error {
            code: text(&v, "code")?,
            message: text(&v, "message").unwrap_or_default(),
        },
        "left" => ServerMsg::Left {
            reason: text(&v, "reason").unwrap_or_default(),
        },
        _ => ServerMsg::Other,
    };
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_messages_follow_the_protocol() {
        let j: Value = serde_json::from_str(&join("lg-7", &identity(3))).unwrap();
        assert_eq!(j["v"], 1);
        assert_eq!(j["type"], "join");
        assert_eq!(j["room"], "lg-7");
        assert_eq!(j["identity"], "loadgen-3");
        assert_eq!(index_of("loadgen-3"), Some(3));
        assert_eq!(index_of("ann"), None);

        let o: Value = serde_json::from_str(&publish_offer("v=0", Some("0"), Some("1"))).unwrap();
        assert_eq!(o["type"], "offer");
        assert_eq!(o["sdp"], "v=0");
        assert_eq!(
            o["tracks"],
            json!([{"mid": "0", "source": "camera"}, {"mid": "1", "source": "mic"}])
        );
        let o: Value = serde_json::from_str(&publish_offer("v=0", None, Some("0"))).unwrap();
        assert_eq!(o["tracks"], json!([{"mid": "0", "source": "mic"}]));

        let a: Value = serde_json::from_str(&answer("v=0", 4)).unwrap();
        assert_eq!(
            (a["type"].as_str(), a["seq"].as_u64()),
            (Some("answer"), Some(4))
        );
        let l: Value = serde_json::from_str(&leave()).unwrap();
        assert_eq!(l["type"], "leave");
    }

    #[test]
    fn server_messages_of_the_documented_example_parse() {
        // From docs/signaling.md's example (SDP shortened).
        let joined = r#"{"v":1,"type":"joined","room":"standup",
          "participant":{"id":"p2","identity":"bob","name":"Bob","kind":"websocket","joinedAt":1712345680000,"tracks":[]},
          "participants":[{"id":"p1","identity":"ann","name":"Ann","kind":"websocket","joinedAt":1712345678901,
            "tracks":[{"id":"t2199023255554","kind":"audio","source":"mic","muted":false}]}],
          "permissions":{"publish":true,"subscribe":true},"iceServers":[],"dataChannel":"sluice",
          "limits":{"maxMessageBytes":65536}}"#;
        assert_eq!(
            parse(joined).unwrap(),
            ServerMsg::Joined {
                me: "p2".into(),
                others: vec![Who {
                    id: "p1".into(),
                    identity: "ann".into()
                }],
            }
        );
        let offer = r#"{"v":1,"type":"offer","seq":1,"sdp":"v=0","tracks":[
          {"mid":"0","track":"t2199023255554","participant":"p1"},
          {"mid":"1","track":"t2199023255557","participant":"p1"}]}"#;
        assert_eq!(
            parse(offer).unwrap(),
            ServerMsg::Offer {
                seq: 1,
                sdp: "v=0".into(),
                tracks: vec![("0".into(), "p1".into()), ("1".into(), "p1".into())],
            }
        );
        // The first subscribe offer carries only the data channel.
        assert!(matches!(
            parse(r#"{"v":1,"type":"offer","seq":1,"sdp":"v=0","tracks":[]}"#).unwrap(),
            ServerMsg::Offer { tracks, .. } if tracks.is_empty()
        ));
        assert_eq!(
            parse(r#"{"v":1,"type":"answer","sdp":"v=0","tracks":[{"mid":"0","track":"t2"}]}"#)
                .unwrap(),
            ServerMsg::Answer { sdp: "v=0".into() }
        );
        assert_eq!(
            parse(r#"{"v":1,"type":"participant_joined","participant":{"id":"p3","identity":"loadgen-2","name":"x","kind":"websocket","joinedAt":1,"tracks":[]}}"#).unwrap(),
            ServerMsg::ParticipantJoined(Who { id: "p3".into(), identity: "loadgen-2".into() })
        );
        assert_eq!(
            parse(r#"{"v":1,"type":"error","code":"room_full","message":"the room is full"}"#)
                .unwrap(),
            ServerMsg::Error {
                code: "room_full".into(),
                message: "the room is full".into()
            }
        );
        assert_eq!(
            parse(r#"{"v":1,"type":"left","reason":"timeout"}"#).unwrap(),
            ServerMsg::Left {
                reason: "timeout".into()
            }
        );
        assert_eq!(
            parse(r#"{"v":1,"type":"speakers","speakers":[]}"#).unwrap(),
            ServerMsg::Other
        );
    }

    #[test]
    fn malformed_server_messages_are_errors_not_panics() {
        assert!(parse("not json").is_err());
        assert!(parse(r#"{"v":1}"#).is_err());
        assert!(parse(r#"{"type":"offer","sdp":"v=0"}"#).is_err());
        assert!(parse(r#"{"type":"offer","seq":"1","sdp":"v=0"}"#).is_err());
        assert!(parse(r#"{"type":"joined","participants":[]}"#).is_err());
        assert!(parse(r#"{"type":"answer"}"#).is_err());
    }
}
