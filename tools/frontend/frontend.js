// Drive ComfyUI's real frontend in headless Chromium (Debian's chromium + playwright-core).
//   node frontend.js convert URL OUT_DIR API.json...   API format -> UI format (app.loadApiJson + graph.serialize)
//   node frontend.js check   URL SHOT_DIR UI.json...   load each UI workflow, report missing nodes / node errors,
//                                                     its API conversion (app.graphToPrompt) and a screenshot
// One JSON line per file on stdout. Used by tools/frontend.py.
const { chromium } = require('playwright-core');
const fs = require('fs');
const path = require('path');

const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';

async function openApp(browser, url) {
  const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
  const consoleErrors = [];
  page.on('pageerror', e => consoleErrors.push(String(e)));
  await page.goto(url);
  await page.waitForFunction(() => window.app && window.app.graph && window.LiteGraph &&
    Object.keys(LiteGraph.registered_node_types).length > 100, null, { timeout: 90000 });
  return { page, consoleErrors };
}

async function convert(page, file) {
  const api = JSON.parse(fs.readFileSync(file));
  const name = path.basename(file, '.json');
  await page.evaluate(async ([a, n]) => { await window.app.loadApiJson(a, n); }, [api, name]);
  await page.waitForTimeout(500);
  return await page.evaluate(() => {
    // shared workflows reproduce: seeds stay as written (the frontend defaults to "randomize")
    for (const n of (window.app.graph._nodes || window.app.graph.nodes || [])) {
      for (const w of (n.widgets || [])) {
        if (w.name === 'control_after_generate') w.value = 'fixed';
      }
    }
    const wf = window.app.graph.serialize();
    wf.extra = wf.extra || {};
    wf.extra.ds = { scale: 0.6, offset: [40, 60] };
    return wf;
  });
}

async function check(page, file, shotDir) {
  const wf = JSON.parse(fs.readFileSync(file));
  const types = [...new Set(wf.nodes.map(n => n.type))];
  const missing = await page.evaluate(t => t.filter(x => !LiteGraph.registered_node_types[x]), types);
  await page.evaluate(async w => { await window.app.loadGraphData(w); }, wf);
  await page.waitForTimeout(1000);
  const state = await page.evaluate(async () => {
    const g = window.app.graph;
    const nodes = g._nodes || g.nodes || [];
    const errors = nodes.filter(n => n.has_errors).map(n => `${n.id}:${n.type}`);
    const prompt = await window.app.graphToPrompt();
    return { errors, n_nodes: nodes.length, output: prompt.output };
  });
  const text = await page.evaluate(() => document.body.innerText);
  const m = text.match(/.{0,120}(missing|not found).{0,120}/i);
  const shot = path.join(shotDir, path.basename(file, '.json') + '.png');
  await page.screenshot({ path: shot });
  return { file, types, missing, errors: state.errors, n_nodes: state.n_nodes, output: state.output,
           dialog: m ? m[0] : '', screenshot: shot };
}

(async () => {
  const [mode, url, dir, ...files] = process.argv.slice(2);
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
           '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage'] });
  try {
    fs.mkdirSync(dir, { recursive: true });
    for (const f of files) {
      const { page, consoleErrors } = await openApp(browser, url);  // a fresh page per file
      if (mode === 'convert') {
        const wf = await convert(page, f);
        const out = path.join(dir, path.basename(f));
        fs.writeFileSync(out + '.tmp', JSON.stringify(wf, null, 1) + '\n');
        fs.renameSync(out + '.tmp', out);
        console.log(JSON.stringify({ file: f, out, nodes: wf.nodes.length }));
      } else {
        const r = await check(page, f, dir);
        r.page_errors = consoleErrors;
        console.log(JSON.stringify(r));
      }
      await page.close();
    }
  } finally {
    await browser.close();
  }
})().catch(e => { console.error(e); process.exit(1); });
