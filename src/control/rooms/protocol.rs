//! The `/ws` wire format, version 1: every message a client sends and the server answers, their
//! JSON shape, and the parser that turns one WebSocket text frame into a [`ClientMessage`] or a
//! [`ProtocolError`]. Documented for people in `docs/signaling.md`; keep the two in step.
//!
//! Shape: a JSON object with `"type"` (snake_case) and optional `"v"` (1); fields are camelCase;
//! unknown fields are ignored so that clients and servers can grow independently. Participant
//! ids are strings `"p<n>"`, track ids `"t<n>"`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The protocol version this server speaks; every server message carries it as `"v"`.
pub const PROTOCOL_VERSION: u64 = 1;

/// The label of the one data channel per participant: created by the server in its first
/// subscribe offer, reliable and ordered, used in both directions.
pub const DATA_CHANNEL_LABEL: &str = "sluice";

/// One participant of a room, unique in the process for its lifetime (never reused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ParticipantId(pub u64);

/// One published track. The value has the layout of the data plane's `mesh::TrackId`
/// (`n << 1 | is_video`), so it can be passed through unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrackId(pub u64);

impl TrackId {
    pub fn new(n: u64, kind: Kind) -> TrackId {
        TrackId((n << 1) | (kind == Kind::Video) as u64)
    }

    pub fn kind(self) -> Kind {
        if self.0 & 1 == 1 {
            Kind::Video
        } else {
            Kind::Audio
        }
    }
}

macro_rules! prefixed_id {
    ($ty:ident, $prefix:literal, $what:literal) => {
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($prefix, "{}"), self.0)
            }
        }

        impl FromStr for $ty {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                s.strip_prefix($prefix)
                    .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
                    .and_then(|d| d.parse().ok())
                    .map($ty)
                    .ok_or_else(|| format!(concat!("not a ", $what, " id: {:?}"), s))
            }
        }

        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}

prefixed_id!(ParticipantId, "p", "participant");
prefixed_id!(TrackId, "t", "track");

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Audio,
    Video,
}

/// What a track carries, as the publisher declares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Camera,
    #[serde(alias = "microphone")]
    Mic,
    /// Screen share: video, or the audio captured with it.
    Screen,
}

impl Source {
    /// The source of a track whose publisher did not say.
    pub fn default_for(kind: Kind) -> Source {
        match kind {
            Kind::Audio => Source::Mic,
            Kind::Video => Source::Camera,
        }
    }

    pub fn fits(self, kind: Kind) -> bool {
        matches!(
            (self, kind),
            (Source::Mic, Kind::Audio) | (Source::Camera, Kind::Video) | (Source::Screen, _)
        )
    }
}

/// Which of a participant's two peer connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PcKind {
    /// The client offers; carries the client's tracks to the server.
    Publish,
    /// The server offers; carries other participants' tracks and the data channel.
    Subscribe,
}

/// How a participant is connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParticipantKind {
    /// A `/ws` client with a publish and a subscribe peer connection.
    Websocket,
    /// A WHIP publisher of the stream named like the room: tracks only, no socket.
    Whip,
}

/// A simulcast layer of a published video track.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer {
    /// The RTP stream id (`a=rid`), 1 to 16 characters `A-Z a-z 0-9 - _`.
    pub rid: String,
}

/// A track the client publishes, declared next to its offer (SDP says neither source nor mute).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TrackDeclaration {
    /// The m-line (`transceiver.mid` after `setLocalDescription`).
    pub mid: String,
    /// Default: `mic` for audio, `camera` for video.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<Source>,
    #[serde(default)]
    pub muted: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub simulcast: Vec<Layer>,
}

/// `join`: the first message on a socket (or the only one before `joined`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JoinMessage {
    pub room: String,
    /// Display name; default: the identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Used only without auth (with auth the token's `sub` is the identity). Default: generated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// The JWT, when not given as `?token=` in the URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Subscribe to every track in the room as it appears (default `true`).
    #[serde(default = "yes")]
    pub auto_subscribe: bool,
}

fn yes() -> bool {
    true
}

/// Client to server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    tag = "type",
    rename_all = "snake_case",
    rename_all_fields = "camelCase"
)]
pub enum ClientMessage {
    Join(JoinMessage),
    /// An offer for the publish peer connection, with the tracks it sends.
    Offer {
        sdp: String,
        #[serde(default)]
        tracks: Vec<TrackDeclaration>,
    },
    /// The answer to the server's subscribe offer `seq`.
    Answer {
        sdp: String,
        seq: u64,
    },
    /// A trickled ICE candidate of one of the client's peer connections (`""`: end of candidates).
    Candidate {
        pc: PcKind,
        candidate: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        sdp_mid: Option<String>,
    },
    Subscribe {
        tracks: Vec<TrackId>,
    },
    Unsubscribe {
        tracks: Vec<TrackId>,
    },
    Mute {
        track: TrackId,
    },
    Unmute {
        track: TrackId,
    },
    /// Cap the simulcast layer this participant receives of a subscribed video track:
    /// `layer` `low`, `mid` or `high` and/or `maxHeight` in pixels (both absent: no cap), as
    /// WHEP's `?layer=` and `?max_height=`.
    Layer {
        track: TrackId,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        layer: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_height: Option<u32>,
    },
    Leave,
    Ping {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ts: Option<serde_json::Number>,
    },
}

impl ClientMessage {
    /// Every `type` a client may send.
    pub const TYPES: [&'static str; 11] = [
        "join",
        "offer",
        "answer",
        "candidate",
        "subscribe",
        "unsubscribe",
        "mute",
        "unmute",
        "layer",
        "leave",
        "ping",
    ];

    /// The JSON text of this message, with `"v":1` (what a Rust client sends).
    pub fn to_json(&self) -> String {
        versioned(self)
    }
}

/// A published track as others see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrackInfo {
    pub id: TrackId,
    pub kind: Kind,
    pub source: Source,
    pub muted: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub simulcast: Vec<Layer>,
}

/// A participant as others see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ParticipantInfo {
    pub id: ParticipantId,
    pub identity: String,
    pub name: String,
    pub kind: ParticipantKind,
    /// Unix milliseconds.
    pub joined_at: u64,
    pub tracks: Vec<TrackInfo>,
}

/// An `RTCIceServer`, passed through to the client's `RTCPeerConnection` configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IceServer {
    pub urls: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

/// What the joining participant may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Permissions {
    pub publish: bool,
    pub subscribe: bool,
}

/// Limits the client must respect, told in `joined`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WireLimits {
    pub max_message_bytes: usize,
    pub messages_per_second: u32,
    pub max_data_bytes: usize,
    pub data_per_second: u32,
    pub max_tracks: usize,
}

/// A track's place in an SDP: which m-line carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MidTrack {
    pub mid: String,
    pub track: TrackId,
}

/// A track in a subscribe offer: its m-line and whose it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OfferedTrack {
    pub mid: String,
    pub track: TrackId,
    pub participant: ParticipantId,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Speaker {
    pub participant: ParticipantId,
    /// Linear amplitude 0..1, `10^(-dBov/20)` of the RFC 6464 level.
    pub level: f32,
}

/// The connection-quality hint, from loss and round-trip time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Quality {
    Lost,
    Poor,
    Good,
    Excellent,
}

/// Why a participant is no longer in the room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaveReason {
    /// It sent `leave` (or its WHIP session was deleted).
    Left,
    /// Its socket closed.
    Disconnected,
    /// One of its peer connections failed or closed.
    PeerClosed,
    /// The same identity joined again from another socket.
    Replaced,
    /// It did not answer a subscribe offer in time.
    Timeout,
    /// Its subscribe peer connection could not be negotiated.
    NegotiationFailed,
    /// The server is shutting down.
    ServerShutdown,
}

impl LeaveReason {
    pub fn as_str(self) -> &'static str {
        match self {
            LeaveReason::Left => "left",
            LeaveReason::Disconnected => "disconnected",
            LeaveReason::PeerClosed => "peer_closed",
            LeaveReason::Replaced => "replaced",
            LeaveReason::Timeout => "timeout",
            LeaveReason::NegotiationFailed => "negotiation_failed",
            LeaveReason::ServerShutdown => "server_shutdown",
        }
    }

    /// The WebSocket close code to end the socket with after `left`.
    pub fn close_code(self) -> u16 {
        match self {
            LeaveReason::Left | LeaveReason::Disconnected => 1000,
            LeaveReason::ServerShutdown => 1001,
            LeaveReason::Timeout => 4408,
            LeaveReason::Replaced => 4409,
            LeaveReason::PeerClosed => 4410,
            LeaveReason::NegotiationFailed => 4422,
        }
    }
}

/// Error codes: stable snake_case, also fit for a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// Not JSON, not an object, a missing or mistyped field.
    BadMessage,
    /// Over `maxMessageBytes` (or a data-channel message over `maxDataBytes`).
    TooLarge,
    UnknownType,
    UnsupportedVersion,
    /// Over the message or data rate; the message was dropped.
    RateLimited,
    /// A message other than `join` before joining.
    NotJoined,
    AlreadyJoined,
    /// No token, or an invalid one (HTTP 401). Fatal.
    Unauthorized,
    /// A valid token for another room, or without the right (HTTP 403).
    Forbidden,
    /// The room is at `limits.max_participants_per_room`. Fatal.
    RoomFull,
    /// A room name, identity or display name that is not allowed. Fatal.
    BadName,
    /// Another participant of another kind (WHIP) has this identity. Fatal.
    IdentityTaken,
    UnknownTrack,
    TooManyTracks,
    /// An `offer` while the previous one is still being answered.
    NegotiationInProgress,
    /// The server could not use the offer.
    NegotiationFailed,
    /// An `answer` with no matching server offer (stale `seq`).
    UnexpectedAnswer,
    /// The server is over capacity. Fatal.
    Unavailable,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadMessage => "bad_message",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::NotJoined => "not_joined",
            ErrorCode::AlreadyJoined => "already_joined",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::RoomFull => "room_full",
            ErrorCode::BadName => "bad_name",
            ErrorCode::IdentityTaken => "identity_taken",
            ErrorCode::UnknownTrack => "unknown_track",
            ErrorCode::TooManyTracks => "too_many_tracks",
            ErrorCode::NegotiationInProgress => "negotiation_in_progress",
            ErrorCode::NegotiationFailed => "negotiation_failed",
            ErrorCode::UnexpectedAnswer => "unexpected_answer",
            ErrorCode::Unavailable => "unavailable",
        }
    }

    /// The WebSocket close code when this error ends the socket (a refused `join`).
    pub fn close_code(self) -> u16 {
        match self {
            ErrorCode::Unauthorized => 4401,
            ErrorCode::Forbidden => 4403,
            ErrorCode::IdentityTaken => 4409,
            ErrorCode::TooLarge => 4413,
            ErrorCode::RoomFull | ErrorCode::Unavailable => 4503,
            _ => 4400,
        }
    }
}

/// Server to client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(
    tag = "type",
    rename_all = "snake_case",
    rename_all_fields = "camelCase"
)]
pub enum ServerMessage {
    /// The answer to `join`: who the client is and everyone already there.
    Joined {
        room: String,
        participant: ParticipantInfo,
        participants: Vec<ParticipantInfo>,
        permissions: Permissions,
        ice_servers: Vec<IceServer>,
        data_channel: String,
        limits: WireLimits,
    },
    ParticipantJoined {
        participant: ParticipantInfo,
    },
    /// Its tracks are gone with it (no `track_unpublished` follows).
    ParticipantLeft {
        participant: ParticipantId,
        reason: LeaveReason,
    },
    TrackPublished {
        participant: ParticipantId,
        track: TrackInfo,
    },
    TrackUnpublished {
        participant: ParticipantId,
        track: TrackId,
    },
    TrackMuted {
        participant: ParticipantId,
        track: TrackId,
    },
    TrackUnmuted {
        participant: ParticipantId,
        track: TrackId,
    },
    /// The answer to the client's publish offer, and the track id of each m-line it publishes.
    Answer {
        sdp: String,
        tracks: Vec<MidTrack>,
    },
    /// An offer for the subscribe peer connection; reply `answer` with the same `seq`.
    Offer {
        seq: u64,
        sdp: String,
        tracks: Vec<OfferedTrack>,
    },
    /// The loudest participants now, loudest first, at most 3; empty when nobody speaks.
    Speakers {
        speakers: Vec<Speaker>,
    },
    ConnectionQuality {
        participant: ParticipantId,
        quality: Quality,
    },
    Pong {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ts: Option<serde_json::Number>,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
    /// This participant was removed (sent before the server closes the socket).
    Left {
        reason: LeaveReason,
    },
}

impl ServerMessage {
    /// The JSON text of this message, with `"v":1`.
    pub fn to_json(&self) -> String {
        versioned(self)
    }

    pub fn error(code: ErrorCode, message: impl Into<String>) -> ServerMessage {
        ServerMessage::Error {
            code,
            message: message.into(),
        }
    }
}

fn versioned<T: Serialize>(message: &T) -> String {
    #[derive(Serialize)]
    struct Versioned<'a, T> {
        v: u64,
        #[serde(flatten)]
        message: &'a T,
    }
    serde_json::to_string(&Versioned {
        v: PROTOCOL_VERSION,
        message,
    })
    .expect("protocol messages serialize")
}

/// A client message that could not be taken: what to answer with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError {
    pub code: ErrorCode,
    pub message: String,
}

impl ProtocolError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ProtocolError {
        ProtocolError {
            code,
            message: message.into(),
        }
    }

    pub fn to_message(&self) -> ServerMessage {
        ServerMessage::error(self.code, self.message.clone())
    }
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

impl std::error::Error for ProtocolError {}

/// Parse one text frame. The size is checked before any parsing.
pub fn parse_client(text: &str, max_bytes: usize) -> Result<ClientMessage, ProtocolError> {
    if text.len() > max_bytes {
        return Err(ProtocolError::new(
            ErrorCode::TooLarge,
            format!("message of {} bytes, limit {max_bytes}", text.len()),
        ));
    }
    let value: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| ProtocolError::new(ErrorCode::BadMessage, format!("not JSON: {e}")))?;
    let Some(object) = value.as_object() else {
        return Err(ProtocolError::new(
            ErrorCode::BadMessage,
            "a message is a JSON object",
        ));
    };
    match object.get("v") {
        None => {}
        Some(v) if v.as_u64() == Some(PROTOCOL_VERSION) => {}
        Some(v) => {
            return Err(ProtocolError::new(
                ErrorCode::UnsupportedVersion,
                format!("version {v} is not supported; this server speaks {PROTOCOL_VERSION}"),
            ))
        }
    }
    let kind = match object.get("type") {
        Some(serde_json::Value::String(t)) => t.clone(),
        _ => {
            return Err(ProtocolError::new(
                ErrorCode::BadMessage,
                "missing string field `type`",
            ))
        }
    };
    if !ClientMessage::TYPES.contains(&kind.as_str()) {
        let mut shown: String = kind.chars().take(32).collect();
        if shown.len() < kind.len() {
            shown.push('…');
        }
        return Err(ProtocolError::new(
            ErrorCode::UnknownType,
            format!("unknown message type {shown:?}"),
        ));
    }
    ClientMessage::deserialize(value)
        .map_err(|e| ProtocolError::new(ErrorCode::BadMessage, format!("bad `{kind}`: {e}")))
}

/// Parse the first frame of a socket, which must be `join`.
pub fn parse_join(text: &str, max_bytes: usize) -> Result<JoinMessage, ProtocolError> {
    match parse_client(text, max_bytes)? {
        ClientMessage::Join(join) => Ok(join),
        _ => Err(ProtocolError::new(
            ErrorCode::NotJoined,
            "the first message must be `join`",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 65536;

    #[test]
    fn ids_have_prefixed_string_form() {
        assert_eq!(ParticipantId(7).to_string(), "p7");
        assert_eq!("t12".parse::<TrackId>(), Ok(TrackId(12)));
        for bad in [
            "12",
            "p12",
            "t",
            "t-1",
            "t1x",
            "t+1",
            "t99999999999999999999999",
        ] {
            assert!(bad.parse::<TrackId>().is_err(), "{bad}");
        }
        assert_eq!(TrackId::new(5, Kind::Video), TrackId(11));
        assert_eq!(TrackId(11).kind(), Kind::Video);
        assert_eq!(TrackId(10).kind(), Kind::Audio);
    }

    #[test]
    fn parses_every_client_message() {
        let cases = [
            r#"{"v":1,"type":"join","room":"demo","name":"Ann","autoSubscribe":false}"#,
            r#"{"type":"offer","sdp":"v=0","tracks":[{"mid":"0","source":"mic"},{"mid":"1","source":"camera","muted":true,"simulcast":[{"rid":"h"},{"rid":"l"}]}]}"#,
            r#"{"type":"answer","sdp":"v=0","seq":3}"#,
            r#"{"type":"candidate","pc":"publish","candidate":"candidate:1 1 udp 1 127.0.0.1 5000 typ host","sdpMid":"0"}"#,
            r#"{"type":"subscribe","tracks":["t2","t3"]}"#,
            r#"{"type":"unsubscribe","tracks":["t2"]}"#,
            r#"{"type":"mute","track":"t2"}"#,
            r#"{"type":"unmute","track":"t2"}"#,
            r#"{"type":"leave"}"#,
            r#"{"type":"ping","ts":1712345678901.5}"#,
        ];
        for text in cases {
            let m = parse_client(text, MAX).unwrap_or_else(|e| panic!("{text}: {e}"));
            // And a Rust client's serialization parses back to the same message.
            assert_eq!(parse_client(&m.to_json(), MAX), Ok(m.clone()), "{text}");
        }
        let join = parse_join(cases[0], MAX).unwrap();
        assert_eq!(join.room, "demo");
        assert!(!join.auto_subscribe);
        assert!(
            parse_join(r#"{"type":"join","room":"r"}"#, MAX)
                .unwrap()
                .auto_subscribe
        );
        let ClientMessage::Offer { tracks, .. } = parse_client(cases[1], MAX).unwrap() else {
            panic!()
        };
        assert_eq!(tracks[1].source, Some(Source::Camera));
        assert!(tracks[1].muted);
        assert_eq!(tracks[1].simulcast.len(), 2);
    }

    #[test]
    fn refusals_carry_the_right_code() {
        let cases = [
            ("not json", ErrorCode::BadMessage),
            ("[1,2]", ErrorCode::BadMessage),
            (r#"{"room":"x"}"#, ErrorCode::BadMessage),
            (r#"{"type":7}"#, ErrorCode::BadMessage),
            (r#"{"type":"fly"}"#, ErrorCode::UnknownType),
            (r#"{"v":2,"type":"ping"}"#, ErrorCode::UnsupportedVersion),
            (r#"{"v":"1","type":"ping"}"#, ErrorCode::UnsupportedVersion),
            (r#"{"type":"offer"}"#, ErrorCode::BadMessage),
            (r#"{"type":"mute","track":"p1"}"#, ErrorCode::BadMessage),
            (r#"{"type":"mute","track":12}"#, ErrorCode::BadMessage),
            (
                r#"{"type":"offer","sdp":"x","tracks":[{"mid":"0","source":"tv"}]}"#,
                ErrorCode::BadMessage,
            ),
            (
                r#"{"type":"candidate","pc":"both","candidate":""}"#,
                ErrorCode::BadMessage,
            ),
        ];
        for (text, code) in cases {
            let e = parse_client(text, MAX).unwrap_err();
            assert_eq!(e.code, code, "{text}: {e}");
            assert!(!e.message.is_empty());
        }
        let e = parse_client(r#"{"type":"offer"}"#, MAX).unwrap_err();
        assert!(e.message.contains("sdp"), "{e}");
        let e = parse_join(r#"{"type":"ping"}"#, MAX).unwrap_err();
        assert_eq!(e.code, ErrorCode::NotJoined);
        // A long unknown type is not echoed whole.
        let long = format!(r#"{{"type":"{}"}}"#, "x".repeat(1000));
        assert!(parse_client(&long, MAX).unwrap_err().message.len() < 100);
    }

    #[test]
    fn oversized_is_refused_before_parsing() {
        let text = format!(r#"{{"type":"ping","pad":"{}"}}"#, "x".repeat(100));
        assert!(parse_client(&text, 200).is_ok());
        let e = parse_client(&text, 50).unwrap_err();
        assert_eq!(e.code, ErrorCode::TooLarge);
        // Even when it is not JSON at all.
        assert_eq!(
            parse_client(&"{".repeat(51), 50).unwrap_err().code,
            ErrorCode::TooLarge
        );
    }

    #[test]
    fn unknown_fields_are_ignored() {
        let m = parse_client(r#"{"type":"mute","track":"t4","future":{"x":1}}"#, MAX).unwrap();
        assert_eq!(m, ClientMessage::Mute { track: TrackId(4) });
    }

    #[test]
    fn server_messages_are_versioned_camel_case_json() {
        let m = ServerMessage::Offer {
            seq: 2,
            sdp: "v=0".into(),
            tracks: vec![OfferedTrack {
                mid: "1".into(),
                track: TrackId(9),
                participant: ParticipantId(3),
            }],
        };
        assert_eq!(
            m.to_json(),
            r#"{"v":1,"type":"offer","seq":2,"sdp":"v=0","tracks":[{"mid":"1","track":"t9","participant":"p3"}]}"#
        );
        let e = ServerMessage::error(ErrorCode::RoomFull, "full");
        assert_eq!(
            e.to_json(),
            r#"{"v":1,"type":"error","code":"room_full","message":"full"}"#
        );
        let q = ServerMessage::ConnectionQuality {
            participant: ParticipantId(1),
            quality: Quality::Excellent,
        };
        assert_eq!(
            q.to_json(),
            r#"{"v":1,"type":"connection_quality","participant":"p1","quality":"excellent"}"#
        );
        // Round trip through serde (a Rust client reads these).
        let back: ServerMessage = serde_json::from_str(&m.to_json()).unwrap();
        assert_eq!(back, m);
    }

    #[test]
    fn error_codes_match_their_serde_names() {
        for code in [
            ErrorCode::BadMessage,
            ErrorCode::TooLarge,
            ErrorCode::UnknownType,
            ErrorCode::UnsupportedVersion,
            ErrorCode::RateLimited,
            ErrorCode::NotJoined,
            ErrorCode::AlreadyJoined,
            ErrorCode::Unauthorized,
            ErrorCode::Forbidden,
            ErrorCode::RoomFull,
            ErrorCode::BadName,
            ErrorCode::IdentityTaken,
            ErrorCode::UnknownTrack,
            ErrorCode::TooManyTracks,
            ErrorCode::NegotiationInProgress,
            ErrorCode::NegotiationFailed,
            ErrorCode::UnexpectedAnswer,
            ErrorCode::Unavailable,
        ] {
            assert_eq!(
                serde_json::to_value(code).unwrap(),
                serde_json::Value::String(code.as_str().into())
            );
        }
        for reason in [
            LeaveReason::Left,
            LeaveReason::Disconnected,
            LeaveReason::PeerClosed,
            LeaveReason::Replaced,
            LeaveReason::Timeout,
            LeaveReason::NegotiationFailed,
            LeaveReason::ServerShutdown,
        ] {
            assert_eq!(
                serde_json::to_value(reason).unwrap(),
                serde_json::Value::String(reason.as_str().into())
            );
        }
    }
}
