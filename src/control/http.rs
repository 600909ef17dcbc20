//! The HTTP API: WHIP (RFC 9725) and WHEP, health, listings, metrics, and the demo page. Every
//! refusal is plain text with a reason, and is counted.

// Handlers short-circuit with a finished `Response` as the error; boxing it would buy nothing on a
// signaling path.
#![allow(clippy::result_large_err)]

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use str0m::Candidate;
use tower_http::cors::{AllowOrigin, CorsLayer};

use super::negotiate::NegotiationError;
use super::placement::shard_for;
use super::registry::{RegistryError, SessionKind};
use super::SharedControl;
use crate::mesh::TrackId;
use crate::sfu::{MaxLayer, Quality};
use crate::shard::{CloseReason, NewPeer, ShardCommand};
use crate::SessionId;

const DEMO_PAGE: &str = include_str!("demo.html");

pub fn router(control: SharedControl) -> Router {
    let origin = if control.config.http.cors_origin == "*" {
        AllowOrigin::any()
    } else {
        match HeaderValue::from_str(&control.config.http.cors_origin) {
            Ok(v) => AllowOrigin::exact(v),
            Err(_) => AllowOrigin::any(),
        }
    };
    let cors = CorsLayer::new()
        .allow_origin(origin)
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::PATCH,
            Method::DELETE,
            Method::OPTIONS,
        ])
        .allow_headers([
            header::CONTENT_TYPE,
            header::AUTHORIZATION,
            header::IF_MATCH,
        ])
        .expose_headers([header::LOCATION, header::ETAG, header::LINK]);
    let body_limit = control.config.limits.max_body_bytes;
    Router::new()
        .route("/", get(|| async { Html(DEMO_PAGE) }))
        .route("/healthz", get(healthz))
        .route("/api/streams", get(list_streams))
        .route("/api/rooms", get(list_rooms))
        .route("/ws", get(super::ws::ws))
        .route("/metrics", get(metrics))
        .route("/whip/{stream}", post(whip).options(options))
        .route("/whep/{stream}", post(whep).options(options))
        .route(
            "/whip/{stream}/{session}",
            axum::routing::delete(delete_whip).patch(patch_whip),
        )
        .route(
            "/whep/{stream}/{session}",
            axum::routing::delete(delete_whep).patch(patch_whep),
        )
        .layer(DefaultBodyLimit::max(body_limit))
        .route_layer(axum::middleware::from_fn_with_state(
            control.clone(),
            count_requests,
        ))
        .layer(cors)
        .layer(axum::middleware::from_fn_with_state(
            control.clone(),
            plain_options,
        ))
        .with_state(control)
}

fn text(status: StatusCode, msg: impl Into<String>) -> Response {
    let mut msg = msg.into();
    msg.push('\n');
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        msg,
    )
        .into_response()
}

fn has_content_type(headers: &HeaderMap, want: &str) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case(want))
}

fn valid_stream_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// With `auth.jwt_secret` set, the request must carry `Authorization: Bearer <jwt>` granting
/// `right` on `stream`. Refusals are 401/403 with the reason, counted by reason.
fn authorize(
    c: &SharedControl,
    headers: &HeaderMap,
    stream: &str,
    right: super::auth::Right,
) -> Result<(), Response> {
    let Some(secret) = c.live.lock().expect("live").jwt_secret.clone() else {
        return Ok(());
    };
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(super::auth::bearer);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    match super::auth::check(secret.as_bytes(), token, stream, right, now) {
        Ok(_) => Ok(()),
        Err(e) => {
            c.metrics
                .auth_failures
                .with_label_values(&[e.reason()])
                .inc();
            let status = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::UNAUTHORIZED);
            let mut r = text(status, e.to_string());
            if status == StatusCode::UNAUTHORIZED {
                r.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"sluice\""),
                );
            }
            Err(r)
        }
    }
}

/// Checks shared by WHIP and WHEP before any work: stream name, content type, body, capacity,
/// and the token.
fn precheck<'a>(
    c: &SharedControl,
    stream: &str,
    headers: &HeaderMap,
    body: &'a Bytes,
    right: super::auth::Right,
) -> Result<&'a str, Response> {
    // WHEP may also name a room participant, `room~identity`; a token for the room covers it.
    let watched = match super::rooms::parse_watch_name(stream) {
        Some(super::rooms::WatchName::Participant { room, .. })
            if right == super::auth::Right::Subscribe =>
        {
            Some(room)
        }
        _ => None,
    };
    if !valid_stream_name(stream) && watched.is_none() {
        c.metrics
            .signaling
            .with_label_values(&["bad_request"])
            .inc();
        return Err(text(
            StatusCode::BAD_REQUEST,
            "stream names are 1-128 characters of A-Z a-z 0-9 - _ . (WHEP also takes room~identity)",
        ));
    }
    authorize(c, headers, watched.unwrap_or(stream), right)?;
    if !has_content_type(headers, "application/sdp") {
        c.metrics
            .signaling
            .with_label_values(&["unsupported_media_type"])
            .inc();
        return Err(text(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "the offer must be sent as Content-Type: application/sdp",
        ));
    }
    let Ok(offer) = std::str::from_utf8(body) else {
        c.metrics
            .signaling
            .with_label_values(&["bad_request"])
            .inc();
        return Err(text(StatusCode::BAD_REQUEST, "the offer is not UTF-8"));
    };
    if c.draining.load(std::sync::atomic::Ordering::SeqCst) {
        c.metrics.signaling.with_label_values(&["draining"]).inc();
        let mut r = text(
            StatusCode::SERVICE_UNAVAILABLE,
            "this node is draining for shutdown: try another node",
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        return Err(r);
    }
    let sessions = c.registry.lock().expect("registry").sessions();
    let max_peers = c.live.lock().expect("live").max_peers;
    if sessions >= max_peers {
        c.metrics
            .signaling
            .with_label_values(&["over_capacity"])
            .inc();
        let mut r = text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("over capacity: {sessions} sessions (limits.max_peers = {max_peers})"),
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        return Err(r);
    }
    Ok(offer)
}

fn negotiation_failed(c: &SharedControl, e: NegotiationError) -> Response {
    c.metrics
        .signaling
        .with_label_values(&["bad_request"])
        .inc();
    text(StatusCode::BAD_REQUEST, e.to_string())
}

/// RFC 9725 `Link: <turn:...>; rel="ice-server"` values with short-lived TURN REST credentials,
/// one user per session so per-user quotas stay per client. Empty when TURN is off.
fn ice_server_links(c: &SharedControl, headers: &HeaderMap, user: &str) -> Vec<String> {
    let (Some(addr), Some(secret)) = (
        c.turn_addr,
        c.live.lock().expect("live").turn_secret.clone(),
    ) else {
        return Vec::new();
    };
    let host = match &c.config.turn.public_host {
        Some(h) => h.clone(),
        None => headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(|h| crate::turn::credentials::host_of(h).to_owned())
            .unwrap_or_else(|| addr.ip().to_string()),
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let ttl = std::time::Duration::from_secs(c.config.turn.credential_ttl_s);
    let (username, credential) =
        crate::turn::credentials::rest_credentials(&secret, user, ttl, now);
    crate::turn::credentials::link_headers(&host, addr.port(), &username, &credential).to_vec()
}

fn with_links(mut r: Response, links: Vec<String>) -> Response {
    for l in links {
        if let Ok(v) = HeaderValue::from_str(&l) {
            r.headers_mut().append(header::LINK, v);
        }
    }
    r
}

fn created(
    kind: SessionKind,
    stream: &str,
    session: SessionId,
    etag: &str,
    answer: String,
) -> Response {
    let location = format!("/{}/{stream}/{session}", kind.path());
    (
        StatusCode::CREATED,
        [
            (header::CONTENT_TYPE, "application/sdp".to_string()),
            (header::LOCATION, location),
            (header::ETAG, format!("\"{etag}\"")),
        ],
        answer,
    )
        .into_response()
}

/// The `sub` of the request's token, when auth is on and it has one.
fn token_identity(c: &SharedControl, headers: &HeaderMap) -> Option<String> {
    let secret = c.live.lock().expect("live").jwt_secret.clone()?;
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(super::auth::bearer)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let claims = super::auth::verify(secret.as_bytes(), token, now).ok()?;
    (!claims.sub.is_empty() && super::rooms::valid_identity(&claims.sub)).then_some(claims.sub)
}

fn hand_over(c: &SharedControl, shard: usize, peer: NewPeer) -> Result<(), Response> {
    c.shards[shard]
        .send(ShardCommand::AddPeer(Box::new(peer)))
        .map_err(|_| {
            c.metrics
                .signaling
                .with_label_values(&["over_capacity"])
                .inc();
            let mut r = text(StatusCode::SERVICE_UNAVAILABLE, "media shard is overloaded");
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            r
        })
}

async fn whip(
    State(c): State<SharedControl>,
    Path(stream): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let offer = match precheck(&c, &stream, &headers, &body, super::auth::Right::Publish) {
        Ok(o) => o,
        Err(r) => return r,
    };
    let session = SessionId::random();
    let shard = shard_for(session, c.shards.len());
    let mut reg = c.registry.lock().expect("registry");
    let stream_id = match reg.prepare_publish(&stream) {
        Ok(id) => id,
        Err(_) => {
            c.metrics.signaling.with_label_values(&["conflict"]).inc();
            return text(
                StatusCode::CONFLICT,
                format!("stream {stream:?} already has a publisher"),
            );
        }
    };
    let n = match c.template.publisher(offer, &c.announced[shard]) {
        Ok(n) => n,
        Err(e) => return negotiation_failed(&c, e),
    };
    // One audio and one video track per stream: the first m-line of each kind.
    let mut tracks = Vec::new();
    let mut published = Vec::new();
    let mut room_tracks = Vec::new();
    for (mid, video, codecs) in n.media {
        let track = TrackId::new(stream_id, video);
        if tracks.iter().any(|(_, t)| *t == track) {
            continue;
        }
        if video {
            let simulcast = n.rtc.media(mid).is_some_and(
                |m| matches!(m.rids_rx(), str0m::media::Rids::Specific(r) if r.len() > 1),
            );
            let mut set = c.simulcast_tracks.lock().expect("simulcast tracks");
            if simulcast {
                set.insert(track);
            } else {
                set.remove(&track);
            }
        }
        tracks.push((mid, track));
        let codecs: Arc<[str0m::format::PayloadParams]> = Arc::from(codecs);
        room_tracks.push((mid, track, codecs.clone()));
        published.push((track, codecs));
    }
    if tracks.is_empty() {
        return negotiation_failed(
            &c,
            NegotiationError::Unusable(
                "the offer sends no audio or video in a codec sluice forwards \
                 (Opus, VP8, VP9, H.264, AV1)"
                    .into(),
            ),
        );
    }
    let etag = format!("{:016x}", rand::random::<u64>());
    let updates = match reg.add_publisher(session, &stream, shard, etag.clone(), published) {
        Ok(u) => u,
        Err(RegistryError::Conflict | RegistryError::NotPublished) => {
            c.metrics.signaling.with_label_values(&["conflict"]).inc();
            return text(StatusCode::CONFLICT, "stream already has a publisher");
        }
    };
    reg.set_offer(&session, offer.to_owned(), None);
    let peer = NewPeer {
        session,
        rtc: n.rtc,
        ufrag: n.ufrag,
        publisher: true,
        tracks,
        max_layer: MaxLayer::default(),
    };
    if let Err(r) = hand_over(&c, shard, peer) {
        let undo = reg.remove(&session).map(|(_, u)| u).unwrap_or_default();
        drop(reg);
        c.broadcast(undo);
        return r;
    }
    drop(reg);
    c.broadcast(updates);
    // The publisher is a participant of the room named like the stream.
    let joined = c.rooms.lock().expect("rooms").join_whip(
        &c,
        &stream,
        token_identity(&c, &headers),
        session,
        shard,
        room_tracks,
    );
    if let Err(refusal) = joined {
        let undo = c.registry.lock().expect("registry").remove(&session);
        if let Some((_, u)) = undo {
            c.broadcast(u);
        }
        let _ = c.shards[shard].send(ShardCommand::RemovePeer {
            session,
            reason: CloseReason::Deleted,
        });
        let outcome = if refusal.http_status() == 503 {
            "room_full"
        } else {
            "conflict"
        };
        c.metrics.signaling.with_label_values(&[outcome]).inc();
        c.rooms
            .lock()
            .expect("rooms")
            .metrics
            .joins
            .with_label_values(&[refusal.code().as_str()])
            .inc();
        let status = StatusCode::from_u16(refusal.http_status()).unwrap_or(StatusCode::CONFLICT);
        let mut r = text(status, format!("room {stream:?}: {refusal}"));
        if status == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        return r;
    }
    c.metrics.signaling.with_label_values(&["created"]).inc();
    tracing::info!(%session, %stream, shard, "publisher created");
    let links = ice_server_links(&c, &headers, &session.to_string());
    with_links(
        created(SessionKind::Publish, &stream, session, &etag, n.answer),
        links,
    )
}

/// A WHEP viewer's own cap on simulcast layers: `?layer=low|mid|high` and/or `?max_height=N`.
/// Other query parameters are ignored.
fn parse_layer_cap(query: &str) -> Result<MaxLayer, String> {
    let mut max = MaxLayer::default();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "layer" => {
                max.quality = Some(
                    Quality::parse(v)
                        .ok_or_else(|| format!("layer must be low, mid or high, not {v:?}"))?,
                );
            }
            "max_height" => {
                let h: u32 = v
                    .parse()
                    .ok()
                    .filter(|h| (1..=8192).contains(h))
                    .ok_or_else(|| {
                        format!("max_height must be a number of pixels from 1 to 8192, not {v:?}")
                    })?;
                max.max_height = Some(h);
            }
            _ => {}
        }
    }
    Ok(max)
}

async fn whep(
    State(c): State<SharedControl>,
    Path(stream): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let max_layer = match parse_layer_cap(query.as_deref().unwrap_or("")) {
        Ok(m) => m,
        Err(e) => {
            c.metrics
                .signaling
                .with_label_values(&["bad_request"])
                .inc();
            return text(StatusCode::BAD_REQUEST, e);
        }
    };
    let offer = match precheck(&c, &stream, &headers, &body, super::auth::Right::Subscribe) {
        Ok(o) => o,
        Err(r) => return r,
    };
    let session = SessionId::random();
    let shard = shard_for(session, c.shards.len());
    let watched = match super::rooms::parse_watch_name(&stream) {
        Some(super::rooms::WatchName::Participant { room, identity }) => {
            let screen = query
                .as_deref()
                .is_some_and(|q| q.split('&').any(|kv| kv == "source=screen"));
            match c.rooms.lock().expect("rooms").watch(room, identity, screen) {
                Some(tracks) => Some(super::registry::Published {
                    stream_id: 0,
                    tracks,
                }),
                None => {
                    c.metrics.signaling.with_label_values(&["not_found"]).inc();
                    return text(
                        StatusCode::NOT_FOUND,
                        format!("nobody in room {room:?} is {identity:?} and publishes that"),
                    );
                }
            }
        }
        _ => None,
    };
    let mut reg = c.registry.lock().expect("registry");
    let published = match watched.map(Ok).unwrap_or_else(|| reg.published(&stream)) {
        Ok(p) => p,
        Err(_) => {
            c.metrics.signaling.with_label_values(&["not_found"]).inc();
            return text(
                StatusCode::NOT_FOUND,
                format!("nobody publishes stream {stream:?}"),
            );
        }
    };
    let codecs: Vec<_> = published
        .tracks
        .iter()
        .flat_map(|(_, c)| c.iter().copied())
        .collect();
    let simulcast = {
        let set = c.simulcast_tracks.lock().expect("simulcast tracks");
        published
            .tracks
            .iter()
            .any(|(t, _)| t.is_video() && set.contains(t))
    };
    let n = match c
        .template
        .viewer(offer, &c.announced[shard], &codecs, simulcast)
    {
        Ok(n) => n,
        Err(e) => return negotiation_failed(&c, e),
    };
    let mut tracks = Vec::new();
    for (mid, video, _) in &n.media {
        // The stream's (or participant's) one track of this kind.
        let Some(&(track, _)) = published
            .tracks
            .iter()
            .find(|(t, _)| t.is_video() == *video)
        else {
            continue;
        };
        if tracks.iter().any(|(_, t)| *t == track) {
            continue;
        }
        tracks.push((*mid, track));
    }
    // Every published kind the viewer asked for must have a common codec.
    for (track, codecs) in &published.tracks {
        let kind = if track.is_video() { "video" } else { "audio" };
        let asked = offer.lines().any(|l| l.starts_with(&format!("m={kind} ")));
        if asked && !tracks.iter().any(|(_, t)| t == track) {
            let names: Vec<String> = codecs
                .iter()
                .map(|p| format!("{}", p.spec().codec))
                .collect();
            return negotiation_failed(
                &c,
                NegotiationError::Unusable(format!(
                    "the offer cannot receive the stream's {kind} codec ({})",
                    names.join(", ")
                )),
            );
        }
    }
    if tracks.is_empty() {
        return negotiation_failed(
            &c,
            NegotiationError::Unusable("the offer receives neither audio nor video".into()),
        );
    }
    let etag = format!("{:016x}", rand::random::<u64>());
    let updates = reg.add_viewer(
        session,
        &stream,
        shard,
        etag.clone(),
        tracks.iter().map(|(_, t)| *t).collect(),
    );
    reg.set_offer(&session, offer.to_owned(), None);
    let peer = NewPeer {
        session,
        rtc: n.rtc,
        ufrag: n.ufrag,
        publisher: false,
        tracks,
        max_layer,
    };
    // Interest first, so the publisher's shard already fans out when the viewer connects.
    drop(reg);
    c.broadcast(updates);
    if let Err(r) = hand_over(&c, shard, peer) {
        let undo = c.registry.lock().expect("registry").remove(&session);
        if let Some((_, u)) = undo {
            c.broadcast(u);
        }
        return r;
    }
    c.metrics.signaling.with_label_values(&["created"]).inc();
    tracing::info!(%session, %stream, shard, "viewer created");
    let links = ice_server_links(&c, &headers, &session.to_string());
    with_links(
        created(SessionKind::Play, &stream, session, &etag, n.answer),
        links,
    )
}

/// A plain `OPTIONS` (no `Access-Control-Request-Method`, so not a CORS preflight) on a WHIP or
/// WHEP endpoint is answered here, outside the CORS layer, which would otherwise take every
/// `OPTIONS` for a preflight and drop the ICE server `Link`s.
async fn plain_options(
    State(c): State<SharedControl>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = req.uri().path();
    let endpoint = path.starts_with("/whip/") || path.starts_with("/whep/");
    let preflight = req
        .headers()
        .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    if req.method() != Method::OPTIONS || preflight || !endpoint {
        return next.run(req).await;
    }
    let headers = req.headers().clone();
    // With token auth on, TURN credentials go only to a request whose token grants the right.
    let stream = path.splitn(3, '/').nth(2).unwrap_or_default();
    let right = if path.starts_with("/whip/") {
        super::auth::Right::Publish
    } else {
        super::auth::Right::Subscribe
    };
    let mut r = if authorize(&c, &headers, stream, right).is_ok() {
        options(State(c.clone()), headers).await
    } else {
        (StatusCode::NO_CONTENT, [(header::ALLOW, "OPTIONS, POST")]).into_response()
    };
    let origin = if c.config.http.cors_origin == "*" {
        HeaderValue::from_static("*")
    } else {
        HeaderValue::from_str(&c.config.http.cors_origin).unwrap_or(HeaderValue::from_static("*"))
    };
    let h = r.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    h.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("location, etag, link"),
    );
    c.metrics
        .http_requests
        .with_label_values(&["/whip|whep/{stream} OPTIONS", r.status().as_str()])
        .inc();
    r
}

/// `OPTIONS`: what the endpoint accepts, and the ICE servers a client should use (RFC 9725
/// section 4.6), with credentials for an anonymous user of this request.
async fn options(State(c): State<SharedControl>, headers: HeaderMap) -> Response {
    let user = format!("options-{:08x}", rand::random::<u32>());
    let links = ice_server_links(&c, &headers, &user);
    let r = (
        StatusCode::NO_CONTENT,
        [
            (
                header::HeaderName::from_static("accept-post"),
                "application/sdp",
            ),
            (header::ALLOW, "OPTIONS, POST"),
        ],
    )
        .into_response();
    with_links(r, links)
}

/// The first `a=<name>:` value in an SDP or SDP fragment.
fn sdp_attr<'a>(sdp: &'a str, name: &str) -> Option<&'a str> {
    sdp.lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix("a=")?.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
}

struct Found {
    id: SessionId,
    shard: usize,
    etag: String,
    remote_ufrag: String,
    offer: String,
}

fn lookup(
    c: &SharedControl,
    kind: SessionKind,
    stream: &str,
    session: &str,
) -> Result<Found, Response> {
    let not_found = || {
        c.metrics.signaling.with_label_values(&["not_found"]).inc();
        text(StatusCode::NOT_FOUND, "no such session")
    };
    let id: SessionId = session.parse().map_err(|_| not_found())?;
    let reg = c.registry.lock().expect("registry");
    let info = reg.session(&id).ok_or_else(not_found)?;
    if info.kind != kind || info.stream != stream {
        return Err(not_found());
    }
    Ok(Found {
        id,
        shard: info.shard,
        etag: info.etag.clone(),
        remote_ufrag: info.remote_ufrag.clone(),
        offer: info.offer.clone(),
    })
}

async fn delete_session(
    c: SharedControl,
    kind: SessionKind,
    stream: String,
    session: String,
) -> Response {
    let Found { id, shard, .. } = match lookup(&c, kind, &stream, &session) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let removed = c.registry.lock().expect("registry").remove(&id);
    if let Some((_, updates)) = removed {
        c.broadcast(updates);
    }
    let _ = c.shards[shard].send(ShardCommand::RemovePeer {
        session: id,
        reason: CloseReason::Deleted,
    });
    c.metrics.signaling.with_label_values(&["deleted"]).inc();
    tracing::info!(session = %id, %stream, "session deleted");
    text(StatusCode::OK, "session ended")
}

async fn delete_whip(
    State(c): State<SharedControl>,
    Path((s, id)): Path<(String, String)>,
) -> Response {
    delete_session(c, SessionKind::Publish, s, id).await
}

async fn delete_whep(
    State(c): State<SharedControl>,
    Path((s, id)): Path<(String, String)>,
) -> Response {
    delete_session(c, SessionKind::Play, s, id).await
}

/// Trickle ICE (RFC 8840 fragments, RFC 9725 section 4.3): remote candidates are handed to the
/// peer. sluice is ICE-lite, so it also learns addresses from the checks themselves.
async fn patch_session(
    c: SharedControl,
    kind: SessionKind,
    stream: String,
    session: String,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Found {
        id,
        shard,
        etag,
        remote_ufrag,
        offer,
    } = match lookup(&c, kind, &stream, &session) {
        Ok(v) => v,
        Err(r) => return r,
    };
    if !has_content_type(&headers, "application/trickle-ice-sdpfrag") {
        c.metrics
            .signaling
            .with_label_values(&["unsupported_media_type"])
            .inc();
        return text(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "PATCH takes Content-Type: application/trickle-ice-sdpfrag",
        );
    }
    if let Some(m) = headers.get(header::IF_MATCH).and_then(|v| v.to_str().ok()) {
        let m = m.trim();
        if m != "*" && m.trim_matches('"') != etag {
            return text(
                StatusCode::PRECONDITION_FAILED,
                "ETag does not match the session",
            );
        }
    }
    let Ok(frag) = std::str::from_utf8(&body) else {
        c.metrics
            .signaling
            .with_label_values(&["bad_request"])
            .inc();
        return text(StatusCode::BAD_REQUEST, "the fragment is not UTF-8");
    };
    // New credentials mean an ICE restart (RFC 9725 section 4.4); the same ones are plain trickle.
    let ufrag = sdp_attr(frag, "ice-ufrag");
    let pwd = sdp_attr(frag, "ice-pwd");
    if let (Some(ufrag), Some(pwd)) = (ufrag, pwd) {
        if ufrag != remote_ufrag {
            return ice_restart(&c, id, shard, &offer, ufrag, pwd).await;
        }
    }
    let mut candidates = Vec::new();
    for line in frag.lines().map(str::trim) {
        if let Some(cand) = line.strip_prefix("a=candidate:") {
            match Candidate::from_sdp_string(&format!("candidate:{cand}")) {
                Ok(c) => candidates.push(c),
                Err(e) => {
                    c.metrics
                        .signaling
                        .with_label_values(&["bad_request"])
                        .inc();
                    return text(StatusCode::BAD_REQUEST, format!("bad candidate: {e}"));
                }
            }
        } else if line.starts_with("a=ice-ufrag:") || line.starts_with("a=ice-pwd:") {
            // Only a fragment with new credentials is an ICE restart; repeating the current
            // ones (as RFC 8840 fragments do) is plain trickle.
            continue;
        }
    }
    for candidate in candidates {
        let _ = c.shards[shard].send(ShardCommand::RemoteCandidate {
            session: id,
            candidate,
        });
    }
    StatusCode::NO_CONTENT.into_response()
}

/// The session's offer with the client's new ICE credentials and without its old candidates.
fn restart_offer(offer: &str, ufrag: &str, pwd: &str) -> String {
    let mut out = String::with_capacity(offer.len());
    for line in offer.lines().map(|l| l.trim_end_matches('\r')) {
        if line.starts_with("a=candidate:") || line == "a=end-of-candidates" {
            continue;
        }
        if line.starts_with("a=ice-ufrag:") {
            out.push_str(&format!("a=ice-ufrag:{ufrag}"));
        } else if line.starts_with("a=ice-pwd:") {
            out.push_str(&format!("a=ice-pwd:{pwd}"));
        } else {
            out.push_str(line);
        }
        out.push_str("\r\n");
    }
    out
}

async fn ice_restart(
    c: &SharedControl,
    id: SessionId,
    shard: usize,
    offer: &str,
    ufrag: &str,
    pwd: &str,
) -> Response {
    let offer = restart_offer(offer, ufrag, pwd);
    let (reply, answer) = tokio::sync::oneshot::channel();
    let sent = c.shards[shard].send(ShardCommand::IceRestart {
        session: id,
        offer: offer.clone(),
        reply,
    });
    if sent.is_err() {
        let mut r = text(StatusCode::SERVICE_UNAVAILABLE, "media shard is overloaded");
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return r;
    }
    let local = match tokio::time::timeout(std::time::Duration::from_secs(2), answer).await {
        Ok(Ok(Ok(creds))) => creds,
        Ok(Ok(Err(e))) => {
            c.metrics
                .signaling
                .with_label_values(&["bad_request"])
                .inc();
            return text(StatusCode::BAD_REQUEST, format!("ICE restart refused: {e}"));
        }
        _ => return text(StatusCode::NOT_FOUND, "the session ended"),
    };
    let etag = format!("{:016x}", rand::random::<u64>());
    let mut body = format!(
        "a=ice-lite\r\na=ice-ufrag:{}\r\na=ice-pwd:{}\r\n",
        local.ufrag, local.pass
    );
    for addr in &c.announced[shard] {
        if let Ok(cand) = Candidate::host(*addr, "udp") {
            body.push_str(&format!("a={}\r\n", cand.to_sdp_string()));
        }
    }
    body.push_str("a=end-of-candidates\r\n");
    c.registry
        .lock()
        .expect("registry")
        .set_offer(&id, offer, Some(etag.clone()));
    tracing::info!(session = %id, "ICE restart");
    (
        StatusCode::OK,
        [
            (
                header::CONTENT_TYPE,
                "application/trickle-ice-sdpfrag".to_string(),
            ),
            (header::ETAG, format!("\"{etag}\"")),
        ],
        body,
    )
        .into_response()
}

async fn patch_whip(
    State(c): State<SharedControl>,
    Path((s, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    patch_session(c, SessionKind::Publish, s, id, headers, body).await
}

async fn patch_whep(
    State(c): State<SharedControl>,
    Path((s, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    patch_session(c, SessionKind::Play, s, id, headers, body).await
}

/// `200 ok`, or `503 draining` once a drain began (load balancers stop sending new sessions).
async fn healthz(State(c): State<SharedControl>) -> Response {
    if c.draining.load(std::sync::atomic::Ordering::SeqCst) {
        return text(StatusCode::SERVICE_UNAVAILABLE, "draining");
    }
    text(StatusCode::OK, "ok")
}

async fn list_streams(State(c): State<SharedControl>) -> Response {
    let list = c.registry.lock().expect("registry").list();
    let v: Vec<_> = list
        .into_iter()
        .map(|(name, live, viewers)| {
            serde_json::json!({ "stream": name, "publishing": live, "viewers": viewers })
        })
        .collect();
    axum::Json(serde_json::json!({ "streams": v })).into_response()
}

async fn list_rooms(State(c): State<SharedControl>) -> Response {
    let rooms = c.rooms.lock().expect("rooms").rooms.summaries();
    axum::Json(serde_json::json!({ "rooms": rooms })).into_response()
}

async fn metrics(State(c): State<SharedControl>) -> Response {
    let stats: Vec<&crate::metrics::ShardStats> = c.shards.iter().map(|s| &*s.stats).collect();
    let gauges = {
        let reg = c.registry.lock().expect("registry");
        let (publish_sessions, play_sessions) = reg.session_counts();
        crate::metrics::export::ControlGauges {
            publish_sessions,
            play_sessions,
            streams: reg.streams() as u64,
            ring_depths: c.mesh.depths(),
        }
    };
    let mut text = c.metrics.render(&stats, &gauges);
    c.turn_stats.write_prometheus(&mut text);
    text.push_str(&c.rooms.lock().expect("rooms").metrics.render());
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// Count every request by route template and status.
pub async fn count_requests(
    State(c): State<SharedControl>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let resp = next.run(req).await;
    c.metrics
        .http_requests
        .with_label_values(&[route.as_str(), resp.status().as_str()])
        .inc();
    resp
}
