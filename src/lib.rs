//! sluice: a thread-per-core WebRTC SFU appliance for bare-metal Linux.
//!
//! One control thread (HTTP signaling, registry, placement) and one shard thread per core (media
//! sockets, peers, forwarding). They share nothing but bounded queues; see `docs/architecture.md`.

pub mod config;
pub mod control;
pub mod mesh;
pub mod metrics;
pub mod serve;
pub mod sfu;
pub mod shard;
pub mod turn;

/// Identifies one shard (one pinned core) of the data plane.
pub type ShardId = usize;

/// A signaling session (one WHIP publisher or one WHEP viewer), and so one peer on one shard.
/// Random, so placement by its hash spreads evenly and URLs cannot be guessed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub u128);

impl SessionId {
    pub fn random() -> SessionId {
        SessionId(rand::random())
    }
}

impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl std::str::FromStr for SessionId {
    type Err = std::num::ParseIntError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 32 {
            // Force a ParseIntError for anything that is not exactly 32 hex digits.
            return u128::from_str_radix("-", 16).map(SessionId);
        }
        u128::from_str_radix(s, 16).map(SessionId)
    }
}
