//! The embedded STUN/TURN server (RFC 8489, RFC 8656) that lets clients behind symmetric NATs and
//! firewalls reach the SFU.
//!
//! `codec`, `auth` and `allocation` are sans-IO (bytes and `now` in, actions out); `server` owns
//! the sockets and runs on the control thread's tokio runtime; `credentials` mints the REST
//! credentials that WHIP/WHEP hand out. Nothing here touches media sockets or shards.

#![forbid(unsafe_code)]

pub mod allocation;
pub mod auth;
pub mod codec;
pub mod credentials;
pub mod server;

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

pub use allocation::{AllocationId, Allocations, FiveTuple, Output, Transport};
pub use auth::AuthFailure;

/// Counters of the TURN server, read by `/metrics`. Bumped with relaxed atomics by the control
/// thread only.
#[derive(Debug, Default)]
pub struct TurnStats {
    /// Allocations alive now (gauge).
    pub allocations_active: AtomicU64,
    /// Allocations ever created.
    pub allocations_total: AtomicU64,
    /// Allocations that ended because their lifetime ran out (not deleted by the client).
    pub allocations_expired: AtomicU64,
    /// STUN Binding requests answered.
    pub binding_requests: AtomicU64,
    /// TURN requests received (Allocate, Refresh, CreatePermission, ChannelBind).
    pub turn_requests: AtomicU64,
    /// Client to peer: datagrams and payload bytes relayed.
    pub relayed_packets_to_peer: AtomicU64,
    pub relayed_bytes_to_peer: AtomicU64,
    /// Peer to client: datagrams and payload bytes relayed.
    pub relayed_packets_to_client: AtomicU64,
    pub relayed_bytes_to_client: AtomicU64,
    /// Datagrams dropped: no permission (either direction) or no channel.
    pub dropped_no_permission: AtomicU64,
    /// Datagrams dropped by the per-allocation bandwidth cap.
    pub dropped_bandwidth: AtomicU64,
    /// 401 challenges sent to requests without credentials (normal for a client's first request).
    pub auth_challenges: AtomicU64,
    /// Authentication failures by reason (see [`AuthFailure::label`]), indexed by
    /// [`TurnStats::AUTH_REASONS`].
    pub auth_failures: [AtomicU64; 6],
    /// Peer addresses refused with 403 (or Send indications dropped) by the peer policy.
    pub refused_peers: AtomicU64,
    /// Allocations refused by the per-user (486) and total (508) quotas.
    pub quota_user_refusals: AtomicU64,
    pub quota_total_refusals: AtomicU64,
    /// Responses to unauthenticated UDP requests withheld because they would have been larger
    /// than what that source sent (no amplification).
    pub amplification_withheld: AtomicU64,
    /// Client TCP connections open now (gauge).
    pub tcp_connections: AtomicU64,
}

impl TurnStats {
    /// The failure reasons counted in `auth_failures`, in index order.
    pub const AUTH_REASONS: [AuthFailure; 6] = [
        AuthFailure::BadRequest,
        AuthFailure::WrongRealm,
        AuthFailure::UnknownUser,
        AuthFailure::Expired,
        AuthFailure::BadIntegrity,
        AuthFailure::StaleNonce,
    ];

    pub(crate) fn count_auth(&self, failure: AuthFailure) {
        match Self::AUTH_REASONS.iter().position(|r| *r == failure) {
            Some(i) => inc(&self.auth_failures[i]),
            None => inc(&self.auth_challenges),
        }
    }

    /// Failures counted for `reason`.
    pub fn auth_failures_for(&self, reason: AuthFailure) -> u64 {
        Self::AUTH_REASONS
            .iter()
            .position(|r| *r == reason)
            .map_or_else(
                || self.auth_challenges.load(Ordering::Relaxed),
                |i| self.auth_failures[i].load(Ordering::Relaxed),
            )
    }

    /// Appends the Prometheus text exposition of every TURN metric (names `sluice_turn_*`).
    pub fn write_prometheus(&self, out: &mut String) {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
            let _ = writeln!(out, "# HELP sluice_turn_{name} {help}");
            let _ = writeln!(out, "# TYPE sluice_turn_{name} {kind}");
            for (labels, v) in samples {
                if labels.is_empty() {
                    let _ = writeln!(out, "sluice_turn_{name} {v}");
                } else {
                    let _ = writeln!(out, "sluice_turn_{name}{{{labels}}} {v}");
                }
            }
        };
        metric(
            "allocations",
            "gauge",
            "TURN allocations alive.",
            &[("", get(&self.allocations_active))],
        );
        metric(
            "allocations_total",
            "counter",
            "TURN allocations created.",
            &[("", get(&self.allocations_total))],
        );
        metric(
            "allocations_expired_total",
            "counter",
            "TURN allocations that expired without being refreshed.",
            &[("", get(&self.allocations_expired))],
        );
        metric(
            "requests_total",
            "counter",
            "STUN Binding and TURN requests received.",
            &[
                ("method=\"binding\"", get(&self.binding_requests)),
                ("method=\"turn\"", get(&self.turn_requests)),
            ],
        );
        metric(
            "relayed_packets_total",
            "counter",
            "Datagrams relayed, by direction.",
            &[
                ("direction=\"to_peer\"", get(&self.relayed_packets_to_peer)),
                (
                    "direction=\"to_client\"",
                    get(&self.relayed_packets_to_client),
                ),
            ],
        );
        metric(
            "relayed_bytes_total",
            "counter",
            "Payload bytes relayed, by direction.",
            &[
                ("direction=\"to_peer\"", get(&self.relayed_bytes_to_peer)),
                (
                    "direction=\"to_client\"",
                    get(&self.relayed_bytes_to_client),
                ),
            ],
        );
        metric(
            "dropped_total",
            "counter",
            "Datagrams not relayed, by reason.",
            &[
                ("reason=\"no_permission\"", get(&self.dropped_no_permission)),
                ("reason=\"bandwidth\"", get(&self.dropped_bandwidth)),
            ],
        );
        let labels: Vec<String> = Self::AUTH_REASONS
            .iter()
            .map(|r| format!("reason=\"{}\"", r.label()))
            .collect();
        let samples: Vec<(&str, u64)> = labels
            .iter()
            .zip(&self.auth_failures)
            .map(|(l, v)| (l.as_str(), get(v)))
            .collect();
        metric(
            "auth_failures_total",
            "counter",
            "TURN requests refused by authentication, by reason.",
            &samples,
        );
        metric(
            "auth_challenges_total",
            "counter",
            "401 challenges to requests without credentials.",
            &[("", get(&self.auth_challenges))],
        );
        metric(
            "refused_peers_total",
            "counter",
            "Peer addresses refused by policy (loopback, private, special-purpose).",
            &[("", get(&self.refused_peers))],
        );
        metric(
            "quota_refusals_total",
            "counter",
            "Allocations refused by quota.",
            &[
                ("quota=\"user\"", get(&self.quota_user_refusals)),
                ("quota=\"total\"", get(&self.quota_total_refusals)),
            ],
        );
        metric(
            "amplification_withheld_total",
            "counter",
            "Responses to unauthenticated UDP requests withheld to avoid amplification.",
            &[("", get(&self.amplification_withheld))],
        );
        metric(
            "tcp_connections",
            "gauge",
            "Client TCP connections open.",
            &[("", get(&self.tcp_connections))],
        );
    }
}

#[inline]
pub(crate) fn inc(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

#[inline]
pub(crate) fn add(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_names_every_metric_once() {
        let stats = TurnStats::default();
        stats.count_auth(AuthFailure::StaleNonce);
        stats.count_auth(AuthFailure::Challenge);
        inc(&stats.allocations_active);
        let mut out = String::new();
        stats.write_prometheus(&mut out);
        assert!(out.contains("sluice_turn_allocations 1\n"), "{out}");
        assert!(out.contains("sluice_turn_auth_failures_total{reason=\"stale_nonce\"} 1\n"));
        assert!(out.contains("sluice_turn_auth_challenges_total 1\n"));
        assert_eq!(stats.auth_failures_for(AuthFailure::StaleNonce), 1);
        let mut types: Vec<&str> = out.lines().filter(|l| l.starts_with("# TYPE")).collect();
        let n = types.len();
        types.dedup();
        assert_eq!(types.len(), n);
    }
}
