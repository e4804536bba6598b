//! A plugin's manifest.json as discovery reads it (name, server path
//! inside the plugin folder, args, enabled).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let dir = std::path::Path::new("/plugins/example");
    if let Ok(manifest) = agentgate_actors::plugin::manifest::parse_manifest(dir, text) {
        let server = manifest.server_path();
        let escapes = !server.starts_with(dir)
            || server
                .components()
                .any(|c| c == std::path::Component::ParentDir);
        assert!(!escapes, "{manifest:?} escapes its folder");
    }
});
