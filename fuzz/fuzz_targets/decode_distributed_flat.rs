//! The distributed flat participants' decoders (announcements, presences and private messages): no
//! panic, and whatever decodes has exactly one encoding (the bytes it came from).
#![no_main]

use keycast_core::protocol::distributed_flat::{Announcement, Presence, Private};
use keycast_core::wire::GroupId;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((announcement, signature)) = Announcement::decode(data) {
        assert_eq!(announcement.encode_with(&signature), data, "announcement re-encodes differently");
    }
    if let Ok((presence, signature)) = Presence::decode(data) {
        assert_eq!(presence.encode_with(&signature), data, "presence re-encodes differently");
    }
    // Private messages name their group after the version and kind bytes.
    let group = data.get(2..10).map_or(GroupId(0), |b| GroupId(u64::from_be_bytes(b.try_into().unwrap())));
    if let Ok(private) = Private::decode(data, group) {
        assert_eq!(&private.encode(group)[..], data, "private message re-encodes differently");
    }
});
