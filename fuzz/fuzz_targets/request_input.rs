//! What a request carries: the token taken from a query string and an
//! `Authorization` header, the query as it is logged, and each REST body
//! deserialized into the struct its handler reads. The binary crate has no
//! library target, so its `request_input.rs` is included as it is.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[path = "../../src/request_input.rs"]
#[allow(dead_code)]
mod request_input;

use request_input::*;

fuzz_target!(|data: &[u8]| {
    // The first 0xff byte splits the input: the query before it (a request
    // line is ASCII, but bytes are taken lossily as actix would reject
    // them), the header after it.
    let (query, header) = match data.iter().position(|&b| b == 0xff) {
        Some(i) => (&data[..i], Some(&data[i + 1..])),
        None => (data, None),
    };
    let query = String::from_utf8_lossy(query);
    if let Some(token) = token_from(&query, header) {
        assert!(!token.is_empty());
    }
    // No token value ever reaches a log line.
    for pair in redact_query(&query).split('&') {
        if let Some(("token", value)) = pair.split_once('=') {
            assert_eq!(value, "REDACTED");
        }
    }
    let _ = serde_json::from_slice::<Credentials>(data);
    let _ = serde_json::from_slice::<NewSession>(data);
    let _ = serde_json::from_slice::<NewProject>(data);
    let _ = serde_json::from_slice::<Rename>(data);
});
