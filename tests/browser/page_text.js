// Opens config.url in a fresh context and reports what a reader sees: the
// title, the visible text and the HTTP status (the harness's own check, and a
// start for page tests that need no more).
//
// config: {url, name?, headers? (sent with every request, e.g.
// {"Authorization": "Bearer JWT"}), waitForText? (text to appear first)}
'use strict';

const { config, step, newContext, screenshot, main } = require('./harness');

main(async (browser) => {
  const origin = new URL(config.url).origin;
  const context = await newContext(browser, origin, config.headers ? { extraHTTPHeaders: config.headers } : {});
  const page = await context.newPage();
  const response = await page.goto(config.url, { waitUntil: 'load' });
  if (config.waitForText) await page.getByText(config.waitForText).first().waitFor();
  step('loaded', {
    status: response.status(),
    title: await page.title(),
    text: await page.innerText('body'),
  });
  await screenshot(page, config.name || 'page');
});
