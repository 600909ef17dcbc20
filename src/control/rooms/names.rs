//! Which room names, identities and display names are accepted, and how a WHEP stream name
//! addresses a room participant (`room~identity`). Pure functions, no state.

/// Longest room name, identity or display name, in bytes.
pub const MAX_NAME_BYTES: usize = 128;

/// Separates the room from the participant's identity in a WHEP stream name.
pub const WATCH_SEPARATOR: char = '~';

/// A room name is a stream name: 1 to 128 characters of `A-Z a-z 0-9 - _ .`. So a room and the
/// WHIP stream of the same name are one namespace, and `~` never occurs in a room name.
pub fn valid_room(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_BYTES
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// An identity (a token's `sub`, or chosen by the client without auth): 1 to 128 bytes, no
/// control characters, no leading or trailing whitespace.
pub fn valid_identity(identity: &str) -> bool {
    !identity.is_empty()
        && identity.len() <= MAX_NAME_BYTES
        && identity.trim() == identity
        && !identity.chars().any(char::is_control)
}

/// A display name: at most 128 bytes without control characters; it may be empty.
pub fn valid_display_name(name: &str) -> bool {
    name.len() <= MAX_NAME_BYTES && !name.chars().any(char::is_control)
}

/// What a WHEP stream name designates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchName<'a> {
    /// `room`: the WHIP publisher of that stream (the registry's business, as before rooms).
    Stream(&'a str),
    /// `room~identity`: one participant of a room.
    Participant { room: &'a str, identity: &'a str },
}

/// Split a WHEP stream name at its first `~`. `None` when either side is not valid.
pub fn parse_watch_name(name: &str) -> Option<WatchName<'_>> {
    match name.split_once(WATCH_SEPARATOR) {
        None => valid_room(name).then_some(WatchName::Stream(name)),
        Some((room, identity)) => (valid_room(room) && valid_identity(identity))
            .then_some(WatchName::Participant { room, identity }),
    }
}

/// The WHEP stream name of a room participant.
pub fn watch_name(room: &str, identity: &str) -> String {
    format!("{room}{WATCH_SEPARATOR}{identity}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_names_are_stream_names() {
        assert!(valid_room("demo-1_a.b"));
        assert!(valid_room(&"a".repeat(128)));
        for bad in ["", "a b", "a/b", "a~b", "é", &"a".repeat(129)] {
            assert!(!valid_room(bad), "{bad:?}");
        }
    }

    #[test]
    fn identities_and_display_names() {
        assert!(valid_identity("alice@example.com"));
        assert!(valid_identity("Zoë Ü"));
        for bad in ["", " alice", "alice\n", "a\u{7}b", &"x".repeat(129)] {
            assert!(!valid_identity(bad), "{bad:?}");
        }
        assert!(valid_display_name(""));
        assert!(valid_display_name("Ann 🎧"));
        assert!(!valid_display_name("a\tb"));
    }

    #[test]
    fn watch_names_split_at_the_first_tilde() {
        assert_eq!(parse_watch_name("demo"), Some(WatchName::Stream("demo")));
        assert_eq!(
            parse_watch_name("demo~alice"),
            Some(WatchName::Participant {
                room: "demo",
                identity: "alice"
            })
        );
        // The identity may itself contain `~`; the room never does.
        assert_eq!(
            parse_watch_name("demo~a~b"),
            Some(WatchName::Participant {
                room: "demo",
                identity: "a~b"
            })
        );
        assert_eq!(parse_watch_name("~alice"), None);
        assert_eq!(parse_watch_name("demo~"), None);
        assert_eq!(parse_watch_name("de mo"), None);
        assert_eq!(watch_name("demo", "alice"), "demo~alice");
    }
}
