// Open a static HTML page (file://) in headless Chromium; print what a reader sees as one JSON line:
// the tables (id, header cells, rows of {text, data-arm, data-metric}), images loaded/broken, a screenshot.
//   node page.js FILE.html SHOT.png
const { chromium } = require('playwright-core');

const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';

(async () => {
  const [file, shot] = process.argv.slice(2);
  const browser = await chromium.launch({ executablePath: CHROMIUM, args: ['--no-sandbox', '--disable-gpu'] });
  try {
    const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
    await page.goto('file://' + file, { waitUntil: 'load' });
    const r = await page.evaluate(() => {
      const tables = [...document.querySelectorAll('table')].map(t => ({
        id: t.id,
        head: [...t.querySelectorAll('tr:first-child th')].map(th => th.innerText.trim()),
        cells: [...t.querySelectorAll('td')].map(td => ({ text: td.innerText.trim(), arm: td.dataset.arm || '',
                                                           metric: td.dataset.metric || '' })),
      }));
      const imgs = [...document.images];
      return { title: document.title, tables, images: imgs.length,
               broken: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute('src')) };
    });
    await page.screenshot({ path: shot, fullPage: true });
    console.log(JSON.stringify(r));
  } finally {
    await browser.close();
  }
})().catch(e => { console.error(e); process.exit(1); });
