//! The credentials sluice hands to its own clients: short-lived TURN REST API credentials, as
//! RFC 9725 `Link` headers (WHIP/WHEP) and as WebRTC `iceServers` entries (rooms).
//!
//! Pure functions of the secret, the user and the time; the HTTP handlers call them.

use std::net::IpAddr;
use std::time::Duration;

use serde::Serialize;

use super::auth::rest_password;

/// REST credentials for `user`, valid `ttl` from `now_unix`: username `<expiry>:<user>`, password
/// `base64(HMAC-SHA1(secret, username))` (coturn's `use-auth-secret`). `user` names who counts
/// against `turn.user_quota`, so give each client its own (a session id, say), and keep it free
/// of `:` so coturn-style parsers agree on the split.
pub fn rest_credentials(
    secret: &str,
    user: &str,
    ttl: Duration,
    now_unix: u64,
) -> (String, String) {
    let username = format!("{}:{user}", now_unix.saturating_add(ttl.as_secs()));
    let password = rest_password(secret, &username);
    (username, password)
}

/// `host` as it goes in a URI: IPv6 addresses in brackets.
fn uri_host(host: &str) -> String {
    match host.parse::<IpAddr>() {
        Ok(IpAddr::V6(v6)) => format!("[{v6}]"),
        _ => host.to_string(),
    }
}

/// The two `turn:` URLs of a server, UDP then TCP.
pub fn turn_urls(host: &str, port: u16) -> [String; 2] {
    let host = uri_host(host);
    [
        format!("turn:{host}:{port}?transport=udp"),
        format!("turn:{host}:{port}?transport=tcp"),
    ]
}

/// Escapes a value for a quoted-string (RFC 9110 section 5.6.4).
fn quoted(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// The RFC 9725 `Link` header values for the TURN server at `host:port`, UDP then TCP:
/// `<turn:HOST:PORT?transport=udp>; rel="ice-server"; username="..."; credential="...";
/// credential-type="password"`.
pub fn link_headers(host: &str, port: u16, username: &str, credential: &str) -> [String; 2] {
    turn_urls(host, port).map(|url| {
        format!(
            "<{url}>; rel=\"ice-server\"; username={}; credential={}; credential-type=\"password\"",
            quoted(username),
            quoted(credential)
        )
    })
}

/// One `RTCIceServer` entry for the rooms' join message (`iceServers`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct IceServer {
    pub urls: Vec<String>,
    pub username: String,
    pub credential: String,
}

/// The `iceServers` entry for the TURN server at `host:port` with REST credentials for `user`.
pub fn ice_server(
    host: &str,
    port: u16,
    secret: &str,
    user: &str,
    ttl: Duration,
    now_unix: u64,
) -> IceServer {
    let (username, credential) = rest_credentials(secret, user, ttl, now_unix);
    IceServer {
        urls: turn_urls(host, port).to_vec(),
        username,
        credential,
    }
}

/// The host part of an HTTP `Host` header value (`example.com:8080`, `[::1]:8080`), for
/// advertising TURN on the host the client already reached when `turn.public_host` is unset.
pub fn host_of(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
        _ => authority,
    }
}

/// A random secret for a process that has TURN on but no `turn.secret`, so the credentials it
/// hands out still work (until it restarts).
pub fn random_secret() -> String {
    use base64::Engine as _;
    let bytes: [u8; 24] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::turn::auth::{long_term_key, parse_rest_username};

    #[test]
    fn rest_credentials_follow_coturn() {
        let (user, pass) =
            rest_credentials("north", "alice", Duration::from_secs(86_400), 1_433_809_518);
        assert_eq!(user, "1433895918:alice");
        assert_eq!(parse_rest_username(&user), Some((1_433_895_918, "alice")));
        assert_eq!(pass, crate::turn::auth::rest_password("north", &user));
        // Known answer: echo -n 1433895918:alice | openssl dgst -binary -sha1 -hmac north | base64
        assert_eq!(pass, "RqMvcGPYTJMGThVLSi4amT4zFtI=");
        assert_eq!(long_term_key(&user, "sluice", &pass).len(), 16);
    }

    #[test]
    fn link_headers_are_rfc9725() {
        let [udp, tcp] = link_headers("turn.example.org", 3478, "1:alice", "pa\"ss");
        assert_eq!(
            udp,
            "<turn:turn.example.org:3478?transport=udp>; rel=\"ice-server\"; username=\"1:alice\"; \
             credential=\"pa\\\"ss\"; credential-type=\"password\""
        );
        assert!(tcp.starts_with("<turn:turn.example.org:3478?transport=tcp>; rel=\"ice-server\""));
        let [udp, _] = link_headers("::1", 3478, "u", "p");
        assert!(udp.starts_with("<turn:[::1]:3478?transport=udp>"), "{udp}");
        let [udp, _] = link_headers("127.0.0.1", 3478, "u", "p");
        assert!(
            udp.starts_with("<turn:127.0.0.1:3478?transport=udp>"),
            "{udp}"
        );
    }

    #[test]
    fn ice_server_json_and_host_of() {
        let s = ice_server("127.0.0.1", 3478, "k", "bob", Duration::from_secs(60), 100);
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["username"], "160:bob");
        assert_eq!(json["urls"][1], "turn:127.0.0.1:3478?transport=tcp");
        assert_eq!(host_of("example.com:8080"), "example.com");
        assert_eq!(host_of("example.com"), "example.com");
        assert_eq!(host_of("[::1]:8080"), "::1");
        assert_eq!(host_of("127.0.0.1:8080"), "127.0.0.1");
        assert_ne!(random_secret(), random_secret());
        assert_eq!(random_secret().len(), 32);
    }
}
