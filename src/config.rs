//! Typed configuration: defaults, layering (defaults < TOML file < `SLUICE_*` environment <
//! CLI flags), and validation.
//!
//! Every key is described once, in the `KEYS` table (see [`Config::keys`]): its section, name,
//! Rust type and help text. That one table drives the environment variable names (`SLUICE_<SECTION>_<KEY>`),
//! the CLI flags (`--<section>-<key>`), the parsing of override strings, the per-key type check,
//! and the reference documentation ([`Config::reference_toml`]). Adding a key is a field in its
//! section struct (with its default) plus one line in `KEYS`; a unit test fails if the two
//! disagree.
//!
//! Layers are merged as a `toml::Value` tree and deserialized once, so a value means the same
//! thing whichever layer it came from. Errors are collected, not short-circuited: an operator sees
//! every problem in one run of `sluice check-config`, each named by its dotted key.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use toml::{Table, Value};

/// The whole configuration. `Config::default()` runs on a laptop.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// `[http]`: the API server.
    pub http: HttpConfig,
    /// `[media]`: shards and their sockets.
    pub media: MediaConfig,
    /// `[limits]`: admission and shutdown.
    pub limits: LimitsConfig,
    /// `[log]`: logging.
    pub log: LogConfig,
    /// `[turn]`: the embedded STUN/TURN server.
    pub turn: TurnConfig,
    /// `[auth]`: token auth for WHIP, WHEP and `/ws`.
    pub auth: AuthConfig,
}

/// Token auth. Without a secret sluice is open (and says so loudly at start).
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// HS256 secret of the JWTs that WHIP, WHEP and `/ws` require; unset = no auth.
    pub jwt_secret: Option<String>,
}

/// Secrets are not printed by `{:?}` (logs, panics).
impl fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthConfig")
            .field(
                "jwt_secret",
                &self.jwt_secret.as_ref().map(|_| "<redacted>"),
            )
            .finish()
    }
}

/// The HTTP(S) API: WHIP, WHEP, `/ws`, admin, metrics, demo page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address the API listens on. Default `0.0.0.0:8080`.
    pub listen: SocketAddr,
    /// PEM certificate chain; with `tls_key`, the API is served over HTTPS.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Value of `Access-Control-Allow-Origin`. Default `*`.
    pub cors_origin: String,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            tls_cert: None,
            tls_key: None,
            cors_origin: "*".to_string(),
        }
    }
}

/// The media plane: shards, their UDP sockets, and per-peer timers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MediaConfig {
    /// Number of shard threads; 0 = one per available core (see [`Config::effective_shards`]).
    pub shards: usize,
    /// UDP port of shard 0; shard `i` listens on `port_base + i`. Default 40000.
    pub port_base: u16,
    /// Local addresses the shards bind; empty = every local IPv4 address, 127.0.0.1 included
    /// (resolved by the shard I/O code, not here).
    pub listen_ips: Vec<IpAddr>,
    /// Address announced in ICE candidates instead of the local ones (1:1 NAT).
    pub public_ip: Option<IpAddr>,
    /// Datagram I/O backend. Default io_uring.
    pub io: IoBackend,
    /// Pin each shard thread to its own core. Default true.
    pub pin_cores: bool,
    /// Slots of each cross-shard SPSC ring (a power of two, at least 64). Default 4096.
    pub ring_capacity: usize,
    /// A peer not connected (ICE + DTLS) within this many ms is removed. Default 15000.
    pub connect_timeout_ms: u64,
    /// A connected peer silent for this many ms is removed. Default 10000.
    pub ice_timeout_ms: u64,
    /// Minimum ms between keyframe requests (PLI) sent to one publisher track. Default 500.
    pub keyframe_min_interval_ms: u64,
    /// Subscribers whose forwarded packets a shard hands to the kernel in one submission.
    /// Smaller puts the first subscribers of a fan-out on the wire sooner. Default 16.
    pub send_chunk: usize,
    /// Busy polling: for this many microseconds after its last received packet, a shard polls
    /// its sockets instead of sleeping. Spares the wake-up latency of a busy shard at the cost of
    /// its core's idle time. Default 0 (sleep at once).
    pub busy_poll_us: u64,
}

impl Default for MediaConfig {
    fn default() -> Self {
        MediaConfig {
            shards: 0,
            port_base: 40000,
            listen_ips: Vec::new(),
            public_ip: None,
            io: IoBackend::Uring,
            pin_cores: true,
            ring_capacity: 4096,
            connect_timeout_ms: 15_000,
            ice_timeout_ms: 10_000,
            keyframe_min_interval_ms: 500,
            send_chunk: 16,
            busy_poll_us: 0,
        }
    }
}

/// The datagram I/O backend of the shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IoBackend {
    /// io_uring: multishot RECVMSG into a provided buffer ring.
    #[default]
    Uring,
    /// `recvmmsg`/`sendmmsg` on a non-blocking socket.
    Mmsg,
}

impl IoBackend {
    /// The name used in the config: `"uring"` or `"mmsg"`.
    pub fn as_str(self) -> &'static str {
        match self {
            IoBackend::Uring => "uring",
            IoBackend::Mmsg => "mmsg",
        }
    }
}

impl fmt::Display for IoBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Admission and shutdown limits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Peers (publishers + subscribers) across all shards; beyond it, `503` + `Retry-After`.
    pub max_peers: usize,
    /// Largest accepted HTTP request body (SDP offers, trickle fragments). Default 64 KiB.
    pub max_body_bytes: usize,
    /// On SIGTERM, how long to wait for peers to leave before closing them. Default 30000.
    pub drain_timeout_ms: u64,
    /// Participants in one `/ws` room (WHIP publishers count, WHEP viewers do not). Default 50.
    pub max_participants_per_room: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_peers: 1000,
            max_body_bytes: 64 * 1024,
            drain_timeout_ms: 30_000,
            max_participants_per_room: 50,
        }
    }
}

/// Logging.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A level (`trace|debug|info|warn|error|off`) or `tracing` directives
    /// (`info,sluice::shard=debug`). `RUST_LOG`, when set, overrides it.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".to_string(),
        }
    }
}

/// The embedded STUN/TURN server (RFC 8489, RFC 8656), on the control thread.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TurnConfig {
    /// Run the STUN/TURN server. Default true.
    pub enabled: bool,
    /// UDP and TCP address of the server. Default `0.0.0.0:3478`.
    pub listen: SocketAddr,
    /// REALM of the long-term credentials. Default `sluice`.
    pub realm: String,
    /// TURN REST API shared secret (coturn's `use-auth-secret`): username `<unix-expiry>:<user>`,
    /// password `base64(HMAC-SHA1(secret, username))`.
    pub secret: Option<String>,
    /// Fixed accounts, each `user:password`.
    pub static_users: Vec<String>,
    /// UDP ports relay sockets are bound on. Default `49152-65535`.
    pub relay_ports: PortRange,
    /// Host (name or IP) advertised in `turn:` URLs; unset = the host of the HTTP request.
    pub public_host: Option<String>,
    /// Allow relaying to loopback peers (127.0.0.0/8, ::1). Default false.
    pub allow_loopback_peers: bool,
    /// Peer networks allowed even though they are special-purpose (private, link-local, ...).
    pub allow_peers: Vec<Cidr>,
    /// Allocations one user may hold at once. Default 10.
    pub user_quota: usize,
    /// Allocations the server holds at once. Default 1000.
    pub total_quota: usize,
    /// Relayed bits per second per allocation, both directions together; 0 = no cap.
    pub bandwidth_bps: u64,
    /// Lifetime of the REST credentials sluice hands out, in seconds. Default 86400.
    pub credential_ttl_s: u64,
}

impl Default for TurnConfig {
    fn default() -> Self {
        TurnConfig {
            enabled: true,
            listen: SocketAddr::from(([0, 0, 0, 0], 3478)),
            realm: "sluice".to_string(),
            secret: None,
            static_users: Vec::new(),
            relay_ports: PortRange {
                low: 49152,
                high: 65535,
            },
            public_host: None,
            allow_loopback_peers: false,
            allow_peers: Vec::new(),
            user_quota: 10,
            total_quota: 1000,
            bandwidth_bps: 10_000_000,
            credential_ttl_s: 86_400,
        }
    }
}

/// Secrets are not printed by `{:?}` (logs, panics).
impl fmt::Debug for TurnConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let users: Vec<&str> = self
            .static_users
            .iter()
            .map(|u| u.split(':').next().unwrap_or(""))
            .collect();
        f.debug_struct("TurnConfig")
            .field("enabled", &self.enabled)
            .field("listen", &self.listen)
            .field("realm", &self.realm)
            .field("secret", &self.secret.as_ref().map(|_| "<redacted>"))
            .field("static_users", &users)
            .field("relay_ports", &self.relay_ports)
            .field("public_host", &self.public_host)
            .field("allow_loopback_peers", &self.allow_loopback_peers)
            .field("allow_peers", &self.allow_peers)
            .field("user_quota", &self.user_quota)
            .field("total_quota", &self.total_quota)
            .field("bandwidth_bps", &self.bandwidth_bps)
            .field("credential_ttl_s", &self.credential_ttl_s)
            .finish()
    }
}

impl TurnConfig {
    /// The static users as (user, password) pairs (entries without a `:` are skipped; validation
    /// refuses them).
    pub fn static_user_pairs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.static_users.iter().filter_map(|u| u.split_once(':'))
    }
}

/// An inclusive UDP port range, written `low-high` (or a single port).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PortRange {
    pub low: u16,
    pub high: u16,
}

impl PortRange {
    /// How many ports the range holds.
    pub fn len(&self) -> usize {
        usize::from(self.high) - usize::from(self.low) + 1
    }

    /// Never true: a range holds at least one port.
    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn contains(&self, port: u16) -> bool {
        (self.low..=self.high).contains(&port)
    }
}

impl std::str::FromStr for PortRange {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (low, high) = s.split_once('-').unwrap_or((s, s));
        let port = |p: &str| {
            p.trim()
                .parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| {
                    format!("invalid port range {s:?}: expected LOW-HIGH, ports 1 to 65535")
                })
        };
        let (low, high) = (port(low)?, port(high)?);
        if low > high {
            return Err(format!("invalid port range {s:?}: {low} is above {high}"));
        }
        Ok(PortRange { low, high })
    }
}

impl TryFrom<String> for PortRange {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<PortRange> for String {
    fn from(r: PortRange) -> String {
        r.to_string()
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.low, self.high)
    }
}

/// An IP network, written `addr/prefix` (a bare address is a single host). Host bits must be 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    /// Is `ip` inside this network? An IPv4 network never contains an IPv6 address, nor the
    /// reverse (IPv4-mapped IPv6 peers are unwrapped before they are checked).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (addr, prefix) = s.split_once('/').unwrap_or((s, ""));
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("invalid network {s:?}: expected ADDR/PREFIX"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = if prefix.is_empty() {
            max
        } else {
            prefix
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("invalid network {s:?}: prefix must be 0 to {max}"))?
        };
        let cidr = Cidr { addr, prefix };
        let network = match addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0);
                IpAddr::from(std::net::Ipv4Addr::from(u32::from(a) & mask))
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0);
                IpAddr::from(std::net::Ipv6Addr::from(u128::from(a) & mask))
            }
        };
        if network != addr {
            return Err(format!(
                "invalid network {s:?}: host bits are set (did you mean {network}/{prefix}?)"
            ));
        }
        Ok(cidr)
    }
}

impl TryFrom<String> for Cidr {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl From<Cidr> for String {
    fn from(c: Cidr) -> String {
        c.to_string()
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// One configuration problem, named by its dotted key (`media.port_base`), or by the environment
/// variable or `config` (the file itself) when no key applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// `media.port_base`, `SLUICE_MEDA_SHARDS`, or `config` (the file as a whole).
    pub key: String,
    /// What is wrong, for an operator.
    pub message: String,
}

impl ConfigError {
    fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

impl std::error::Error for ConfigError {}

/// How an override string (environment variable or CLI flag) is read into a TOML value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueKind {
    /// A decimal integer (`_` separators allowed).
    Int,
    /// `true|false|1|0|yes|no|on|off`.
    Bool,
    /// Taken verbatim.
    Str,
    /// Comma-separated strings; blanks around items are trimmed; empty = empty list.
    List,
}

/// One configuration key: the single source for its env var, CLI flag, parsing and docs.
#[derive(Debug, Clone, Copy)]
pub struct KeySpec {
    /// TOML table: `http`, `media`, `limits`, `log`.
    pub section: &'static str,
    /// Key inside the table: `port_base`.
    pub key: &'static str,
    /// How override strings are parsed.
    pub kind: ValueKind,
    /// An `Option` field: an empty override string unsets it.
    pub optional: bool,
    /// One line for `--help` and the reference config.
    pub help: &'static str,
    /// Placeholder for the value in `--help`: `N`, `ADDR:PORT`, `PATH`, ...
    pub value_name: &'static str,
    /// Checks that a TOML value deserializes as the field's Rust type.
    check: fn(&Value) -> Result<(), String>,
}

impl KeySpec {
    /// `media.port_base`
    pub fn dotted(&self) -> String {
        format!("{}.{}", self.section, self.key)
    }

    /// `SLUICE_MEDIA_PORT_BASE`
    pub fn env_var(&self) -> String {
        format!("SLUICE_{}_{}", self.section, self.key).to_ascii_uppercase()
    }

    /// `media-port-base` (the CLI flag without its leading `--`)
    pub fn flag(&self) -> String {
        format!("{}-{}", self.section, self.key).replace('_', "-")
    }

    /// The built-in default, written as an override string would be (`None` when unset).
    pub fn default_repr(&self) -> Option<String> {
        let tree = Value::try_from(Config::default()).ok()?;
        let value = tree.get(self.section)?.get(self.key)?;
        Some(match value {
            Value::String(s) => s.clone(),
            Value::Array(items) => items
                .iter()
                .map(|v| match v {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                })
                .collect::<Vec<_>>()
                .join(","),
            other => other.to_string(),
        })
    }
}

/// Ties a field's Rust type to how its override strings are parsed.
trait FieldType: DeserializeOwned {
    const KIND: ValueKind;
    const VALUE_NAME: &'static str;
    const OPTIONAL: bool = false;
}

macro_rules! field_types {
    ($($t:ty => $kind:ident $name:literal),* $(,)?) => {
        $(impl FieldType for $t {
            const KIND: ValueKind = ValueKind::$kind;
            const VALUE_NAME: &'static str = $name;
        })*
    };
}

field_types! {
    u16 => Int "N",
    u64 => Int "N",
    usize => Int "N",
    bool => Bool "BOOL",
    String => Str "STRING",
    SocketAddr => Str "ADDR:PORT",
    IpAddr => Str "IP",
    PathBuf => Str "PATH",
    IoBackend => Str "uring|mmsg",
    Vec<IpAddr> => List "IP,..",
    Vec<String> => List "STRING,..",
    PortRange => Str "LOW-HIGH",
    Vec<Cidr> => List "CIDR,..",
}

impl<T: FieldType> FieldType for Option<T> {
    const KIND: ValueKind = T::KIND;
    const VALUE_NAME: &'static str = T::VALUE_NAME;
    const OPTIONAL: bool = true;
}

fn check_as<T: DeserializeOwned>(value: &Value) -> Result<(), String> {
    T::deserialize(value.clone())
        .map(drop)
        .map_err(|e| e.message().trim().to_string())
}

const fn key<T: FieldType>(
    section: &'static str,
    key: &'static str,
    help: &'static str,
) -> KeySpec {
    KeySpec {
        section,
        key,
        kind: T::KIND,
        optional: T::OPTIONAL,
        help,
        value_name: T::VALUE_NAME,
        check: check_as::<T>,
    }
}

/// THE table of keys, in the order of the structs. One line per key: section, key, Rust type
/// of the field, help.
#[rustfmt::skip]
static KEYS: &[KeySpec] = &[
    key::<SocketAddr>("http", "listen", "address:port of the HTTP(S) API"),
    key::<Option<PathBuf>>("http", "tls_cert", "PEM certificate chain; with tls_key, serve HTTPS"),
    key::<Option<PathBuf>>("http", "tls_key", "PEM private key matching tls_cert"),
    key::<String>("http", "cors_origin", "Access-Control-Allow-Origin value"),
    key::<usize>("media", "shards", "shard threads; 0 = one per available core"),
    key::<u16>("media", "port_base", "UDP port of shard 0; shard i listens on port_base + i"),
    key::<Vec<IpAddr>>("media", "listen_ips", "local IPs for media sockets; empty = every local IPv4 address"),
    key::<Option<IpAddr>>("media", "public_ip", "IP announced in ICE candidates instead (1:1 NAT)"),
    key::<IoBackend>("media", "io", "datagram I/O backend: uring | mmsg"),
    key::<bool>("media", "pin_cores", "pin each shard thread to its own core"),
    key::<usize>("media", "ring_capacity", "slots per cross-shard ring (power of two, >= 64)"),
    key::<u64>("media", "connect_timeout_ms", "remove a peer not connected (ICE+DTLS) within this time"),
    key::<u64>("media", "ice_timeout_ms", "remove a connected peer silent for this long"),
    key::<u64>("media", "keyframe_min_interval_ms", "minimum interval between keyframe requests per publisher track"),
    key::<usize>("media", "send_chunk", "subscribers whose forwarded packets go to the kernel in one submission (1 to 1024)"),
    key::<u64>("media", "busy_poll_us", "after its last received packet a shard polls this long before sleeping (0 to 100000); 0 = sleep at once"),
    key::<usize>("limits", "max_peers", "maximum peers across all shards; beyond it, 503"),
    key::<usize>("limits", "max_body_bytes", "largest accepted HTTP request body (1 KiB to 16 MiB)"),
    key::<u64>("limits", "drain_timeout_ms", "on shutdown, how long peers may stay before being closed"),
    key::<usize>("limits", "max_participants_per_room", "participants in one /ws room (WHIP publishers count); beyond it, room_full"),
    key::<String>("log", "level", "trace|debug|info|warn|error|off, or directives like info,sluice::shard=debug (RUST_LOG overrides)"),
    key::<bool>("turn", "enabled", "run the embedded STUN/TURN server"),
    key::<SocketAddr>("turn", "listen", "UDP and TCP address:port of the STUN/TURN server"),
    key::<String>("turn", "realm", "REALM of the TURN long-term credentials"),
    key::<Option<String>>("turn", "secret", "TURN REST API shared secret (coturn use-auth-secret); also enables credential hand-out"),
    key::<Vec<String>>("turn", "static_users", "fixed TURN accounts, each user:password"),
    key::<PortRange>("turn", "relay_ports", "UDP port range of relay sockets, LOW-HIGH"),
    key::<Option<String>>("turn", "public_host", "host advertised in turn: URLs; unset = the host of the HTTP request"),
    key::<bool>("turn", "allow_loopback_peers", "allow relaying to loopback peers (127.0.0.0/8, ::1)"),
    key::<Vec<Cidr>>("turn", "allow_peers", "networks allowed as peers though special-purpose (private, link-local, ...)"),
    key::<usize>("turn", "user_quota", "allocations one user may hold at once"),
    key::<usize>("turn", "total_quota", "allocations the server holds at once"),
    key::<u64>("turn", "bandwidth_bps", "relayed bits/s per allocation, both directions; 0 = no cap"),
    key::<u64>("turn", "credential_ttl_s", "lifetime in seconds of the TURN credentials handed out"),
    key::<Option<String>>("auth", "jwt_secret", "HS256 secret; when set, WHIP, WHEP and /ws require a JWT (at least 16 characters)"),
];

/// Environment variables with the `SLUICE_` prefix that are not configuration keys.
const NON_KEY_ENV: &[&str] = &["SLUICE_CONFIG", "SLUICE_GIT_COMMIT"];

/// Smallest accepted `limits.max_body_bytes`.
pub const MIN_BODY_BYTES: usize = 1024;
/// Largest accepted `limits.max_body_bytes`.
pub const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;
/// Largest accepted `media.send_chunk`.
const MAX_SEND_CHUNK: usize = 1024;
/// Largest accepted `media.busy_poll_us` (100 ms).
const MAX_BUSY_POLL_US: u64 = 100_000;

/// Smallest accepted `media.ring_capacity`.
pub const MIN_RING_CAPACITY: usize = 64;

const LEVELS: &[&str] = &["trace", "debug", "info", "warn", "error", "off"];

/// Where an override came from, for error messages.
#[derive(Clone)]
enum Source {
    File,
    Env(String),
    Cli(String),
}

impl Source {
    fn suffix(&self) -> String {
        match self {
            Source::File => String::new(),
            Source::Env(var) => format!(" (from {var})"),
            Source::Cli(flag) => format!(" (from --{flag})"),
        }
    }
}

impl Config {
    /// The table of keys, one [`KeySpec`] per key, in file order.
    pub fn keys() -> &'static [KeySpec] {
        KEYS
    }

    /// Builds the configuration from defaults, then `file` (TOML), then `env` (only `SLUICE_*`
    /// entries are looked at; pass `std::env::vars()`), then `cli` pairs of dotted key and value
    /// string, each layer overriding the ones before; then validates it.
    ///
    /// Every problem found is returned, each naming its key: unreadable or malformed file,
    /// unknown keys in the file, unknown `SLUICE_<SECTION>_*` variables (and near misses of known
    /// ones), values of the wrong type, and failed validation.
    pub fn load(
        file: Option<&Path>,
        env: &[(String, String)],
        cli: &[(String, String)],
    ) -> Result<Config, Vec<ConfigError>> {
        let mut errors = Vec::new();
        let mut tree = Table::new();
        if let Some(path) = file {
            tree = read_file(path, &mut errors);
            remove_unknown_keys(&mut tree, &mut errors);
        }

        let mut sources: HashMap<(&str, &str), Source> = HashMap::new();
        for (name, value) in env {
            if !name.starts_with("SLUICE_") || NON_KEY_ENV.contains(&name.as_str()) {
                continue;
            }
            match Config::keys().iter().find(|k| k.env_var() == *name) {
                Some(spec) => {
                    let source = Source::Env(name.clone());
                    if apply_override(&mut tree, spec, value, &source, &mut errors) {
                        sources.insert((spec.section, spec.key), source);
                    }
                }
                None => {
                    if let Some(message) = unknown_env_message(name) {
                        errors.push(ConfigError::new(name.clone(), message));
                    }
                }
            }
        }
        for (dotted, value) in cli {
            match Config::keys().iter().find(|k| k.dotted() == *dotted) {
                Some(spec) => {
                    let source = Source::Cli(spec.flag());
                    if apply_override(&mut tree, spec, value, &source, &mut errors) {
                        sources.insert((spec.section, spec.key), source);
                    }
                }
                None => errors.push(ConfigError::new(
                    dotted.clone(),
                    format!(
                        "unknown key{}",
                        suggestion(dotted, Config::keys().iter().map(KeySpec::dotted))
                    ),
                )),
            }
        }

        // Type-check each key on its own so every bad value is reported, then drop the bad
        // ones so the rest can still be deserialized and validated.
        for spec in Config::keys() {
            let Some(Value::Table(section)) = tree.get_mut(spec.section) else {
                continue;
            };
            let Some(value) = section.get(spec.key) else {
                continue;
            };
            if let Err(message) = (spec.check)(value) {
                let source = sources
                    .get(&(spec.section, spec.key))
                    .cloned()
                    .unwrap_or(Source::File);
                errors.push(ConfigError::new(
                    spec.dotted(),
                    format!("{message}{}", source.suffix()),
                ));
                section.remove(spec.key);
            }
        }

        let config = match Value::Table(tree).try_into::<Config>() {
            Ok(config) => config,
            Err(e) => {
                // Unreachable when the key table matches the structs (a unit test checks it).
                errors.push(ConfigError::new("config", e.message().trim().to_string()));
                return Err(errors);
            }
        };
        if let Err(invalid) = config.validate() {
            // Skip consequences of values already reported (and dropped) above.
            for e in invalid {
                if !errors.iter().any(|seen| seen.key == e.key) {
                    errors.push(e);
                }
            }
        }
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(errors)
        }
    }

    /// Checks cross-field and range constraints; returns every violation.
    pub fn validate(&self) -> Result<(), Vec<ConfigError>> {
        let mut errors = Vec::new();
        let mut err = |key: &str, message: String| errors.push(ConfigError::new(key, message));

        let http = &self.http;
        match (&http.tls_cert, &http.tls_key) {
            (Some(_), None) => err(
                "http.tls_key",
                "must be set when http.tls_cert is set".into(),
            ),
            (None, Some(_)) => err(
                "http.tls_cert",
                "must be set when http.tls_key is set".into(),
            ),
            _ => {}
        }

        let media = &self.media;
        if media.port_base == 0 {
            err("media.port_base", "must be at least 1".into());
        } else {
            let shards = self.effective_shards() as u64;
            let last = u64::from(media.port_base) + shards - 1;
            if last > u64::from(u16::MAX) {
                err(
                    "media.port_base",
                    format!(
                        "port_base + shards - 1 exceeds 65535 ({} + {shards} - 1 = {last})",
                        media.port_base
                    ),
                );
            }
        }
        for (i, ip) in media.listen_ips.iter().enumerate() {
            if ip.is_unspecified() || ip.is_multicast() {
                err(
                    "media.listen_ips",
                    format!("{ip} is not a unicast address (leave the list empty to use every local IPv4 address)"),
                );
            } else if media.listen_ips[..i].contains(ip) {
                err("media.listen_ips", format!("{ip} is listed twice"));
            }
        }
        if let Some(ip) = media.public_ip {
            if ip.is_unspecified() || ip.is_multicast() {
                err("media.public_ip", format!("{ip} is not a unicast address"));
            }
        }
        if media.ring_capacity < MIN_RING_CAPACITY || !media.ring_capacity.is_power_of_two() {
            err(
                "media.ring_capacity",
                format!(
                    "must be a power of two and at least {MIN_RING_CAPACITY}, got {}",
                    media.ring_capacity
                ),
            );
        }
        if !(1..=MAX_SEND_CHUNK).contains(&media.send_chunk) {
            err(
                "media.send_chunk",
                format!("must be 1 to {MAX_SEND_CHUNK}, got {}", media.send_chunk),
            );
        }
        if media.busy_poll_us > MAX_BUSY_POLL_US {
            err(
                "media.busy_poll_us",
                format!(
                    "must be 0 to {MAX_BUSY_POLL_US}, got {}",
                    media.busy_poll_us
                ),
            );
        }
        for (key, ms) in [
            ("media.connect_timeout_ms", media.connect_timeout_ms),
            ("media.ice_timeout_ms", media.ice_timeout_ms),
            (
                "media.keyframe_min_interval_ms",
                media.keyframe_min_interval_ms,
            ),
            ("limits.drain_timeout_ms", self.limits.drain_timeout_ms),
        ] {
            if ms == 0 {
                err(key, "must be greater than 0".into());
            }
        }

        let limits = &self.limits;
        if limits.max_peers == 0 {
            err("limits.max_peers", "must be at least 1".into());
        }
        if limits.max_participants_per_room == 0 {
            err(
                "limits.max_participants_per_room",
                "must be at least 1".into(),
            );
        }
        if !(MIN_BODY_BYTES..=MAX_BODY_BYTES).contains(&limits.max_body_bytes) {
            err(
                "limits.max_body_bytes",
                format!(
                    "must be between {MIN_BODY_BYTES} (1 KiB) and {MAX_BODY_BYTES} (16 MiB), got {}",
                    limits.max_body_bytes
                ),
            );
        }

        if let Err(message) = check_log_level(&self.log.level) {
            err("log.level", message);
        }

        if let Some(secret) = &self.auth.jwt_secret {
            if secret.chars().count() < 16 {
                err(
                    "auth.jwt_secret",
                    "must be at least 16 characters (an HS256 key should be 32 random bytes)"
                        .into(),
                );
            }
        }
        let turn = &self.turn;
        if turn.listen.ip().is_multicast() {
            err(
                "turn.listen",
                format!("{} is not a unicast address", turn.listen.ip()),
            );
        }
        if turn.realm.is_empty() || turn.realm.chars().count() > 127 {
            err("turn.realm", "must be 1 to 127 characters".into());
        } else if turn
            .realm
            .chars()
            .any(|c| c.is_control() || c == '"' || c == '\\')
        {
            err(
                "turn.realm",
                "must not contain quotes, backslashes or control characters".into(),
            );
        }
        if turn.secret.as_deref().is_some_and(|s| s.is_empty()) {
            err(
                "turn.secret",
                "must not be empty (leave it unset instead)".into(),
            );
        }
        for (i, entry) in turn.static_users.iter().enumerate() {
            match entry.split_once(':') {
                Some((user, password)) if !user.is_empty() && !password.is_empty() => {
                    let seen = turn.static_users[..i]
                        .iter()
                        .any(|e| e.split_once(':').is_some_and(|(u, _)| u == user));
                    if seen {
                        err(
                            "turn.static_users",
                            format!("user {user:?} is listed twice"),
                        );
                    }
                }
                _ => {
                    let user = entry.split(':').next().unwrap_or("");
                    err(
                        "turn.static_users",
                        format!(
                            "entry {} ({user:?}...) must be user:password, both non-empty",
                            i + 1
                        ),
                    );
                }
            }
        }
        if let Some(host) = &turn.public_host {
            if let Err(message) = check_host(host) {
                err("turn.public_host", message);
            }
        }
        if turn.user_quota == 0 {
            err("turn.user_quota", "must be at least 1".into());
        }
        if turn.total_quota == 0 {
            err("turn.total_quota", "must be at least 1".into());
        }
        if turn.credential_ttl_s < 60 || turn.credential_ttl_s > 30 * 86_400 {
            err(
                "turn.credential_ttl_s",
                format!(
                    "must be between 60 and 2592000 (30 days), got {}",
                    turn.credential_ttl_s
                ),
            );
        }
        if turn.bandwidth_bps != 0 && turn.bandwidth_bps < 64_000 {
            err(
                "turn.bandwidth_bps",
                format!(
                    "must be 0 (no cap) or at least 64000, got {}",
                    turn.bandwidth_bps
                ),
            );
        }

        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    /// `media.shards`, or when it is 0 the number of cores this process may run on.
    pub fn effective_shards(&self) -> usize {
        match self.media.shards {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }

    /// The configuration as TOML (unset optional keys are omitted). Loading it back gives the
    /// same configuration.
    pub fn to_toml(&self) -> String {
        // Cannot fail: every field is a string, integer (within i64), bool, or list of those.
        toml::to_string(self).expect("config serializes to TOML")
    }

    /// The effective configuration as `check-config` prints it: secrets (`auth.jwt_secret`,
    /// `turn.secret`, static TURN passwords) replaced by `<redacted>`, so the output can be pasted
    /// into a ticket or a log.
    pub fn to_toml_redacted(&self) -> String {
        let mut c = self.clone();
        if c.auth.jwt_secret.is_some() {
            c.auth.jwt_secret = Some("<redacted>".into());
        }
        if c.turn.secret.is_some() {
            c.turn.secret = Some("<redacted>".into());
        }
        for u in &mut c.turn.static_users {
            if let Some((user, _)) = u.split_once(':') {
                *u = format!("{user}:<redacted>");
            }
        }
        c.to_toml()
    }

    /// A commented TOML file documenting every key (help, env var, flag) with its default;
    /// loading it gives `Config::default()`.
    pub fn reference_toml() -> String {
        let mut out = String::from(
            "# sluice configuration: every key with its built-in default.\n\
             # Precedence: defaults < this file < SLUICE_<SECTION>_<KEY> env vars < --<section>-<key> flags.\n",
        );
        let defaults = Value::try_from(Config::default()).expect("defaults serialize");
        let mut section = "";
        for spec in Config::keys() {
            if spec.section != section {
                section = spec.section;
                out.push_str(&format!("\n[{section}]\n"));
            }
            out.push_str(&format!(
                "# {} (env {}, flag --{})\n",
                spec.help,
                spec.env_var(),
                spec.flag()
            ));
            match defaults.get(spec.section).and_then(|s| s.get(spec.key)) {
                Some(value) => out.push_str(&format!("{} = {value}\n", spec.key)),
                None => out.push_str(&format!("# {} = (unset)\n", spec.key)),
            }
        }
        out
    }
}

fn read_file(path: &Path, errors: &mut Vec<ConfigError>) -> Table {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) => {
            errors.push(ConfigError::new(
                "config",
                format!("{}: {e}", path.display()),
            ));
            return Table::new();
        }
    };
    match text.parse::<Table>() {
        Ok(table) => table,
        Err(e) => {
            let at = e
                .span()
                .map(|span| {
                    let before = &text[..span.start.min(text.len())];
                    let line = before.matches('\n').count() + 1;
                    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                    format!(":{line}:{col}")
                })
                .unwrap_or_default();
            errors.push(ConfigError::new(
                "config",
                format!("{}{at}: {}", path.display(), e.message().trim()),
            ));
            Table::new()
        }
    }
}

/// Reports and removes sections and keys the table does not know.
fn remove_unknown_keys(tree: &mut Table, errors: &mut Vec<ConfigError>) {
    let keys = Config::keys();
    let sections: Vec<&str> = {
        let mut s: Vec<&str> = keys.iter().map(|k| k.section).collect();
        s.dedup();
        s
    };
    tree.retain(|name, value| {
        if !sections.contains(&name) {
            errors.push(ConfigError::new(
                name,
                format!(
                    "unknown section{} (sections: {})",
                    suggestion(name, sections.iter().map(|s| s.to_string())),
                    sections.join(", ")
                ),
            ));
            return false;
        }
        let Value::Table(table) = value else {
            errors.push(ConfigError::new(name, "expected a table ([section])"));
            return false;
        };
        table.retain(|k, _| {
            let known = keys
                .iter()
                .any(|spec| spec.section == name && spec.key == k);
            if !known {
                let dotted = format!("{name}.{k}");
                let near = suggestion(
                    &dotted,
                    keys.iter()
                        .filter(|s| s.section == name)
                        .map(KeySpec::dotted),
                );
                errors.push(ConfigError::new(dotted, format!("unknown key{near}")));
            }
            known
        });
        true
    });
}

/// Parses `raw` as `spec`'s kind and sets it in the tree (or unsets an optional key on "").
/// Returns whether the tree was changed.
fn apply_override(
    tree: &mut Table,
    spec: &KeySpec,
    raw: &str,
    source: &Source,
    errors: &mut Vec<ConfigError>,
) -> bool {
    let section = tree
        .entry(spec.section)
        .or_insert_with(|| Value::Table(Table::new()));
    let Value::Table(section) = section else {
        return false; // a non-table section in the file was already reported and removed
    };
    if spec.optional && raw.trim().is_empty() {
        section.remove(spec.key);
        return true;
    }
    match parse_override(spec.kind, raw) {
        Ok(value) => {
            section.insert(spec.key.to_string(), value);
            true
        }
        Err(expected) => {
            errors.push(ConfigError::new(
                spec.dotted(),
                format!(
                    "invalid value {raw:?}{}: expected {expected}",
                    source.suffix()
                ),
            ));
            false
        }
    }
}

/// Reads an override string as a TOML value of the given kind.
pub fn parse_override(kind: ValueKind, raw: &str) -> Result<Value, &'static str> {
    let s = raw.trim();
    match kind {
        ValueKind::Int => s
            .replace('_', "")
            .parse::<i64>()
            .map(Value::Integer)
            .map_err(|_| "an integer"),
        ValueKind::Bool => match s.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Ok(Value::Boolean(true)),
            "false" | "0" | "no" | "off" => Ok(Value::Boolean(false)),
            _ => Err("true or false"),
        },
        ValueKind::Str => Ok(Value::String(raw.to_string())),
        ValueKind::List => Ok(Value::Array(
            s.split(',')
                .map(str::trim)
                .filter(|item| !item.is_empty())
                .map(|item| Value::String(item.to_string()))
                .collect(),
        )),
    }
}

/// For a `SLUICE_*` variable that is not a key: an error message if it looks like a
/// misspelled key (known section prefix, or within edit distance 2 of a key), else `None`.
fn unknown_env_message(name: &str) -> Option<String> {
    let keys = Config::keys();
    let known_section = keys
        .iter()
        .any(|k| name.starts_with(&format!("SLUICE_{}_", k.section.to_ascii_uppercase())));
    let near = keys
        .iter()
        .map(|k| k.env_var())
        .map(|var| (edit_distance(name, &var), var))
        .min();
    match near {
        Some((d, var)) if d <= 2 => Some(format!(
            "unknown configuration variable; did you mean {var}?"
        )),
        _ if known_section => Some(format!(
            "unknown configuration variable{}",
            suggestion(name, keys.iter().map(KeySpec::env_var))
        )),
        _ => None,
    }
}

/// `"; did you mean X?"` for the closest candidate within a small edit distance, else `""`.
fn suggestion(name: &str, candidates: impl Iterator<Item = String>) -> String {
    candidates
        .map(|c| (edit_distance(name, &c), c))
        .filter(|(d, _)| *d <= 3)
        .min()
        .map(|(_, c)| format!("; did you mean {c}?"))
        .unwrap_or_default()
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// A host name or IP address fit for a `turn:` URL (IPv6 bare or in brackets).
fn check_host(host: &str) -> Result<(), String> {
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if bare.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if host.len() <= 253 && host.trim_end_matches('.').split('.').all(label_ok) {
        Ok(())
    } else {
        Err(format!(
            "{host:?} is neither an IP address nor a host name (no port, no scheme)"
        ))
    }
}

/// Accepts a level, or comma-separated `tracing` directives (`target=level`, `level`).
/// A bare word that is not a level is refused: `tracing` would read it as a target and
/// silently log almost nothing.
fn check_log_level(level: &str) -> Result<(), String> {
    if level.trim().is_empty() {
        return Err("must not be empty (trace|debug|info|warn|error|off or directives)".into());
    }
    for directive in level.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        if !directive.contains('=') && !LEVELS.contains(&directive.to_ascii_lowercase().as_str()) {
            return Err(format!(
                "{directive:?} is not a level (trace|debug|info|warn|error|off) nor a target=level directive"
            ));
        }
    }
    tracing_subscriber::EnvFilter::builder()
        .parse(level)
        .map(drop)
        .map_err(|e| format!("invalid directives {level:?}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A TOML file in the temp dir, removed on drop.
    struct TempToml(PathBuf);

    impl TempToml {
        fn new(text: &str) -> Self {
            static N: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "sluice-config-test-{}-{}.toml",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::write(&path, text).unwrap();
            TempToml(path)
        }
    }

    impl Drop for TempToml {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
        items
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn load_file(
        text: &str,
        env: &[(&str, &str)],
        cli: &[(&str, &str)],
    ) -> Result<Config, Vec<ConfigError>> {
        let file = TempToml::new(text);
        Config::load(Some(&file.0), &pairs(env), &pairs(cli))
    }

    fn keys_of(errors: &[ConfigError]) -> Vec<&str> {
        errors.iter().map(|e| e.key.as_str()).collect()
    }

    #[test]
    fn defaults_validate_and_load_without_a_file() {
        let defaults = Config::default();
        defaults.validate().unwrap();
        assert_eq!(Config::load(None, &[], &[]).unwrap(), defaults);
        assert_eq!(defaults.http.listen, "0.0.0.0:8080".parse().unwrap());
        assert_eq!(defaults.http.cors_origin, "*");
        assert_eq!(defaults.media.port_base, 40000);
        assert_eq!(defaults.media.io, IoBackend::Uring);
        assert!(defaults.media.pin_cores);
        assert_eq!(defaults.media.ring_capacity, 4096);
        assert_eq!(defaults.media.send_chunk, 16);
        assert_eq!(defaults.media.busy_poll_us, 0);
        assert_eq!(defaults.limits.max_body_bytes, 65536);
        assert_eq!(defaults.log.level, "info");
        assert!(defaults.effective_shards() >= 1);
        // An empty file is the defaults too.
        assert_eq!(load_file("", &[], &[]).unwrap(), defaults);
    }

    #[test]
    fn key_table_matches_the_structs() {
        // serde_json keeps `None` fields (as null), so this sees every field.
        let json = serde_json::to_value(Config::default()).unwrap();
        let mut from_structs = Vec::new();
        for (section, fields) in json.as_object().unwrap() {
            for field in fields.as_object().unwrap().keys() {
                from_structs.push(format!("{section}.{field}"));
            }
        }
        let mut from_table: Vec<String> = Config::keys().iter().map(KeySpec::dotted).collect();
        from_structs.sort();
        from_table.sort();
        assert_eq!(
            from_table, from_structs,
            "KEYS and the config structs disagree"
        );

        let defaults = Value::try_from(Config::default()).unwrap();
        for spec in Config::keys() {
            // The declared type accepts the default, and optional <=> an Option field.
            let value = defaults.get(spec.section).and_then(|s| s.get(spec.key));
            match value {
                Some(v) => (spec.check)(v).unwrap_or_else(|e| panic!("{}: {e}", spec.dotted())),
                None => assert!(
                    spec.optional,
                    "{} is unset by default but not optional",
                    spec.dotted()
                ),
            }
            assert!(spec.env_var().starts_with("SLUICE_"));
            assert!(!spec.help.is_empty());
        }
        let spec = Config::keys()
            .iter()
            .find(|k| k.dotted() == "media.port_base")
            .unwrap();
        assert_eq!(spec.env_var(), "SLUICE_MEDIA_PORT_BASE");
        assert_eq!(spec.flag(), "media-port-base");
        assert_eq!(spec.default_repr().as_deref(), Some("40000"));
    }

    #[test]
    fn file_then_env_then_cli() {
        let file = "[http]\nlisten = \"127.0.0.1:9000\"\ncors_origin = \"https://a.example\"\n\
                    [media]\nport_base = 41000\nshards = 2\nio = \"mmsg\"\n";
        let env = [
            ("SLUICE_MEDIA_PORT_BASE", "42000"),
            ("SLUICE_MEDIA_SHARDS", "3"),
            ("SLUICE_LOG_LEVEL", "debug"),
            ("PATH", "/usr/bin"),
        ];
        let cli = [("media.port_base", "43000"), ("log.level", "warn")];
        let config = load_file(file, &env, &cli).unwrap();
        assert_eq!(config.http.listen, "127.0.0.1:9000".parse().unwrap()); // file
        assert_eq!(config.http.cors_origin, "https://a.example"); // file
        assert_eq!(config.media.io, IoBackend::Mmsg); // file
        assert_eq!(config.media.shards, 3); // env over file
        assert_eq!(config.effective_shards(), 3);
        assert_eq!(config.media.port_base, 43000); // cli over env over file
        assert_eq!(config.log.level, "warn"); // cli over env
        assert_eq!(config.limits, LimitsConfig::default()); // untouched

        // Env alone, no file.
        let env = [
            ("SLUICE_HTTP_LISTEN", "127.0.0.1:18080"),
            ("SLUICE_MEDIA_PIN_CORES", "false"),
        ];
        let config = Config::load(None, &pairs(&env), &[]).unwrap();
        assert_eq!(config.http.listen, "127.0.0.1:18080".parse().unwrap());
        assert!(!config.media.pin_cores);
    }

    #[test]
    fn empty_override_unsets_an_optional_key() {
        let file = "[media]\npublic_ip = \"203.0.113.7\"\n";
        let config = load_file(file, &[], &[]).unwrap();
        assert_eq!(config.media.public_ip, Some("203.0.113.7".parse().unwrap()));
        let config = load_file(file, &[("SLUICE_MEDIA_PUBLIC_IP", "")], &[]).unwrap();
        assert_eq!(config.media.public_ip, None);
        let config = load_file(file, &[], &[("media.public_ip", "198.51.100.1")]).unwrap();
        assert_eq!(
            config.media.public_ip,
            Some("198.51.100.1".parse().unwrap())
        );
    }

    #[test]
    fn lists_parse_from_file_env_and_cli() {
        let env = [("SLUICE_MEDIA_LISTEN_IPS", "127.0.0.1,10.0.0.5")];
        let config = Config::load(None, &pairs(&env), &[]).unwrap();
        let want: Vec<IpAddr> = vec!["127.0.0.1".parse().unwrap(), "10.0.0.5".parse().unwrap()];
        assert_eq!(config.media.listen_ips, want);

        let cli = [("media.listen_ips", " 127.0.0.1 , ::1 ,")];
        let config = Config::load(None, &[], &pairs(&cli)).unwrap();
        assert_eq!(
            config.media.listen_ips,
            vec![
                "127.0.0.1".parse::<IpAddr>().unwrap(),
                "::1".parse().unwrap()
            ]
        );

        let config = load_file(
            "[media]\nlisten_ips = [\"10.0.0.5\"]\n",
            &[("SLUICE_MEDIA_LISTEN_IPS", "")],
            &[],
        )
        .unwrap();
        assert!(
            config.media.listen_ips.is_empty(),
            "an empty override clears the list"
        );

        let errors = Config::load(
            None,
            &pairs(&[("SLUICE_MEDIA_LISTEN_IPS", "127.0.0.1,nope")]),
            &[],
        )
        .unwrap_err();
        assert_eq!(keys_of(&errors), ["media.listen_ips"]);
        assert!(
            errors[0].message.contains("SLUICE_MEDIA_LISTEN_IPS"),
            "{}",
            errors[0]
        );

        assert_eq!(
            parse_override(ValueKind::List, ""),
            Ok(Value::Array(vec![]))
        );
        assert_eq!(
            parse_override(ValueKind::Int, "65_536"),
            Ok(Value::Integer(65536))
        );
        assert_eq!(
            parse_override(ValueKind::Bool, "Off"),
            Ok(Value::Boolean(false))
        );
        assert_eq!(
            parse_override(ValueKind::Bool, "yes"),
            Ok(Value::Boolean(true))
        );
        assert!(parse_override(ValueKind::Bool, "maybe").is_err());
        assert!(parse_override(ValueKind::Int, "12k").is_err());
    }

    #[test]
    fn each_validation_error_names_its_key() {
        type Mutation = fn(&mut Config);
        let cases: Vec<(&str, Mutation)> = vec![
            ("media.port_base", |c| c.media.port_base = 0),
            ("media.port_base", |c| {
                c.media.port_base = 65530;
                c.media.shards = 8;
            }),
            ("media.ring_capacity", |c| c.media.ring_capacity = 1000),
            ("media.ring_capacity", |c| c.media.ring_capacity = 32),
            ("media.send_chunk", |c| c.media.send_chunk = 0),
            ("media.busy_poll_us", |c| c.media.busy_poll_us = 100_001),
            ("media.send_chunk", |c| c.media.send_chunk = 5000),
            ("media.connect_timeout_ms", |c| {
                c.media.connect_timeout_ms = 0
            }),
            ("media.ice_timeout_ms", |c| c.media.ice_timeout_ms = 0),
            ("media.keyframe_min_interval_ms", |c| {
                c.media.keyframe_min_interval_ms = 0
            }),
            ("media.listen_ips", |c| {
                c.media.listen_ips = vec!["0.0.0.0".parse().unwrap()]
            }),
            ("media.listen_ips", |c| {
                c.media.listen_ips = vec!["10.0.0.1".parse().unwrap(); 2]
            }),
            ("media.public_ip", |c| {
                c.media.public_ip = Some("224.0.0.1".parse().unwrap())
            }),
            ("limits.drain_timeout_ms", |c| c.limits.drain_timeout_ms = 0),
            ("limits.max_peers", |c| c.limits.max_peers = 0),
            ("limits.max_body_bytes", |c| c.limits.max_body_bytes = 1023),
            ("limits.max_body_bytes", |c| {
                c.limits.max_body_bytes = 16 * 1024 * 1024 + 1
            }),
            ("http.tls_key", |c| {
                c.http.tls_cert = Some("cert.pem".into())
            }),
            ("http.tls_cert", |c| c.http.tls_key = Some("key.pem".into())),
            ("log.level", |c| c.log.level = String::new()),
            ("log.level", |c| c.log.level = "inof".into()),
            ("log.level", |c| c.log.level = "info,sluice=loud".into()),
        ];
        for (key, mutate) in cases {
            let mut config = Config::default();
            mutate(&mut config);
            let errors = config.validate().unwrap_err();
            assert_eq!(keys_of(&errors), [key], "{errors:?}");
            assert!(errors[0].to_string().starts_with(&format!("{key}: ")));
        }

        // The exact wording the operator sees for the port range.
        let errors = Config::load(
            None,
            &[],
            &pairs(&[("media.port_base", "65535"), ("media.shards", "2")]),
        )
        .unwrap_err();
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0]
                .to_string()
                .starts_with("media.port_base: port_base + shards - 1 exceeds 65535"),
            "{}",
            errors[0]
        );

        // Edges that are fine.
        let mut config = Config::default();
        config.media.port_base = 65534;
        config.media.shards = 2;
        config.media.ring_capacity = 64;
        config.limits.max_body_bytes = 1024;
        config.http.tls_cert = Some("c.pem".into());
        config.http.tls_key = Some("k.pem".into());
        config.log.level = "WARN,sluice::shard=trace,hyper=off".into();
        config.validate().unwrap();
    }

    #[test]
    fn every_error_is_returned_at_once() {
        let file = "[media]\nring_capacity = 100\nport_bsae = 1\n[limits]\nmax_body_bytes = 10\n";
        let env = [
            ("SLUICE_MEDIA_SHARDS", "many"),
            ("SLUICE_HTTP_LISTEN", "nowhere"),
        ];
        let cli = [("log.level", "loud")];
        let errors = load_file(file, &env, &cli).unwrap_err();
        let mut keys = keys_of(&errors);
        keys.sort();
        assert_eq!(
            keys,
            [
                "http.listen",
                "limits.max_body_bytes",
                "log.level",
                "media.port_bsae",
                "media.ring_capacity",
                "media.shards"
            ],
            "{errors:#?}"
        );
    }

    #[test]
    fn wrong_types_name_the_key_and_source() {
        let errors = load_file("[media]\nport_base = \"high\"\n", &[], &[]).unwrap_err();
        assert_eq!(keys_of(&errors), ["media.port_base"]);
        let errors =
            Config::load(None, &pairs(&[("SLUICE_MEDIA_PORT_BASE", "70000")]), &[]).unwrap_err();
        assert_eq!(keys_of(&errors), ["media.port_base"]);
        assert!(
            errors[0].message.contains("SLUICE_MEDIA_PORT_BASE"),
            "{}",
            errors[0]
        );
        let errors = Config::load(None, &[], &pairs(&[("media.io", "epoll")])).unwrap_err();
        assert_eq!(keys_of(&errors), ["media.io"]);
        assert!(errors[0].message.contains("--media-io"), "{}", errors[0]);
        let errors = Config::load(None, &[], &pairs(&[("media.pin_cores", "sure")])).unwrap_err();
        assert_eq!(keys_of(&errors), ["media.pin_cores"]);
    }

    #[test]
    fn typo_keys_are_errors() {
        // TOML: unknown key, unknown section, section that is not a table.
        let errors = load_file("[media]\nport_bsae = 41000\n", &[], &[]).unwrap_err();
        assert_eq!(keys_of(&errors), ["media.port_bsae"]);
        assert!(
            errors[0].message.contains("did you mean media.port_base?"),
            "{}",
            errors[0]
        );
        let errors = load_file("[meda]\nshards = 1\n", &[], &[]).unwrap_err();
        assert_eq!(keys_of(&errors), ["meda"]);
        let errors = load_file("shards = 1\n", &[], &[]).unwrap_err();
        assert_eq!(keys_of(&errors), ["shards"]);
        let errors = load_file("media = 1\n", &[], &[]).unwrap_err();
        assert_eq!(keys_of(&errors), ["media"]);

        // Env: known section with unknown key, and a near miss of a known name.
        let errors =
            Config::load(None, &pairs(&[("SLUICE_MEDIA_PORTBASE", "41000")]), &[]).unwrap_err();
        assert_eq!(keys_of(&errors), ["SLUICE_MEDIA_PORTBASE"]);
        assert!(
            errors[0].message.contains("SLUICE_MEDIA_PORT_BASE"),
            "{}",
            errors[0]
        );
        let errors = Config::load(None, &pairs(&[("SLUICE_MEDA_SHARDS", "1")]), &[]).unwrap_err();
        assert_eq!(keys_of(&errors), ["SLUICE_MEDA_SHARDS"]);
        let errors = Config::load(None, &pairs(&[("SLUICE_HTTP_FOO", "1")]), &[]).unwrap_err();
        assert_eq!(keys_of(&errors), ["SLUICE_HTTP_FOO"]);

        // Not configuration: left alone.
        let env = [
            ("SLUICE_CONFIG", "/etc/sluice.toml"),
            ("SLUICE_GIT_COMMIT", "abc"),
            ("SLUICE_TEST_DIR", "/tmp"),
            ("sluice_media_shards", "x"),
        ];
        Config::load(None, &pairs(&env), &[]).unwrap();

        // CLI pairs are checked too.
        let errors = Config::load(None, &[], &pairs(&[("media.shard", "1")])).unwrap_err();
        assert_eq!(keys_of(&errors), ["media.shard"]);
    }

    #[test]
    fn file_problems_are_reported() {
        let missing = std::env::temp_dir().join("sluice-config-test-does-not-exist.toml");
        let errors = Config::load(Some(&missing), &[], &[]).unwrap_err();
        assert_eq!(keys_of(&errors), ["config"]);
        assert!(errors[0].message.contains("does-not-exist"));

        let errors = load_file("[http]\nlisten = \n", &[], &[]).unwrap_err();
        assert_eq!(keys_of(&errors), ["config"]);
        assert!(errors[0].message.contains(".toml:2:"), "{}", errors[0]);
    }

    #[test]
    fn redacted_output_hides_every_secret() {
        let mut c = Config::default();
        c.auth.jwt_secret = Some("jwt-secret-value-123456".into());
        c.turn.secret = Some("turn-secret-value".into());
        c.turn.static_users = vec!["alice:alice-password".into()];
        let out = c.to_toml_redacted();
        for secret in [
            "jwt-secret-value-123456",
            "turn-secret-value",
            "alice-password",
        ] {
            assert!(!out.contains(secret), "{secret} printed:\n{out}");
        }
        assert!(out.contains("alice:<redacted>"));
    }

    #[test]
    fn to_toml_round_trips_through_load() {
        let defaults = Config::default();
        assert_eq!(load_file(&defaults.to_toml(), &[], &[]).unwrap(), defaults);

        let mut config = Config::default();
        config.http.listen = "[::1]:8443".parse().unwrap();
        config.http.tls_cert = Some("/etc/sluice/cert.pem".into());
        config.http.tls_key = Some("/etc/sluice/key.pem".into());
        config.http.cors_origin = "https://app.example".into();
        config.media.shards = 4;
        config.media.port_base = 50000;
        config.media.listen_ips = vec!["10.0.0.5".parse().unwrap(), "fd00::5".parse().unwrap()];
        config.media.public_ip = Some("203.0.113.9".parse().unwrap());
        config.media.io = IoBackend::Mmsg;
        config.media.pin_cores = false;
        config.media.ring_capacity = 1024;
        config.media.connect_timeout_ms = 5000;
        config.media.ice_timeout_ms = 7000;
        config.media.keyframe_min_interval_ms = 250;
        config.limits.max_peers = 20_000;
        config.limits.max_body_bytes = 128 * 1024;
        config.limits.drain_timeout_ms = 1000;
        config.log.level = "debug,sluice::shard=trace".into();
        config.validate().unwrap();
        let text = config.to_toml();
        assert!(
            text.contains("[media]") && text.contains("io = \"mmsg\""),
            "{text}"
        );
        assert_eq!(load_file(&text, &[], &[]).unwrap(), config);
    }

    #[test]
    fn turn_section_defaults_env_and_types() {
        let d = Config::default().turn;
        assert!(d.enabled);
        assert_eq!(d.listen, "0.0.0.0:3478".parse().unwrap());
        assert_eq!(d.realm, "sluice");
        assert_eq!(d.secret, None);
        assert_eq!(
            d.relay_ports,
            PortRange {
                low: 49152,
                high: 65535
            }
        );
        assert_eq!(d.relay_ports.len(), 16384);
        assert_eq!((d.user_quota, d.total_quota), (10, 1000));
        assert_eq!(d.credential_ttl_s, 86_400);

        let env = [
            ("SLUICE_TURN_SECRET", "s3cret"),
            ("SLUICE_TURN_LISTEN", "127.0.0.1:13478"),
            ("SLUICE_TURN_ALLOW_LOOPBACK_PEERS", "true"),
            ("SLUICE_TURN_RELAY_PORTS", "50000-50099"),
            ("SLUICE_TURN_ALLOW_PEERS", "10.0.0.0/8, fd00::/8,192.0.2.7"),
            ("SLUICE_TURN_STATIC_USERS", "alice:pw1,bob:p:w"),
        ];
        let c = Config::load(None, &pairs(&env), &[]).unwrap().turn;
        assert_eq!(c.secret.as_deref(), Some("s3cret"));
        assert_eq!(c.listen, "127.0.0.1:13478".parse().unwrap());
        assert!(c.allow_loopback_peers);
        assert_eq!(
            c.relay_ports,
            PortRange {
                low: 50000,
                high: 50099
            }
        );
        assert_eq!(c.allow_peers.len(), 3);
        assert!(c.allow_peers[0].contains("10.1.2.3".parse().unwrap()));
        assert!(!c.allow_peers[0].contains("11.1.2.3".parse().unwrap()));
        assert!(c.allow_peers[1].contains("fd12::1".parse().unwrap()));
        assert!(!c.allow_peers[1].contains("10.1.2.3".parse().unwrap()));
        assert!(c.allow_peers[2].contains("192.0.2.7".parse().unwrap()));
        assert!(!c.allow_peers[2].contains("192.0.2.8".parse().unwrap()));
        assert_eq!(
            c.static_user_pairs().collect::<Vec<_>>(),
            [("alice", "pw1"), ("bob", "p:w")]
        );
        // Secrets stay out of Debug output.
        let debug = format!("{c:?}");
        assert!(
            !debug.contains("s3cret") && !debug.contains("pw1"),
            "{debug}"
        );

        // Bad values are type errors named by key.
        for (var, key) in [
            ("SLUICE_TURN_RELAY_PORTS", "turn.relay_ports"),
            ("SLUICE_TURN_ALLOW_PEERS", "turn.allow_peers"),
        ] {
            for bad in ["60000-50000", "0-10", "x", "10.0.0.1/8", "10.0.0.0/33"] {
                if let Err(errors) = Config::load(None, &pairs(&[(var, bad)]), &[]) {
                    assert_eq!(keys_of(&errors), [key], "{bad}: {errors:?}");
                    assert!(errors[0].message.contains(var), "{}", errors[0]);
                }
            }
        }
        let errors = Config::load(
            None,
            &pairs(&[("SLUICE_TURN_ALLOW_PEERS", "10.0.0.1/8")]),
            &[],
        )
        .unwrap_err();
        assert!(errors[0].message.contains("10.0.0.0/8"), "{}", errors[0]);
        assert_eq!("50000".parse::<PortRange>().unwrap().len(), 1);
        assert!("65535-65535".parse::<PortRange>().is_ok());
    }

    #[test]
    fn turn_validation_errors_name_their_key() {
        type Mutation = fn(&mut TurnConfig);
        let cases: Vec<(&str, Mutation)> = vec![
            ("turn.realm", |t| t.realm = String::new()),
            ("turn.realm", |t| t.realm = "a\"b".into()),
            ("turn.realm", |t| t.realm = "x".repeat(128)),
            ("turn.secret", |t| t.secret = Some(String::new())),
            ("turn.static_users", |t| {
                t.static_users = vec!["alice".into()]
            }),
            ("turn.static_users", |t| t.static_users = vec![":pw".into()]),
            ("turn.static_users", |t| t.static_users = vec!["a:".into()]),
            ("turn.static_users", |t| {
                t.static_users = vec!["a:1".into(), "a:2".into()]
            }),
            ("turn.public_host", |t| t.public_host = Some(String::new())),
            ("turn.public_host", |t| {
                t.public_host = Some("turn.example.com:3478".into())
            }),
            ("turn.public_host", |t| {
                t.public_host = Some("https://turn.example.com".into())
            }),
            ("turn.user_quota", |t| t.user_quota = 0),
            ("turn.total_quota", |t| t.total_quota = 0),
            ("turn.credential_ttl_s", |t| t.credential_ttl_s = 59),
            ("turn.credential_ttl_s", |t| {
                t.credential_ttl_s = 31 * 86_400
            }),
            ("turn.bandwidth_bps", |t| t.bandwidth_bps = 1000),
            ("turn.listen", |t| {
                t.listen = "224.0.0.1:3478".parse().unwrap()
            }),
        ];
        for (key, mutate) in cases {
            let mut config = Config::default();
            mutate(&mut config.turn);
            let errors = config.validate().unwrap_err();
            assert_eq!(keys_of(&errors), [key], "{errors:?}");
        }
        // Edges that are fine.
        let mut config = Config::default();
        config.turn.public_host = Some("turn.example.com".into());
        config.turn.bandwidth_bps = 0;
        config.turn.credential_ttl_s = 60;
        config.turn.static_users = vec!["a:b:c".into(), "b:x".into()];
        config.validate().unwrap();
        for host in ["203.0.113.5", "2001:db8::1", "[2001:db8::1]", "localhost"] {
            config.turn.public_host = Some(host.into());
            config.validate().unwrap();
        }

        // Round trip through TOML with every turn key set.
        let config = Config {
            turn: TurnConfig {
                enabled: false,
                listen: "127.0.0.1:3479".parse().unwrap(),
                realm: "example.org".into(),
                secret: Some("k".into()),
                static_users: vec!["u:p".into()],
                relay_ports: "40000-40010".parse().unwrap(),
                public_host: Some("turn.example.org".into()),
                allow_loopback_peers: true,
                allow_peers: vec!["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()],
                user_quota: 3,
                total_quota: 30,
                bandwidth_bps: 0,
                credential_ttl_s: 600,
            },
            ..Config::default()
        };
        config.validate().unwrap();
        assert_eq!(load_file(&config.to_toml(), &[], &[]).unwrap(), config);
    }

    #[test]
    fn reference_toml_documents_every_key_and_loads_as_defaults() {
        let text = Config::reference_toml();
        for spec in Config::keys() {
            assert!(text.contains(&spec.env_var()), "{} missing", spec.env_var());
            assert!(text.contains(&format!("--{}", spec.flag())));
        }
        assert_eq!(load_file(&text, &[], &[]).unwrap(), Config::default());
    }
}
