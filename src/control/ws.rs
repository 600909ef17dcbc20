//! `GET /ws`: one task per room socket. It authenticates (`?token=` or the `join` message),
//! joins through the [`RoomHub`](super::room_hub::RoomHub), feeds every frame to the rooms and
//! writes what they send back. It enforces the socket's own limits: join within 10 s, message
//! size, liveness (ping every 15 s, closed after 45 s of silence). Nothing here touches media.

use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tokio::sync::mpsc;

use super::auth::{self, AuthError, Claims};
use super::room_hub::{Outbound, SOCKET_QUEUE};
use super::rooms::{
    parse_join, ClientMessage, ErrorCode, IceServer, JoinMessage, JoinRequest, LeaveReason,
    Permissions, ServerMessage,
};
use super::SharedControl;

/// A socket must send `join` within this time (close 4408).
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(10);
/// The server pings every socket this often.
pub const PING_INTERVAL: Duration = Duration::from_secs(15);
/// A socket silent for this long (no message, no pong) is closed (4408).
pub const SILENCE_TIMEOUT: Duration = Duration::from_secs(45);
/// Messages before `join` that are refused before the socket is closed (4400).
const PRE_JOIN_STRIKES: u32 = 5;
/// Frames up to this multiple of `maxMessageBytes` are read and refused with an error; larger
/// ones end the socket at the protocol level.
const READ_SLACK: usize = 4;

#[derive(Deserialize)]
pub struct WsQuery {
    token: Option<String>,
}

fn unix_now() -> Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
}

fn count_auth(c: &SharedControl, e: AuthError) {
    c.metrics
        .auth_failures
        .with_label_values(&[e.reason()])
        .inc();
}

/// The upgrade. A `?token=` that is not valid is refused here with 401 (before any WebSocket);
/// room and rights are checked at `join`.
pub async fn ws(
    State(c): State<SharedControl>,
    Query(q): Query<WsQuery>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    let secret = c.live.lock().expect("live").jwt_secret.clone();
    let claims = match (secret, q.token.as_deref()) {
        (Some(secret), Some(token)) => {
            match auth::verify(secret.as_bytes(), token, unix_now().as_secs()) {
                Ok(claims) => Some(claims),
                Err(e) => {
                    count_auth(&c, e);
                    c.rooms
                        .lock()
                        .expect("rooms")
                        .metrics
                        .joins
                        .with_label_values(&["unauthorized"])
                        .inc();
                    return (
                        StatusCode::UNAUTHORIZED,
                        [
                            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
                            (header::WWW_AUTHENTICATE, "Bearer realm=\"sluice\""),
                        ],
                        format!("{e}\n"),
                    )
                        .into_response();
                }
            }
        }
        _ => None,
    };
    if c.draining.load(std::sync::atomic::Ordering::SeqCst) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "5")],
            "this node is draining for shutdown: try another node\n",
        )
            .into_response();
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(|h| crate::turn::credentials::host_of(h).to_owned());
    let max = c
        .rooms
        .lock()
        .expect("rooms")
        .rooms
        .config()
        .max_message_bytes;
    let read_max = max.saturating_mul(READ_SLACK).max(4096);
    upgrade
        .max_message_size(read_max)
        .max_frame_size(read_max)
        .on_upgrade(move |socket| run(c, socket, claims, host, max))
}

async fn send_text(socket: &mut WebSocket, message: &ServerMessage) -> bool {
    socket
        .send(Message::Text(message.to_json().into()))
        .await
        .is_ok()
}

async fn close(socket: &mut WebSocket, code: u16, reason: &str) {
    // A close reason is at most 123 bytes.
    let mut reason = reason.to_owned();
    while reason.len() > 120 {
        reason.pop();
    }
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        })))
        .await;
}

/// Refuse with an `error` message, then close with the error's code.
async fn refuse(socket: &mut WebSocket, code: ErrorCode, message: String) {
    send_text(socket, &ServerMessage::error(code, message.clone())).await;
    close(socket, code.close_code(), &message).await;
}

/// The type of a client message, for metric labels: one of the protocol's types or `invalid`.
fn message_type(text: &str) -> &'static str {
    #[derive(Deserialize)]
    struct Typed<'a> {
        #[serde(rename = "type", borrow)]
        kind: Option<std::borrow::Cow<'a, str>>,
    }
    let kind = serde_json::from_str::<Typed>(text)
        .ok()
        .and_then(|t| t.kind)
        .unwrap_or_default();
    ClientMessage::TYPES
        .iter()
        .find(|t| **t == kind)
        .copied()
        .unwrap_or("invalid")
}

/// Who the joining client is and what it may do: from the token with auth, else open.
fn admit(
    c: &SharedControl,
    claims: Option<Claims>,
    join: &JoinMessage,
) -> Result<(Option<String>, Permissions), AuthError> {
    let Some(secret) = c.live.lock().expect("live").jwt_secret.clone() else {
        let permissions = Permissions {
            publish: true,
            subscribe: true,
        };
        return Ok((join.identity.clone(), permissions));
    };
    let claims = match claims {
        Some(claims) => claims,
        None => {
            let token = join.token.as_deref().ok_or(AuthError::Missing)?;
            auth::verify(secret.as_bytes(), token, unix_now().as_secs())?
        }
    };
    let grant = auth::room_access(&claims, &join.room)?;
    let identity = (!claims.sub.is_empty()).then(|| claims.sub.clone());
    Ok((
        identity,
        Permissions {
            publish: grant.publish,
            subscribe: grant.subscribe,
        },
    ))
}

fn ice_servers(c: &SharedControl, host: Option<&str>, user: &str) -> Vec<IceServer> {
    let (Some(addr), Some(secret)) = (
        c.turn_addr,
        c.live.lock().expect("live").turn_secret.clone(),
    ) else {
        return Vec::new();
    };
    let host = c
        .config
        .turn
        .public_host
        .clone()
        .or_else(|| host.map(str::to_owned))
        .unwrap_or_else(|| addr.ip().to_string());
    let ttl = Duration::from_secs(c.config.turn.credential_ttl_s);
    let s = crate::turn::credentials::ice_server(
        &host,
        addr.port(),
        &secret,
        user,
        ttl,
        unix_now().as_secs(),
    );
    vec![IceServer {
        urls: s.urls,
        username: Some(s.username),
        credential: Some(s.credential),
    }]
}

/// Wait for `join`; `None` when the socket was refused or went away.
async fn await_join(c: &SharedControl, socket: &mut WebSocket, max: usize) -> Option<JoinMessage> {
    let deadline = tokio::time::Instant::now() + JOIN_TIMEOUT;
    let mut strikes = 0;
    loop {
        let message = match tokio::time::timeout_at(deadline, socket.recv()).await {
            Err(_) => {
                count_join(c, "join_timeout");
                close(socket, 4408, "no join within 10 s").await;
                return None;
            }
            Ok(None) | Ok(Some(Err(_))) => return None,
            Ok(Some(Ok(m))) => m,
        };
        let error = match message {
            Message::Text(text) => {
                if text.len() > max {
                    count_message(c, "invalid", "too_large");
                    let m = format!("message of {} bytes, limit {max}", text.len());
                    refuse(socket, ErrorCode::TooLarge, m).await;
                    return None;
                }
                match parse_join(&text, max) {
                    Ok(join) => return Some(join),
                    Err(e) => {
                        count_message(c, message_type(&text), e.code.as_str());
                        e
                    }
                }
            }
            Message::Binary(b) => {
                count_message(c, "invalid", "bad_message");
                super::rooms::ProtocolError::new(
                    ErrorCode::BadMessage,
                    format!("binary frame of {} bytes: messages are JSON text", b.len()),
                )
            }
            Message::Close(_) => return None,
            _ => continue,
        };
        strikes += 1;
        if strikes >= PRE_JOIN_STRIKES {
            refuse(socket, error.code, error.message).await;
            return None;
        }
        if !send_text(socket, &error.to_message()).await {
            return None;
        }
    }
}

fn count_join(c: &SharedControl, result: &str) {
    c.rooms
        .lock()
        .expect("rooms")
        .metrics
        .joins
        .with_label_values(&[result])
        .inc();
}

fn count_message(c: &SharedControl, kind: &str, result: &str) {
    c.rooms
        .lock()
        .expect("rooms")
        .metrics
        .messages
        .with_label_values(&[kind, result])
        .inc();
}

/// One participant's socket; `max` is `rooms.max_message_bytes`, read once at the upgrade.
async fn run(
    c: SharedControl,
    mut socket: WebSocket,
    claims: Option<Claims>,
    host: Option<String>,
    max: usize,
) {
    let Some(join) = await_join(&c, &mut socket, max).await else {
        return;
    };
    count_message(&c, "join", "ok");
    let (identity, permissions) = match admit(&c, claims, &join) {
        Ok(v) => v,
        Err(e) => {
            count_auth(&c, e);
            let code = if e.status() == 403 {
                ErrorCode::Forbidden
            } else {
                ErrorCode::Unauthorized
            };
            count_join(&c, code.as_str());
            refuse(&mut socket, code, e.to_string()).await;
            return;
        }
    };
    let user = identity.clone().unwrap_or_else(|| "guest".into());
    let request = JoinRequest::websocket(
        &join,
        identity,
        permissions,
        ice_servers(&c, host.as_deref(), &user),
        unix_now().as_millis() as u64,
    );
    let (tx, mut rx) = mpsc::channel(SOCKET_QUEUE);
    let joined = c
        .rooms
        .lock()
        .expect("rooms")
        .join_websocket(&c, request, tx);
    let id = match joined {
        Ok(id) => id,
        Err(refusal) => {
            count_join(&c, refusal.code().as_str());
            refuse(&mut socket, refusal.code(), refusal.to_string()).await;
            return;
        }
    };
    tracing::info!(participant = %id, room = %join.room, "joined");

    let mut ping = tokio::time::interval(PING_INTERVAL);
    ping.tick().await;
    let mut last_heard = Instant::now();
    let reason = loop {
        tokio::select! {
            out = rx.recv() => match out {
                Some(Outbound::Text(text)) => {
                    if socket.send(Message::Text(text.as_ref().into())).await.is_err() {
                        break LeaveReason::Disconnected;
                    }
                }
                Some(Outbound::Close(code, reason)) => {
                    // The rooms removed this participant already.
                    close(&mut socket, code, &reason).await;
                    return;
                }
                None => return,
            },
            message = socket.recv() => {
                last_heard = Instant::now();
                match message {
                    None | Some(Err(_)) => break LeaveReason::Disconnected,
                    Some(Ok(Message::Close(_))) => {
                        // Flush the close reply tungstenite queued.
                        let _ = socket.send(Message::Close(None)).await;
                        break LeaveReason::Disconnected;
                    }
                    Some(Ok(Message::Text(text))) => {
                        if text.len() > max {
                            count_message(&c, "invalid", "too_large");
                            let m = format!("message of {} bytes, limit {max}", text.len());
                            refuse(&mut socket, ErrorCode::TooLarge, m).await;
                            break LeaveReason::Disconnected;
                        }
                        let kind = message_type(&text);
                        let mut hub = c.rooms.lock().expect("rooms");
                        let now = Instant::now();
                        let actions = hub.rooms.handle_text(id, &text, now);
                        count_result(&c, &hub, kind, id, &actions);
                        hub.execute(&c, actions, now);
                    }
                    Some(Ok(Message::Binary(bytes))) => {
                        let mut hub = c.rooms.lock().expect("rooms");
                        let now = Instant::now();
                        let actions = hub.rooms.handle_binary(id, bytes.len(), now);
                        hub.metrics.messages.with_label_values(&["binary", "bad_message"]).inc();
                        hub.execute(&c, actions, now);
                    }
                    Some(Ok(_)) => {}
                }
            }
            _ = ping.tick() => {
                if last_heard.elapsed() >= SILENCE_TIMEOUT {
                    close(&mut socket, 4408, "silent for 45 s").await;
                    break LeaveReason::Timeout;
                }
                if socket.send(Message::Ping(Vec::new().into())).await.is_err() {
                    break LeaveReason::Disconnected;
                }
            }
        }
    };
    let mut hub = c.rooms.lock().expect("rooms");
    let now = Instant::now();
    let actions = hub.rooms.leave(id, reason, now);
    hub.execute(&c, actions, now);
}

/// Count a message by type and by the error it caused, if any; a refused publish or subscribe
/// also counts as an auth refusal.
fn count_result(
    c: &SharedControl,
    hub: &super::room_hub::RoomHub,
    kind: &str,
    id: super::rooms::ParticipantId,
    actions: &[super::rooms::Action],
) {
    use super::rooms::Action;
    let error = actions.iter().find_map(|a| match a {
        Action::Send {
            to,
            message: ServerMessage::Error { code, .. },
        } if to.as_slice() == [id] => Some(*code),
        _ => None,
    });
    let result = error.map(ErrorCode::as_str).unwrap_or("ok");
    hub.metrics
        .messages
        .with_label_values(&[kind, result])
        .inc();
    if error == Some(ErrorCode::Forbidden) {
        count_auth(
            c,
            match kind {
                "offer" => AuthError::NotAllowed(auth::Right::Publish),
                _ => AuthError::NotAllowed(auth::Right::Subscribe),
            },
        );
    }
}

/// Time out unanswered offers and send `speakers` updates, every 100 ms while rooms exist.
pub async fn run_timers(c: SharedControl) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let mut hub = c.rooms.lock().expect("rooms");
        let now = Instant::now();
        if hub.rooms.poll_timeout(now).is_some_and(|t| t <= now) {
            let actions = hub.rooms.handle_timeout(now);
            hub.execute(&c, actions, now);
        }
    }
}
