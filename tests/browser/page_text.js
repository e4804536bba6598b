// Opens config.url in a fresh context and reports what a reader sees: the
// title, the visible text and the HTTP status (the harness's own check, and a
// start for page tests that need no more).
'use strict';

const { config, step, newContext, screenshot, main } = require('./harness');

main(async (browser) => {
  const origin = new URL(config.url).origin;
  const context = await newContext(browser, origin);
  const page = await context.newPage();
  const response = await page.goto(config.url, { waitUntil: 'load' });
  step('loaded', {
    status: response.status(),
    title: await page.title(),
    text: await page.innerText('body'),
  });
  await screenshot(page, config.name || 'page');
});
