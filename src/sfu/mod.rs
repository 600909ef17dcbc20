//! Forwarding decisions for one shard's subscribers: sequence and timestamp rewriting, drops,
//! keyframe detection and keyframe-request throttling. Sans-IO: it never touches a socket, a
//! thread or a clock (every time is a `now` argument), and never allocates per packet.
#![forbid(unsafe_code)]

mod forwarder;
mod keyframe;
mod seq;
mod throttle;

pub use forwarder::{Decision, DropReason, Forwarder, ForwarderConfig, SourcePacket};
pub use keyframe::{is_keyframe, CodecKind};
pub use seq::{SeqUnwrapper, TsUnwrapper};
pub use throttle::KeyframeThrottle;
