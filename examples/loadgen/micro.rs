//! `micro`: the per-event CPU work of the chat hot path, in-process and
//! without I/O: the Claude parser on a text delta line, and the registry's
//! one serialization of an event envelope. Run it under
//! `valgrind --tool=callgrind` for instruction counts that do not depend on
//! machine noise (see BENCHMARKS in the README).

use std::time::Instant;

use agentgate_actors::protocol::{now_iso, Envelope, EventBody};
use agentgate_actors::provider::claude::ClaudeParser;
use agentgate_actors::provider::{LineParser, ProviderEvent};

use crate::report::{Row, Target, Unit};
use crate::Ctx;

/// Distinct lines cycled through (so branch predictors see realistic data).
const DISTINCT: usize = 1000;

fn delta_line(i: usize) -> String {
    format!(
        r#"{{"type":"stream_event","event":{{"type":"content_block_delta","index":0,"delta":{{"type":"text_delta","text":"t={};{i}:{} "}}}},"session_id":"fake-4242-1795314739548909671","parent_tool_use_id":null}}"#,
        1_795_314_739_548_941_253u64 + i as u64,
        "x".repeat(64)
    )
}

pub async fn micro(ctx: &Ctx) -> Result<Vec<Row>, String> {
    let n = if ctx.quick { 100_000 } else { 500_000 };
    let lines: Vec<String> = (0..DISTINCT).map(delta_line).collect();
    let mut parser = ClaudeParser::default();
    let mut out = Vec::with_capacity(256);
    let mut deltas = Vec::with_capacity(DISTINCT);
    let t0 = Instant::now();
    for i in 0..n {
        parser.parse_line(&lines[i % DISTINCT], &mut out);
        if out.len() >= 256 {
            out.clear();
        }
    }
    let parse_ns = t0.elapsed().as_nanos() as f64 / n as f64;
    for line in &lines {
        parser.parse_line(line, &mut deltas);
    }
    let bodies: Vec<EventBody> = deltas
        .into_iter()
        .filter_map(|e| match e {
            ProviderEvent::Emit(ev) => Some(ev.body),
            _ => None,
        })
        .collect();
    if bodies.is_empty() {
        return Err("the Claude parser produced no events for text delta lines".into());
    }
    let (session, run) = (
        "6353e92a-3dda-4327-85e4-f02c17e3b567",
        "6c9fe3f6-75cf-4729-ba8e-3e96b15a1e69",
    );
    let mut bytes = 0usize;
    let t0 = Instant::now();
    for seq in 0..n as u64 {
        // What RunRegistry::sequence does per event: id, timestamp, one serialization.
        let id = format!("{run}:{seq}");
        let timestamp = now_iso();
        let frame = Envelope {
            id: &id,
            session_id: session,
            timestamp: &timestamp,
            provider: "claude",
            seq,
            run_id: run,
            parent_tool_use_id: None,
            body: &bodies[seq as usize % bodies.len()],
        }
        .to_frame();
        bytes += frame.len();
    }
    let ser_ns = t0.elapsed().as_nanos() as f64 / n as f64;
    let s = "micro";
    Ok(vec![
        Row::new(
            s,
            "Claude parser, one text delta line",
            parse_ns / 1e3,
            Unit::Micros,
            Target::None,
        ),
        Row::new(
            s,
            "id + timestamp + envelope serialization",
            ser_ns / 1e3,
            Unit::Micros,
            Target::None,
        )
        .note(format!("{} bytes per frame", bytes / n)),
    ])
}
