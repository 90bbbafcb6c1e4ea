#!/usr/bin/env node
// Retake the MLflow UI screenshots used in the README (mlflow_runs.png,
// mlflow_plot.png, mlflow_compare.png, mlflow_chart.png: the sweep's figures
// against the epoch). tests/browser/test_mlflow_ui.py runs it when
// LANDSCAPES_SCREENSHOTS names a folder. See docs/images/README.md for the
// whole procedure (install, server, this script).
//
// Needs playwright-core (npm, in a scratch folder outside the repository; run
// with NODE_PATH=<scratch>/node_modules) and a system Chromium. Never
// `npx playwright install`. An `mlflow ui` server must already be running.
//
// Settings (environment variables; all optional):
//   MLFLOW_URL        server address                 [http://127.0.0.1:5055]
//   EXPERIMENT_ID     experiment id        [looked up from EXPERIMENT_NAME]
//   EXPERIMENT_NAME   experiment name                          [landscapes]
//   PIPELINE_RUN_ID   pipeline run to expand and to show a plot of
//                     [the newest run tagged landscapes.kind=pipeline whose
//                      name contains PIPELINE_MATCH]
//   PIPELINE_MATCH    substring of the pipeline run's name     [epoch_010]
//   SWEEP_RUN_ID      sweep parent run     [the pipeline run's parent]
//   COMPARE_RUN_ID    compare run  [newest run tagged landscapes.kind=compare]
//   PLOT_ARTIFACT     artifact of the pipeline run
//                                       [plots/loss_contour_filled_log.png]
//   COMPARE_ARTIFACT  artifact of the compare run   [loss_log_comparison.png]
//   SHOTS             which to take, comma separated
//                                         [runs,plot,compare,chart]
//   OUT_DIR           where the PNGs go          [this script's directory]
//   CHROMIUM          browser executable                  [/usr/bin/chromium]
//   WIDTH, HEIGHT     viewport                                   [1600, 900]
// Positional arguments, if given, override: 1st = MLFLOW_URL or just a port,
// 2nd = EXPERIMENT_ID, 3rd = PIPELINE_RUN_ID, 4th = COMPARE_RUN_ID.
//
// Example:
//   NODE_PATH=/tmp/shot/node_modules node docs/images/capture_mlflow_ui.js 5055

'use strict';
const path = require('path');
const fs = require('fs');
const os = require('os');
const { chromium } = require('playwright-core');

const argv = process.argv.slice(2);
const env = process.env;
let base = argv[0] || env.MLFLOW_URL || 'http://127.0.0.1:5055';
if (/^\d+$/.test(base)) base = `http://127.0.0.1:${base}`;
base = base.replace(/\/+$/, '');
const cfg = {
  base,
  experimentId: argv[1] || env.EXPERIMENT_ID || '',
  experimentName: env.EXPERIMENT_NAME || 'landscapes',
  pipelineRunId: argv[2] || env.PIPELINE_RUN_ID || '',
  pipelineMatch: env.PIPELINE_MATCH || 'epoch_010',
  sweepRunId: env.SWEEP_RUN_ID || '',
  compareRunId: argv[3] || env.COMPARE_RUN_ID || '',
  plotArtifact: env.PLOT_ARTIFACT || 'plots/loss_contour_filled_log.png',
  compareArtifact: env.COMPARE_ARTIFACT || 'loss_log_comparison.png',
  shots: (env.SHOTS || 'runs,plot,compare,chart').split(',').map((s) => s.trim()).filter(Boolean),
  outDir: env.OUT_DIR || __dirname,
  chromium: env.CHROMIUM || '/usr/bin/chromium',
  width: Number(env.WIDTH || 1600),
  height: Number(env.HEIGHT || 900),
};
const TIMEOUT = 30000; // first page loads can take >10 s on a small machine

// ---------------------------------------------------------------- REST look-ups
async function api(method, endpoint, body) {
  const url = `${cfg.base}/api/2.0/mlflow/${endpoint}`;
  const res = await fetch(url, method === 'GET' ? {} : {
    method, headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body),
  });
  if (!res.ok) throw new Error(`${method} ${url}: ${res.status} ${await res.text()}`);
  return res.json();
}
const tag = (run, key) => ((run.data.tags || []).find((t) => t.key === key) || {}).value;

async function searchRuns(filter) {
  const out = await api('POST', 'runs/search', {
    experiment_ids: [cfg.experimentId], filter, max_results: 1000,
    order_by: ['attributes.start_time DESC'],
  });
  return out.runs || [];
}

async function resolve() {
  if (!cfg.experimentId) {
    const q = encodeURIComponent(cfg.experimentName);
    cfg.experimentId = (await api('GET', `experiments/get-by-name?experiment_name=${q}`)).experiment.experiment_id;
  }
  if (!cfg.pipelineRunId) {
    const runs = await searchRuns("tags.`landscapes.kind` = 'pipeline'");
    const hit = runs.find((r) => r.info.run_name.includes(cfg.pipelineMatch)) || runs[0];
    if (!hit) throw new Error('no pipeline run found; set PIPELINE_RUN_ID');
    cfg.pipelineRunId = hit.info.run_id;
  }
  const pipeline = (await api('GET', `runs/get?run_id=${cfg.pipelineRunId}`)).run;
  cfg.pipelineName = pipeline.info.run_name;
  if (!cfg.sweepRunId) cfg.sweepRunId = tag(pipeline, 'mlflow.parentRunId') || '';
  if (cfg.sweepRunId) {
    cfg.sweepName = (await api('GET', `runs/get?run_id=${cfg.sweepRunId}`)).run.info.run_name;
  }
  // the pipeline run's stage child runs (one name to wait for after expanding)
  const children = await searchRuns(`tags.mlflow.parentRunId = '${cfg.pipelineRunId}'`);
  cfg.stageName = children.length ? children[0].info.run_name : '';
  if (!cfg.compareRunId && cfg.shots.includes('compare')) {
    const runs = await searchRuns("tags.`landscapes.kind` = 'compare'");
    if (runs.length) cfg.compareRunId = runs[0].info.run_id;
  }
}

// ---------------------------------------------------------------- browser
async function newPage(ctx) {
  const page = await ctx.newPage();
  page.setDefaultTimeout(TIMEOUT);
  return page;
}

async function settle(page) {
  await page.evaluate(() => document.activeElement && document.activeElement.blur());
  await page.mouse.move(cfg.width / 2, cfg.height - 10);
  await page.waitForTimeout(1000);
}

const rowButton = (page, runId) => page.locator(`[role=row][row-id="${runId}"] button`).first();

async function shotRuns(ctx) {
  const page = await newPage(ctx);
  const url = `${cfg.base}/#/experiments/${cfg.experimentId}/runs?workflowType=machine_learning`;
  await page.goto(url, { timeout: TIMEOUT });
  const first = cfg.sweepName || cfg.pipelineName;
  await page.getByRole('link', { name: first, exact: true }).first().waitFor();

  // oldest first: train run, sweep, pipelines in checkpoint order, stages in pipeline order
  await page.locator('[role=columnheader]').filter({ hasText: 'Created' }).first().click();
  await page.waitForTimeout(1000);

  if (cfg.sweepRunId) {
    await rowButton(page, cfg.sweepRunId).click();
    await page.getByRole('link', { name: cfg.pipelineName, exact: true }).first().waitFor();
  }
  await rowButton(page, cfg.pipelineRunId).click();
  if (cfg.stageName) await page.getByRole('link', { name: cfg.stageName, exact: true }).first().waitFor();

  // columns: drop Models, add the headline metrics and the stage tag (Dataset stays: the data's name and digest)
  await page.getByRole('button', { name: 'Columns', exact: true }).click();
  const dlg = page.locator('[role=dialog]').first();
  await dlg.waitFor();
  for (const name of ['Models', 'loss_at_theta0', 'accuracy_at_theta0', 'sharpness_r0.1', 'landscapes.stage']) {
    await dlg.getByPlaceholder('Search columns').fill(name);
    await page.waitForTimeout(300);
    const item = dlg.getByText(name, { exact: true }).first();
    if (await item.count()) await item.click();
    else console.warn(`column ${name} not offered; skipped`);
  }
  await page.keyboard.press('Escape');
  await page.waitForTimeout(800);

  // widen the (pinned) Run Name column so the names are readable; grab the
  // resize handle just inside the pinned area's right edge
  const handle = page.locator('.ag-header-cell[col-id="attributes.`Run Name`"] .ag-header-cell-resize').first();
  const bb = await handle.boundingBox();
  if (bb) {
    const y = bb.y + bb.height / 2;
    await page.mouse.move(bb.x + 1, y);
    await page.mouse.down();
    for (let i = 1; i <= 20; i++) await page.mouse.move(bb.x + 1 + i * 6, y);
    await page.mouse.up();
  }
  await settle(page);
  const out = path.join(cfg.outDir, 'mlflow_runs.png');
  await page.screenshot({ path: out });
  console.log('wrote', out);
  await page.close();
}

async function shotArtifact(ctx, runId, artifact, file) {
  const page = await newPage(ctx);
  const url = `${cfg.base}/#/experiments/${cfg.experimentId}/runs/${runId}/artifacts/${artifact}?workflowType=machine_learning`;
  await page.goto(url, { timeout: TIMEOUT });
  // the viewer shows the image from a blob: URL; wait until it has decoded
  await page.waitForFunction(() => {
    const img = document.querySelector('img.rc-image-img');
    return img && img.complete && img.naturalWidth > 0;
  }, null, { timeout: TIMEOUT });
  await settle(page);
  const out = path.join(cfg.outDir, file);
  await page.screenshot({ path: out });
  console.log('wrote', out);
  await page.close();
}

// the sweep run's "Model metrics" tab: each headline figure against the step (the epoch)
async function shotChart(ctx) {
  const page = await newPage(ctx);
  const url = `${cfg.base}/#/experiments/${cfg.experimentId}/runs/${cfg.sweepRunId}/model-metrics?workflowType=machine_learning`;
  await page.goto(url, { timeout: TIMEOUT });
  await page.getByText('loss_at_theta0', { exact: true }).first().waitFor();
  await page.waitForFunction(() => document.querySelectorAll('.scatterlayer .point').length > 0, null, { timeout: TIMEOUT });
  await settle(page);
  const out = path.join(cfg.outDir, 'mlflow_chart.png');
  await page.screenshot({ path: out });
  console.log('wrote', out);
  await page.close();
}

(async () => {
  await resolve();
  console.log(JSON.stringify(cfg, null, 1));
  fs.mkdirSync(cfg.outDir, { recursive: true });
  const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'mlflow-shot-'));
  // a fresh, empty profile (--user-data-dir) every time
  const ctx = await chromium.launchPersistentContext(userDataDir, {
    executablePath: cfg.chromium,
    headless: true,
    viewport: { width: cfg.width, height: cfg.height },
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  // keep the assistant side panel closed and stay in the "Model training" UI
  await ctx.addInitScript(() => {
    localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');
    localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');
    localStorage.setItem('mlflow.workflowType_v1', '"machine_learning"');
  });
  try {
    if (cfg.shots.includes('runs')) await shotRuns(ctx);
    if (cfg.shots.includes('plot')) await shotArtifact(ctx, cfg.pipelineRunId, cfg.plotArtifact, 'mlflow_plot.png');
    if (cfg.shots.includes('compare')) {
      if (!cfg.compareRunId) console.warn('no compare run; mlflow_compare.png skipped');
      else await shotArtifact(ctx, cfg.compareRunId, cfg.compareArtifact, 'mlflow_compare.png');
    }
    if (cfg.shots.includes('chart')) {
      if (!cfg.sweepRunId) console.warn('no sweep run; mlflow_chart.png skipped');
      else await shotChart(ctx);
    }
  } finally {
    await ctx.close();
    fs.rmSync(userDataDir, { recursive: true, force: true });
  }
})().catch((e) => { console.error(e); process.exit(1); });
