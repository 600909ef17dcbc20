//! The STUN/TURN wire format: messages (RFC 8489) with the TURN attributes (RFC 8656), their
//! FINGERPRINT, MESSAGE-INTEGRITY and MESSAGE-INTEGRITY-SHA256, and ChannelData.
//!
//! Owns bytes only: no sockets, no clocks, no policy. Decoding borrows from the input buffer and
//! never panics on any input (see [`fuzz_decode`]); what a message *means* is `allocation`'s
//! business.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use hmac::{Hmac, Mac};

/// The fixed value of bytes 4..8 of every STUN message (RFC 8489 section 5).
pub const MAGIC_COOKIE: u32 = 0x2112_A442;
/// Size of the STUN header.
pub const HEADER_LEN: usize = 20;
/// XORed into the CRC-32 of FINGERPRINT ("STUN").
const FINGERPRINT_XOR: u32 = 0x5354_554e;
/// A message with more attributes than this is refused (none of ours needs a tenth of it).
pub const MAX_ATTRIBUTES: usize = 64;
/// First and last channel number a client may bind. RFC 8656 section 12 narrowed the range to
/// 0x4000-0x4FFF, but RFC 5766 clients (coturn's own `turnutils_uclient` among them) still pick
/// numbers up to 0x7FFE, so those are accepted too, as coturn does.
pub const CHANNEL_MIN: u16 = 0x4000;
pub const CHANNEL_MAX: u16 = 0x7FFE;

/// Attribute types (RFC 8489 section 18.3, RFC 8656 section 18, RFC 8445 section 16.1).
pub mod attr {
    pub const MAPPED_ADDRESS: u16 = 0x0001;
    pub const USERNAME: u16 = 0x0006;
    pub const MESSAGE_INTEGRITY: u16 = 0x0008;
    pub const ERROR_CODE: u16 = 0x0009;
    pub const UNKNOWN_ATTRIBUTES: u16 = 0x000A;
    pub const CHANNEL_NUMBER: u16 = 0x000C;
    pub const LIFETIME: u16 = 0x000D;
    pub const XOR_PEER_ADDRESS: u16 = 0x0012;
    pub const DATA: u16 = 0x0013;
    pub const REALM: u16 = 0x0014;
    pub const NONCE: u16 = 0x0015;
    pub const XOR_RELAYED_ADDRESS: u16 = 0x0016;
    pub const REQUESTED_ADDRESS_FAMILY: u16 = 0x0017;
    pub const EVEN_PORT: u16 = 0x0018;
    pub const REQUESTED_TRANSPORT: u16 = 0x0019;
    pub const DONT_FRAGMENT: u16 = 0x001A;
    pub const MESSAGE_INTEGRITY_SHA256: u16 = 0x001C;
    pub const PASSWORD_ALGORITHM: u16 = 0x001D;
    pub const USERHASH: u16 = 0x001E;
    pub const XOR_MAPPED_ADDRESS: u16 = 0x0020;
    pub const RESERVATION_TOKEN: u16 = 0x0022;
    pub const PRIORITY: u16 = 0x0024;
    pub const USE_CANDIDATE: u16 = 0x0025;
    pub const ADDITIONAL_ADDRESS_FAMILY: u16 = 0x8000;
    pub const ADDRESS_ERROR_CODE: u16 = 0x8001;
    pub const PASSWORD_ALGORITHMS: u16 = 0x8002;
    pub const ALTERNATE_DOMAIN: u16 = 0x8003;
    pub const ICMP: u16 = 0x8004;
    pub const SOFTWARE: u16 = 0x8022;
    pub const ALTERNATE_SERVER: u16 = 0x8023;
    pub const FINGERPRINT: u16 = 0x8028;
    pub const ICE_CONTROLLED: u16 = 0x8029;
    pub const ICE_CONTROLLING: u16 = 0x802A;

    /// Types 0x0000-0x7FFF must be understood by the receiver (RFC 8489 section 14).
    pub fn is_comprehension_required(typ: u16) -> bool {
        typ < 0x8000
    }
}

/// STUN/TURN methods (RFC 8489 section 18.2, RFC 8656 section 17).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Method(pub u16);

impl Method {
    pub const BINDING: Method = Method(0x001);
    pub const ALLOCATE: Method = Method(0x003);
    pub const REFRESH: Method = Method(0x004);
    pub const SEND: Method = Method(0x006);
    pub const DATA: Method = Method(0x007);
    pub const CREATE_PERMISSION: Method = Method(0x008);
    pub const CHANNEL_BIND: Method = Method(0x009);

    pub fn name(self) -> &'static str {
        match self {
            Method::BINDING => "Binding",
            Method::ALLOCATE => "Allocate",
            Method::REFRESH => "Refresh",
            Method::SEND => "Send",
            Method::DATA => "Data",
            Method::CREATE_PERMISSION => "CreatePermission",
            Method::CHANNEL_BIND => "ChannelBind",
            _ => "unknown",
        }
    }
}

/// The class of a message (RFC 8489 section 5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Class {
    Request,
    Indication,
    Success,
    Error,
}

impl Class {
    fn bits(self) -> u16 {
        match self {
            Class::Request => 0b00,
            Class::Indication => 0b01,
            Class::Success => 0b10,
            Class::Error => 0b11,
        }
    }
}

/// The 96-bit transaction id of a message.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TransactionId(pub [u8; 12]);

impl fmt::Debug for TransactionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// An address family as STUN encodes it (1 = IPv4, 2 = IPv6).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
    fn code(self) -> u8 {
        match self {
            Family::V4 => 0x01,
            Family::V6 => 0x02,
        }
    }
    fn from_code(code: u8) -> Option<Family> {
        match code {
            0x01 => Some(Family::V4),
            0x02 => Some(Family::V6),
            _ => None,
        }
    }
}

/// The 16-bit message type from method and class (RFC 8489 figure 3).
pub fn message_type(method: Method, class: Class) -> u16 {
    let m = method.0 & 0x0fff;
    let c = class.bits();
    (m & 0x000f) | ((m & 0x0070) << 1) | ((m & 0x0f80) << 2) | ((c & 1) << 4) | ((c & 2) << 7)
}

fn split_type(t: u16) -> (Method, Class) {
    let m = (t & 0x000f) | ((t & 0x00e0) >> 1) | ((t & 0x3e00) >> 2);
    let class = match ((t >> 4) & 1) | ((t >> 7) & 2) {
        0 => Class::Request,
        1 => Class::Indication,
        2 => Class::Success,
        _ => Class::Error,
    };
    (Method(m), class)
}

/// Why bytes are not a STUN message or ChannelData.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// Shorter than its header or than the length it claims.
    Truncated,
    /// Not STUN: top bits set, or no magic cookie.
    NotStun,
    /// The header length is not a multiple of 4, or disagrees with the buffer.
    BadLength,
    /// An attribute runs past the end of the message.
    BadAttribute,
    /// More than [`MAX_ATTRIBUTES`].
    TooManyAttributes,
    /// Something follows FINGERPRINT, or it is malformed.
    BadFingerprint,
    /// FINGERPRINT present but the CRC does not match.
    FingerprintMismatch,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            DecodeError::Truncated => "truncated",
            DecodeError::NotStun => "not a STUN message",
            DecodeError::BadLength => "bad message length",
            DecodeError::BadAttribute => "attribute overruns the message",
            DecodeError::TooManyAttributes => "too many attributes",
            DecodeError::BadFingerprint => "misplaced or malformed FINGERPRINT",
            DecodeError::FingerprintMismatch => "FINGERPRINT does not match",
        };
        f.write_str(s)
    }
}

impl std::error::Error for DecodeError {}

/// One attribute as it sits in the message: type and value (without padding).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawAttribute<'a> {
    pub typ: u16,
    pub value: &'a [u8],
    /// Offset of the attribute header from the start of the message.
    offset: usize,
}

impl<'a> RawAttribute<'a> {
    /// The typed value, checked against the attribute's format.
    pub fn decode(&self, txid: &TransactionId) -> Result<Attribute<'a>, AttrError> {
        Attribute::decode(self.typ, self.value, txid)
    }
}

/// A decoded STUN message borrowing its input.
///
/// Only attributes that count are kept: those before MESSAGE-INTEGRITY, then
/// MESSAGE-INTEGRITY-SHA256 and FINGERPRINT (RFC 8489 section 14.5: anything else after
/// MESSAGE-INTEGRITY is ignored). FINGERPRINT, when present, has been verified.
#[derive(Clone, Debug)]
pub struct Message<'a> {
    pub class: Class,
    pub method: Method,
    pub transaction_id: TransactionId,
    raw: &'a [u8],
    attributes: Vec<RawAttribute<'a>>,
    integrity: Option<RawAttribute<'a>>,
    integrity_sha256: Option<RawAttribute<'a>>,
    has_fingerprint: bool,
}

/// Which integrity attribute authenticated a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IntegrityKind {
    /// MESSAGE-INTEGRITY, HMAC-SHA1.
    Sha1,
    /// MESSAGE-INTEGRITY-SHA256, HMAC-SHA256 (possibly truncated).
    Sha256,
}

/// Why a message did not authenticate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IntegrityError {
    /// Neither integrity attribute is present.
    Missing,
    /// The HMAC does not match the key.
    Mismatch,
}

impl<'a> Message<'a> {
    /// Decodes one whole STUN message: `buf` must be exactly the message (a UDP datagram, or one
    /// frame cut by [`frame_len`]).
    pub fn decode(buf: &'a [u8]) -> Result<Message<'a>, DecodeError> {
        if buf.len() < HEADER_LEN {
            return Err(DecodeError::Truncated);
        }
        if buf[0] & 0xc0 != 0 || be32(&buf[4..8]) != MAGIC_COOKIE {
            return Err(DecodeError::NotStun);
        }
        let len = usize::from(be16(&buf[2..4]));
        if !len.is_multiple_of(4) {
            return Err(DecodeError::BadLength);
        }
        if HEADER_LEN + len > buf.len() {
            return Err(DecodeError::Truncated);
        }
        if HEADER_LEN + len != buf.len() {
            return Err(DecodeError::BadLength);
        }
        let (method, class) = split_type(be16(&buf[0..2]));
        let mut txid = [0u8; 12];
        txid.copy_from_slice(&buf[8..20]);
        let mut msg = Message {
            class,
            method,
            transaction_id: TransactionId(txid),
            raw: buf,
            attributes: Vec::new(),
            integrity: None,
            integrity_sha256: None,
            has_fingerprint: false,
        };
        let mut at = HEADER_LEN;
        let mut count = 0;
        while at < buf.len() {
            if at + 4 > buf.len() {
                return Err(DecodeError::BadAttribute);
            }
            let typ = be16(&buf[at..at + 2]);
            let vlen = usize::from(be16(&buf[at + 2..at + 4]));
            let end = at + 4 + vlen;
            let padded = at + 4 + vlen.div_ceil(4) * 4;
            if padded > buf.len() {
                return Err(DecodeError::BadAttribute);
            }
            count += 1;
            if count > MAX_ATTRIBUTES {
                return Err(DecodeError::TooManyAttributes);
            }
            let raw = RawAttribute {
                typ,
                value: &buf[at + 4..end],
                offset: at,
            };
            if msg.has_fingerprint {
                return Err(DecodeError::BadFingerprint);
            }
            match typ {
                attr::FINGERPRINT => {
                    if vlen != 4 {
                        return Err(DecodeError::BadFingerprint);
                    }
                    if fingerprint(buf, at) != be32(raw.value) {
                        return Err(DecodeError::FingerprintMismatch);
                    }
                    msg.has_fingerprint = true;
                }
                attr::MESSAGE_INTEGRITY_SHA256 if msg.integrity_sha256.is_none() => {
                    msg.integrity_sha256 = Some(raw);
                }
                attr::MESSAGE_INTEGRITY
                    if msg.integrity.is_none() && msg.integrity_sha256.is_none() =>
                {
                    msg.integrity = Some(raw);
                }
                _ if msg.integrity.is_some() || msg.integrity_sha256.is_some() => {
                    // Ignored: after MESSAGE-INTEGRITY(-SHA256) only the two above count.
                }
                _ => msg.attributes.push(raw),
            }
            at = padded;
        }
        Ok(msg)
    }

    /// The whole message as received.
    pub fn raw(&self) -> &'a [u8] {
        self.raw
    }

    /// Attributes before MESSAGE-INTEGRITY, in order (integrity and fingerprint excluded).
    pub fn attributes(&self) -> &[RawAttribute<'a>] {
        &self.attributes
    }

    /// The first attribute of type `typ`, raw.
    pub fn get(&self, typ: u16) -> Option<&RawAttribute<'a>> {
        self.attributes.iter().find(|a| a.typ == typ)
    }

    /// The first attribute of type `typ`, decoded: `None` if absent, `Some(Err)` if malformed.
    pub fn find(&self, typ: u16) -> Option<Result<Attribute<'a>, AttrError>> {
        self.get(typ).map(|a| a.decode(&self.transaction_id))
    }

    /// Was a FINGERPRINT present (and so verified)?
    pub fn has_fingerprint(&self) -> bool {
        self.has_fingerprint
    }

    /// Is MESSAGE-INTEGRITY or MESSAGE-INTEGRITY-SHA256 present?
    pub fn has_integrity(&self) -> bool {
        self.integrity.is_some() || self.integrity_sha256.is_some()
    }

    /// Checks the message's integrity with `key` (the long-term key, or a short-term password).
    /// MESSAGE-INTEGRITY-SHA256 is preferred when both are present (RFC 8489 section 14.6).
    pub fn verify_integrity(&self, key: &[u8]) -> Result<IntegrityKind, IntegrityError> {
        if let Some(a) = self.integrity_sha256 {
            let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(key).expect("any key size");
            feed_before(&mut mac, self.raw, a.offset, a.value.len());
            return mac
                .verify_truncated_left(a.value)
                .map(|_| IntegrityKind::Sha256)
                .map_err(|_| IntegrityError::Mismatch);
        }
        if let Some(a) = self.integrity {
            let mut mac = <Hmac<sha1::Sha1> as Mac>::new_from_slice(key).expect("any key size");
            feed_before(&mut mac, self.raw, a.offset, a.value.len());
            return mac
                .verify_slice(a.value)
                .map(|_| IntegrityKind::Sha1)
                .map_err(|_| IntegrityError::Mismatch);
        }
        Err(IntegrityError::Missing)
    }

    /// Comprehension-required attribute types this message carries that `known` does not list.
    pub fn unknown_required(&self, known: &[u16]) -> Vec<u16> {
        let mut out: Vec<u16> = self
            .attributes
            .iter()
            .map(|a| a.typ)
            .filter(|t| attr::is_comprehension_required(*t) && !known.contains(t))
            .collect();
        out.dedup();
        out
    }
}

/// Feeds the HMAC with the message up to the integrity attribute at `offset`, with the header's
/// length rewritten to end just after that attribute (RFC 8489 section 14.5).
fn feed_before(mac: &mut impl Mac, raw: &[u8], offset: usize, value_len: usize) {
    let len = (offset + 4 + value_len - HEADER_LEN) as u16;
    mac.update(&raw[0..2]);
    mac.update(&len.to_be_bytes());
    mac.update(&raw[4..offset]);
}

/// The FINGERPRINT value for a FINGERPRINT attribute at `offset` of `raw`.
fn fingerprint(raw: &[u8], offset: usize) -> u32 {
    let len = (offset + 8 - HEADER_LEN) as u16;
    let mut h = crc32fast::Hasher::new();
    h.update(&raw[0..2]);
    h.update(&len.to_be_bytes());
    h.update(&raw[4..offset]);
    h.finalize() ^ FINGERPRINT_XOR
}

/// Why an attribute's value does not fit its type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttrError {
    pub typ: u16,
}

impl fmt::Display for AttrError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed attribute 0x{:04x}", self.typ)
    }
}

impl std::error::Error for AttrError {}

/// A typed attribute. Unknown types are kept as [`Attribute::Other`], so decoding then encoding
/// gives back the same bytes (padding aside).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Attribute<'a> {
    MappedAddress(SocketAddr),
    XorMappedAddress(SocketAddr),
    XorPeerAddress(SocketAddr),
    XorRelayedAddress(SocketAddr),
    AlternateServer(SocketAddr),
    Username(&'a str),
    Realm(&'a str),
    Nonce(&'a str),
    Software(&'a str),
    AlternateDomain(&'a str),
    ErrorCode {
        code: u16,
        reason: &'a str,
    },
    /// UNKNOWN-ATTRIBUTES: a list of 16-bit types, borrowed as their bytes.
    UnknownAttributes(AttrList<'a>),
    MessageIntegrity(&'a [u8]),
    MessageIntegritySha256(&'a [u8]),
    Fingerprint(u32),
    PasswordAlgorithm {
        algorithm: u16,
        params: &'a [u8],
    },
    PasswordAlgorithms(&'a [u8]),
    UserHash(&'a [u8]),
    ChannelNumber(u16),
    Lifetime(u32),
    Data(&'a [u8]),
    RequestedAddressFamily(Family),
    AdditionalAddressFamily(Family),
    /// EVEN-PORT: the R bit (reserve the next port too).
    EvenPort(bool),
    /// REQUESTED-TRANSPORT: an IP protocol number (17 = UDP).
    RequestedTransport(u8),
    DontFragment,
    ReservationToken([u8; 8]),
    AddressErrorCode {
        family: Family,
        code: u16,
        reason: &'a str,
    },
    Icmp {
        typ: u8,
        code: u8,
        data: u32,
    },
    Priority(u32),
    UseCandidate,
    IceControlled(u64),
    IceControlling(u64),
    Other {
        typ: u16,
        value: &'a [u8],
    },
}

/// The types listed by UNKNOWN-ATTRIBUTES, either borrowed bytes or an owned list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AttrList<'a> {
    Wire(&'a [u8]),
    Owned(Vec<u16>),
}

impl AttrList<'_> {
    pub fn types(&self) -> Vec<u16> {
        match self {
            AttrList::Wire(b) => b.chunks_exact(2).map(be16).collect(),
            AttrList::Owned(v) => v.clone(),
        }
    }
}

impl<'a> Attribute<'a> {
    /// The attribute's type code.
    pub fn typ(&self) -> u16 {
        use Attribute::*;
        match self {
            MappedAddress(_) => attr::MAPPED_ADDRESS,
            XorMappedAddress(_) => attr::XOR_MAPPED_ADDRESS,
            XorPeerAddress(_) => attr::XOR_PEER_ADDRESS,
            XorRelayedAddress(_) => attr::XOR_RELAYED_ADDRESS,
            AlternateServer(_) => attr::ALTERNATE_SERVER,
            Username(_) => attr::USERNAME,
            Realm(_) => attr::REALM,
            Nonce(_) => attr::NONCE,
            Software(_) => attr::SOFTWARE,
            AlternateDomain(_) => attr::ALTERNATE_DOMAIN,
            ErrorCode { .. } => attr::ERROR_CODE,
            UnknownAttributes(_) => attr::UNKNOWN_ATTRIBUTES,
            MessageIntegrity(_) => attr::MESSAGE_INTEGRITY,
            MessageIntegritySha256(_) => attr::MESSAGE_INTEGRITY_SHA256,
            Fingerprint(_) => attr::FINGERPRINT,
            PasswordAlgorithm { .. } => attr::PASSWORD_ALGORITHM,
            PasswordAlgorithms(_) => attr::PASSWORD_ALGORITHMS,
            UserHash(_) => attr::USERHASH,
            ChannelNumber(_) => attr::CHANNEL_NUMBER,
            Lifetime(_) => attr::LIFETIME,
            Data(_) => attr::DATA,
            RequestedAddressFamily(_) => attr::REQUESTED_ADDRESS_FAMILY,
            AdditionalAddressFamily(_) => attr::ADDITIONAL_ADDRESS_FAMILY,
            EvenPort(_) => attr::EVEN_PORT,
            RequestedTransport(_) => attr::REQUESTED_TRANSPORT,
            DontFragment => attr::DONT_FRAGMENT,
            ReservationToken(_) => attr::RESERVATION_TOKEN,
            AddressErrorCode { .. } => attr::ADDRESS_ERROR_CODE,
            Icmp { .. } => attr::ICMP,
            Priority(_) => attr::PRIORITY,
            UseCandidate => attr::USE_CANDIDATE,
            IceControlled(_) => attr::ICE_CONTROLLED,
            IceControlling(_) => attr::ICE_CONTROLLING,
            Other { typ, .. } => *typ,
        }
    }

    /// Decodes one attribute value of type `typ` (`txid` unmasks XOR addresses).
    pub fn decode(typ: u16, v: &'a [u8], txid: &TransactionId) -> Result<Attribute<'a>, AttrError> {
        use Attribute::*;
        let bad = AttrError { typ };
        let text = |max: usize| -> Result<&'a str, AttrError> {
            if v.len() > max {
                return Err(bad);
            }
            std::str::from_utf8(v).map_err(|_| bad)
        };
        let exact = |n: usize| if v.len() == n { Ok(()) } else { Err(bad) };
        Ok(match typ {
            attr::MAPPED_ADDRESS => MappedAddress(decode_address(v, None).ok_or(bad)?),
            attr::XOR_MAPPED_ADDRESS => XorMappedAddress(decode_address(v, Some(txid)).ok_or(bad)?),
            attr::XOR_PEER_ADDRESS => XorPeerAddress(decode_address(v, Some(txid)).ok_or(bad)?),
            attr::XOR_RELAYED_ADDRESS => {
                XorRelayedAddress(decode_address(v, Some(txid)).ok_or(bad)?)
            }
            attr::ALTERNATE_SERVER => AlternateServer(decode_address(v, None).ok_or(bad)?),
            attr::USERNAME => Username(text(513)?),
            attr::REALM => Realm(text(763)?),
            attr::NONCE => Nonce(text(763)?),
            attr::SOFTWARE => Software(text(763)?),
            attr::ALTERNATE_DOMAIN => AlternateDomain(text(255)?),
            attr::ERROR_CODE => {
                if v.len() < 4 || v[0] != 0 || v[1] != 0 {
                    return Err(bad);
                }
                let (class, number) = (v[2] & 0x07, v[3]);
                if !(3..=6).contains(&class) || number > 99 {
                    return Err(bad);
                }
                let reason = std::str::from_utf8(&v[4..]).map_err(|_| bad)?;
                if reason.len() > 763 {
                    return Err(bad);
                }
                ErrorCode {
                    code: u16::from(class) * 100 + u16::from(number),
                    reason,
                }
            }
            attr::UNKNOWN_ATTRIBUTES => {
                if !v.len().is_multiple_of(2) {
                    return Err(bad);
                }
                UnknownAttributes(AttrList::Wire(v))
            }
            attr::MESSAGE_INTEGRITY => {
                exact(20)?;
                MessageIntegrity(v)
            }
            attr::MESSAGE_INTEGRITY_SHA256 => {
                if v.len() < 16 || v.len() > 32 || !v.len().is_multiple_of(4) {
                    return Err(bad);
                }
                MessageIntegritySha256(v)
            }
            attr::FINGERPRINT => {
                exact(4)?;
                Fingerprint(be32(v))
            }
            attr::PASSWORD_ALGORITHM => {
                if v.len() < 4 || v.len() != 4 + usize::from(be16(&v[2..4])) {
                    return Err(bad);
                }
                PasswordAlgorithm {
                    algorithm: be16(&v[0..2]),
                    params: &v[4..],
                }
            }
            attr::PASSWORD_ALGORITHMS => PasswordAlgorithms(v),
            attr::USERHASH => {
                exact(32)?;
                UserHash(v)
            }
            attr::CHANNEL_NUMBER => {
                exact(4)?;
                ChannelNumber(be16(&v[0..2]))
            }
            attr::LIFETIME => {
                exact(4)?;
                Lifetime(be32(v))
            }
            attr::DATA => Data(v),
            attr::REQUESTED_ADDRESS_FAMILY | attr::ADDITIONAL_ADDRESS_FAMILY => {
                exact(4)?;
                let family = Family::from_code(v[0]).ok_or(bad)?;
                if typ == attr::REQUESTED_ADDRESS_FAMILY {
                    RequestedAddressFamily(family)
                } else {
                    AdditionalAddressFamily(family)
                }
            }
            attr::EVEN_PORT => {
                exact(1)?;
                EvenPort(v[0] & 0x80 != 0)
            }
            attr::REQUESTED_TRANSPORT => {
                exact(4)?;
                RequestedTransport(v[0])
            }
            attr::DONT_FRAGMENT => {
                exact(0)?;
                DontFragment
            }
            attr::RESERVATION_TOKEN => {
                exact(8)?;
                let mut token = [0u8; 8];
                token.copy_from_slice(v);
                ReservationToken(token)
            }
            attr::ADDRESS_ERROR_CODE => {
                if v.len() < 4 {
                    return Err(bad);
                }
                let family = Family::from_code(v[0]).ok_or(bad)?;
                let (class, number) = (v[2] & 0x07, v[3]);
                if !(3..=6).contains(&class) || number > 99 {
                    return Err(bad);
                }
                AddressErrorCode {
                    family,
                    code: u16::from(class) * 100 + u16::from(number),
                    reason: std::str::from_utf8(&v[4..]).map_err(|_| bad)?,
                }
            }
            attr::ICMP => {
                exact(8)?;
                Icmp {
                    typ: v[2],
                    code: v[3],
                    data: be32(&v[4..8]),
                }
            }
            attr::PRIORITY => {
                exact(4)?;
                Priority(be32(v))
            }
            attr::USE_CANDIDATE => {
                exact(0)?;
                UseCandidate
            }
            attr::ICE_CONTROLLED | attr::ICE_CONTROLLING => {
                exact(8)?;
                let tie = u64::from_be_bytes(v.try_into().map_err(|_| bad)?);
                if typ == attr::ICE_CONTROLLED {
                    IceControlled(tie)
                } else {
                    IceControlling(tie)
                }
            }
            _ => Other { typ, value: v },
        })
    }

    /// Appends the attribute's value (no header, no padding) to `out`.
    fn encode_value(&self, txid: &TransactionId, out: &mut Vec<u8>) {
        use Attribute::*;
        match self {
            MappedAddress(a) | AlternateServer(a) => encode_address(*a, None, out),
            XorMappedAddress(a) | XorPeerAddress(a) | XorRelayedAddress(a) => {
                encode_address(*a, Some(txid), out)
            }
            Username(s) | Realm(s) | Nonce(s) | Software(s) | AlternateDomain(s) => {
                out.extend_from_slice(s.as_bytes())
            }
            ErrorCode { code, reason } => {
                out.extend_from_slice(&[0, 0, (code / 100) as u8, (code % 100) as u8]);
                out.extend_from_slice(reason.as_bytes());
            }
            UnknownAttributes(AttrList::Wire(b)) => out.extend_from_slice(b),
            UnknownAttributes(AttrList::Owned(types)) => {
                for t in types {
                    out.extend_from_slice(&t.to_be_bytes());
                }
            }
            MessageIntegrity(v)
            | MessageIntegritySha256(v)
            | PasswordAlgorithms(v)
            | UserHash(v)
            | Data(v)
            | Other { value: v, .. } => out.extend_from_slice(v),
            Fingerprint(v) | Lifetime(v) | Priority(v) => out.extend_from_slice(&v.to_be_bytes()),
            PasswordAlgorithm { algorithm, params } => {
                out.extend_from_slice(&algorithm.to_be_bytes());
                out.extend_from_slice(&(params.len() as u16).to_be_bytes());
                out.extend_from_slice(params);
            }
            ChannelNumber(n) => {
                out.extend_from_slice(&n.to_be_bytes());
                out.extend_from_slice(&[0, 0]);
            }
            RequestedAddressFamily(f) | AdditionalAddressFamily(f) => {
                out.extend_from_slice(&[f.code(), 0, 0, 0])
            }
            EvenPort(reserve) => out.push(if *reserve { 0x80 } else { 0 }),
            RequestedTransport(p) => out.extend_from_slice(&[*p, 0, 0, 0]),
            DontFragment | UseCandidate => {}
            ReservationToken(t) => out.extend_from_slice(t),
            AddressErrorCode {
                family,
                code,
                reason,
            } => {
                out.extend_from_slice(&[family.code(), 0, (code / 100) as u8, (code % 100) as u8]);
                out.extend_from_slice(reason.as_bytes());
            }
            Icmp { typ, code, data } => {
                out.extend_from_slice(&[0, 0, *typ, *code]);
                out.extend_from_slice(&data.to_be_bytes());
            }
            IceControlled(v) | IceControlling(v) => out.extend_from_slice(&v.to_be_bytes()),
        }
    }
}

fn decode_address(v: &[u8], xor: Option<&TransactionId>) -> Option<SocketAddr> {
    if v.len() < 4 || v[0] != 0 {
        return None;
    }
    let mut port = be16(&v[2..4]);
    if xor.is_some() {
        port ^= (MAGIC_COOKIE >> 16) as u16;
    }
    let ip = match (Family::from_code(v[1])?, v.len()) {
        (Family::V4, 8) => {
            let mut a = be32(&v[4..8]);
            if xor.is_some() {
                a ^= MAGIC_COOKIE;
            }
            IpAddr::V4(Ipv4Addr::from(a))
        }
        (Family::V6, 20) => {
            let mut a = [0u8; 16];
            a.copy_from_slice(&v[4..20]);
            if let Some(txid) = xor {
                for (b, k) in a.iter_mut().zip(xor_key(txid)) {
                    *b ^= k;
                }
            }
            IpAddr::V6(Ipv6Addr::from(a))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

fn xor_key(txid: &TransactionId) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    k[4..].copy_from_slice(&txid.0);
    k
}

fn encode_address(a: SocketAddr, xor: Option<&TransactionId>, out: &mut Vec<u8>) {
    let mut port = a.port();
    if xor.is_some() {
        port ^= (MAGIC_COOKIE >> 16) as u16;
    }
    out.extend_from_slice(&[0, Family::of(a.ip()).code()]);
    out.extend_from_slice(&port.to_be_bytes());
    match a.ip() {
        IpAddr::V4(ip) => {
            let mut v = u32::from(ip);
            if xor.is_some() {
                v ^= MAGIC_COOKIE;
            }
            out.extend_from_slice(&v.to_be_bytes());
        }
        IpAddr::V6(ip) => {
            let mut v = ip.octets();
            if let Some(txid) = xor {
                for (b, k) in v.iter_mut().zip(xor_key(txid)) {
                    *b ^= k;
                }
            }
            out.extend_from_slice(&v);
        }
    }
}

/// Writes one STUN message at the end of a buffer: header, attributes, then optionally
/// MESSAGE-INTEGRITY, MESSAGE-INTEGRITY-SHA256 and FINGERPRINT, in that order. The header length
/// is kept current after every step, so the integrity and fingerprint cover exactly what the RFC
/// says.
pub struct MessageWriter<'b> {
    buf: &'b mut Vec<u8>,
    start: usize,
    txid: TransactionId,
    padding: u8,
}

impl<'b> MessageWriter<'b> {
    /// Starts a message at the end of `buf`.
    pub fn new(buf: &'b mut Vec<u8>, class: Class, method: Method, txid: TransactionId) -> Self {
        let start = buf.len();
        buf.extend_from_slice(&message_type(method, class).to_be_bytes());
        buf.extend_from_slice(&[0, 0]);
        buf.extend_from_slice(&MAGIC_COOKIE.to_be_bytes());
        buf.extend_from_slice(&txid.0);
        MessageWriter {
            buf,
            start,
            txid,
            padding: 0,
        }
    }

    /// The byte used to pad attribute values to 4 bytes (0 unless told; RFC 5769 uses spaces).
    pub fn padding(mut self, byte: u8) -> Self {
        self.padding = byte;
        self
    }

    /// Appends an attribute.
    pub fn attr(&mut self, a: &Attribute<'_>) -> &mut Self {
        let header = self.buf.len();
        self.buf.extend_from_slice(&a.typ().to_be_bytes());
        self.buf.extend_from_slice(&[0, 0]);
        a.encode_value(&self.txid, self.buf);
        self.close_attr(header)
    }

    /// Appends an attribute given as type and value bytes.
    pub fn raw_attr(&mut self, typ: u16, value: &[u8]) -> &mut Self {
        let header = self.buf.len();
        self.buf.extend_from_slice(&typ.to_be_bytes());
        self.buf.extend_from_slice(&[0, 0]);
        self.buf.extend_from_slice(value);
        self.close_attr(header)
    }

    fn close_attr(&mut self, header: usize) -> &mut Self {
        let vlen = self.buf.len() - header - 4;
        debug_assert!(vlen <= usize::from(u16::MAX));
        self.buf[header + 2..header + 4].copy_from_slice(&(vlen as u16).to_be_bytes());
        while !(self.buf.len() - self.start).is_multiple_of(4) {
            self.buf.push(self.padding);
        }
        self.set_length();
        self
    }

    fn set_length(&mut self) {
        let len = (self.buf.len() - self.start - HEADER_LEN) as u16;
        self.buf[self.start + 2..self.start + 4].copy_from_slice(&len.to_be_bytes());
    }

    /// Appends MESSAGE-INTEGRITY (HMAC-SHA1 with `key`).
    pub fn integrity(&mut self, key: &[u8]) -> &mut Self {
        let mac = <Hmac<sha1::Sha1> as Mac>::new_from_slice(key).expect("any key size");
        self.sign(mac, attr::MESSAGE_INTEGRITY, 20)
    }

    /// Appends MESSAGE-INTEGRITY-SHA256 (HMAC-SHA256 with `key`, full 32 bytes).
    pub fn integrity_sha256(&mut self, key: &[u8]) -> &mut Self {
        let mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(key).expect("any key size");
        self.sign(mac, attr::MESSAGE_INTEGRITY_SHA256, 32)
    }

    /// Appends the integrity attribute of `kind`.
    pub fn integrity_of(&mut self, kind: IntegrityKind, key: &[u8]) -> &mut Self {
        match kind {
            IntegrityKind::Sha1 => self.integrity(key),
            IntegrityKind::Sha256 => self.integrity_sha256(key),
        }
    }

    fn sign(&mut self, mut mac: impl Mac, typ: u16, size: usize) -> &mut Self {
        let offset = self.buf.len() - self.start;
        let msg = &self.buf[self.start..];
        feed_before(&mut mac, msg, offset, size);
        let tag = mac.finalize().into_bytes();
        self.raw_attr(typ, &tag[..size])
    }

    /// Appends FINGERPRINT. Nothing may follow it.
    pub fn fingerprint(&mut self) -> &mut Self {
        let offset = self.buf.len() - self.start;
        // Set the length as if the attribute were present, then compute over the prefix.
        let len = (offset + 8 - HEADER_LEN) as u16;
        self.buf[self.start + 2..self.start + 4].copy_from_slice(&len.to_be_bytes());
        let crc = fingerprint(&self.buf[self.start..], offset);
        self.raw_attr(attr::FINGERPRINT, &crc.to_be_bytes())
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.buf.len() - self.start
    }

    /// Nothing but the header written?
    pub fn is_empty(&self) -> bool {
        self.len() == HEADER_LEN
    }
}

/// A ChannelData message (RFC 8656 section 12.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChannelData<'a> {
    pub channel: u16,
    pub data: &'a [u8],
}

impl<'a> ChannelData<'a> {
    /// Decodes ChannelData. Bytes past the length are padding and ignored; the channel number
    /// is not checked against the valid range here.
    pub fn decode(buf: &'a [u8]) -> Result<ChannelData<'a>, DecodeError> {
        if buf.len() < 4 {
            return Err(DecodeError::Truncated);
        }
        if buf[0] & 0xc0 != 0x40 {
            return Err(DecodeError::NotStun);
        }
        let len = usize::from(be16(&buf[2..4]));
        let data = buf.get(4..4 + len).ok_or(DecodeError::Truncated)?;
        Ok(ChannelData {
            channel: be16(&buf[0..2]),
            data,
        })
    }

    /// Appends a ChannelData message to `out`, padded to 4 bytes when `pad` (required over TCP).
    pub fn encode(channel: u16, data: &[u8], pad: bool, out: &mut Vec<u8>) {
        out.extend_from_slice(&channel.to_be_bytes());
        out.extend_from_slice(&(data.len() as u16).to_be_bytes());
        out.extend_from_slice(data);
        if pad {
            while !out.len().is_multiple_of(4) {
                out.push(0);
            }
        }
    }
}

/// What the first byte says a datagram is (RFC 7983 / RFC 8656 section 12).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Stun,
    ChannelData,
    Other,
}

pub fn classify(buf: &[u8]) -> Kind {
    match buf.first().map(|b| b >> 6) {
        Some(0) => Kind::Stun,
        Some(1) => Kind::ChannelData,
        _ => Kind::Other,
    }
}

/// TCP framing: the length of the first whole STUN message or ChannelData (with its padding) at
/// the start of `buf`. `Ok(None)` = need more bytes; `Err` = the stream is not STUN/TURN.
pub fn frame_len(buf: &[u8]) -> Result<Option<usize>, DecodeError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = usize::from(be16(&buf[2..4]));
    match classify(buf) {
        Kind::Stun => {
            if !len.is_multiple_of(4) {
                return Err(DecodeError::BadLength);
            }
            Ok(Some(HEADER_LEN + len))
        }
        Kind::ChannelData => Ok(Some(4 + len.div_ceil(4) * 4)),
        Kind::Other => Err(DecodeError::NotStun),
    }
    .map(|n| n.filter(|n| *n <= buf.len()))
}

/// The standard reason phrase of an error code (RFC 8489 section 14.8, RFC 8656 section 18).
pub fn reason_phrase(code: u16) -> &'static str {
    match code {
        300 => "Try Alternate",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        420 => "Unknown Attribute",
        437 => "Allocation Mismatch",
        438 => "Stale Nonce",
        440 => "Address Family not Supported",
        441 => "Wrong Credentials",
        442 => "Unsupported Transport Protocol",
        443 => "Peer Address Family Mismatch",
        486 => "Allocation Quota Reached",
        500 => "Server Error",
        508 => "Insufficient Capacity",
        _ => "Error",
    }
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// The fuzzing entry point (`fuzz/fuzz_targets/stun_decode.rs`, and a unit test over the
/// committed corpus): decodes `data` every way the server does and checks that what decodes
/// re-encodes to the same attributes. Panics only on a codec bug.
pub fn fuzz_decode(data: &[u8]) {
    let _ = frame_len(data);
    match classify(data) {
        Kind::ChannelData => {
            if let Ok(cd) = ChannelData::decode(data) {
                let mut out = Vec::new();
                ChannelData::encode(cd.channel, cd.data, true, &mut out);
                let again = ChannelData::decode(&out).expect("re-encoded ChannelData decodes");
                assert_eq!(again, cd);
            }
        }
        Kind::Stun | Kind::Other => {
            let Ok(msg) = Message::decode(data) else {
                return;
            };
            let _ = msg.verify_integrity(b"fuzz-key");
            let _ = msg.unknown_required(&[attr::USERNAME]);
            let mut typed = Vec::new();
            for a in msg.attributes() {
                match a.decode(&msg.transaction_id) {
                    Ok(t) => {
                        assert_eq!(t.typ(), a.typ);
                        typed.push(t);
                    }
                    Err(_) => typed.push(Attribute::Other {
                        typ: a.typ,
                        value: a.value,
                    }),
                }
            }
            let mut out = Vec::new();
            let mut w = MessageWriter::new(&mut out, msg.class, msg.method, msg.transaction_id);
            for t in &typed {
                w.attr(t);
            }
            // The input's own MESSAGE-INTEGRITY(-SHA256) and FINGERPRINT are not re-encoded, so
            // there is always room for a FINGERPRINT unless the input had none of them.
            let room = w.len() + 8 - HEADER_LEN <= usize::from(u16::MAX);
            if room {
                w.fingerprint();
            }
            let again = Message::decode(&out).expect("re-encoded message decodes");
            assert_eq!(again.class, msg.class);
            assert_eq!(again.method, msg.method);
            assert_eq!(again.has_fingerprint(), room);
            assert_eq!(again.attributes().len(), typed.len());
            for (a, t) in again.attributes().iter().zip(&typed) {
                let decoded = a.decode(&again.transaction_id).unwrap_or(Attribute::Other {
                    typ: a.typ,
                    value: a.value,
                });
                assert_eq!(&decoded, t, "attribute 0x{:04x} did not round-trip", a.typ);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| c.is_ascii_hexdigit()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    // RFC 5769 section 2.1: sample request (short-term credentials).
    pub(crate) fn rfc5769_request() -> Vec<u8> {
        hex("00010058 2112a442 b7e7a701 bc34d686 fa87dfae
             80220010 5354554e 20746573 7420636c 69656e74
             00240004 6e0001ff
             80290008 932ff9b1 51263b36
             00060009 6576746a 3a683676 59202020
             00080014 9aeaa70c bfd8cb56 781ef2b5 b2d3f249 c1b571a2
             80280004 e57a3bcf")
    }
    // Section 2.2: sample IPv4 response.
    pub(crate) fn rfc5769_response_v4() -> Vec<u8> {
        hex("0101003c 2112a442 b7e7a701 bc34d686 fa87dfae
             8022000b 74657374 20766563 746f7220
             00200008 0001a147 e112a643
             00080014 2b91f599 fd9e90c3 8c7489f9 2af9ba53 f06be7d7
             80280004 c07d4c96")
    }
    // Section 2.3: sample IPv6 response.
    pub(crate) fn rfc5769_response_v6() -> Vec<u8> {
        hex("01010048 2112a442 b7e7a701 bc34d686 fa87dfae
             8022000b 74657374 20766563 746f7220
             00200014 0002a147 0113a9fa a5d3f179 bc25f4b5 bed2b9d9
             00080014 a382954e 4be67bf1 1784c97c 8292c275 bfe3ed41
             80280004 c8fb0b4c")
    }
    // Section 2.4: sample request with long-term authentication.
    pub(crate) fn rfc5769_long_term() -> Vec<u8> {
        hex("00010060 2112a442 78ad3433 c6ad72c0 29da412e
             00060012 e3839ee3 8388e383 aae38383 e382afe3 82b90000
             0015001c 662f2f34 39396b39 35346436 4f4c3334 6f4c3946 53547679 36347341
             0014000b 6578616d 706c652e 6f726700
             00080014 f6702465 6dd64a3e 02b8e071 2e85c9a2 8ca89666")
    }

    const SHORT_TERM_PASSWORD: &[u8] = b"VOkJxbRl1RmTxUk/WvJxBt";

    fn typed<'a>(m: &Message<'a>) -> Vec<Attribute<'a>> {
        m.attributes()
            .iter()
            .map(|a| a.decode(&m.transaction_id).unwrap())
            .collect()
    }

    /// Re-encodes a decoded message from its typed attributes.
    fn reencode(m: &Message<'_>, padding: u8, key: &[u8], fingerprint: bool) -> Vec<u8> {
        let mut out = Vec::new();
        let mut w =
            MessageWriter::new(&mut out, m.class, m.method, m.transaction_id).padding(padding);
        for a in typed(m) {
            w.attr(&a);
        }
        w.integrity(key);
        if fingerprint {
            w.fingerprint();
        }
        out
    }

    #[test]
    fn rfc5769_sample_request() {
        let bytes = rfc5769_request();
        let m = Message::decode(&bytes).unwrap();
        assert_eq!((m.class, m.method), (Class::Request, Method::BINDING));
        assert!(m.has_fingerprint());
        assert_eq!(
            typed(&m),
            vec![
                Attribute::Software("STUN test client"),
                Attribute::Priority(0x6e0001ff),
                Attribute::IceControlled(0x932ff9b151263b36),
                Attribute::Username("evtj:h6vY"),
            ]
        );
        assert_eq!(
            m.verify_integrity(SHORT_TERM_PASSWORD),
            Ok(IntegrityKind::Sha1)
        );
        assert_eq!(m.verify_integrity(b"wrong"), Err(IntegrityError::Mismatch));
        assert_eq!(reencode(&m, b' ', SHORT_TERM_PASSWORD, true), bytes);
    }

    #[test]
    fn rfc5769_sample_ipv4_response() {
        let bytes = rfc5769_response_v4();
        let m = Message::decode(&bytes).unwrap();
        assert_eq!((m.class, m.method), (Class::Success, Method::BINDING));
        assert_eq!(
            typed(&m),
            vec![
                Attribute::Software("test vector"),
                Attribute::XorMappedAddress("192.0.2.1:32853".parse().unwrap()),
            ]
        );
        assert_eq!(
            m.verify_integrity(SHORT_TERM_PASSWORD),
            Ok(IntegrityKind::Sha1)
        );
        assert_eq!(reencode(&m, b' ', SHORT_TERM_PASSWORD, true), bytes);
    }

    #[test]
    fn rfc5769_sample_ipv6_response() {
        let bytes = rfc5769_response_v6();
        let m = Message::decode(&bytes).unwrap();
        assert_eq!(
            typed(&m),
            vec![
                Attribute::Software("test vector"),
                Attribute::XorMappedAddress(
                    "[2001:db8:1234:5678:11:2233:4455:6677]:32853"
                        .parse()
                        .unwrap()
                ),
            ]
        );
        assert_eq!(
            m.verify_integrity(SHORT_TERM_PASSWORD),
            Ok(IntegrityKind::Sha1)
        );
        assert_eq!(reencode(&m, b' ', SHORT_TERM_PASSWORD, true), bytes);
    }

    #[test]
    fn rfc5769_sample_long_term_request() {
        let bytes = rfc5769_long_term();
        let m = Message::decode(&bytes).unwrap();
        assert!(!m.has_fingerprint());
        assert_eq!(
            typed(&m),
            vec![
                Attribute::Username("\u{30DE}\u{30C8}\u{30EA}\u{30C3}\u{30AF}\u{30B9}"),
                Attribute::Nonce("f//499k954d6OL34oL9FSTvy64sA"),
                Attribute::Realm("example.org"),
            ]
        );
        // The password "The<U+00AD>M<U+00AA>tr<U+2168>" after SASLprep (OpaqueString) is
        // "TheMatrIX"; sluice takes passwords as given.
        let key = crate::turn::auth::long_term_key(
            "\u{30DE}\u{30C8}\u{30EA}\u{30C3}\u{30AF}\u{30B9}",
            "example.org",
            "TheMatrIX",
        );
        assert_eq!(m.verify_integrity(&key), Ok(IntegrityKind::Sha1));
        assert_eq!(reencode(&m, 0, &key, false), bytes);
    }

    #[test]
    fn message_type_round_trips_every_method_and_class() {
        for method in 0..0x1000u16 {
            for class in [
                Class::Request,
                Class::Indication,
                Class::Success,
                Class::Error,
            ] {
                let t = message_type(Method(method), class);
                assert_eq!(t & 0xc000, 0);
                assert_eq!(split_type(t), (Method(method), class));
            }
        }
        assert_eq!(message_type(Method::BINDING, Class::Request), 0x0001);
        assert_eq!(message_type(Method::BINDING, Class::Success), 0x0101);
        assert_eq!(message_type(Method::ALLOCATE, Class::Error), 0x0113);
        assert_eq!(message_type(Method::SEND, Class::Indication), 0x0016);
        assert_eq!(message_type(Method::DATA, Class::Indication), 0x0017);
    }

    #[test]
    fn sha256_integrity_and_truncation() {
        let txid = TransactionId([9; 12]);
        let mut out = Vec::new();
        let mut w = MessageWriter::new(&mut out, Class::Request, Method::REFRESH, txid);
        w.attr(&Attribute::Lifetime(600));
        w.integrity(b"key").integrity_sha256(b"key").fingerprint();
        let m = Message::decode(&out).unwrap();
        assert_eq!(m.verify_integrity(b"key"), Ok(IntegrityKind::Sha256));
        assert_eq!(m.verify_integrity(b"other"), Err(IntegrityError::Mismatch));
        assert_eq!(m.attributes().len(), 1);

        // A truncated (16-byte) MESSAGE-INTEGRITY-SHA256 verifies too.
        let mut out = Vec::new();
        let mut w = MessageWriter::new(&mut out, Class::Request, Method::REFRESH, txid);
        w.attr(&Attribute::Lifetime(600));
        let offset = w.len();
        let mut mac = <Hmac<sha2::Sha256> as Mac>::new_from_slice(b"key").unwrap();
        feed_before(&mut mac, &out, offset, 16);
        let tag = mac.finalize().into_bytes();
        let mut w = MessageWriter {
            start: 0,
            txid,
            padding: 0,
            buf: &mut out,
        };
        w.raw_attr(attr::MESSAGE_INTEGRITY_SHA256, &tag[..16]);
        let m = Message::decode(&out).unwrap();
        assert_eq!(m.verify_integrity(b"key"), Ok(IntegrityKind::Sha256));

        // No integrity at all.
        let mut out = Vec::new();
        MessageWriter::new(&mut out, Class::Request, Method::REFRESH, txid);
        assert_eq!(
            Message::decode(&out).unwrap().verify_integrity(b"key"),
            Err(IntegrityError::Missing)
        );
    }

    #[test]
    fn attributes_after_integrity_are_ignored_and_fingerprint_must_be_last() {
        let txid = TransactionId([1; 12]);
        let mut out = Vec::new();
        let mut w = MessageWriter::new(&mut out, Class::Request, Method::ALLOCATE, txid);
        w.attr(&Attribute::RequestedTransport(17));
        w.integrity(b"k");
        w.attr(&Attribute::Lifetime(5));
        let m = Message::decode(&out).unwrap();
        assert_eq!(m.attributes().len(), 1);
        assert!(m.get(attr::LIFETIME).is_none());
        // The HMAC covers the message up to MESSAGE-INTEGRITY with the length rewritten to end
        // there, so what follows neither counts nor breaks it.
        assert_eq!(m.verify_integrity(b"k"), Ok(IntegrityKind::Sha1));

        let mut out = Vec::new();
        let mut w = MessageWriter::new(&mut out, Class::Request, Method::BINDING, txid);
        w.fingerprint();
        w.attr(&Attribute::Lifetime(5));
        assert_eq!(
            Message::decode(&out).unwrap_err(),
            DecodeError::BadFingerprint
        );

        let mut bytes = rfc5769_request();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        assert_eq!(
            Message::decode(&bytes).unwrap_err(),
            DecodeError::FingerprintMismatch
        );
    }

    #[test]
    fn malformed_headers_are_refused() {
        let good = rfc5769_response_v4();
        assert_eq!(
            Message::decode(&good[..19]).unwrap_err(),
            DecodeError::Truncated
        );
        assert_eq!(
            Message::decode(&good[..good.len() - 4]).unwrap_err(),
            DecodeError::Truncated
        );
        let mut longer = good.clone();
        longer.extend_from_slice(&[0; 4]);
        assert_eq!(
            Message::decode(&longer).unwrap_err(),
            DecodeError::BadLength
        );
        let mut bad = good.clone();
        bad[4] = 0;
        assert_eq!(Message::decode(&bad).unwrap_err(), DecodeError::NotStun);
        let mut bad = good.clone();
        bad[3] = 0x3d;
        assert_eq!(Message::decode(&bad).unwrap_err(), DecodeError::BadLength);
        // An attribute length that runs past the end.
        let mut bad = good.clone();
        bad[22] = 0x01;
        assert_eq!(
            Message::decode(&bad).unwrap_err(),
            DecodeError::BadAttribute
        );
        for cut in 0..good.len() {
            let _ = Message::decode(&good[..cut]);
            fuzz_decode(&good[..cut]);
        }
    }

    #[test]
    fn typed_attribute_formats_are_checked() {
        let txid = TransactionId([0; 12]);
        let bad = |typ, v: &[u8]| Attribute::decode(typ, v, &txid).unwrap_err();
        bad(attr::LIFETIME, &[0, 0, 1]);
        bad(attr::XOR_PEER_ADDRESS, &[0, 1, 0, 0, 1, 2, 3]);
        bad(attr::XOR_PEER_ADDRESS, &[0, 3, 0, 0, 1, 2, 3, 4]);
        bad(attr::XOR_PEER_ADDRESS, &[0, 2, 0, 0, 1, 2, 3, 4]);
        bad(attr::ERROR_CODE, &[0, 0, 7, 0]);
        bad(attr::ERROR_CODE, &[0, 0, 4, 100]);
        bad(attr::USERNAME, &[0xff, 0xfe]);
        bad(attr::USERNAME, &[b'a'; 514]);
        bad(attr::REQUESTED_ADDRESS_FAMILY, &[3, 0, 0, 0]);
        bad(attr::MESSAGE_INTEGRITY_SHA256, &[0; 12]);
        bad(attr::EVEN_PORT, &[]);
        assert_eq!(
            Attribute::decode(attr::ERROR_CODE, &[0, 0, 4, 38, b'x'], &txid).unwrap(),
            Attribute::ErrorCode {
                code: 438,
                reason: "x"
            }
        );
        assert_eq!(
            Attribute::decode(attr::EVEN_PORT, &[0x80], &txid).unwrap(),
            Attribute::EvenPort(true)
        );
        assert_eq!(
            Attribute::decode(0x7777, &[1, 2, 3], &txid).unwrap(),
            Attribute::Other {
                typ: 0x7777,
                value: &[1, 2, 3]
            }
        );
        let mut out = Vec::new();
        let mut w = MessageWriter::new(&mut out, Class::Error, Method::ALLOCATE, txid);
        w.attr(&Attribute::UnknownAttributes(AttrList::Owned(vec![
            0x0018, 0x001a,
        ])));
        let m = Message::decode(&out).unwrap();
        let Attribute::UnknownAttributes(list) = m.find(attr::UNKNOWN_ATTRIBUTES).unwrap().unwrap()
        else {
            panic!()
        };
        assert_eq!(list.types(), vec![0x0018, 0x001a]);
    }

    #[test]
    fn unknown_comprehension_required() {
        let txid = TransactionId([2; 12]);
        let mut out = Vec::new();
        let mut w = MessageWriter::new(&mut out, Class::Request, Method::ALLOCATE, txid);
        w.raw_attr(0x0031, b"x").raw_attr(0x8031, b"y");
        w.attr(&Attribute::RequestedTransport(17));
        let m = Message::decode(&out).unwrap();
        assert_eq!(
            m.unknown_required(&[attr::REQUESTED_TRANSPORT]),
            vec![0x0031]
        );
    }

    #[test]
    fn channel_data_and_tcp_framing() {
        let mut out = Vec::new();
        ChannelData::encode(0x4001, b"hello", true, &mut out);
        assert_eq!(out.len(), 12);
        assert_eq!(
            ChannelData::decode(&out).unwrap(),
            ChannelData {
                channel: 0x4001,
                data: b"hello"
            }
        );
        assert_eq!(frame_len(&out), Ok(Some(12)));
        assert_eq!(frame_len(&out[..11]), Ok(None));
        assert_eq!(ChannelData::decode(&out[..8]), Err(DecodeError::Truncated));
        let stun = rfc5769_request();
        let mut stream = stun.clone();
        stream.extend_from_slice(&out);
        assert_eq!(frame_len(&stream), Ok(Some(stun.len())));
        assert_eq!(frame_len(&stream[..3]), Ok(None));
        assert_eq!(frame_len(&[0x80, 0, 0, 0]), Err(DecodeError::NotStun));
        assert_eq!(frame_len(&[0x00, 1, 0, 3]), Err(DecodeError::BadLength));
        assert_eq!(classify(&[0x40]), Kind::ChannelData);
        assert_eq!(classify(&[0x01]), Kind::Stun);
        assert_eq!(classify(&[0x80]), Kind::Other);
        assert_eq!(classify(&[]), Kind::Other);
    }

    #[test]
    fn fuzz_entry_point_survives_pseudo_random_input() {
        let mut seed = 0x2545_f491u32;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 17;
            seed ^= seed << 5;
            seed
        };
        let samples = [
            rfc5769_request(),
            rfc5769_response_v4(),
            rfc5769_response_v6(),
            rfc5769_long_term(),
        ];
        for _ in 0..2000 {
            let mut buf = samples[(next() % 4) as usize].clone();
            for _ in 0..(next() % 4) {
                let i = next() as usize % buf.len();
                buf[i] = next() as u8;
            }
            fuzz_decode(&buf);
        }
    }

    /// Writes the seed corpus of `fuzz/corpus/stun_decode/`: the RFC 5769 vectors and one of each
    /// TURN message sluice handles. Run by hand after changing the codec:
    /// `cargo test --lib write_fuzz_seed_corpus -- --ignored`.
    #[test]
    #[ignore]
    fn write_fuzz_seed_corpus() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/stun_decode");
        std::fs::create_dir_all(&dir).unwrap();
        let txid = TransactionId(*b"sluice-seed!");
        let key = crate::turn::auth::long_term_key("1700000000:alice", "sluice", "pw");
        let peer: SocketAddr = "127.0.0.2:7000".parse().unwrap();
        let peer6: SocketAddr = "[::1]:7000".parse().unwrap();
        let relay: SocketAddr = "127.0.0.1:50000".parse().unwrap();
        let auth = [
            Attribute::Username("1700000000:alice"),
            Attribute::Realm("sluice"),
            Attribute::Nonce("AAAAAAAAAAAAAAAA"),
        ];
        let msg = |class, method, attrs: &[Attribute<'_>], sign: bool, fp: bool| {
            let mut out = Vec::new();
            let mut w = MessageWriter::new(&mut out, class, method, txid);
            for a in attrs {
                w.attr(a);
            }
            if sign {
                w.integrity(&key);
            }
            if fp {
                w.fingerprint();
            }
            out
        };
        let with_auth = |attrs: &[Attribute<'static>]| {
            let mut v = attrs.to_vec();
            v.extend_from_slice(&auth);
            v
        };
        let mut seeds: Vec<(&str, Vec<u8>)> = vec![
            ("rfc5769-request", rfc5769_request()),
            ("rfc5769-response-ipv4", rfc5769_response_v4()),
            ("rfc5769-response-ipv6", rfc5769_response_v6()),
            ("rfc5769-long-term", rfc5769_long_term()),
            (
                "binding-request",
                msg(Class::Request, Method::BINDING, &[], false, false),
            ),
            (
                "allocate-unauthenticated",
                msg(
                    Class::Request,
                    Method::ALLOCATE,
                    &[
                        Attribute::RequestedTransport(17),
                        Attribute::Lifetime(777),
                        Attribute::EvenPort(true),
                        Attribute::RequestedAddressFamily(Family::V4),
                    ],
                    false,
                    true,
                ),
            ),
            (
                "allocate-401",
                msg(
                    Class::Error,
                    Method::ALLOCATE,
                    &[
                        Attribute::ErrorCode {
                            code: 401,
                            reason: "Unauthorized",
                        },
                        Attribute::Realm("sluice"),
                        Attribute::Nonce("AAAAAAAAAAAAAAAA"),
                    ],
                    false,
                    true,
                ),
            ),
            (
                "allocate-authenticated",
                msg(
                    Class::Request,
                    Method::ALLOCATE,
                    &with_auth(&[Attribute::RequestedTransport(17), Attribute::DontFragment]),
                    true,
                    true,
                ),
            ),
            (
                "allocate-success",
                msg(
                    Class::Success,
                    Method::ALLOCATE,
                    &[
                        Attribute::XorRelayedAddress(relay),
                        Attribute::Lifetime(600),
                        Attribute::ReservationToken(*b"reserved"),
                        Attribute::XorMappedAddress(peer),
                    ],
                    true,
                    true,
                ),
            ),
            ("refresh-sha256", {
                let mut out = Vec::new();
                let mut w = MessageWriter::new(&mut out, Class::Request, Method::REFRESH, txid);
                for a in with_auth(&[Attribute::Lifetime(0)]) {
                    w.attr(&a);
                }
                w.integrity(&key).integrity_sha256(&key).fingerprint();
                out
            }),
            (
                "create-permission",
                msg(
                    Class::Request,
                    Method::CREATE_PERMISSION,
                    &with_auth(&[
                        Attribute::XorPeerAddress(peer),
                        Attribute::XorPeerAddress(peer6),
                    ]),
                    true,
                    false,
                ),
            ),
            (
                "channel-bind",
                msg(
                    Class::Request,
                    Method::CHANNEL_BIND,
                    &with_auth(&[
                        Attribute::ChannelNumber(0x4001),
                        Attribute::XorPeerAddress(peer),
                    ]),
                    true,
                    true,
                ),
            ),
            (
                "send-indication",
                msg(
                    Class::Indication,
                    Method::SEND,
                    &[
                        Attribute::XorPeerAddress(peer),
                        Attribute::DontFragment,
                        Attribute::Data(b"hello peer"),
                    ],
                    false,
                    false,
                ),
            ),
            (
                "data-indication",
                msg(
                    Class::Indication,
                    Method::DATA,
                    &[
                        Attribute::XorPeerAddress(peer6),
                        Attribute::Data(b"hello client"),
                    ],
                    false,
                    false,
                ),
            ),
            (
                "error-420",
                msg(
                    Class::Error,
                    Method::ALLOCATE,
                    &[
                        Attribute::ErrorCode {
                            code: 420,
                            reason: "Unknown Attribute",
                        },
                        Attribute::UnknownAttributes(AttrList::Owned(vec![0x001a, 0x0031])),
                        Attribute::Software("sluice"),
                    ],
                    false,
                    false,
                ),
            ),
        ];
        let mut cd = Vec::new();
        ChannelData::encode(0x4001, b"channel data payload", true, &mut cd);
        seeds.push(("channel-data", cd));
        for (name, bytes) in seeds {
            fuzz_decode(&bytes);
            std::fs::write(dir.join(name), bytes).unwrap();
        }
    }

    /// `fuzz_decode` over every file of the committed seed corpus (what `cargo fuzz` starts
    /// from), so the entry point cannot rot.
    #[test]
    fn fuzz_corpus_decodes_without_panic() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/stun_decode");
        let mut files = 0;
        for entry in std::fs::read_dir(&dir).expect("fuzz/corpus/stun_decode exists") {
            let path = entry.unwrap().path();
            fuzz_decode(&std::fs::read(&path).unwrap());
            files += 1;
        }
        assert!(files >= 8, "only {files} corpus files in {}", dir.display());
    }
}
