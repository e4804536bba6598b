// Shared helpers for the browser scripts run by tests/support/browser.rs.
//
// A script reports what it saw as JSON lines on stdout, `{"step": name, ...}`,
// which the Rust test awaits and asserts on; it ends with `done` (or `error`
// and exit status 1). Diagnostics (console messages, failed requests) go to
// stderr, which the Rust side saves beside the screenshots.
'use strict';

const fs = require('fs');
const path = require('path');
const readline = require('readline');
const { chromium } = require('playwright-core');

const config = JSON.parse(process.env.BROWSER_CONFIG || '{}');
const artifacts = process.env.BROWSER_ARTIFACTS || '.';

function step(name, data = {}) {
  process.stdout.write(JSON.stringify({ step: name, ...data }) + '\n');
}

function log(...args) {
  process.stderr.write(args.join(' ') + '\n');
}

// Debian's Chromium, headless; never a browser download.
async function launch() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM_PATH || '/usr/bin/chromium',
    headless: true,
    args: [
      '--no-sandbox',
      '--disable-gpu',
      '--disable-dev-shm-usage',
      '--disable-background-networking',
      '--disable-component-update',
      '--no-first-run',
    ],
  });
}

// A fresh context (its own cookies and storage: another user) that reaches
// only `origin`: other hosts (fonts, GitHub) cannot be reached here, so their
// requests are aborted at once instead of hanging. Service workers are
// blocked so a reload really asks the server.
async function newContext(browser, origin, options = {}) {
  const context = await browser.newContext({
    serviceWorkers: 'block',
    viewport: { width: 1280, height: 800 },
    ...options,
  });
  await context.route(
    (url) => url.origin !== origin,
    (route) => route.abort()
  );
  context.on('page', watch);
  return context;
}

// Page errors and failed requests into stderr (kept as an artifact).
function watch(page) {
  page.on('console', (m) => {
    if (m.type() === 'error' || m.type() === 'warning') log(`[console.${m.type()}]`, m.text());
  });
  page.on('pageerror', (e) => log('[pageerror]', e.stack || e.message));
  page.on('requestfailed', (r) => log('[requestfailed]', r.url(), r.failure()?.errorText));
  page.on('response', (r) => {
    if (r.status() >= 400) log('[http]', r.status(), r.request().method(), r.url());
  });
}

let shots = 0;
// A numbered full-page screenshot in the artifacts dir, reported as a step.
async function screenshot(page, name) {
  shots += 1;
  const file = path.join(artifacts, `${String(shots).padStart(2, '0')}-${name}.png`);
  await page.screenshot({ path: file });
  step('screenshot', { name, path: file });
  return file;
}

// The next JSON line the test sent on stdin.
const pending = [];
const waiters = [];
const input = readline.createInterface({ input: process.stdin });
input.on('line', (line) => {
  let value;
  try {
    value = JSON.parse(line);
  } catch (e) {
    log('[stdin] not JSON:', line);
    return;
  }
  const waiter = waiters.shift();
  if (waiter) waiter(value);
  else pending.push(value);
});
function fromTest() {
  if (pending.length) return Promise.resolve(pending.shift());
  return new Promise((resolve) => waiters.push(resolve));
}

// Polls `fn` (async, returns a truthy value when done) until it holds.
async function until(what, fn, timeoutMs = 30000, everyMs = 100) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    try {
      last = await fn();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what} (last: ${last})`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}

// Runs the script body; reports `done` or `error` and exits.
function main(body) {
  let browser;
  const run = async () => {
    browser = await launch();
    step('launched', { version: browser.version() });
    await body(browser);
  };
  run().then(
    async () => {
      await browser?.close().catch(() => {});
      step('done');
      process.exit(0);
    },
    async (e) => {
      // What each open page showed when it failed, for the person reading the log.
      for (const [i, context] of (browser?.contexts() || []).entries()) {
        for (const [j, page] of context.pages().entries()) {
          await screenshot(page, `failed-context${i}-page${j}`).catch(() => {});
        }
      }
      step('error', { message: String(e && e.stack ? e.stack : e) });
      await browser?.close().catch(() => {});
      process.exit(1);
    }
  );
}

module.exports = { config, artifacts, step, log, launch, newContext, watch, screenshot, fromTest, until, main };
