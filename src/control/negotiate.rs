//! Turning an SDP offer into a ready str0m `Rtc` and its answer: ICE-lite, RTP mode, the process's
//! one DTLS certificate, the shard's candidates, and for viewers only the publisher's codecs.

use std::net::SocketAddr;
use std::time::Instant;

use str0m::bwe::Bitrate;
use str0m::change::SdpOffer;
use str0m::format::{CodecConfig, PayloadParams};
use str0m::media::{Direction, MediaKind, Mid};
use str0m::rtp::{Extension, ExtensionMap};
use str0m::{Candidate, Rtc, RtcConfig};

/// Where a viewer's bandwidth estimate starts, before any feedback: the middle layer of a
/// 720p simulcast at most, as mediasoup's default (libwebrtc starts at 300). The first picture
/// is chosen on it, and str0m paces at it: a guess above the link pours the top layer's
/// keyframe into a queue that drops it, and the viewer spends its first seconds recovering.
/// str0m's first probes (3 and 6 times this, at most twice what the layer selectors want) show
/// at once whether more fits.
const VIEWER_INITIAL_BWE_KBPS: u64 = 600;

/// Which bandwidth estimate a peer connection's media feeds, and so which header extensions it
/// negotiates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Estimate {
    /// A publisher: sluice receives and reports transport-wide feedback, which the client's own
    /// estimator paces its uplink by. Every extension str0m offers.
    Uplink,
    /// A viewer whose downlink sluice estimates from transport-wide feedback (simulcast layer
    /// choice). Every extension str0m offers.
    Downlink,
    /// A viewer or room subscriber with no estimator. Neither abs-send-time nor transport-wide
    /// sequence numbers are negotiated: they exist only for an estimator, and with them the client
    /// would report on every packet (transport-wide feedback every 50 to 100 ms) for sluice to
    /// decrypt and discard.
    None,
}

/// str0m's standard extensions without the two that only a bandwidth estimator reads: what a
/// connection without an estimator negotiates ([`Estimate::None`]).
pub fn extensions_without_estimator() -> ExtensionMap {
    let mut exts = ExtensionMap::empty();
    for (id, ext) in ExtensionMap::standard().iter() {
        if !matches!(
            ext,
            Extension::AbsoluteSendTime | Extension::TransportSequenceNumber
        ) {
            exts.set(id, ext.clone());
        }
    }
    exts
}

/// Why an offer was refused; each maps to a `400` with this text.
#[derive(Debug, thiserror::Error)]
pub enum NegotiationError {
    #[error("malformed SDP offer: {0}")]
    Malformed(String),
    #[error("offer rejected: {0}")]
    Rejected(String),
    #[error("{0}")]
    Unusable(String),
}

/// The m-lines that carry media in the direction asked for: (mid, is video, codecs).
pub type NegotiatedMedia = Vec<(Mid, bool, Vec<PayloadParams>)>;

/// A negotiated peer, not yet connected.
pub struct Negotiated {
    pub rtc: Rtc,
    pub answer: String,
    pub ufrag: String,
    /// The m-lines that carry media in the direction asked for: (mid, is video, codecs).
    pub media: NegotiatedMedia,
}

/// Settings shared by every peer of the process.
#[derive(Clone)]
pub struct PeerTemplate {
    pub cert: str0m::crypto::dtls::DtlsCert,
}

impl PeerTemplate {
    pub fn new() -> Result<PeerTemplate, String> {
        let provider = str0m::crypto::from_feature_flags();
        let cert = provider
            .dtls_provider
            .generate_certificate()
            .ok_or("could not generate the DTLS certificate")?;
        Ok(PeerTemplate { cert })
    }

    fn config(&self, codecs: Option<&[PayloadParams]>, estimate: Estimate) -> RtcConfig {
        let mut cfg = RtcConfig::new()
            .set_ice_lite(true)
            .set_rtp_mode(true)
            .set_stats_interval(Some(std::time::Duration::from_secs(1)))
            .set_dtls_cert(self.cert.clone());
        if let Some(codecs) = codecs {
            *cfg.codec_config() = CodecConfig::new_from_payload_params(codecs.to_vec());
        }
        match estimate {
            Estimate::Uplink => {}
            Estimate::Downlink => {
                cfg = cfg.enable_bwe(Some(Bitrate::kbps(VIEWER_INITIAL_BWE_KBPS)));
            }
            Estimate::None => cfg = cfg.set_extension_map(extensions_without_estimator()),
        }
        cfg
    }

    /// Negotiate a publisher (WHIP): keep the m-lines the client sends on.
    pub fn publisher(
        &self,
        offer: &str,
        candidates: &[SocketAddr],
    ) -> Result<Negotiated, NegotiationError> {
        self.negotiate(offer, candidates, None, true, Estimate::Uplink)
    }

    /// Negotiate a viewer (WHEP): only the publisher's codecs are on offer. With `bwe` (the
    /// stream's video is simulcast), the viewer's downlink is estimated (TWCC), which picks its
    /// layer. Without simulcast there is nothing to adapt, and str0m's pacer, which paces at the
    /// estimate, would only queue a stream that cannot slow down: no estimator then, and no
    /// extensions that ask the viewer for feedback ([`Estimate::None`]).
    pub fn viewer(
        &self,
        offer: &str,
        candidates: &[SocketAddr],
        codecs: &[PayloadParams],
        bwe: bool,
    ) -> Result<Negotiated, NegotiationError> {
        let estimate = if bwe {
            Estimate::Downlink
        } else {
            Estimate::None
        };
        self.negotiate(offer, candidates, Some(codecs), false, estimate)
    }

    /// A room participant's subscribe peer connection: no offer yet (the shard makes them),
    /// every codec sluice forwards, the shard's candidates.
    pub fn subscriber(&self, candidates: &[SocketAddr]) -> Result<(Rtc, String), String> {
        // No bandwidth estimator (see `viewer`): which tracks it will carry is not known yet, and
        // the pacer would queue the ones that cannot adapt. Simulcast layers follow the
        // participant's `layer` messages.
        let mut rtc = self.config(None, Estimate::None).build(Instant::now());
        for addr in candidates {
            let c = Candidate::host(*addr, "udp").map_err(|e| format!("candidate {addr}: {e}"))?;
            rtc.add_local_candidate(c);
        }
        let ufrag = rtc.direct_api().local_ice_credentials().ufrag;
        Ok((rtc, ufrag))
    }

    fn negotiate(
        &self,
        offer: &str,
        candidates: &[SocketAddr],
        codecs: Option<&[PayloadParams]>,
        publish: bool,
        estimate: Estimate,
    ) -> Result<Negotiated, NegotiationError> {
        let now = Instant::now();
        let mut rtc = self.config(codecs, estimate).build(now);
        for addr in candidates {
            let c = Candidate::host(*addr, "udp")
                .map_err(|e| NegotiationError::Rejected(format!("candidate {addr}: {e}")))?;
            rtc.add_local_candidate(c);
        }
        let (answer, media) = answer_on(&mut rtc, offer, publish)?;
        let ufrag = rtc.direct_api().local_ice_credentials().ufrag;
        Ok(Negotiated {
            rtc,
            answer,
            ufrag,
            media,
        })
    }
}

/// Accept `offer` on `rtc` (new, or renegotiating a room participant's publish connection):
/// the answer, with the candidates in every section, and the m-lines carrying media in the
/// direction asked for (`publish`: towards sluice).
pub fn answer_on(
    rtc: &mut Rtc,
    offer: &str,
    publish: bool,
) -> Result<(String, NegotiatedMedia), NegotiationError> {
    let offer_text = offer;
    let offer =
        SdpOffer::from_sdp_string(offer).map_err(|e| NegotiationError::Malformed(e.to_string()))?;
    let answer = rtc
        .sdp_api()
        .accept_offer(offer)
        .map_err(|e| NegotiationError::Rejected(e.to_string()))?;
    // str0m announces media as events only once connected; read the m-lines directly.
    let mut media = Vec::new();
    for mid in offer_mids(offer_text) {
        let Some(m) = rtc.media(mid) else {
            continue;
        };
        let wanted = if publish {
            matches!(m.direction(), Direction::RecvOnly | Direction::SendRecv)
        } else {
            matches!(m.direction(), Direction::SendOnly | Direction::SendRecv)
        };
        if !wanted || !matches!(m.kind(), MediaKind::Audio | MediaKind::Video) {
            continue;
        }
        let params = negotiated_params(rtc, mid);
        if params.is_empty() {
            continue;
        }
        media.push((mid, m.kind() == MediaKind::Video, params));
    }
    Ok((candidates_in_every_section(&answer.to_sdp_string()), media))
}

/// Repeat the host candidates in every m-section and close each with `a=end-of-candidates`.
///
/// str0m lists them in the first section only. Bundled clients differ in which section they read
/// (aiortc takes the last), and sluice never trickles, so every section says all there is.
fn candidates_in_every_section(sdp: &str) -> String {
    let lines: Vec<&str> = sdp.lines().map(|l| l.trim_end_matches('\r')).collect();
    let candidates: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.starts_with("a=candidate:"))
        .collect();
    let mut out = String::with_capacity(sdp.len() + 256);
    let mut in_media = false;
    let mut pending = false;
    let flush = |out: &mut String| {
        for c in &candidates {
            out.push_str(c);
            out.push_str("\r\n");
        }
        out.push_str("a=end-of-candidates\r\n");
    };
    for line in lines {
        if line.starts_with("a=candidate:") || line == "a=end-of-candidates" {
            continue;
        }
        if line.starts_with("m=") {
            if pending {
                flush(&mut out);
            }
            in_media = true;
            pending = true;
        }
        out.push_str(line);
        out.push_str("\r\n");
        if in_media && pending && line.starts_with("c=") {
            flush(&mut out);
            pending = false;
        }
    }
    if pending {
        flush(&mut out);
    }
    out
}

/// The mids of an offer's m-lines, in order.
fn offer_mids(sdp: &str) -> Vec<Mid> {
    sdp.lines()
        .filter_map(|l| l.trim().strip_prefix("a=mid:"))
        .map(|m| Mid::from(m.trim()))
        .collect()
}

/// The codecs negotiated on one m-line.
fn negotiated_params(rtc: &Rtc, mid: Mid) -> Vec<PayloadParams> {
    let Some(media) = rtc.media(mid) else {
        return Vec::new();
    };
    media
        .remote_pts()
        .iter()
        .filter_map(|pt| rtc.codec_config().find(|p| p.pt() == *pt).copied())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offer(dir: Direction, vp8: bool) -> String {
        let mut cfg = RtcConfig::new().clear_codecs().enable_opus(true, false);
        cfg = if vp8 {
            cfg.enable_vp8(true)
        } else {
            cfg.enable_h264(true)
        };
        let mut rtc = cfg.build(Instant::now());
        rtc.add_local_candidate(Candidate::host("127.0.0.1:5000".parse().unwrap(), "udp").unwrap());
        let mut api = rtc.sdp_api();
        api.add_media(MediaKind::Video, dir, None, None, None);
        api.add_media(MediaKind::Audio, dir, None, None, None);
        let (o, _) = api.apply().unwrap();
        o.to_sdp_string()
    }

    #[test]
    fn publisher_offer_yields_audio_and_video() {
        let t = PeerTemplate::new().unwrap();
        let n = t
            .publisher(
                &offer(Direction::SendOnly, true),
                &["127.0.0.1:40000".parse().unwrap()],
            )
            .unwrap();
        let kinds: Vec<bool> = n.media.iter().map(|m| m.1).collect();
        assert_eq!(kinds, vec![true, false], "{:?}", n.media);
        assert!(n.answer.contains("a=ice-lite"));
        assert_eq!(
            n.answer.matches("127.0.0.1 40000").count(),
            2,
            "in both sections"
        );
        assert_eq!(n.answer.matches("a=end-of-candidates").count(), 2);
        assert!(n.answer.ends_with("\r\n"));
        assert!(!n.ufrag.is_empty());
    }

    #[test]
    fn viewer_gets_only_the_publishers_codecs() {
        let t = PeerTemplate::new().unwrap();
        let p = t
            .publisher(
                &offer(Direction::SendOnly, true),
                &["127.0.0.1:40000".parse().unwrap()],
            )
            .unwrap();
        let codecs: Vec<PayloadParams> = p.media.iter().flat_map(|m| m.2.clone()).collect();
        let v = t
            .viewer(
                &offer(Direction::RecvOnly, true),
                &["127.0.0.1:40001".parse().unwrap()],
                &codecs,
                false,
            )
            .unwrap();
        assert_eq!(v.media.len(), 2, "{:?}", v.media);
        // An H.264-only viewer cannot receive a VP8 stream: no video m-line survives.
        let v = t
            .viewer(
                &offer(Direction::RecvOnly, false),
                &["127.0.0.1:40001".parse().unwrap()],
                &codecs,
                false,
            )
            .unwrap();
        assert!(v.media.iter().all(|m| !m.1), "{:?}", v.media);
    }

    const TWCC_URI: &str = "transport-wide-cc";
    const ABS_SEND_TIME_URI: &str = "abs-send-time";

    /// Extensions that only feed an estimator are negotiated where one runs: a publisher's
    /// (its own, from sluice's feedback) and a simulcast viewer's (sluice's); never for a viewer
    /// or room subscriber without one, who would otherwise send feedback for nothing.
    #[test]
    fn estimator_extensions_only_where_an_estimator_runs() {
        let t = PeerTemplate::new().unwrap();
        let host = ["127.0.0.1:40000".parse().unwrap()];
        let p = t
            .publisher(&offer(Direction::SendOnly, true), &host)
            .unwrap();
        assert!(p.answer.contains(TWCC_URI), "{}", p.answer);
        assert!(p.answer.contains(ABS_SEND_TIME_URI), "{}", p.answer);
        let codecs: Vec<PayloadParams> = p.media.iter().flat_map(|m| m.2.clone()).collect();

        let estimated = t
            .viewer(&offer(Direction::RecvOnly, true), &host, &codecs, true)
            .unwrap();
        assert!(estimated.answer.contains(TWCC_URI), "{}", estimated.answer);

        let plain = t
            .viewer(&offer(Direction::RecvOnly, true), &host, &codecs, false)
            .unwrap();
        assert_eq!(plain.media.len(), 2, "{:?}", plain.media);
        assert!(!plain.answer.contains(TWCC_URI), "{}", plain.answer);
        assert!(
            !plain.answer.contains(ABS_SEND_TIME_URI),
            "{}",
            plain.answer
        );
        assert!(
            plain.answer.contains("sdes:mid"),
            "MID stays: {}",
            plain.answer
        );

        let (mut sub, _) = t.subscriber(&host).unwrap();
        let mut api = sub.sdp_api();
        api.add_media(MediaKind::Video, Direction::SendOnly, None, None, None);
        let (room_offer, _) = api.apply().unwrap();
        let room_offer = room_offer.to_sdp_string();
        assert!(!room_offer.contains(TWCC_URI), "{room_offer}");
        assert!(!room_offer.contains(ABS_SEND_TIME_URI), "{room_offer}");
    }

    #[test]
    fn garbage_is_malformed() {
        let t = PeerTemplate::new().unwrap();
        let e = t.publisher("v=0\r\nnonsense", &[]).err().unwrap();
        assert!(matches!(e, NegotiationError::Malformed(_)), "{e}");
    }
}
