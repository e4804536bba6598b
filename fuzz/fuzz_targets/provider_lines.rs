//! A provider CLI's output: the first byte picks the provider, the rest is
//! fed line by line to its parser as stdout, then as stderr, then the
//! stream ends and the process exits. Seeded from tests/fixtures.
#![no_main]
use agentgate_actors::provider::{provider_for, ProviderKind, Turn};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let kind = ProviderKind::ALL[pick as usize % ProviderKind::ALL.len()];
    let Some(provider) = provider_for(kind) else {
        return;
    };
    let turn = Turn {
        app_session_id: "app".into(),
        provider_session_id: (pick & 0x80 != 0).then(|| "resumed-id".into()),
        content: "hi".into(),
        options: serde_json::json!({}),
        cwd: "/tmp".into(),
        bin: "cli".into(),
    };
    let mut parser = provider.parser(&turn);
    let text = String::from_utf8_lossy(rest);
    let mut out = Vec::new();
    for line in text.lines() {
        parser.parse_line(line, &mut out);
    }
    for line in text.lines().take(64) {
        parser.stderr_line(line, &mut out);
    }
    parser.finish(&mut out);
    parser.exited(Some(i32::from(pick) - 128), &mut out);
});
