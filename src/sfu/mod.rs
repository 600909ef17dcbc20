//! Forwarding decisions for one shard's subscribers: sequence and timestamp rewriting, drops,
//! keyframe detection and keyframe-request throttling. Sans-IO: it never touches a socket, a
//! thread or a clock (every time is a `now` argument), and never allocates per packet.
#![forbid(unsafe_code)]

mod forwarder;
mod keyframe;
mod layer;
mod seq;
mod throttle;
mod vp8;

pub use forwarder::{Decision, DropReason, Forwarder, ForwarderConfig, SourcePacket};
pub use keyframe::{is_keyframe, CodecKind};
pub use layer::{
    BweTargets, LayerDecision, LayerInfo, LayerSelector, LayerSelectorConfig, LayerTable, MaxLayer,
    Quality, SwitchEvent, SwitchReason, MAX_LAYERS,
};
pub use seq::{SeqUnwrapper, TsUnwrapper};
pub use throttle::KeyframeThrottle;
pub use vp8::{
    fuzz_vp8, keyframe_size as vp8_keyframe_size, PictureId, PictureIdWidth, TemporalLayer,
    Vp8Descriptor, Vp8Error, Vp8Rewrite, Vp8Rewriter,
};
