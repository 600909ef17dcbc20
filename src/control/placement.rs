//! Placement: which shard owns a new peer. One function, so it can later weigh load.

use std::hash::{Hash, Hasher};

use crate::{SessionId, ShardId};

/// `hash(session) % shards`, with a fixed-key hash so a session always maps to the same shard.
pub fn shard_for(session: SessionId, shards: usize) -> ShardId {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    session.hash(&mut h);
    (h.finish() % shards.max(1) as u64) as ShardId
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads_sessions_evenly_and_stably() {
        let shards = 4;
        let mut count = [0usize; 4];
        for i in 0..4000u128 {
            let s = SessionId(i.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835));
            let a = shard_for(s, shards);
            assert_eq!(a, shard_for(s, shards));
            count[a] += 1;
        }
        for c in count {
            assert!((800..1200).contains(&c), "{count:?}");
        }
        assert_eq!(shard_for(SessionId(5), 1), 0);
    }
}
