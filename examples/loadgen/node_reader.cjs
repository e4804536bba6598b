// The loadgen's Node reader (scenario chat-node): the WebSocket library
// Node and browser-like clients use (`ws`, pinned, installed by the loadgen
// into .cache/loadgen-node), reading as fast as it can and parsing every
// frame, as a real client would.
//
//   node node_reader.cjs ws URL SESSION PROMPT   start a run, read it to its complete
//   node node_reader.cjs pipe                    baseline: parse stream-json lines from stdin
//
// On a 4008 close it resubscribes with its lastSeq (counted). Prints one
// JSON line: {"deltas", "gaps", "duplicates", "closes4008", "secs", "complete"}.
'use strict';

const mode = process.argv[2];
// Timed from the first delta, so Node's and the CLI's start-up do not count.
let started = null;
const mark = () => {
  if (started === null) started = process.hrtime.bigint();
};
const secs = () => (started === null ? 0 : Number(process.hrtime.bigint() - started) / 1e9);

if (mode === 'pipe') {
  const rl = require('readline').createInterface({ input: process.stdin, crlfDelay: Infinity });
  let deltas = 0;
  rl.on('line', (line) => {
    const v = JSON.parse(line);
    if (v.type === 'stream_event' && v.event && v.event.type === 'content_block_delta') {
      mark();
      deltas++;
    }
  });
  rl.on('close', () => {
    console.log(JSON.stringify({ deltas, gaps: 0, duplicates: 0, closes4008: 0, secs: secs(), complete: true }));
  });
} else {
  const WebSocket = require('ws');
  const [url, session, prompt] = process.argv.slice(3);
  let last = 0;
  let deltas = 0;
  let gaps = 0;
  let duplicates = 0;
  let closes4008 = 0;
  let done = false;
  const finish = (complete) => {
    console.log(JSON.stringify({ deltas, gaps, duplicates, closes4008, secs: secs(), complete }));
    process.exit(complete ? 0 : 1);
  };
  const connect = (first) => {
    const ws = new WebSocket(url, { maxPayload: 64 * 1024 * 1024 });
    ws.on('open', () => {
      if (first) {
        ws.send(JSON.stringify({ type: 'chat.send', sessionId: session, content: prompt }));
      } else {
        ws.send(JSON.stringify({ type: 'chat.subscribe', sessions: [{ sessionId: session, lastSeq: last }] }));
      }
    });
    ws.on('message', (data) => {
      const v = JSON.parse(data);
      if (typeof v.seq !== 'number') return;
      if (v.seq <= last) duplicates++;
      else if (last !== 0 && v.seq !== last + 1) gaps++;
      if (v.seq > last) last = v.seq;
      if (v.kind === 'stream_delta') {
        mark();
        deltas++;
      }
      if (v.kind === 'complete') {
        done = true;
        ws.close(1000);
        finish(true);
      }
    });
    ws.on('close', (code) => {
      if (done) return;
      if (code === 4008) {
        closes4008++;
        connect(false);
      } else {
        finish(false);
      }
    });
    ws.on('error', () => {});
  };
  connect(true);
  // Bounded: a run that never completes ends the reader.
  setTimeout(() => finish(false), 600 * 1000).unref();
}
