//! A WebSocket client for sluice's `/ws` rooms that runs on a glommio shard: TCP connect on the
//! ring, then tungstenite (a synchronous codec) over the same connection made non-blocking, woken
//! by a one-byte peek on the ring (`crate::udp::Readiness::new`). So
//! a participant's signaling never leaves its shard, needs no thread or second runtime, and never
//! blocks media: a read or write that would block returns at once and is retried when the
//! socket is ready.
//!
//! tungstenite answers the server's WebSocket pings by itself (on the next read), which is all
//! the liveness sluice asks of a client.

use std::io;
use std::net::TcpStream;
use std::time::Duration;

use tungstenite::{HandshakeError, Message, WebSocket};

use crate::http::Target;
use crate::udp::{self, Readiness, ReadyWait};

pub struct Ws {
    socket: WebSocket<TcpStream>,
    ready: Readiness,
    waiting: Option<ReadyWait>,
}

/// What reading the socket gave.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    Text(String),
    /// The server closed the socket: its close code and reason, when it sent them.
    Closed(String),
}

fn would_block(e: &tungstenite::Error) -> bool {
    matches!(e, tungstenite::Error::Io(e) if e.kind() == io::ErrorKind::WouldBlock)
}

/// Open `ws://<target><path>` (path with its query). Bounded by `timeout`.
pub async fn connect(target: &Target, path: &str, timeout: Duration) -> Result<Ws, String> {
    glommio::timer::timeout(timeout, async { Ok(open(target, path).await) })
        .await
        .map_err(|_| format!("GET /ws: no WebSocket within {timeout:?}"))?
}

async fn open(target: &Target, path: &str) -> Result<Ws, String> {
    let stream = glommio::net::TcpStream::connect(target.addr)
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", target.addr))?;
    let tcp = udp::dup_tcp(&stream).map_err(|e| format!("/ws socket: {e}"))?;
    drop(stream);
    tcp.set_nonblocking(true)
        .map_err(|e| format!("/ws socket: {e}"))?;
    tcp.set_nodelay(true).ok();
    let ready = Readiness::new(&tcp).map_err(|e| format!("/ws socket: {e}"))?;
    let url = format!("ws://{}{path}", target.host);
    let mut attempt = tungstenite::client(url.as_str(), tcp);
    loop {
        match attempt {
            Ok((socket, _)) => {
                return Ok(Ws {
                    socket,
                    ready,
                    waiting: None,
                })
            }
            Err(HandshakeError::Interrupted(mid)) => {
                // The request is out (a few hundred bytes); what blocks is the response.
                ready.wait().await.map_err(|e| format!("GET /ws: {e}"))?;
                attempt = mid.handshake();
            }
            Err(HandshakeError::Failure(tungstenite::Error::Http(r))) => {
                let body = r
                    .body()
                    .as_deref()
                    .map(String::from_utf8_lossy)
                    .unwrap_or_default();
                return Err(format!(
                    "GET /ws: HTTP {} {}",
                    r.status().as_u16(),
                    crate::peer::short(&body)
                ));
            }
            Err(HandshakeError::Failure(e)) => return Err(format!("GET /ws: {e}")),
        }
    }
}

impl Ws {
    /// Queue one text message and write what the socket takes now; the rest goes out on the
    /// next read or send.
    pub fn send(&mut self, text: String) -> Result<(), String> {
        match self.socket.send(Message::text(text)) {
            Ok(()) => Ok(()),
            Err(e) if would_block(&e) => Ok(()),
            Err(e) => Err(format!("/ws send: {e}")),
        }
    }

    /// The next message without waiting: `Ok(None)` when nothing (complete) is there.
    pub fn try_recv(&mut self) -> Result<Option<Incoming>, String> {
        loop {
            match self.socket.read() {
                Ok(Message::Text(t)) => return Ok(Some(Incoming::Text(t.as_str().to_owned()))),
                Ok(Message::Close(frame)) => {
                    let why = frame.map_or("no close code".to_string(), |f| {
                        format!("{} {}", u16::from(f.code), f.reason)
                    });
                    return Ok(Some(Incoming::Closed(why.trim_end().to_string())));
                }
                // Pings are answered by tungstenite; sluice sends no binary frames.
                Ok(_) => continue,
                Err(e) if would_block(&e) => return Ok(None),
                Err(tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed) => {
                    return Ok(Some(Incoming::Closed("connection closed".into())))
                }
                Err(e) => return Err(format!("/ws: {e}")),
            }
        }
    }

    /// The wait for the socket to have something to read, kept across loop turns until it
    /// resolves (then call [`Ws::ready_done`] and [`Ws::try_recv`] until `None`).
    pub fn ready_wait(&mut self) -> &mut ReadyWait {
        self.waiting.get_or_insert_with(|| self.ready.wait())
    }

    pub fn ready_done(&mut self) {
        self.waiting = None;
    }
}
