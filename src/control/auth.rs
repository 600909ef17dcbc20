//! Token auth: HS256 JSON Web Tokens, minted and verified with the configured shared secret, and
//! the room and right checks WHIP, WHEP and `/ws` apply. Sans-IO: the caller passes the time;
//! this module reads no clock, no config and no request.
//!
//! Only HS256 is accepted (never `none`, never an asymmetric `alg` that could be confused with
//! the secret), the signature is compared in constant time, the token is bounded in size, and the
//! signature is checked before the claims are parsed.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The longest token accepted, in bytes. Real tokens are a few hundred bytes.
pub const MAX_TOKEN_BYTES: usize = 4096;

/// `nbf` may be this far in the future (clock skew between the issuer and sluice). `exp` has no
/// leeway: a token is refused from the second it names.
pub const NBF_LEEWAY_SECS: u64 = 30;

/// Shortest secret worth using; shorter ones should be warned about at start.
pub const RECOMMENDED_MIN_SECRET_BYTES: usize = 32;

/// The room claim that grants every room and stream.
pub const ANY_ROOM: &str = "*";

/// `{"alg":"HS256","typ":"JWT"}`, encoded.
const HEADER_B64: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9";

/// What a token says about its bearer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The identity: a room participant's identity, a publisher's name in logs.
    #[serde(default)]
    pub sub: String,
    /// The room or stream name the token is for, or `"*"` for all. `stream` is accepted as an
    /// alias when verifying.
    #[serde(alias = "stream")]
    pub room: String,
    /// May publish media (WHIP, tracks in a room).
    #[serde(default)]
    pub publish: bool,
    /// May receive media (WHEP, subscriptions in a room).
    #[serde(default)]
    pub subscribe: bool,
    /// Expiry, unix seconds. Required.
    pub exp: u64,
    /// Not before, unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Issued at, unix seconds (informational).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
}

impl Claims {
    /// Claims valid from `now_unix` for `ttl_secs`, with `iat` set: what `sluice token` mints.
    pub fn new(
        identity: &str,
        room: &str,
        publish: bool,
        subscribe: bool,
        now_unix: u64,
        ttl_secs: u64,
    ) -> Claims {
        Claims {
            sub: identity.to_owned(),
            room: room.to_owned(),
            publish,
            subscribe,
            exp: now_unix.saturating_add(ttl_secs),
            nbf: None,
            iat: Some(now_unix),
        }
    }
}

/// A right a token grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Right {
    Publish,
    Subscribe,
}

/// Why a request was refused. `status()` is the HTTP status, `reason()` a stable label for the
/// response body and the refusal metric, `Display` a sentence for people.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AuthError {
    /// No token where one is required.
    Missing,
    /// Not three base64url parts, or a part that is not the JSON it should be.
    Malformed,
    /// Longer than [`MAX_TOKEN_BYTES`].
    TooLarge,
    /// An `alg` other than HS256 (`none` included), or a `crit` header.
    UnsupportedAlgorithm,
    /// The signature does not match (another secret, or a tampered token).
    BadSignature,
    Expired,
    NotYetValid,
    /// A valid token for another room or stream.
    WrongRoom,
    /// A valid token for this room without the right asked for.
    NotAllowed(Right),
}

impl AuthError {
    /// Every refusal, for pre-registering metric labels.
    pub const ALL: [AuthError; 10] = [
        AuthError::Missing,
        AuthError::Malformed,
        AuthError::TooLarge,
        AuthError::UnsupportedAlgorithm,
        AuthError::BadSignature,
        AuthError::Expired,
        AuthError::NotYetValid,
        AuthError::WrongRoom,
        AuthError::NotAllowed(Right::Publish),
        AuthError::NotAllowed(Right::Subscribe),
    ];

    /// 401 when the bearer is not authenticated, 403 when it is but may not do this.
    pub fn status(self) -> u16 {
        match self {
            AuthError::WrongRoom | AuthError::NotAllowed(_) => 403,
            _ => 401,
        }
    }

    /// A stable snake_case label: the metric's `reason` and the start of the response body.
    pub fn reason(self) -> &'static str {
        match self {
            AuthError::Missing => "missing_token",
            AuthError::Malformed => "malformed_token",
            AuthError::TooLarge => "token_too_large",
            AuthError::UnsupportedAlgorithm => "unsupported_algorithm",
            AuthError::BadSignature => "bad_signature",
            AuthError::Expired => "token_expired",
            AuthError::NotYetValid => "token_not_yet_valid",
            AuthError::WrongRoom => "wrong_room",
            AuthError::NotAllowed(Right::Publish) => "publish_not_allowed",
            AuthError::NotAllowed(Right::Subscribe) => "subscribe_not_allowed",
        }
    }
}

impl std::fmt::Display for AuthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let text = match self {
            AuthError::Missing => "a token is required (Authorization: Bearer <jwt>)",
            AuthError::Malformed => "the token is not a well-formed JWT",
            AuthError::TooLarge => "the token is too large",
            AuthError::UnsupportedAlgorithm => "only HS256 tokens are accepted",
            AuthError::BadSignature => "the token's signature is invalid",
            AuthError::Expired => "the token has expired",
            AuthError::NotYetValid => "the token is not valid yet",
            AuthError::WrongRoom => "the token is for another room or stream",
            AuthError::NotAllowed(Right::Publish) => "the token does not grant publishing",
            AuthError::NotAllowed(Right::Subscribe) => "the token does not grant subscribing",
        };
        write!(f, "{}: {text}", self.reason())
    }
}

impl std::error::Error for AuthError {}

#[derive(Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    crit: Option<serde_json::Value>,
}

fn mac(secret: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
    HmacSha256::new_from_slice(secret).expect("HMAC accepts any key length")
}

/// A signed HS256 token carrying `claims`.
pub fn mint(secret: &[u8], claims: &Claims) -> String {
    let payload = serde_json::to_vec(claims).expect("claims serialize");
    let mut token = String::with_capacity(HEADER_B64.len() + payload.len() * 2 + 48);
    token.push_str(HEADER_B64);
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(&payload, &mut token);
    let mut m = mac(secret);
    m.update(token.as_bytes());
    let signature = m.finalize().into_bytes();
    token.push('.');
    URL_SAFE_NO_PAD.encode_string(signature, &mut token);
    token
}

/// Check a token's form, algorithm, signature and validity period at `now_unix`, and return its
/// claims. It does not check the room or rights: see [`authorize`].
pub fn verify(secret: &[u8], token: &str, now_unix: u64) -> Result<Claims, AuthError> {
    if token.is_empty() {
        return Err(AuthError::Missing);
    }
    if token.len() > MAX_TOKEN_BYTES {
        return Err(AuthError::TooLarge);
    }
    let mut parts = token.split('.');
    let (Some(header_b64), Some(payload_b64), Some(signature_b64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::Malformed);
    };
    let header = URL_SAFE_NO_PAD
        .decode(header_b64)
        .map_err(|_| AuthError::Malformed)?;
    let header: Header = serde_json::from_slice(&header).map_err(|_| AuthError::Malformed)?;
    if header.alg != "HS256" || header.crit.is_some() {
        return Err(AuthError::UnsupportedAlgorithm);
    }
    let signature = URL_SAFE_NO_PAD
        .decode(signature_b64)
        .map_err(|_| AuthError::Malformed)?;
    let signed_len = header_b64.len() + 1 + payload_b64.len();
    let mut m = mac(secret);
    m.update(&token.as_bytes()[..signed_len]);
    // Constant time, and refuses a signature of the wrong length.
    m.verify_slice(&signature)
        .map_err(|_| AuthError::BadSignature)?;
    let payload = URL_SAFE_NO_PAD
        .decode(payload_b64)
        .map_err(|_| AuthError::Malformed)?;
    let claims: Claims = serde_json::from_slice(&payload).map_err(|_| AuthError::Malformed)?;
    if now_unix >= claims.exp {
        return Err(AuthError::Expired);
    }
    if let Some(nbf) = claims.nbf {
        if nbf > now_unix.saturating_add(NBF_LEEWAY_SECS) {
            return Err(AuthError::NotYetValid);
        }
    }
    Ok(claims)
}

/// May the bearer of `claims` exercise `right` on `room`? `room` is the room or stream name; for
/// a WHEP name `room~identity` pass the room part (a token for a room covers its participants).
pub fn authorize(claims: &Claims, room: &str, right: Right) -> Result<(), AuthError> {
    if claims.room != ANY_ROOM && claims.room != room {
        return Err(AuthError::WrongRoom);
    }
    let granted = match right {
        Right::Publish => claims.publish,
        Right::Subscribe => claims.subscribe,
    };
    if granted {
        Ok(())
    } else {
        Err(AuthError::NotAllowed(right))
    }
}

/// What a token grants in one room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub publish: bool,
    pub subscribe: bool,
}

/// Joining a `/ws` room: the token must be for `room` and grant at least one right; the rights
/// then decide what the participant may do there.
pub fn room_access(claims: &Claims, room: &str) -> Result<Grant, AuthError> {
    if claims.room != ANY_ROOM && claims.room != room {
        return Err(AuthError::WrongRoom);
    }
    if !claims.publish && !claims.subscribe {
        return Err(AuthError::NotAllowed(Right::Subscribe));
    }
    Ok(Grant {
        publish: claims.publish,
        subscribe: claims.subscribe,
    })
}

/// The token of an `Authorization: Bearer <token>` header value (scheme case-insensitive).
pub fn bearer(header_value: &str) -> Option<&str> {
    let value = header_value.trim();
    let (scheme, rest) = value.split_once([' ', '\t'])?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = rest.trim_start_matches([' ', '\t']);
    if token.is_empty() || token.contains(|c: char| c.is_ascii_whitespace()) {
        return None;
    }
    Some(token)
}

/// Verify, then authorize: the whole check of one request. `token` is `None` when the request
/// carried none.
pub fn check(
    secret: &[u8],
    token: Option<&str>,
    room: &str,
    right: Right,
    now_unix: u64,
) -> Result<Claims, AuthError> {
    let claims = verify(secret, token.ok_or(AuthError::Missing)?, now_unix)?;
    authorize(&claims, room, right)?;
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
    const NOW: u64 = 1_700_000_000;

    fn claims() -> Claims {
        Claims::new("alice", "demo", true, true, NOW, 3600)
    }

    fn b64(s: &str) -> String {
        URL_SAFE_NO_PAD.encode(s)
    }

    /// A token with the given header and payload JSON, signed with SECRET.
    fn forge(header: &str, payload: &str) -> String {
        let signing_input = format!("{}.{}", b64(header), b64(payload));
        let mut m = mac(SECRET);
        m.update(signing_input.as_bytes());
        let sig = URL_SAFE_NO_PAD.encode(m.finalize().into_bytes());
        format!("{signing_input}.{sig}")
    }

    #[test]
    fn valid_token_round_trips() {
        let token = mint(SECRET, &claims());
        assert_eq!(token.split('.').count(), 3);
        assert!(!token.contains('='), "no padding");
        assert_eq!(verify(SECRET, &token, NOW + 10), Ok(claims()));
        assert_eq!(
            check(SECRET, Some(&token), "demo", Right::Publish, NOW),
            Ok(claims())
        );
    }

    #[test]
    fn matches_a_reference_token() {
        // Signed outside this code (Python's hmac + base64): header {"alg":"HS256","typ":"JWT"},
        // payload {"sub":"bob","room":"r","exp":2000000000}, key SECRET.
        let token = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.\
                     eyJzdWIiOiJib2IiLCJyb29tIjoiciIsImV4cCI6MjAwMDAwMDAwMH0.\
                     Csb5SM6roe4URG9OVFsaJvE2dt43mvQ6LPfo2HqRMxY";
        let c = verify(SECRET, token, NOW).unwrap();
        assert_eq!(
            (c.sub.as_str(), c.room.as_str(), c.exp),
            ("bob", "r", 2_000_000_000)
        );
        assert!(!c.publish && !c.subscribe, "rights default to false");
        assert_eq!(HEADER_B64, b64(r#"{"alg":"HS256","typ":"JWT"}"#));
    }

    #[test]
    fn stream_is_an_alias_of_room() {
        let token = forge(
            r#"{"alg":"HS256"}"#,
            r#"{"sub":"cam","stream":"lobby","publish":true,"exp":2000000000}"#,
        );
        let c = verify(SECRET, &token, NOW).unwrap();
        assert_eq!(c.room, "lobby");
        assert_eq!(authorize(&c, "lobby", Right::Publish), Ok(()));
    }

    #[test]
    fn tampered_payload_is_refused() {
        let token = mint(SECRET, &claims());
        let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
        let mut c = claims();
        c.room = ANY_ROOM.into();
        parts[1] = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&c).unwrap());
        let tampered = parts.join(".");
        assert_eq!(verify(SECRET, &tampered, NOW), Err(AuthError::BadSignature));
        // A flipped signature bit too.
        let mut sig = URL_SAFE_NO_PAD
            .decode(token.rsplit('.').next().unwrap())
            .unwrap();
        sig[0] ^= 1;
        let bad = format!(
            "{}.{}",
            token.rsplit_once('.').unwrap().0,
            URL_SAFE_NO_PAD.encode(sig)
        );
        assert_eq!(verify(SECRET, &bad, NOW), Err(AuthError::BadSignature));
    }

    #[test]
    fn wrong_secret_is_refused() {
        let token = mint(b"another secret entirely, 32 bytes", &claims());
        let e = verify(SECRET, &token, NOW).unwrap_err();
        assert_eq!(e, AuthError::BadSignature);
        assert_eq!(e.status(), 401);
    }

    #[test]
    fn alg_none_and_other_algorithms_are_refused() {
        let payload =
            r#"{"sub":"eve","room":"*","publish":true,"subscribe":true,"exp":2000000000}"#;
        let none = format!("{}.{}.", b64(r#"{"alg":"none"}"#), b64(payload));
        assert_eq!(
            verify(SECRET, &none, NOW),
            Err(AuthError::UnsupportedAlgorithm)
        );
        for alg in ["None", "HS512", "RS256", "hs256"] {
            let t = forge(&format!(r#"{{"alg":"{alg}"}}"#), payload);
            assert_eq!(
                verify(SECRET, &t, NOW),
                Err(AuthError::UnsupportedAlgorithm),
                "{alg}"
            );
        }
        let crit = forge(r#"{"alg":"HS256","crit":["exp"]}"#, payload);
        assert_eq!(
            verify(SECRET, &crit, NOW),
            Err(AuthError::UnsupportedAlgorithm)
        );
        assert_eq!(AuthError::UnsupportedAlgorithm.status(), 401);
    }

    #[test]
    fn expired_token_is_refused_from_its_exp_second() {
        let token = mint(SECRET, &claims());
        let exp = NOW + 3600;
        assert!(verify(SECRET, &token, exp - 1).is_ok());
        let e = verify(SECRET, &token, exp).unwrap_err();
        assert_eq!(e, AuthError::Expired);
        assert_eq!((e.status(), e.reason()), (401, "token_expired"));
    }

    #[test]
    fn nbf_in_the_future_is_refused() {
        let mut c = claims();
        c.nbf = Some(NOW + 600);
        let token = mint(SECRET, &c);
        let e = verify(SECRET, &token, NOW).unwrap_err();
        assert_eq!((e, e.status()), (AuthError::NotYetValid, 401));
        // Within the leeway it passes.
        assert!(verify(SECRET, &token, NOW + 600 - NBF_LEEWAY_SECS).is_ok());
    }

    #[test]
    fn wrong_room_is_403() {
        let c = claims();
        let e = authorize(&c, "other", Right::Subscribe).unwrap_err();
        assert_eq!(
            (e, e.status(), e.reason()),
            (AuthError::WrongRoom, 403, "wrong_room")
        );
        let token = mint(SECRET, &c);
        assert_eq!(
            check(SECRET, Some(&token), "other", Right::Subscribe, NOW),
            Err(AuthError::WrongRoom)
        );
    }

    #[test]
    fn star_room_grants_every_room() {
        let mut c = claims();
        c.room = ANY_ROOM.into();
        assert_eq!(authorize(&c, "anything", Right::Publish), Ok(()));
        assert_eq!(authorize(&c, "demo", Right::Subscribe), Ok(()));
    }

    #[test]
    fn missing_right_is_403() {
        let mut c = claims();
        c.publish = false;
        let e = authorize(&c, "demo", Right::Publish).unwrap_err();
        assert_eq!(e, AuthError::NotAllowed(Right::Publish));
        assert_eq!((e.status(), e.reason()), (403, "publish_not_allowed"));
        assert_eq!(authorize(&c, "demo", Right::Subscribe), Ok(()));
        c.subscribe = false;
        assert_eq!(
            authorize(&c, "demo", Right::Subscribe)
                .unwrap_err()
                .reason(),
            "subscribe_not_allowed"
        );
    }

    #[test]
    fn room_access_needs_the_room_and_a_right() {
        let mut c = claims();
        c.publish = false;
        assert_eq!(
            room_access(&c, "demo"),
            Ok(Grant {
                publish: false,
                subscribe: true
            })
        );
        assert_eq!(room_access(&c, "other"), Err(AuthError::WrongRoom));
        c.subscribe = false;
        let e = room_access(&c, "demo").unwrap_err();
        assert_eq!((e.status(), e.reason()), (403, "subscribe_not_allowed"));
    }

    #[test]
    fn missing_token_is_401() {
        let e = check(SECRET, None, "demo", Right::Subscribe, NOW).unwrap_err();
        assert_eq!((e, e.status()), (AuthError::Missing, 401));
        assert_eq!(verify(SECRET, "", NOW), Err(AuthError::Missing));
    }

    #[test]
    fn malformed_tokens_are_401() {
        let good = mint(SECRET, &claims());
        let (h, rest) = good.split_once('.').unwrap();
        let (p, s) = rest.split_once('.').unwrap();
        let cases = [
            "abc".to_owned(),
            "a.b".to_owned(),
            format!("{good}.extra"),
            format!("{h}.{p}.{s}="),          // padding
            format!("{h}=.{p}.{s}"),          // padding in the header
            format!("{}.{p}.{s}", "!!!"),     // not base64
            format!("{}.{p}.{s}", b64("{")),  // header not JSON
            format!("{}.{p}.{s}", b64("[]")), // header without alg
            format!("{h}.{p}.{}", "+/+/"),    // standard alphabet, not url-safe
            forge(r#"{"alg":"HS256"}"#, "not json"),
            forge(r#"{"alg":"HS256"}"#, r#"{"sub":"x","room":"r"}"#), // no exp
            forge(r#"{"alg":"HS256"}"#, r#"{"room":"r","exp":"soon"}"#),
            forge(r#"{"alg":"HS256"}"#, r#"{"room":5,"exp":2000000000}"#),
        ];
        for t in &cases {
            let e = verify(SECRET, t, NOW).unwrap_err();
            assert_eq!(e.status(), 401, "{t}: {e}");
            assert!(
                matches!(e, AuthError::Malformed | AuthError::BadSignature),
                "{t}: {e:?}"
            );
        }
        // A payload that is not base64 but correctly signed is malformed, not a bad signature.
        let signing_input = format!("{h}.***");
        let mut m = mac(SECRET);
        m.update(signing_input.as_bytes());
        let sig = URL_SAFE_NO_PAD.encode(m.finalize().into_bytes());
        assert_eq!(
            verify(SECRET, &format!("{signing_input}.{sig}"), NOW),
            Err(AuthError::Malformed)
        );
    }

    #[test]
    fn oversized_token_is_refused_before_decoding() {
        let mut c = claims();
        c.sub = "x".repeat(MAX_TOKEN_BYTES);
        let token = mint(SECRET, &c);
        let e = verify(SECRET, &token, NOW).unwrap_err();
        assert_eq!(
            (e, e.status(), e.reason()),
            (AuthError::TooLarge, 401, "token_too_large")
        );
    }

    #[test]
    fn bearer_header_parsing() {
        assert_eq!(bearer("Bearer abc.def.ghi"), Some("abc.def.ghi"));
        assert_eq!(bearer("bearer   abc"), Some("abc"));
        assert_eq!(bearer("  BEARER abc  "), Some("abc"));
        assert_eq!(bearer("Bearer"), None);
        assert_eq!(bearer("Bearer "), None);
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer a b"), None);
        assert_eq!(bearer(""), None);
    }

    #[test]
    fn reasons_are_distinct_and_snake_case() {
        let mut seen = std::collections::HashSet::new();
        for e in AuthError::ALL {
            let r = e.reason();
            assert!(seen.insert(r), "duplicate {r}");
            assert!(
                r.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
                "{r}"
            );
            assert!(e.to_string().starts_with(r));
        }
    }
}
