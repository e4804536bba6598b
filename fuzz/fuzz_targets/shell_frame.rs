//! A `/shell` client frame (text or binary), and an `init` frame's request
//! as the launch reads it (key, session id, mode, size).
#![no_main]
use agentgate_actors::shell::launch::InitRequest;
use agentgate_actors::shell::ClientFrame;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(ClientFrame::Init(frame)) = ClientFrame::parse(data) {
        if let Ok(req) = InitRequest::from_frame(frame) {
            let _ = req.key();
            let _ = req.check_session_id();
            let _ = req.mode();
            let _ = req.replaces_existing();
        }
    }
});
