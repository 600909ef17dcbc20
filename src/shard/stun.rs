//! Just enough STUN parsing to route a peer's first datagram: the local ICE ufrag from the USERNAME
//! attribute of a Binding request (RFC 8489 section 14.3). Full validation is the WebRTC stack's.

const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xa4, 0x42];
const ATTR_USERNAME: u16 = 0x0006;

/// Is this datagram shaped like STUN (RFC 7983 demultiplexing plus the magic cookie)?
pub fn is_stun(buf: &[u8]) -> bool {
    buf.len() >= 20 && buf[0] < 2 && buf[4..8] == MAGIC_COOKIE
}

/// The receiver's ufrag (`<ours>:<theirs>`, the part before the colon) of a STUN message, if any.
pub fn local_ufrag(buf: &[u8]) -> Option<&[u8]> {
    if !is_stun(buf) {
        return None;
    }
    let body_len = u16::from_be_bytes([buf[2], buf[3]]) as usize;
    let end = 20usize.checked_add(body_len)?.min(buf.len());
    let mut at = 20;
    while at + 4 <= end {
        let typ = u16::from_be_bytes([buf[at], buf[at + 1]]);
        let len = u16::from_be_bytes([buf[at + 2], buf[at + 3]]) as usize;
        let value = buf.get(at + 4..at + 4 + len)?;
        if typ == ATTR_USERNAME {
            let colon = value.iter().position(|&b| b == b':')?;
            return Some(&value[..colon]);
        }
        at += 4 + len.div_ceil(4) * 4;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding(username: &[u8]) -> Vec<u8> {
        let mut attr = vec![0x00, 0x06];
        attr.extend_from_slice(&(username.len() as u16).to_be_bytes());
        attr.extend_from_slice(username);
        while attr.len() % 4 != 0 {
            attr.push(0);
        }
        // A PRIORITY attribute before USERNAME, to walk past it.
        let mut body = vec![0x00, 0x24, 0x00, 0x04, 1, 2, 3, 4];
        body.extend_from_slice(&attr);
        let mut m = vec![0x00, 0x01];
        m.extend_from_slice(&(body.len() as u16).to_be_bytes());
        m.extend_from_slice(&MAGIC_COOKIE);
        m.extend_from_slice(&[7; 12]);
        m.extend_from_slice(&body);
        m
    }

    #[test]
    fn finds_local_ufrag() {
        let m = binding(b"srvufrag:cliufrag");
        assert_eq!(local_ufrag(&m), Some(&b"srvufrag"[..]));
    }

    #[test]
    fn rejects_garbage_and_truncation() {
        let m = binding(b"abc:def");
        for cut in 0..m.len() {
            let _ = local_ufrag(&m[..cut]);
        }
        assert_eq!(local_ufrag(&m[..20]), None);
        assert_eq!(local_ufrag(b"\x80\x60garbage-rtp-ish-bytes"), None);
        assert_eq!(local_ufrag(&binding(b"nocolon")), None);
        let mut seed = 0x9e37_79b9u32;
        for len in 0..200 {
            let buf: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 17;
                    seed ^= seed << 5;
                    seed as u8
                })
                .collect();
            let _ = local_ufrag(&buf);
        }
    }
}
