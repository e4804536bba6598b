// The admin page (/admin) as an admin and as another user would use it.
//
// config: {base, admin: {username, password}, user: {username, password}, session}
// Steps: `signed_in`, `seq` {first, later} (the run's seq read twice from
// its row), `aborted` {state}, then after the test sends {restartsAbove: N}:
// `restarts` {value}; `refused` {text} for the other user.
'use strict';

const { config, step, newContext, screenshot, fromTest, until, main } = require('./harness');

async function signIn(page, who) {
  await page.goto(`${config.base}/admin`, { waitUntil: 'load' });
  await page.fill('input[name=username]', who.username);
  await page.fill('input[name=password]', who.password);
  await page.click('#login button[type=submit]');
}

main(async (browser) => {
  const origin = new URL(config.base).origin;
  const admin = await (await newContext(browser, origin)).newPage();
  await signIn(admin, config.admin);
  await admin.locator('#app').waitFor({ state: 'visible' });
  step('signed_in');

  // The streaming run appears, and its seq climbs while the page is open.
  const row = admin.locator(`#runs tr[data-key]`, { hasText: config.session });
  await row.waitFor();
  const seq = async () => Number(await row.locator('td.seq').innerText());
  const first = await seq();
  const later = await until('the seq to climb', async () => {
    const now = await seq();
    return now > first ? now : 0;
  });
  // The chart has drawn a rate above zero by now (a second or two of samples).
  const rate = await until('an events/s sample', async () => {
    const r = Number(await row.locator('canvas').getAttribute('data-rate'));
    return r > 0 ? r : 0;
  });
  await screenshot(admin, 'admin-streaming');
  step('seq', { first, later, rate });

  // Abort from the page.
  await row.locator('button', { hasText: 'Abort' }).click();
  const state = await until('the run to show aborted', async () => {
    const text = await row.locator('td').nth(3).innerText();
    return text.includes('aborted') ? text : '';
  });
  step('aborted', { state });

  // The test kills the plugin's server; its restart count goes up here.
  const { restartsAbove } = await fromTest();
  const plugin = admin.locator('#plugins tr[data-key="echo"]');
  const value = await until('the restart count to go up', async () => {
    const n = Number(await plugin.locator('td.restarts').innerText());
    return n > restartsAbove ? n : 0;
  }, 60000);
  await until('the plugin to run again', async () => (await plugin.innerText()).includes('running'), 60000);
  await until('the restart in the supervision events', async () =>
    (await admin.locator('#supervision').innerText()).includes('actor.restarted'));
  await screenshot(admin, 'admin-plugin-restarted');
  step('restarts', { value });

  // Another user signs in and is refused.
  const other = await (await newContext(browser, origin)).newPage();
  await signIn(other, config.user);
  const refused = other.locator('#refused');
  await refused.waitFor({ state: 'visible' });
  const appHidden = await other.locator('#app').isHidden();
  await screenshot(other, 'admin-refused');
  step('refused', { text: await refused.innerText(), appHidden });
});
