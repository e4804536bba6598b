// The reference's web UI (CloudCLI) served by agentgate, driven as a new
// user would: see tests/web_ui_browser.rs (cloudcli_end_to_end), which
// awaits each step and checks the gateway, the project folder and the model
// stand-in in between.
'use strict';

const fs = require('fs');
const path = require('path');
const { config, artifacts, step, log, newContext, screenshot, fromTest, until, main } = require('./harness');

const origin = new URL(config.url).origin;
const bodyText = (page) => page.innerText('body');
// The first match a user can see (the UI keeps hidden copies for small screens).
const visible = (locator) => locator.filter({ visible: true }).first();

// Counts how many of the answer's words `tok0 tok1 ...` the page shows.
async function answerWords(page) {
  const text = await bodyText(page);
  let n = 0;
  while (n < config.answerWords && text.includes(`tok${n} `.trim())) n += 1;
  return n;
}

async function register(page) {
  await page.goto(config.url);
  await page.waitForSelector('#username');
  const status = await page.evaluate(() => fetch('/api/auth/status').then((r) => r.json()));
  step('setup_form', { needsSetup: status.needsSetup });
  await screenshot(page, 'setup-form');
  await page.fill('#username', config.username);
  await page.fill('#password', config.password);
  if (await page.$('#confirmPassword')) await page.fill('#confirmPassword', config.password);
  await page.click('button[type=submit]');
  await page.waitForSelector('#username', { state: 'detached' });
  await screenshot(page, 'registered');
  step('registered');
}

main(async (browser) => {
  const context = await newContext(browser, origin);
  const page = await context.newPage();
  await register(page);

  // The sidebar's "Create new project" wizard: a typed absolute path (the
  // folder browser is one of the routes agentgate does not serve).
  await visible(page.locator('button[title="Create new project"]')).click();
  await page.fill('input[placeholder="/path/to/project/workspace"]', config.projectPath);
  await page.getByText('Next', { exact: true }).click();
  await screenshot(page, 'new-project-confirm');
  await page.getByRole('button', { name: 'Create Project' }).click();
  await visible(page.getByText(config.projectName, { exact: true })).waitFor();
  await screenshot(page, 'project-listed');
  step('project_listed');
  await visible(page.getByText('New Session', { exact: true })).click();

  const chat = watchChat(page);
  await page.waitForSelector('textarea');
  await screenshot(page, 'composer');
  await page.fill('textarea', config.prompt);
  await page.keyboard.press('Enter');

  const allow = visible(page.getByText('Allow once'));
  await allow.waitFor({ timeout: 60000 });
  const prompt = await bodyText(page);
  await screenshot(page, 'permission-prompt');
  // Checked here, before the click: the test reads this step only later.
  const toolFileBeforeAllow = fs.existsSync(path.join(config.projectPath, config.toolFile));
  step('permission_shown', { text: prompt, toolFileBeforeAllow });
  await allow.click();

  const words = await until('part of the answer', async () => {
    const n = await answerWords(page);
    return n > 0 ? n : 0;
  }, 60000, 20);
  await screenshot(page, 'answer-streaming');
  step('answer_streaming', { words });
  await until('the whole answer', async () => (await answerWords(page)) === config.answerWords, 60000);
  step('answered');
  await screenshot(page, 'answered');
  // The run is over when the composer's Stop control goes away; the UI then
  // replaces its live rows with the history it fetches.
  await visible(page.getByText('Stop', { exact: true })).waitFor({ state: 'hidden', timeout: 60000 });
  await page.waitForLoadState('networkidle');
  const sessionId = new URL(page.url()).pathname.split('/').pop();
  await screenshot(page, 'completed');
  step('completed', {
    sessionId,
    url: page.url(),
    lastWordShown: await occurrences(page, lastWord),
    subscribesDuringRun: chat.subscribesDuringRun(),
    seqsReceivedTwice: chat.seqsReceivedTwice(),
  });

  // A reload shows the conversation from the gateway's history.
  await page.reload();
  await until('the conversation after the reload', async () => {
    const text = await bodyText(page);
    return text.includes(lastWord) && text.includes(config.prompt);
  });
  await screenshot(page, 'reloaded');
  step('reloaded', { text: await chatText(page), lastWordShown: await occurrences(page, lastWord) });

  // The Shell tab: a terminal on a PTY (Claude's interactive CLI in the
  // project); its `!` prefix runs a shell command.
  const shell = watchShell(page);
  await visible(page.getByText('Shell', { exact: true })).click();
  await page.waitForSelector('.xterm-helper-textarea', { state: 'attached' });
  // Its input line's hint shows once it reads keys.
  await until('the CLI ready in the terminal', () => /for shortcuts|to cycle/.test(shell.output()), 60000);
  await screenshot(page, 'shell-ready');
  await page.focus('.xterm-helper-textarea');
  await page.keyboard.type('!');
  await page.keyboard.type(`touch ${config.shellFile}`, { delay: 20 });
  await page.keyboard.press('Enter');
  step('shell_typed', { sent: shell.sent() });
  await fromTest();
  await until('the terminal to show the command finished', () => /Bash completed/.test(shell.output()), 30000);
  await screenshot(page, 'shell-command-ran');

  // Another user in another browser context sees none of it.
  const otherContext = await newContext(browser, origin);
  const other = await otherContext.newPage();
  await other.goto(config.url);
  await other.waitForSelector('#username');
  await other.fill('#username', config.other.username);
  await other.fill('#password', config.other.password);
  await other.click('button[type=submit]');
  await visible(other.getByText('No projects found')).waitFor();
  await other.waitForLoadState('networkidle');
  const me = await other.evaluate(() =>
    fetch('/api/auth/user', { headers: { Authorization: `Bearer ${localStorage.getItem('auth-token')}` } }).then((r) => r.json())
  );
  await screenshot(other, 'other-user');
  step('other_user', { username: me.user && me.user.username, text: await bodyText(other) });
});

const lastWord = `tok${config.answerWords - 1}`;

// How many times `word` appears in the conversation (once, unless events
// were delivered twice).
async function occurrences(page, word) {
  const text = await chatText(page);
  return text.split(word).length - 1;
}

// The conversation pane's text (without the sidebar's session titles).
async function chatText(page) {
  const text = await bodyText(page);
  const start = text.indexOf('Source Control');
  return start >= 0 ? text.slice(start) : text;
}

// Frames on the page's `/ws` sockets: how often the UI re-sent
// `chat.subscribe` while its run was live, and how many seqs one socket
// received twice (PROTOCOL.md E8: none).
function watchChat(page) {
  let running = false;
  let subscribes = 0;
  const seqs = new Map();
  let sockets = 0;
  page.on('websocket', (ws) => {
    if (new URL(ws.url()).pathname !== '/ws') return;
    sockets += 1;
    const socket = sockets;
    ws.on('framesent', (f) => {
      let msg;
      try {
        msg = JSON.parse(f.payload);
      } catch (e) {
        return;
      }
      if (msg.type === 'chat.send') running = true;
      if (msg.type === 'chat.subscribe' && running) subscribes += 1;
    });
    ws.on('framereceived', (f) => {
      let msg;
      try {
        msg = JSON.parse(f.payload);
      } catch (e) {
        return;
      }
      if (typeof msg.seq === 'number' && msg.sessionId) {
        const key = `${socket}:${msg.sessionId}:${msg.seq}`;
        seqs.set(key, (seqs.get(key) || 0) + 1);
      }
      if (msg.kind === 'complete') running = false;
    });
  });
  return {
    subscribesDuringRun: () => subscribes,
    seqsReceivedTwice: () => [...seqs.values()].filter((n) => n > 1).length,
  };
}

// Frames on the page's `/shell` socket: what the browser sent and the
// terminal output the gateway sent (xterm draws to a canvas).
function watchShell(page) {
  let output = '';
  const sent = [];
  page.on('websocket', (ws) => {
    if (!new URL(ws.url()).pathname.startsWith('/shell')) return;
    ws.on('framesent', (f) => {
      try {
        const msg = JSON.parse(f.payload);
        sent.push(msg.type === 'input' ? { type: 'input', data: msg.data } : msg);
      } catch (e) {
        sent.push({ raw: String(f.payload).slice(0, 200) });
      }
    });
    ws.on('framereceived', (f) => {
      try {
        const msg = JSON.parse(f.payload);
        if (msg.type === 'output') {
          output += msg.data;
          fs.appendFileSync(path.join(artifacts, 'shell-output.txt'), msg.data);
        }
      } catch (e) {
        log('[shell] not JSON:', String(f.payload).slice(0, 200));
      }
    });
    ws.on('close', () => log('[shell] socket closed'));
  });
  const plain = () => output.replace(/\x1b\[[0-9;?]*[ -\/]*[@-~]/g, ' ').replace(/\x1b\][^\x07]*\x07/g, '');
  return { output: plain, sent: () => sent };
}
