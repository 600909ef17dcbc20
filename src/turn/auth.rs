//! Long-term credentials (RFC 8489 section 9.2) for TURN: the REST API shared secret exactly as
//! coturn's `use-auth-secret`, optional static users, REALM, and stateless NONCEs that go stale.
//!
//! Sans-IO: every check takes the time it should use; nothing here reads a clock or a socket.

use std::collections::HashMap;
use std::net::IpAddr;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use hmac::{Hmac, Mac};
use md5::{Digest, Md5};

use super::codec::{attr, Attribute, IntegrityError, IntegrityKind, Message};

/// The long-term key: `MD5(username ":" realm ":" password)` (RFC 8489 section 9.2.2). Passwords
/// are used as given (no SASLprep/OpaqueString).
pub fn long_term_key(username: &str, realm: &str, password: &str) -> [u8; 16] {
    let mut h = Md5::new();
    h.update(username.as_bytes());
    h.update(b":");
    h.update(realm.as_bytes());
    h.update(b":");
    h.update(password.as_bytes());
    h.finalize().into()
}

/// The TURN REST API password of `username`: `base64(HMAC-SHA1(secret, username))`.
pub fn rest_password(secret: &str, username: &str) -> String {
    let mut mac = <Hmac<sha1::Sha1> as Mac>::new_from_slice(secret.as_bytes()).expect("any key");
    mac.update(username.as_bytes());
    STANDARD.encode(mac.finalize().into_bytes())
}

/// Splits a REST username into (expiry, user), as coturn does: `<expiry>:<user>`, also
/// `<user>:<expiry>`, or a bare `<expiry>`.
pub fn parse_rest_username(username: &str) -> Option<(u64, &str)> {
    let digits = |s: &str| !s.is_empty() && s.len() <= 20 && s.bytes().all(|b| b.is_ascii_digit());
    match username.split_once(':') {
        Some((a, b)) if digits(a) => Some((a.parse().ok()?, b)),
        Some((a, b)) if digits(b) => Some((b.parse().ok()?, a)),
        None if digits(username) => Some((username.parse().ok()?, "")),
        _ => None,
    }
}

/// Why a request did not authenticate. Each maps to an error response and a metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthFailure {
    /// No MESSAGE-INTEGRITY: the first request of a client. Answered with 401 + REALM + NONCE;
    /// a challenge, not counted as a failure.
    Challenge,
    /// Integrity present but USERNAME, REALM or NONCE missing or malformed: 400.
    BadRequest,
    /// REALM is not ours: 401 with our realm.
    WrongRealm,
    /// No such static user, and not a REST username (or no secret configured): 401.
    UnknownUser,
    /// A REST username whose expiry has passed: 401.
    Expired,
    /// The HMAC does not match the user's key: 401.
    BadIntegrity,
    /// Integrity good but the NONCE is expired or not ours: 438 with a fresh one.
    StaleNonce,
}

impl AuthFailure {
    /// The label used in metrics.
    pub fn label(self) -> &'static str {
        match self {
            AuthFailure::Challenge => "challenge",
            AuthFailure::BadRequest => "bad_request",
            AuthFailure::WrongRealm => "wrong_realm",
            AuthFailure::UnknownUser => "unknown_user",
            AuthFailure::Expired => "expired",
            AuthFailure::BadIntegrity => "bad_integrity",
            AuthFailure::StaleNonce => "stale_nonce",
        }
    }

    /// The STUN error code to answer with.
    pub fn code(self) -> u16 {
        match self {
            AuthFailure::BadRequest => 400,
            AuthFailure::StaleNonce => 438,
            _ => 401,
        }
    }
}

/// A request that authenticated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authenticated {
    /// USERNAME as sent.
    pub username: String,
    /// Who counts against `user_quota`: the user part of a REST username, or the static user.
    pub quota_user: String,
    /// The long-term key, to sign the response.
    pub key: [u8; 16],
    /// Which integrity attribute the client used (the response uses the same).
    pub integrity: IntegrityKind,
}

/// Checks long-term credentials and issues nonces.
pub struct Authenticator {
    realm: String,
    secret: Option<String>,
    /// Static users' keys, precomputed.
    static_keys: HashMap<String, [u8; 16]>,
    nonce_key: [u8; 32],
    nonce_lifetime_s: u64,
}

/// How long a NONCE stays fresh (coturn's `stale-nonce` default).
pub const NONCE_LIFETIME_S: u64 = 600;

impl Authenticator {
    /// `nonce_key` must be random and secret (it makes nonces unforgeable).
    pub fn new(
        realm: &str,
        secret: Option<&str>,
        static_users: &[(&str, &str)],
        nonce_key: [u8; 32],
    ) -> Self {
        Authenticator {
            realm: realm.to_string(),
            secret: secret.map(str::to_string),
            static_keys: static_users
                .iter()
                .map(|(u, p)| (u.to_string(), long_term_key(u, realm, p)))
                .collect(),
            nonce_key,
            nonce_lifetime_s: NONCE_LIFETIME_S,
        }
    }

    pub fn realm(&self) -> &str {
        &self.realm
    }

    /// Replace the REST API shared secret (SIGHUP reload). Credentials minted with the old one
    /// stop working for new requests; allocations already made keep their key until they end.
    pub fn set_secret(&mut self, secret: Option<&str>) {
        self.secret = secret.map(str::to_string);
    }

    /// A fresh NONCE for `client`, valid for at least [`NONCE_LIFETIME_S`] from `now_s` (seconds
    /// on the caller's monotonic clock), rounded up to the minute. 8 characters: base64url of a
    /// 3-byte expiry minute and a 3-byte MAC over it and the client's IP.
    ///
    /// Short on purpose: the 401 that carries it must fit in what an unauthenticated source sent
    /// (see `allocation`'s credit rule), and with the default realm it is then 52 bytes. A short
    /// MAC is enough: a forged nonce gains nothing without the password, since the request's
    /// MESSAGE-INTEGRITY covers the nonce and a captured request cannot be given a new one.
    pub fn nonce(&self, client: IpAddr, now_s: u64) -> String {
        let expiry = ((now_s + self.nonce_lifetime_s).div_ceil(60) as u32) & 0x00ff_ffff;
        let tag = self.nonce_mac(expiry, client);
        let mut raw = [0u8; 6];
        raw[..3].copy_from_slice(&expiry.to_be_bytes()[1..]);
        raw[3..].copy_from_slice(&tag[..3]);
        URL_SAFE_NO_PAD.encode(raw)
    }

    fn nonce_mac(&self, expiry: u32, client: IpAddr) -> [u8; 32] {
        let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(&self.nonce_key).expect("key");
        mac.update(&expiry.to_be_bytes());
        match client {
            IpAddr::V4(ip) => mac.update(&ip.octets()),
            IpAddr::V6(ip) => mac.update(&ip.octets()),
        }
        mac.finalize().into_bytes().into()
    }

    /// Is `nonce` one of ours, for `client`, and not yet expired at `now_s`?
    pub fn nonce_is_fresh(&self, nonce: &str, client: IpAddr, now_s: u64) -> bool {
        let Ok(raw) = URL_SAFE_NO_PAD.decode(nonce) else {
            return false;
        };
        if raw.len() != 6 {
            return false;
        }
        let expiry = u32::from_be_bytes([0, raw[0], raw[1], raw[2]]);
        let tag = self.nonce_mac(expiry, client);
        // Constant time, so a tag cannot be guessed byte by byte.
        let diff = tag[..3]
            .iter()
            .zip(&raw[3..])
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        diff == 0 && u64::from(expiry) * 60 > now_s
    }

    /// The key and quota user of `username`, or why there is none. A static user wins over the
    /// REST form when both could apply.
    pub fn key_for(
        &self,
        username: &str,
        now_unix: u64,
    ) -> Result<([u8; 16], String), AuthFailure> {
        if let Some(key) = self.static_keys.get(username) {
            return Ok((*key, username.to_string()));
        }
        let secret = self.secret.as_deref().ok_or(AuthFailure::UnknownUser)?;
        let (expiry, user) = parse_rest_username(username).ok_or(AuthFailure::UnknownUser)?;
        if expiry <= now_unix {
            return Err(AuthFailure::Expired);
        }
        let password = rest_password(secret, username);
        Ok((
            long_term_key(username, &self.realm, &password),
            user.to_string(),
        ))
    }

    /// Authenticates a request in the order of RFC 8489 section 9.2.4: integrity present, then
    /// USERNAME/REALM/NONCE present, then the user, then the HMAC, and only then the nonce's
    /// freshness (so a 438 goes only to a client that knows the password).
    ///
    /// `now_s` is the monotonic clock nonces are minted on; `now_unix` is wall time for REST
    /// username expiry.
    pub fn authenticate(
        &self,
        msg: &Message<'_>,
        client: IpAddr,
        now_s: u64,
        now_unix: u64,
    ) -> Result<Authenticated, AuthFailure> {
        if !msg.has_integrity() {
            return Err(AuthFailure::Challenge);
        }
        let text = |typ| match msg.find(typ) {
            Some(Ok(Attribute::Username(s) | Attribute::Realm(s) | Attribute::Nonce(s))) => Some(s),
            _ => None,
        };
        let (Some(username), Some(realm), Some(nonce)) =
            (text(attr::USERNAME), text(attr::REALM), text(attr::NONCE))
        else {
            return Err(AuthFailure::BadRequest);
        };
        if realm != self.realm {
            return Err(AuthFailure::WrongRealm);
        }
        let (key, quota_user) = self.key_for(username, now_unix)?;
        let integrity = match msg.verify_integrity(&key) {
            Ok(kind) => kind,
            Err(IntegrityError::Mismatch | IntegrityError::Missing) => {
                return Err(AuthFailure::BadIntegrity)
            }
        };
        if !self.nonce_is_fresh(nonce, client, now_s) {
            return Err(AuthFailure::StaleNonce);
        }
        Ok(Authenticated {
            username: username.to_string(),
            quota_user,
            key,
            integrity,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::turn::codec::{Class, MessageWriter, Method, TransactionId};

    fn request(username: &str, realm: &str, nonce: &str, key: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut w = MessageWriter::new(
            &mut out,
            Class::Request,
            Method::ALLOCATE,
            TransactionId([5; 12]),
        );
        w.attr(&Attribute::RequestedTransport(17))
            .attr(&Attribute::Username(username))
            .attr(&Attribute::Realm(realm))
            .attr(&Attribute::Nonce(nonce))
            .integrity(key);
        out
    }

    #[test]
    fn rest_password_matches_coturn() {
        // The TURN REST API draft's construction, checked against an independent HMAC-SHA1:
        // `echo -n 1433895918506:alice | openssl dgst -binary -sha1 -hmac north | base64`.
        assert_eq!(
            rest_password("north", "1433895918506:alice"),
            "GPCalOXHCHJRqBRVGXzX5o/tUXE="
        );
        assert_eq!(
            parse_rest_username("1700000000:alice"),
            Some((1_700_000_000, "alice"))
        );
        assert_eq!(
            parse_rest_username("alice:1700000000"),
            Some((1_700_000_000, "alice"))
        );
        assert_eq!(parse_rest_username("1700000000"), Some((1_700_000_000, "")));
        assert_eq!(
            parse_rest_username("1700000000:a:b"),
            Some((1_700_000_000, "a:b"))
        );
        assert_eq!(parse_rest_username("alice"), None);
        assert_eq!(parse_rest_username("alice:bob"), None);
        assert_eq!(parse_rest_username("99999999999999999999999:x"), None);
    }

    #[test]
    fn nonces_are_bound_to_client_and_expire() {
        let a = Authenticator::new("sluice", None, &[], [7; 32]);
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let other: IpAddr = "127.0.0.2".parse().unwrap();
        let n = a.nonce(ip, 100);
        assert_eq!(n.len(), 8);
        assert!(a.nonce_is_fresh(&n, ip, 100));
        assert!(a.nonce_is_fresh(&n, ip, 100 + NONCE_LIFETIME_S - 1));
        // Rounded up to the minute: 100 + 600 s ends at 720 s.
        assert!(a.nonce_is_fresh(&n, ip, 719));
        assert!(!a.nonce_is_fresh(&n, ip, 720));
        assert!(!a.nonce_is_fresh(&a.nonce(ip, 120), ip, 720));
        assert!(!a.nonce_is_fresh(&n, other, 100));
        assert!(!a.nonce_is_fresh("garbage", ip, 100));
        let b = Authenticator::new("sluice", None, &[], [8; 32]);
        assert!(!b.nonce_is_fresh(&n, ip, 100), "another server key");
    }

    #[test]
    fn authenticate_in_rfc_order() {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let now_unix = 1_700_000_000;
        let a = Authenticator::new("sluice", Some("secret"), &[("bob", "pw")], [1; 32]);
        let nonce = a.nonce(ip, 0);
        let user = format!("{}:alice", now_unix + 60);
        let key = long_term_key(&user, "sluice", &rest_password("secret", &user));
        let auth = |bytes: &[u8], now_s| {
            a.authenticate(&Message::decode(bytes).unwrap(), ip, now_s, now_unix)
        };

        let ok = auth(&request(&user, "sluice", &nonce, &key), 1).unwrap();
        assert_eq!(ok.quota_user, "alice");
        assert_eq!(ok.key, key);
        assert_eq!(ok.integrity, IntegrityKind::Sha1);

        let bob = long_term_key("bob", "sluice", "pw");
        assert_eq!(
            auth(&request("bob", "sluice", &nonce, &bob), 1)
                .unwrap()
                .quota_user,
            "bob"
        );
        assert_eq!(
            auth(&request("bob", "sluice", &nonce, &key), 1),
            Err(AuthFailure::BadIntegrity)
        );
        assert_eq!(
            auth(&request("carol", "sluice", &nonce, &key), 1),
            Err(AuthFailure::UnknownUser)
        );
        assert_eq!(
            auth(&request(&user, "other", &nonce, &key), 1),
            Err(AuthFailure::WrongRealm)
        );
        let old = format!("{}:alice", now_unix - 1);
        let old_key = long_term_key(&old, "sluice", &rest_password("secret", &old));
        assert_eq!(
            auth(&request(&old, "sluice", &nonce, &old_key), 1),
            Err(AuthFailure::Expired)
        );
        // Stale only once the HMAC is good; a bad HMAC with a stale nonce is a 401.
        assert_eq!(
            auth(
                &request(&user, "sluice", &nonce, &key),
                NONCE_LIFETIME_S + 1
            ),
            Err(AuthFailure::StaleNonce)
        );
        assert_eq!(
            auth(
                &request(&user, "sluice", &nonce, b"bad"),
                NONCE_LIFETIME_S + 1
            ),
            Err(AuthFailure::BadIntegrity)
        );

        // No integrity: a challenge. Integrity but no NONCE: 400.
        let mut bare = Vec::new();
        MessageWriter::new(
            &mut bare,
            Class::Request,
            Method::ALLOCATE,
            TransactionId([0; 12]),
        )
        .attr(&Attribute::RequestedTransport(17));
        assert_eq!(auth(&bare, 1), Err(AuthFailure::Challenge));
        let mut no_nonce = Vec::new();
        MessageWriter::new(
            &mut no_nonce,
            Class::Request,
            Method::ALLOCATE,
            TransactionId([0; 12]),
        )
        .attr(&Attribute::Username(&user))
        .attr(&Attribute::Realm("sluice"))
        .integrity(&key);
        assert_eq!(auth(&no_nonce, 1), Err(AuthFailure::BadRequest));

        // Without a secret, REST usernames are unknown.
        let no_secret = Authenticator::new("sluice", None, &[], [1; 32]);
        let m = request(&user, "sluice", &nonce, &key);
        assert_eq!(
            no_secret.authenticate(&Message::decode(&m).unwrap(), ip, 1, now_unix),
            Err(AuthFailure::UnknownUser)
        );
    }
}
