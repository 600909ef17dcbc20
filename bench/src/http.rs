//! A minimal HTTP/1.1 client for signaling (WHIP/WHEP POST and DELETE) and scraping `/metrics`:
//! one request per connection (`Connection: close`), plain HTTP only (the load generator talks
//! to a server on the same host). The codec is shared by a blocking client (main thread) and an
//! async one that runs on the glommio shards, so joins never leave the shard that owns the peer.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use futures_lite::{AsyncReadExt, AsyncWriteExt};

/// Where the SFU's HTTP API is.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// `Host` header value.
    pub host: String,
    /// Path prefix from the URL, without a trailing slash ("" for none).
    pub prefix: String,
}

impl Target {
    /// Parse `http://host:port[/prefix]`, resolving the host once.
    pub fn parse(url: &str) -> Result<Target, String> {
        let rest = if let Some(r) = url.strip_prefix("http://") {
            r
        } else if url.starts_with("https://") {
            return Err(format!(
                "{url}: https is not supported; point --url at sluice's plain-HTTP listener"
            ));
        } else {
            url
        };
        let (host, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        if host.is_empty() {
            return Err(format!("{url}: no host"));
        }
        let with_port = if host.contains(':') && !host.ends_with(']') {
            host.to_string()
        } else {
            format!("{host}:80")
        };
        let addr = with_port
            .to_socket_addrs()
            .map_err(|e| format!("{url}: cannot resolve {host}: {e}"))?
            .next()
            .ok_or_else(|| format!("{url}: {host} has no address"))?;
        Ok(Target {
            addr,
            host: host.to_string(),
            prefix: prefix.to_string(),
        })
    }

    /// The path for `rel` (which starts with '/'): prefix + rel, or `rel` as is when it is
    /// already absolute from the server root (a Location header) or a full URL.
    pub fn path(&self, rel: &str) -> String {
        if let Some(r) = rel.strip_prefix("http://") {
            return r.find('/').map_or("/".to_string(), |i| r[i..].to_string());
        }
        if self.prefix.is_empty() || rel.starts_with(&self.prefix) {
            rel.to_string()
        } else {
            format!("{}{rel}", self.prefix)
        }
    }
}

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub fn encode_request(
    target: &Target,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: &[u8],
) -> Vec<u8> {
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: sluice-loadgen\r\nConnection: close\r\n",
        target.host
    );
    if let Some(ct) = content_type {
        req.push_str(&format!("Content-Type: {ct}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    let mut out = req.into_bytes();
    out.extend_from_slice(body);
    out
}

/// Whether `buf` holds a complete response (headers plus a body of Content-Length bytes, or a
/// finished chunked body). Responses without either end at EOF.
pub fn response_complete(buf: &[u8]) -> bool {
    let Some(end) = find(buf, b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&buf[..end]);
    let body = &buf[end + 4..];
    for line in head.lines().skip(1) {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        if k.trim().eq_ignore_ascii_case("content-length") {
            return v.trim().parse::<usize>().is_ok_and(|n| body.len() >= n);
        }
        if k.trim().eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked") {
            return find(body, b"0\r\n\r\n").is_some();
        }
    }
    false
}

pub fn parse_response(buf: &[u8]) -> Result<Response, String> {
    let end = find(buf, b"\r\n\r\n").ok_or("truncated HTTP response (no end of headers)")?;
    let head = std::str::from_utf8(&buf[..end]).map_err(|_| "HTTP headers are not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .filter(|_| status_line.starts_with("HTTP/1."))
        .ok_or_else(|| format!("bad HTTP status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let raw = &buf[end + 4..];
    let mut r = Response {
        status,
        headers,
        body: Vec::new(),
    };
    let chunked = r
        .header("transfer-encoding")
        .is_some_and(|v| v.contains("chunked"));
    r.body = if chunked {
        dechunk(raw)?
    } else if let Some(n) = r.header("content-length") {
        let n: usize = n.parse().map_err(|_| "bad Content-Length")?;
        raw.get(..n).ok_or("truncated HTTP body")?.to_vec()
    } else {
        raw.to_vec()
    };
    Ok(r)
}

fn dechunk(mut raw: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let eol = find(raw, b"\r\n").ok_or("truncated chunk size")?;
        let size_text = std::str::from_utf8(&raw[..eol]).map_err(|_| "bad chunk size")?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| format!("bad chunk size {size_text:?}"))?;
        raw = &raw[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        out.extend_from_slice(raw.get(..size).ok_or("truncated chunk")?);
        raw = raw.get(size + 2..).ok_or("truncated chunk")?;
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A blocking request from an ordinary thread, bounded by `timeout` for connect, write and each
/// read.
pub fn request(
    target: &Target,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: &[u8],
    timeout: Duration,
) -> Result<Response, String> {
    let mut s = TcpStream::connect_timeout(&target.addr, timeout)
        .map_err(|e| format!("cannot connect to {}: {e}", target.addr))?;
    s.set_read_timeout(Some(timeout)).ok();
    s.set_write_timeout(Some(timeout)).ok();
    s.set_nodelay(true).ok();
    s.write_all(&encode_request(target, method, path, content_type, body))
        .map_err(|e| format!("{method} {path}: {e}"))?;
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if response_complete(&buf) {
                    break;
                }
            }
            Err(e) => return Err(format!("{method} {path}: {e}")),
        }
    }
    parse_response(&buf).map_err(|e| format!("{method} {path}: {e}"))
}

/// The same request from a glommio executor; the caller bounds it in time
/// (`glommio::timer::timeout`).
pub async fn request_async(
    target: &Target,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: &[u8],
) -> Result<Response, String> {
    let mut s = glommio::net::TcpStream::connect(target.addr)
        .await
        .map_err(|e| format!("cannot connect to {}: {e}", target.addr))?;
    s.set_nodelay(true).ok();
    s.write_all(&encode_request(target, method, path, content_type, body))
        .await
        .map_err(|e| format!("{method} {path}: {e}"))?;
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        let n = s
            .read(&mut chunk)
            .await
            .map_err(|e| format!("{method} {path}: {e}"))?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
        if response_complete(&buf) {
            break;
        }
    }
    parse_response(&buf).map_err(|e| format!("{method} {path}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_resolve_to_an_address_and_a_prefix() {
        let t = Target::parse("http://127.0.0.1:18080").unwrap();
        assert_eq!(t.addr, "127.0.0.1:18080".parse().unwrap());
        assert_eq!(t.prefix, "");
        assert_eq!(t.path("/whip/a"), "/whip/a");
        let t = Target::parse("127.0.0.1:9/sfu/").unwrap();
        assert_eq!(t.prefix, "/sfu");
        assert_eq!(t.path("/whip/a"), "/sfu/whip/a");
        assert_eq!(t.path("/sfu/whip/a/1"), "/sfu/whip/a/1");
        assert_eq!(t.path("http://x:1/whip/a/1"), "/whip/a/1");
        assert!(Target::parse("https://127.0.0.1:1").is_err());
        assert!(Target::parse("http:///x").is_err());
    }

    #[test]
    fn responses_with_length_and_chunked_bodies_parse() {
        let r = b"HTTP/1.1 201 Created\r\nLocation: /whip/s/ab\r\ncontent-length: 5\r\n\r\nv=0\r\n";
        assert!(response_complete(r));
        assert!(!response_complete(&r[..r.len() - 1]));
        let p = parse_response(r).unwrap();
        assert_eq!(p.status, 201);
        assert_eq!(p.header("location"), Some("/whip/s/ab"));
        assert_eq!(p.text(), "v=0\r\n");

        let c = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=1\r\nde\r\n0\r\n\r\n";
        assert!(response_complete(c));
        assert_eq!(parse_response(c).unwrap().text(), "abcde");

        assert!(parse_response(b"garbage\r\n\r\n").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\n").is_err());
    }

    #[test]
    fn requests_carry_length_type_and_close() {
        let t = Target::parse("http://127.0.0.1:1").unwrap();
        let r = encode_request(&t, "POST", "/whip/x", Some("application/sdp"), b"v=0");
        let s = String::from_utf8(r).unwrap();
        assert!(s.starts_with("POST /whip/x HTTP/1.1\r\nHost: 127.0.0.1:1\r\n"));
        assert!(s.contains("Content-Type: application/sdp\r\n"));
        assert!(s.contains("Content-Length: 3\r\n"));
        assert!(s.contains("Connection: close\r\n"));
        assert!(s.ends_with("\r\n\r\nv=0"));
    }

    #[test]
    fn an_unreachable_server_is_a_clear_error_not_a_hang() {
        // Bind then drop a listener: its port is (very likely) closed now.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let t = Target::parse(&format!("http://127.0.0.1:{port}")).unwrap();
        let started = std::time::Instant::now();
        let e = request(&t, "GET", "/healthz", None, b"", Duration::from_secs(2)).unwrap_err();
        assert!(e.contains("cannot connect"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(3));
    }
}
