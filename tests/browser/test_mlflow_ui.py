"""A real ``mlflow ui`` on a fresh store, looked at in headless Chromium (playwright-core from npm).

Skips cleanly without a browser: it needs ``chromium`` (``$CHROMIUM`` or on ``PATH``), ``node``,
and the npm package ``playwright-core`` in ``$PLAYWRIGHT_NODE_PATH``, ``$NODE_PATH`` or
``/tmp/shot/node_modules`` (see ``/work/shared/mlflow-ui-in-a-browser.md`` and
``docs/images/README.md`` for installing them; nothing goes into the repository).

It checks the runs list (the sweep, its pipeline runs nested), the sweep's chart of loss at θ0
against the epoch, one pipeline run's report plot (PNG) and its interactive HTML plot, which the
artifact viewer shows in a sandboxed iframe: plotly must draw there (the page embeds plotly.js).

With ``LANDSCAPES_SCREENSHOTS=<folder>`` (e.g. ``docs/images``) the sweep's grid is 21×21 and the
test also takes the README's screenshots there with ``docs/images/capture_mlflow_ui.js``:
``mlflow_runs.png`` (the runs list, the sweep and one pipeline run expanded), ``mlflow_plot.png``
(a pipeline run's filled contour), ``mlflow_compare.png`` (the comparison on the sweep's run) and
``mlflow_chart.png`` (the sweep's figures against the epoch).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from pipelines.tracking import TAG_PARENT_STAGE_PREFIX
from tests.integration.conftest import REPO, Project

TIMEOUT_MS = 45_000
SHOTS_ENV = "LANDSCAPES_SCREENSHOTS"
SHOTS = ("mlflow_runs.png", "mlflow_plot.png", "mlflow_compare.png", "mlflow_chart.png")

SCRIPT = r"""
const { chromium } = require('playwright-core');
const fs = require('fs'), os = require('os'), path = require('path');
const [base, experimentId, sweepRunId, sweepName, childName, childRunId, reportRunId, exe] = process.argv.slice(2);
(async () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'mlflow-ui-test-'));
  const ctx = await chromium.launchPersistentContext(dir, {
    executablePath: exe, headless: true, viewport: { width: 1600, height: 900 },
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  await ctx.addInitScript(() => {
    localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');
    localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');
    localStorage.setItem('mlflow.workflowType_v1', '"machine_learning"');
  });
  const names = async (page) => page.locator('[role=row] a').allInnerTexts();
  try {
    const page = await ctx.newPage();
    page.setDefaultTimeout(%(timeout)d);
    await page.goto(`${base}/#/experiments/${experimentId}/runs?workflowType=machine_learning`);
    await page.getByRole('link', { name: sweepName, exact: true }).first().waitFor();
    const collapsed = await names(page);
    await page.locator(`[role=row][row-id="${sweepRunId}"] button`).first().click();
    await page.getByRole('link', { name: childName, exact: true }).first().waitFor();
    const expanded = await names(page);
    // the sweep's chart view: loss at θ0 against the step (the epoch), one point per checkpoint
    await page.goto(`${base}/#/experiments/${experimentId}/runs/${sweepRunId}/model-metrics?workflowType=machine_learning`);
    await page.getByText('loss_at_theta0', { exact: true }).first().waitFor();
    await page.waitForFunction(() => document.querySelectorAll('.scatterlayer .point').length > 0);
    const chart = await page.evaluate(() => {
      const title = [...document.querySelectorAll('*')].find((e) => !e.children.length && e.textContent.trim() === 'loss_at_theta0');
      let card = title;
      while (card && !card.querySelector('.js-plotly-plot')) card = card.parentElement;
      return card ? { points: card.querySelectorAll('.scatterlayer .point').length,
                      xticks: [...card.querySelectorAll('.xtick text')].map((e) => e.textContent) } : null;
    });
    // one pipeline run's report plot, rendered in the artifact view
    await page.goto(`${base}/#/experiments/${experimentId}/runs/${childRunId}/artifacts/plots/loss_contour_filled_log.png?workflowType=machine_learning`);
    await page.waitForFunction(() => {
      const img = document.querySelector('img.rc-image-img');
      return img && img.complete && img.naturalWidth > 0;
    });
    const plotWidth = await page.evaluate(() => document.querySelector('img.rc-image-img').naturalWidth);
    // its interactive HTML plot (on the report stage's run), rendered in the artifact view's iframe
    await page.goto(`${base}/#/experiments/${experimentId}/runs/${reportRunId}/artifacts/plots/loss_log.html?workflowType=machine_learning`);
    const frame = page.frameLocator('iframe.mlflow-html-iframe');
    await frame.locator('.js-plotly-plot .main-svg').first().waitFor();
    const html = await frame.locator('body').evaluate((b) => ({
      plots: b.querySelectorAll('.js-plotly-plot').length, svgs: b.querySelectorAll('.main-svg').length,
      gl: b.querySelectorAll('canvas').length, text: [...b.querySelectorAll('.gtitle, .g-xtitle, .g-ytitle')].map((e) => e.textContent),
    }));
    console.log(JSON.stringify({ collapsed, expanded, chart, plotWidth, html }));
  } finally {
    await ctx.close();
    fs.rmSync(dir, { recursive: true, force: true });
  }
})().catch((e) => { console.error(e); process.exit(1); });
""".replace("%(timeout)d", str(TIMEOUT_MS))


def _browser() -> tuple[str, str, dict[str, str]]:
    """Chromium, node and the environment that finds playwright-core; skip when one is missing."""
    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    node = shutil.which("node")
    if not chromium or not node:
        pytest.skip("needs chromium and node (apt-get install chromium nodejs)")
    paths = [p for p in (os.environ.get("PLAYWRIGHT_NODE_PATH"), os.environ.get("NODE_PATH"), "/tmp/shot/node_modules") if p]
    env = {**os.environ, "NODE_PATH": os.pathsep.join(paths)}
    found = subprocess.run([node, "-e", "require.resolve('playwright-core')"], env=env, capture_output=True, timeout=30)
    if found.returncode != 0:
        pytest.skip("needs the npm package playwright-core (npm install playwright-core; set PLAYWRIGHT_NODE_PATH "
                    "to its node_modules)")
    return chromium, node, env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, server: subprocess.Popen, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert server.poll() is None, f"mlflow ui exited with {server.returncode}"
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(1)
    raise AssertionError(f"mlflow ui did not answer {url}/health within {seconds} s")


@pytest.mark.slow
def test_runs_list_shows_sweep_with_named_pipeline_runs_and_comparison(project: Project, tmp_path: Path) -> None:
    chromium, node, env = _browser()
    shots = os.environ.get(SHOTS_ENV)
    steps = 21 if shots else 5  # the README's screenshots show the default grid
    ckpts = ",".join(str(project.checkpoint(e)) for e in (0, 2, 4))
    # the debug config makes no HTML; here each job makes one interactive page (the loss only, unless for the README)
    html = ["plot.html=true"] + ([] if shots else ["plot.metrics=[loss]"])
    project.cli("pipelines.run", "-m", f"checkpoint.path={ckpts}", "debug=default", f"grid.steps={steps}", *html)
    (sweep,) = project.search("tags.`landscapes.kind` = 'sweep'")
    children = project.children(sweep.info.run_id)
    names = {r.info.run_name for r in children}
    pipelines = [f"epoch_{e:03d} · plane {steps}² filter s0" for e in (0, 2, 4)]
    assert names == {*pipelines, "compare 3 landscapes"}

    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = (tmp_path / "mlflow_ui.log").open("w")
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("mlflow")), "ui", "--backend-store-uri", project.uri,
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        _wait_healthy(base, server)
        script = tmp_path / "runs_list.js"
        script.write_text(SCRIPT)
        child = next(r for r in children if r.info.run_name == pipelines[1])
        report = child.data.tags[f"{TAG_PARENT_STAGE_PREFIX}report"]
        assert "plots/loss_log.html" in {a.path for a in project.client.list_artifacts(report, "plots")}
        child = child.info.run_id
        proc = subprocess.run(
            [node, str(script), base, project.experiment_id, sweep.info.run_id, sweep.info.run_name, pipelines[1], child,
             report, chromium],
            env=env, capture_output=True, text=True, timeout=240,
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        seen = json.loads(proc.stdout.strip().splitlines()[-1])
        if shots:
            _screenshots(Path(shots), node, env, base, project, sweep.info.run_id, child, chromium)
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    assert sweep.info.run_name == "sweep checkpoint.path ×3"
    assert sweep.info.run_name in seen["collapsed"]
    assert "epoch_000 · plane 5² filter s0" not in seen["collapsed"]  # nested under the sweep
    for name in names:
        assert name in seen["expanded"], seen["expanded"]
    assert seen["chart"]["points"] == 3, seen["chart"]  # epochs 0, 2, 4
    assert seen["chart"]["xticks"][0] == "0" and seen["chart"]["xticks"][-1] == "4", seen["chart"]
    assert seen["plotWidth"] > 300
    assert seen["html"]["plots"] == 1 and seen["html"]["svgs"] >= 1, seen["html"]  # plotly drew in the iframe


def _screenshots(out: Path, node: str, env: dict[str, str], base: str, project: Project, sweep_id: str,
                 pipeline_id: str, chromium: str) -> None:
    """The README's screenshots, by ``docs/images/capture_mlflow_ui.js``, into ``out``."""
    out = out if out.is_absolute() else REPO / out
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [node, str(REPO / "docs" / "images" / "capture_mlflow_ui.js"), base, project.experiment_id, pipeline_id, sweep_id],
        env=env | {"OUT_DIR": str(out), "SWEEP_RUN_ID": sweep_id, "CHROMIUM": chromium,
                   "COMPARE_ARTIFACT": "comparison/loss_log_comparison.png"},
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    for name in SHOTS:
        assert (out / name).stat().st_size > 20_000, name  # a blank page is a few KB
