"""A real MLflow tracking server, and stores that fail: lost, unreachable, impossible, full.

Each server is ``mlflow server`` in a subprocess (sqlite backend, proxied artifacts under
``<tmp>/server-artifacts``); the pipeline runs as the CLI (``python -m pipelines.run``) with
``MLFLOW_TRACKING_URI=http://127.0.0.1:<port>``. Every subprocess is killed (its whole
process group) when the test ends.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import zarr
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from torch import nn

from landscapes.errors import ConfigurationError
from pipelines import tracking
from pipelines.callbacks import ENV_SWEEP_RUN, SweepCallback
from pipelines.demo import DemoMLP

REPO = Path(__file__).resolve().parents[2]
GRID = ["grid.steps=[9,7]", "compute.max_batch_points=5"]  # 18 tiles of at most 5 points
N_TILES = 18
HTTP_VARS = (tracking.HTTP_RETRIES, tracking.HTTP_BACKOFF, tracking.HTTP_JITTER, tracking.HTTP_TIMEOUT)


class SlowLoss(nn.Module):
    """Cross-entropy that sleeps ``delay`` seconds per call: an evaluation long enough to kill a server in."""

    def __init__(self, delay: float = 0.0):
        super().__init__()
        self.delay = delay
        self.ce = nn.CrossEntropyLoss()

    def forward(self, outputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        time.sleep(self.delay)
        return self.ce(outputs, target)


# --- helpers -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL a subprocess started with ``start_new_session=True`` and everything it started."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:  # pragma: no cover - a zombie we cannot reap
        pass
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


class Server:
    """``mlflow server`` on 127.0.0.1: sqlite backend and proxied artifacts under ``folder``."""

    def __init__(self, folder: Path, port: int | None = None) -> None:
        self.folder, self.port = folder, port or free_port()
        self.db, self.artifacts = folder / "server.db", folder / "server-artifacts"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180) -> Server:
        self.starts += 1
        log = open(self.folder / f"server-{self.starts}.log", "w")  # noqa: SIM115 - closed with the process
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "NO_PROXY": "127.0.0.1,localhost"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.db}",
             "--artifacts-destination", str(self.artifacts), "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1"],
            cwd=self.folder, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"mlflow server exited ({self.proc.returncode}):\n{self.log()[-3000:]}")
            try:
                with opener.open(f"{self.uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.3)
        pytest.fail(f"mlflow server did not answer /health within {timeout} s:\n{self.log()[-3000:]}")

    def kill(self) -> None:
        if self.proc is not None:
            kill_group(self.proc)

    def log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.folder.glob("server-*.log")))


@pytest.fixture
def http_env() -> Iterator[None]:
    """Restore MLflow's HTTP settings and the tracking URI that `tracking.configure` changes."""
    saved = {k: os.environ.get(k) for k in HTTP_VARS}
    previous = mlflow.get_tracking_uri()
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "mlp.pt"
    torch.save(DemoMLP().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server for the tests that do not stop it."""
    srv = Server(tmp_path_factory.mktemp("server"))
    try:
        yield srv.start()
    finally:
        srv.kill()


def pipeline(checkpoint: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "pipelines.run", "debug=default", f"checkpoint.path={checkpoint}", *overrides]


def env_for(root: Path, uri: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (*HTTP_VARS, ENV_SWEEP_RUN)}
    env.update(LANDSCAPES_ROOT=str(root), MLFLOW_TRACKING_URI=uri, PYTHONUNBUFFERED="1",
               NO_PROXY="127.0.0.1,localhost")
    return env


def run_cli(cmd: list[str], root: Path, uri: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=REPO, env=env_for(root, uri), capture_output=True, text=True, timeout=timeout)


def done_count(root: Path) -> tuple[Path | None, int]:
    stores = sorted((root / "outputs" / "stores").glob("landscape-*/landscape.zarr"))
    if not stores:
        return None, 0
    try:
        return stores[0], int(np.asarray(zarr.open_array(str(stores[0] / "done"), mode="r")[...]).sum())
    except (OSError, ValueError, KeyError, zarr.errors.BaseZarrError):  # not created yet
        return stores[0], 0


def error_line(text: str) -> str:
    """The line of the error that names the tracking URI (Hydra prints a hint after it)."""
    lines = [line for line in text.splitlines() if "tracking.uri=" in line]
    return lines[-1] if lines else text.strip()[-500:]


# --- HTTP settings (no server) -------------------------------------------------------------


def test_http_settings_fit_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    s = tracking.http_settings(30.0, environ={})
    assert s == {tracking.HTTP_RETRIES: "3", tracking.HTTP_BACKOFF: "1", tracking.HTTP_JITTER: "0.5",
                 tracking.HTTP_TIMEOUT: "5"}
    for budget in (1.0, 5.0, 10.0, 30.0, 120.0):
        s = tracking.http_settings(budget, environ={})
        retries, backoff, jitter, timeout = (float(s[k]) for k in HTTP_VARS)
        sleeps = sum(backoff * 2 ** (i - 1) for i in range(2, int(retries) + 1)) + retries * jitter
        assert (retries + 1) * timeout + sleeps <= max(budget, 1.0), (budget, s)
    user = tracking.http_settings(30.0, environ={tracking.HTTP_RETRIES: "0", tracking.HTTP_TIMEOUT: "7"})
    assert user[tracking.HTTP_RETRIES] == "0" and user[tracking.HTTP_TIMEOUT] == "7"
    with pytest.raises(ConfigurationError, match=r"tracking.request_timeout=0: expected a positive number"):
        tracking.http_settings(0)


def test_configure_keeps_the_users_settings(http_env: None, tmp_path: Path) -> None:
    for k in HTTP_VARS:
        os.environ.pop(k, None)
    os.environ[tracking.HTTP_RETRIES] = "2"
    tracking.configure(f"sqlite:///{tmp_path / 'mlflow.db'}", request_timeout=10)
    assert os.environ[tracking.HTTP_RETRIES] == "2"  # the user's
    assert os.environ[tracking.HTTP_TIMEOUT] == tracking.http_settings(10, environ={tracking.HTTP_RETRIES: "2"})[
        tracking.HTTP_TIMEOUT]
    tracking.configure(f"sqlite:///{tmp_path / 'mlflow.db'}", request_timeout=60)  # ours follow the new budget
    assert os.environ[tracking.HTTP_RETRIES] == "2"
    assert os.environ[tracking.HTTP_TIMEOUT] == tracking.http_settings(60, environ={tracking.HTTP_RETRIES: "2"})[
        tracking.HTTP_TIMEOUT]


# --- servers that are not there ------------------------------------------------------------


@pytest.mark.slow
def test_nothing_listening_fails_fast_naming_the_uri(tmp_path: Path, checkpoint: Path) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    proc = run_cli(pipeline(checkpoint), tmp_path / "root", uri, timeout=120)
    elapsed = time.monotonic() - started
    assert proc.returncode != 0
    assert elapsed < 35, f"took {elapsed:.1f} s to fail"
    print(f"failed after {elapsed:.1f} s: {error_line(proc.stderr)}")
    assert f"tracking.uri={uri}: the tracking server does not answer ([Errno 111] Connection refused); " \
        "is the server running?" in proc.stderr, proc.stderr[-3000:]
    assert "is the server running?" in proc.stderr


def test_a_server_that_never_answers_times_out(http_env: None) -> None:
    """A port that accepts connections but never answers: the per-attempt timeout bounds the wait."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        uri = f"http://127.0.0.1:{listener.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(tracking.TrackingError, match=rf"tracking.uri={uri}: .*no answer within .*is the server running\?") as info:
            tracking.configure(uri, request_timeout=6)
        elapsed = time.monotonic() - started
    assert elapsed < 9, f"took {elapsed:.1f} s for a 6 s budget"
    assert info.value.__cause__ is not None


# --- impossible sqlite paths ---------------------------------------------------------------


@pytest.mark.parametrize("uri", [
    pytest.param("sqlite:////proc/forbidden/mlflow.db", id="proc"),
    pytest.param("sqlite:////etc/hostname/mlflow.db", id="file-in-the-way"),
])
def test_impossible_sqlite_path_names_the_uri(uri: str) -> None:
    db = uri[len("sqlite:///"):]
    with pytest.raises(ConfigurationError, match=rf"tracking.uri={uri}: cannot create or open the tracking database "
                       rf"{db} \(.*\); set tracking.uri .* absolute sqlite:/// path in a writable folder") as info:
        tracking.ensure_store(uri)
    assert isinstance(info.value.__cause__, OSError)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_folder_names_the_uri(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(ConfigurationError, match=r"tracking.uri=sqlite:///.*/ro/mlflow.db: cannot create"):
            tracking.ensure_store(f"sqlite:///{folder / 'mlflow.db'}")
    finally:
        folder.chmod(0o755)


# --- a store that refuses writes mid-run ---------------------------------------------------


@pytest.mark.slow
def test_store_refusing_writes_fails_the_runs(tmp_path: Path) -> None:
    """Files may not grow past their size (RLIMIT_FSIZE, like a full disk): the stage's artifact
    cannot be stored, the error names tracking.uri, and both runs still end FAILED (sqlite
    updates a status in place)."""
    code = textwrap.dedent(f"""
        import resource, signal, sys
        from dataclasses import dataclass
        from pathlib import Path
        from mlflow.tracking import MlflowClient
        from pipelines import tracking

        @dataclass(frozen=True)
        class Out:
            store: Path
            artifacts: tuple

        root = Path({str(tmp_path)!r})
        tracking.configure(f"sqlite:///{{root / 'mlflow.db'}}")
        exp = tracking.get_or_create_experiment("full", artifact_root=root / "mlartifacts")
        big = root / "big.bin"
        big.write_bytes(b"x" * 4_000_000)
        (root / "landscape.zarr").mkdir()
        db_size = (root / "mlflow.db").stat().st_size
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        try:
            with tracking.start_pipeline_run(exp, "p") as run:
                parent = run.info.run_id
                def stage(cfg, inputs):
                    resource.setrlimit(resource.RLIMIT_FSIZE, (db_size + 2_000_000, resource.RLIM_INFINITY))
                    return Out(store=root / "landscape.zarr", artifacts=(big,))
                tracking.run_stage("evaluate", stage, None, None, parent_run_id=parent, experiment_id=exp,
                                   key="k" * 64, outputs_type=Out)
        except tracking.TrackingError as err:
            print("ERROR", err)
        client = MlflowClient()
        print("STATUS", *sorted((r.info.run_name, r.info.status) for r in client.search_runs([exp])))
    """)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert f"ERROR tracking.uri={uri}: the tracking store refused a write during the 'evaluate' stage" in out, out
    assert f"the evaluated tiles are kept in {tmp_path / 'landscape.zarr'}" in out
    assert "STATUS ('evaluate', 'FAILED') ('p', 'FAILED')" in out, out


# --- a real server -------------------------------------------------------------------------


@pytest.mark.slow
def test_artifacts_go_to_the_server(server: Server, tmp_path: Path, checkpoint: Path) -> None:
    root = tmp_path / "client"
    proc = run_cli(pipeline(checkpoint, "tracking.experiment=served"), root, server.uri)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = MlflowClient(server.uri)
    exp = client.get_experiment_by_name("served")
    assert exp.artifact_location.startswith("mlflow-artifacts:"), exp.artifact_location
    stored = {p.relative_to(server.artifacts).as_posix() for p in server.artifacts.rglob("*") if p.is_file()}
    assert sum(p.endswith("/artifacts/outputs.json") for p in stored) == 5, sorted(stored)  # one per stage
    assert any(p.endswith(".png") and "/artifacts/plots/" in p for p in stored), sorted(stored)
    assert not (root / "mlartifacts").exists()
    assert not list(root.rglob("outputs.json"))


@pytest.mark.slow
def test_experiment_with_a_local_artifact_location_warns(server: Server, tmp_path: Path, http_env: None) -> None:
    tracking.configure(server.uri)
    MlflowClient().create_experiment("local-artifacts", artifact_location=(tmp_path / "a").as_uri())
    with pytest.warns(tracking.ArtifactLocationWarning, match=r"tracking.experiment='local-artifacts' on "
                      rf"tracking.uri={server.uri} keeps its artifacts at file://.*set tracking.experiment to a new name"):
        tracking.get_or_create_experiment("local-artifacts", artifact_root=tmp_path)


@pytest.mark.slow
def test_server_killed_mid_evaluate_then_resumed(tmp_path: Path, checkpoint: Path) -> None:
    srv = Server(tmp_path / "server-home")
    srv.folder.mkdir()
    root = tmp_path / "client"
    cmd = pipeline(checkpoint, "plot.enabled=false", *GRID, f"metrics.loss._target_={__name__}.SlowLoss",
                   "+metrics.loss.delay=0.2")
    proc = None
    try:
        srv.start()
        err_file = tmp_path / "pipeline.err"
        with open(err_file, "w") as err_out:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env_for(root, srv.uri), stdout=subprocess.DEVNULL,
                                    stderr=err_out, text=True, start_new_session=True)
        deadline = time.monotonic() + 240
        while done_count(root)[1] < 2:
            if proc.poll() is not None:
                pytest.fail(f"the run ended (rc={proc.returncode}) before the server was killed:\n"
                            f"{err_file.read_text()[-3000:]}")
            assert time.monotonic() < deadline, "evaluate did not store two tiles within 240 s"
            time.sleep(0.05)
        srv.kill()
        killed_at, done_at_kill = time.monotonic(), done_count(root)[1]
        assert done_at_kill < N_TILES, "evaluate finished before the server was killed; slow it down"
        all_done_at = None
        while proc.poll() is None:  # the tiles go on; then MLflow calls fail
            if all_done_at is None and done_count(root)[1] == N_TILES:
                all_done_at = time.monotonic()
            assert time.monotonic() < killed_at + 120, "the run did not fail within 120 s of losing the server"
            time.sleep(0.1)
        failed_after = time.monotonic() - killed_at
        err = err_file.read_text()
        assert proc.returncode != 0
        assert failed_after < 60, f"failed {failed_after:.1f} s after the server was killed"
        after_tiles = time.monotonic() - (all_done_at or killed_at)
        print(f"failed {failed_after:.1f} s after the server was killed, {after_tiles:.1f} s after the last tile: "
              f"{error_line(err)}")
        store, done = done_count(root)
        assert done == N_TILES, "the tiles are evaluated and stored whatever MLflow does"
        message = f"tracking.uri={srv.uri}: lost the tracking server during the 'evaluate' stage"
        assert message in err, err[-3000:]
        assert (f"the evaluated tiles are kept in {store}; re-run the same command to resume once the server is back."
                in err)

        srv.start()  # same backend store, same port
        again = run_cli(cmd, root, srv.uri)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        client = MlflowClient(srv.uri)
        exp = client.get_experiment_by_name("landscapes")
        runs = client.search_runs([exp.experiment_id], max_results=1000)
        evals = [r for r in runs if r.data.tags.get("landscapes.stage") == "evaluate"]
        finished = [r for r in evals if r.info.status == "FINISHED"]
        assert len(finished) == 1
        assert finished[0].data.metrics["tiles_reused"] == N_TILES
        assert finished[0].data.metrics["tiles_computed"] == 0
        # the lost run's parent and evaluate run were left RUNNING; the re-run closed them
        assert not [r for r in runs if r.info.status == "RUNNING"]
        pipelines = sorted(r.info.status for r in runs if r.data.tags.get("landscapes.kind") == "pipeline")
        assert pipelines == ["FINISHED", "KILLED"]
    finally:
        if proc is not None:
            kill_group(proc)
        srv.kill()


# --- sweeps --------------------------------------------------------------------------------


def _sweep_config(tmp_path: Path, uri: str, name: str) -> object:
    return OmegaConf.create({
        "tracking": {"uri": uri, "experiment": "sweeps", "request_timeout": 30.0},
        "paths": {"artifacts_dir": str(tmp_path / "mlartifacts")},
        "hydra": {"sweep": {"dir": str(tmp_path / "multirun" / name)}, "overrides": {"task": ["grid.steps=3"]}},
    })


def test_next_sweep_closes_a_killed_sweeps_run(tmp_path: Path, http_env: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_SWEEP_RUN, "")  # restored (unset) after the test: the callback sets it
    monkeypatch.delenv(ENV_SWEEP_RUN)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    killed = SweepCallback()
    killed.on_multirun_start(_sweep_config(tmp_path, uri, "first"))
    client = MlflowClient()
    run = client.get_run(killed.run_id)
    assert run.data.tags[tracking.TAG_KIND] == "sweep"
    assert run.data.tags[tracking.TAG_PID] == str(os.getpid())
    assert run.data.tags[tracking.TAG_HOST] == socket.gethostname()
    live = SweepCallback()  # a sweep of a process that is still running (this one) stays
    live.on_multirun_start(_sweep_config(tmp_path, uri, "live"))
    assert client.get_run(killed.run_id).info.status == "RUNNING"

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid that no longer runs: the sweep process was killed
    client.set_tag(killed.run_id, tracking.TAG_PID, str(gone.pid))
    nxt = SweepCallback()
    nxt.on_multirun_start(_sweep_config(tmp_path, uri, "second"))
    assert client.get_run(killed.run_id).info.status == "KILLED"
    assert client.get_run(live.run_id).info.status == "RUNNING"
    assert client.get_run(nxt.run_id).info.status == "RUNNING"
    for cb in (live, nxt):
        client.set_terminated(cb.run_id, "FINISHED")
