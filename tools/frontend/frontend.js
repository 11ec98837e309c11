// Drive ComfyUI's real frontend in headless Chromium (Debian's chromium + playwright-core).
//   node frontend.js convert URL OUT_DIR API.json...   API format -> UI format (app.loadApiJson + graph.serialize)
//   node frontend.js check   URL SHOT_DIR UI.json...   load each UI workflow, report missing nodes / node errors,
//                                                     its API conversion (app.graphToPrompt) and a screenshot
// One JSON line per file on stdout. Used by tools/frontend.py.
const { chromium } = require('playwright-core');
const fs = require('fs');
const path = require('path');

const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';

// Start-up: the frontend loads a graph of its own (the default graph, a restored workflow) once it
// is ready, and newer frontends (1.4x) may do so *after* window.app.graph exists. Wait for the app to
// be ready (vueAppReady where the frontend has it) and for the graph to stop changing, so that our
// graph is not replaced by the start-up one; loadAndVerify() then checks that it was not.
const SETTLE_MS = 1000;

async function openApp(browser, url) {
  const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
  const consoleErrors = [];
  page.on('pageerror', e => consoleErrors.push(String(e)));
  await page.goto(url);
  await page.waitForFunction(() => window.app && window.app.graph && window.LiteGraph &&
    Object.keys(LiteGraph.registered_node_types).length > 100 &&
    (!('vueAppReady' in window.app) || window.app.vueAppReady === true), null, { timeout: 90000 });
  await waitStable(page, 15000);
  return { page, consoleErrors };
}

// "id:type" of every node in the current graph, sorted
async function signature(page) {
  return await page.evaluate(() => {
    const g = window.app.graph;
    return (g._nodes || g.nodes || []).map(n => `${n.id}:${n.type}`).sort().join(',');
  });
}

// Wait until the graph's signature has not changed for SETTLE_MS (at most timeoutMs).
async function waitStable(page, timeoutMs) {
  const t0 = Date.now();
  let last = await signature(page), since = Date.now();
  while (Date.now() - t0 < timeoutMs) {
    await page.waitForTimeout(200);
    const now = await signature(page);
    if (now !== last) { last = now; since = Date.now(); } else if (Date.now() - since >= SETTLE_MS) return last;
  }
  return last;
}

// Load a graph with `load` (a page function of its argument), then check that the graph shown is
// the one loaded (`want`: sorted "id:type" list) and still is after SETTLE_MS; reload if the start-up
// graph replaced it (at most 3 tries). Returns { loaded, attempts, got }.
async function loadAndVerify(page, load, arg, want) {
  let got = '';
  for (let attempt = 1; attempt <= 3; attempt++) {
    await page.evaluate(load, arg);
    try {
      await page.waitForFunction(w => {
        const g = window.app.graph;
        return (g._nodes || g.nodes || []).map(n => `${n.id}:${n.type}`).sort().join(',') === w;
      }, want, { timeout: 10000 });
    } catch (e) { /* reported below */ }
    got = await waitStable(page, 10000);
    if (got === want) return { loaded: true, attempts: attempt, got };
  }
  return { loaded: false, attempts: 3, got };
}

async function convert(page, file) {
  const api = JSON.parse(fs.readFileSync(file));
  const name = path.basename(file, '.json');
  const want = Object.entries(api).map(([id, n]) => `${id}:${n.class_type}`).sort().join(',');
  const ld = await loadAndVerify(page, async ([a, n]) => { await window.app.loadApiJson(a, n); }, [api, name], want);
  if (!ld.loaded) throw new Error(`${file}: the graph shown is not the one loaded (${ld.got} != ${want})`);
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
  const want = wf.nodes.map(n => `${n.id}:${n.type}`).sort().join(',');
  const ld = await loadAndVerify(page, async w => { await window.app.loadGraphData(w); }, wf, want);
  const state = await page.evaluate(async () => {
    const g = window.app.graph;
    const nodes = g._nodes || g.nodes || [];
    const errors = nodes.filter(n => n.has_errors).map(n => `${n.id}:${n.type}`);
    // why a node is in error, where the frontend lets us see it: combo widgets whose value is not
    // among the server's choices (e.g. a model file the server does not have)
    const error_details = nodes.filter(n => n.has_errors).map(n => ({
      node: `${n.id}:${n.type}`,
      bad_choices: (n.widgets || []).filter(w => w.options && Array.isArray(w.options.values) &&
        !w.options.values.includes(w.value)).map(w => [w.name, w.value]) }));
    const prompt = await window.app.graphToPrompt();
    return { errors, error_details, n_nodes: nodes.length, output: prompt.output };
  });
  const text = await page.evaluate(() => document.body.innerText);
  const m = text.match(/.{0,120}(missing|not found).{0,120}/i);
  const shot = path.join(shotDir, path.basename(file, '.json') + '.png');
  await page.screenshot({ path: shot });
  return { file, types, missing, errors: state.errors, error_details: state.error_details, n_nodes: state.n_nodes,
           output: state.output, dialog: m ? m[0] : '', screenshot: shot, loaded: ld.loaded,
           load_attempts: ld.attempts, graph_shown: ld.got, graph_loaded: want };
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
