// Drive ComfyUI's real frontend in headless Chromium (Debian's chromium + playwright-core).
//   node frontend.js convert URL OUT_DIR API.json...   API format -> UI format (app.loadApiJson, the layout of
//                                                     env SAFEGEN_LAYOUTS applied, graph.serialize)
//   node frontend.js check   URL SHOT_DIR UI.json...   load each UI workflow, report missing nodes / node errors,
//                                                     its API conversion (app.graphToPrompt) and a screenshot
//   node frontend.js freeze  URL SHOT_DIR API.json...  queue each graph from the frontend, wait for SafeGen's web
//                                                     extension to embed the INE, report the saved workflow
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

// The layout of tools/workflow_layout.py (resolve()), applied to the graph the frontend made from the
// API file: node pos/size (never below the frontend's computeSize; `grown` reports where it was),
// properties.models, reroutes on long links, the groups, one MarkdownNote per group, extra.ds. The
// frontend then serializes it, so widget order and links stay its own.
function applyLayout(L) {
  const g = window.app.graph;
  const byId = new Map((g._nodes || g.nodes || []).map(n => [String(n.id), n]));
  const grown = [];
  for (const [id, v] of Object.entries(L.nodes)) {
    const n = byId.get(id);
    const min = n.computeSize();
    const size = [Math.max(v.size[0], Math.ceil(min[0])), Math.max(v.size[1], Math.ceil(min[1]))];
    if (size[0] !== v.size[0] || size[1] !== v.size[1]) grown.push({ id, want: v.size, got: size });
    n.pos = [v.pos[0], v.pos[1]];
    n.setSize(size);
    if (L.models[id]) n.properties.models = L.models[id];
  }
  for (const r of L.reroutes || []) {
    const n = byId.get(r.target);
    const slot = n.inputs.findIndex(i => i.name === r.input);
    const link = g.links.get ? g.links.get(n.inputs[slot].link) : g.links[n.inputs[slot].link];
    const inY = n.getConnectionPos(true, slot)[1];
    // each one nearer the target; a null y is the height of the target's input
    for (const p of r.points) g.createReroute([p[0], p[1] === null ? inY : p[1]], link);
  }
  for (const gr of L.groups) {
    const group = new LiteGraph.LGraphGroup(gr.title);
    group.pos = [gr.bounding[0], gr.bounding[1]];
    group.size = [gr.bounding[2], gr.bounding[3]];
    group.color = gr.color;
    group.font_size = gr.font_size;
    g.add(group);
  }
  for (const nt of L.notes) {
    const md = LiteGraph.createNode('MarkdownNote');
    md.title = nt.title;
    md.pos = [nt.pos[0], nt.pos[1]];
    md.size = [nt.size[0], nt.size[1]];
    md.widgets[0].value = nt.text;
    g.add(md);
  }
  return grown;
}

async function convert(page, file, layout) {
  const api = JSON.parse(fs.readFileSync(file));
  const name = path.basename(file, '.json');
  const want = Object.entries(api).map(([id, n]) => `${id}:${n.class_type}`).sort().join(',');
  const ld = await loadAndVerify(page, async ([a, n]) => { await window.app.loadApiJson(a, n); }, [api, name], want);
  if (!ld.loaded) throw new Error(`${file}: the graph shown is not the one loaded (${ld.got} != ${want})`);
  return await page.evaluate(([L, applySrc]) => {
    // shared workflows reproduce: seeds stay as written (the frontend defaults to "randomize")
    for (const n of (window.app.graph._nodes || window.app.graph.nodes || [])) {
      for (const w of (n.widgets || [])) {
        if (w.name === 'control_after_generate') w.value = 'fixed';
      }
    }
    const grown = L ? (0, eval)(`(${applySrc})`)(L) : [];
    const wf = window.app.graph.serialize();
    wf.extra = wf.extra || {};
    wf.extra.ds = L ? L.ds : { scale: 0.6, offset: [40, 60] };
    return { wf, grown };
  }, [layout, applyLayout.toString()]);
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
    // geometry as the frontend has it: node boxes (title included), groups, the view, and each
    // link's path (output slot, reroutes, input slot) for the layout checks
    const boxes = nodes.map(n => ({ id: String(n.id), type: n.type, box: Array.from(n.boundingRect) }));
    const groups = (g._groups || g.groups || []).map(gr => ({ title: gr.title, box: Array.from(gr._bounding || gr.bounding) }));
    const links = [];
    for (const n of nodes) {
      (n.inputs || []).forEach((inp, i) => {
        if (inp.link == null) return;
        const link = g.links.get ? g.links.get(inp.link) : g.links[inp.link];
        const src = g.getNodeById(link.origin_id);
        const first = link.parentId === undefined || !g.reroutes ? undefined : g.reroutes.get(link.parentId);
        const reroutes = (first ? first.getReroutes() || [] : []).map(r => Array.from(r.pos));
        links.push({ origin: String(link.origin_id), target: String(n.id), input: inp.name,
                     from: Array.from(src.getConnectionPos(false, link.origin_slot)),
                     to: Array.from(n.getConnectionPos(true, i)), reroutes });
      });
    }
    const c = window.app.canvas;
    const view = { scale: c.ds.scale, offset: Array.from(c.ds.offset),
                   canvas: [c.canvas.clientWidth, c.canvas.clientHeight] };
    return { errors, error_details, n_nodes: nodes.length, output: prompt.output, boxes, groups, links, view };
  });
  // dialogs and toasts the frontend shows (the text of the workflow's own notes does not count)
  const text = await page.evaluate(() => {
    let t = document.body.innerText;
    for (const el of document.querySelectorAll('.dom-widget')) if (el.innerText) t = t.split(el.innerText).join(' ');
    return t;
  });
  const m = text.match(/.{0,120}(missing|not found).{0,120}/i);
  const shot = path.join(shotDir, path.basename(file, '.json') + '.png');
  await page.screenshot({ path: shot });
  return { file, types, missing, errors: state.errors, error_details: state.error_details, n_nodes: state.n_nodes,
           output: state.output, boxes: state.boxes, groups: state.groups, links: state.links, view: state.view,
           dialog: m ? m[0] : '', screenshot: shot, loaded: ld.loaded,
           load_attempts: ld.attempts, graph_shown: ld.got, graph_loaded: want };
}

// Queue an API graph from the frontend (app.queuePrompt, as the Queue button does) and wait until the
// SafeGen web extension has written the packed INE into the Load Implicit Negative Embedding node
// (web/js/safegen_embed.js); report the extension, that node's widgets, the saved workflow and its API form.
async function freeze(page, file, shotDir) {
  const api = JSON.parse(fs.readFileSync(file));
  const want = Object.entries(api).map(([id, n]) => `${id}:${n.class_type}`).sort().join(',');
  const ld = await loadAndVerify(page, async ([a, n]) => { await window.app.loadApiJson(a, n); },
                                 [api, path.basename(file, '.json')], want);
  if (!ld.loaded) throw new Error(`${file}: the graph shown is not the one loaded (${ld.got} != ${want})`);
  const NODE = 'SafeGen_LoadImplicitNegativeEmbedding';
  const before = await page.evaluate(async (NODE) => {
    const names = (window.app.extensions || []).map(e => e.name);
    await window.app.queuePrompt(0, 1);
    return { extensions: names };
  }, NODE);
  let frozen = true;
  try {
    await page.waitForFunction((NODE) => {
      const n = (window.app.graph._nodes || window.app.graph.nodes).find(x => x.type === NODE);
      const w = n && (n.widgets || []).find(x => x.name === 'embedded');
      return w && typeof w.value === 'string' && w.value.startsWith('safegen-ine:v1:');
    }, NODE, { timeout: 180000 });
  } catch (e) { frozen = false; }
  const after = await page.evaluate(async (NODE) => {
    const n = (window.app.graph._nodes || window.app.graph.nodes).find(x => x.type === NODE);
    const widgets = Object.fromEntries((n.widgets || []).map(w => [w.name, w.value]));
    const wf = window.app.graph.serialize();
    const prompt = await window.app.graphToPrompt();
    return { node: String(n.id), widgets, wf, output: prompt.output };
  }, NODE);
  const shot = path.join(shotDir, path.basename(file, '.json') + '.png');
  await page.screenshot({ path: shot });
  return { file, frozen, extension_loaded: before.extensions.includes('SafeGen.EmbedImplicitNegativeEmbedding'),
           ...after, screenshot: shot };
}

(async () => {
  const [mode, url, dir, ...files] = process.argv.slice(2);
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
           '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage'] });
  try {
    fs.mkdirSync(dir, { recursive: true });
    // convert: {workflow name: layout} from tools/frontend.py (env SAFEGEN_LAYOUTS, a JSON file)
    const layouts = process.env.SAFEGEN_LAYOUTS ? JSON.parse(fs.readFileSync(process.env.SAFEGEN_LAYOUTS)) : {};
    // check: one page for every file (a frontend start-up costs seconds; loadAndVerify checks that each
    // graph shown is the one loaded); convert and freeze: a fresh page per file
    let shared = null;
    for (const f of files) {
      const opened = mode === 'check' && shared ? shared : await openApp(browser, url);
      if (mode === 'check') shared = opened;
      const { page } = opened;
      const errorsBefore = opened.consoleErrors.length;
      const pageErrors = () => opened.consoleErrors.slice(errorsBefore);  // this file's
      if (mode === 'convert') {
        const { wf, grown } = await convert(page, f, layouts[path.basename(f, '.json')] || null);
        const out = path.join(dir, path.basename(f));
        fs.writeFileSync(out + '.tmp', JSON.stringify(wf, null, 1) + '\n');
        fs.renameSync(out + '.tmp', out);
        console.log(JSON.stringify({ file: f, out, nodes: wf.nodes.length, grown }));
      } else if (mode === 'freeze') {
        const r = await freeze(page, f, dir);
        r.page_errors = pageErrors();
        console.log(JSON.stringify(r));
      } else {
        const r = await check(page, f, dir);
        r.page_errors = pageErrors();
        console.log(JSON.stringify(r));
      }
      if (mode !== 'check') await page.close();
    }
  } finally {
    await browser.close();
  }
})().catch(e => { console.error(e); process.exit(1); });
