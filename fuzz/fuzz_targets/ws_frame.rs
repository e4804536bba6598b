//! A `/ws` client frame: parsed as the ChatSocket parses it, and the
//! options of a `chat.send` checked as before a run starts.
#![no_main]
use agentgate_actors::protocol::ClientMessage;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Text frames are UTF-8 (anything else is closed with 1007 before parsing).
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(ClientMessage::Send { options, .. }) = ClientMessage::parse(text) {
        let _ = agentgate_actors::provider::check_options(&options);
    }
});
