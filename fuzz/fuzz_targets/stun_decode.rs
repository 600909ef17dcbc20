//! STUN/TURN/ChannelData decoding (`sluice::turn::codec`): must never panic, and whatever
//! decodes must re-encode to the same attributes. Seeds: `fuzz/corpus/stun_decode/`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    sluice::turn::codec::fuzz_decode(data);
});
