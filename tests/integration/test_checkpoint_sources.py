"""MLflow models and artifacts as checkpoints, logged with MLflow 3 into a real sqlite store."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import mlflow.pytorch
import pytest
import torch
from mlflow.models import Model
from mlflow.tracking import MlflowClient
from torch import nn

from landscapes.checkpoints import load_into, load_state_dict
from landscapes.errors import CheckpointError, CheckpointNotFoundError
from pipelines.checkpoint_sources import mlflow_model_format, resolve_checkpoint_file, source_run_of

pytestmark = pytest.mark.filterwarnings(
    r"ignore:`torch\.jit\.\w+` is deprecated:DeprecationWarning"
)


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2))
    model[1].running_mean.uniform_()
    return model.eval()


@dataclass(frozen=True)
class Store:
    uri: str
    source: nn.Module
    runs: dict[str, str]  # what was logged -> run id
    model_ids: dict[str, str]  # format -> MLflow 3 logged model id


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    """One sqlite store: the model logged in each format (registered), and a state dict."""
    root = tmp_path_factory.mktemp("mlflow")
    previous = mlflow.get_tracking_uri()
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    source = _model(seed=1)
    runs, model_ids = {}, {}
    try:
        mlflow.set_experiment("checkpoints")
        logged = {
            "pt2": (
                source,
                {"serialization_format": "pt2", "input_example": torch.randn(5, 3).numpy()},
            ),
            "pickle": (source, {"serialization_format": "pickle"}),
            "torchscript": (torch.jit.script(source), {"serialization_format": "pickle"}),
        }
        for fmt, (model, kwargs) in logged.items():
            with mlflow.start_run() as run:
                info = mlflow.pytorch.log_model(
                    model,
                    name="model",
                    registered_model_name=f"tiny-{fmt}",
                    pip_requirements=["torch"],
                    **kwargs,
                )
            runs[fmt], model_ids[fmt] = run.info.run_id, info.model_id
        MlflowClient().set_registered_model_alias("tiny-pt2", "champion", "1")
        with mlflow.start_run() as run:
            mlflow.pytorch.log_state_dict(source.state_dict(), artifact_path="weights")
            extra = root / "other.pt"
            torch.save(source.state_dict(), extra)
            mlflow.log_artifact(str(extra), artifact_path="extra")
        runs["state_dict"] = run.info.run_id
        yield Store(uri=uri, source=source, runs=runs, model_ids=model_ids)
    finally:
        while mlflow.active_run() is not None:
            mlflow.end_run()
        mlflow.set_tracking_uri(previous)


@pytest.fixture
def tracking(store: Store) -> Iterator[Store]:
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(store.uri)
    yield store
    mlflow.set_tracking_uri(previous)


def _uri(store: Store, fmt: str, form: str) -> str:
    return {
        "runs": f"runs:/{store.runs[fmt]}/model",
        "version": f"models:/tiny-{fmt}/1",
        "latest": f"models:/tiny-{fmt}/latest",
        "alias": f"models:/tiny-{fmt}@champion",
        "model-id": f"models:/{store.model_ids[fmt]}",
    }[form]


def _download(uri: str, tmp_path: Path) -> Path:
    return Path(
        mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp_path / "download"))
    )


def _assert_loads(file: Path, source: nn.Module, *, trust_pickle: bool) -> None:
    target = load_into(_model(seed=2), load_state_dict(file, trust_pickle=trust_pickle))
    for (name, a), b in zip(target.state_dict().items(), source.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


@pytest.mark.slow  # the module's store: seconds to create and log into
@pytest.mark.parametrize(
    ("fmt", "form", "file"),
    [
        pytest.param("pt2", "runs", "data/model.pt2", id="pt2-runs"),
        pytest.param("pt2", "version", "data/model.pt2", id="pt2-models-version"),
        pytest.param("pt2", "alias", "data/model.pt2", id="pt2-models-alias"),
        pytest.param("pt2", "model-id", "data/model.pt2", id="pt2-logged-model-id"),
        pytest.param("pickle", "runs", "data/model.pth", id="pickle-runs"),
        pytest.param("pickle", "latest", "data/model.pth", id="pickle-models-latest"),
        pytest.param("torchscript", "version", "data/model.pth", id="torchscript-models-version"),
    ],
)
@pytest.mark.filterwarnings("ignore:.*looks like a TorchScript archive:UserWarning")
def test_logged_model_loads_with_trust(
    tracking: Store, tmp_path: Path, fmt: str, form: str, file: str
) -> None:
    uri = _uri(tracking, fmt, form)
    local = _download(uri, tmp_path)
    assert mlflow_model_format(local) == fmt
    resolved = resolve_checkpoint_file(local, uri, trust_pickle=True)
    assert resolved == local / file
    _assert_loads(resolved, tracking.source, trust_pickle=True)
    assert source_run_of(uri) == tracking.runs[fmt]


@pytest.mark.slow  # the module's store: seconds to create and log into
@pytest.mark.parametrize(
    ("fmt", "what"),
    [
        pytest.param(
            "pt2", r"MLflow 3's default .*data/model\.pt2 is a torch\.export program", id="pt2"
        ),
        pytest.param("pickle", r"data/model\.pth holds a whole module pickled", id="pickle"),
        pytest.param("torchscript", r"data/model\.pth is a TorchScript archive", id="torchscript"),
    ],
)
def test_logged_model_without_trust_names_format_and_fix(
    tracking: Store, tmp_path: Path, fmt: str, what: str
) -> None:
    uri = _uri(tracking, fmt, "version")
    local = _download(uri, tmp_path)
    with pytest.raises(CheckpointError) as info:
        resolve_checkpoint_file(local, uri)
    message = str(info.value)
    assert "\n" not in message
    assert re.search(
        rf"^checkpoint\.path='models:/tiny-{fmt}/1' is an MLflow model in '{fmt}' format \({what}.*\)\. "
        r"If you trust its source, set checkpoint\.trust_pickle=true .*; better, .*"
        r"mlflow\.pytorch\.log_state_dict\(model\.state_dict\(\), artifact_path='model'\) and set "
        r"checkpoint\.path=runs:/<run_id>/model/state_dict\.pth\.$",
        message,
    ), message


@pytest.mark.slow  # the module's store: seconds to create and log into
def test_state_dict_artifact_folder(tracking: Store, tmp_path: Path) -> None:
    uri = f"runs:/{tracking.runs['state_dict']}/weights"
    local = _download(uri, tmp_path)
    resolved = resolve_checkpoint_file(local, uri)  # a plain state dict: no trust needed
    assert resolved == local / "state_dict.pth"
    _assert_loads(resolved, tracking.source, trust_pickle=False)
    assert source_run_of(uri) == tracking.runs["state_dict"]


@pytest.mark.slow  # the module's store: seconds to create and log into
def test_state_dict_file_uri(tracking: Store, tmp_path: Path) -> None:
    uri = f"runs:/{tracking.runs['state_dict']}/extra/other.pt"
    local = _download(uri, tmp_path)
    assert resolve_checkpoint_file(local, uri) == local


@pytest.mark.slow  # the module's store: seconds to create and log into
def test_folder_with_several_checkpoints_lists_uris(tracking: Store, tmp_path: Path) -> None:
    run_id = tracking.runs["state_dict"]
    uri = f"runs:/{run_id}/"
    local = _download(uri, tmp_path)
    with pytest.raises(
        CheckpointError,
        match=re.escape(
            f"checkpoint.path={uri!r} is a folder with 2 checkpoint file(s) and 0 MLflow model(s): "
            f"[{uri}extra/other.pt, {uri}weights/state_dict.pth]; point checkpoint.path at one of them."
        ),
    ):
        resolve_checkpoint_file(local, uri)


def test_run_root_with_one_model_resolves_it(tmp_path: Path) -> None:
    # MLflow 3 keeps logged models outside the run's artifacts; a run root that holds one
    # model folder (an older layout, or a copied one) resolves to that model's file.
    local = tmp_path / "run"
    (local / "model" / "data").mkdir(parents=True)
    (local / "model" / "data" / "model.pt2").write_bytes(b"PK")
    Model().add_flavor("pytorch", model_data="data").save(str(local / "model" / "MLmodel"))
    assert (
        resolve_checkpoint_file(local, "runs:/abc", trust_pickle=True)
        == local / "model" / "data" / "model.pt2"
    )


def test_folder_without_checkpoints(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("no weights here")
    with pytest.raises(
        CheckpointError,
        match=r"^checkpoint\.path='runs:/abc/x': the downloaded folder holds no checkpoint file "
        r"\(.*\.safetensors, \.pt2\) and no MLflow model \(found \[notes\.txt\]\); point checkpoint\.path at",
    ):
        resolve_checkpoint_file(tmp_path, "runs:/abc/x")


def test_missing_download(tmp_path: Path) -> None:
    with pytest.raises(
        CheckpointNotFoundError,
        match=r"^checkpoint\.path='runs:/abc/x': MLflow's download .* does not exist",
    ):
        resolve_checkpoint_file(tmp_path / "gone", "runs:/abc/x")


def test_other_flavor_with_one_weights_file(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    weights = tmp_path / "model" / "model.safetensors"
    weights.write_bytes(b"{}")
    Model().add_flavor("transformers").save(str(tmp_path / "MLmodel"))
    assert resolve_checkpoint_file(tmp_path, "models:/hf/1") == weights
    weights.unlink()
    with pytest.raises(
        CheckpointError,
        match=r"^checkpoint\.path='models:/hf/1' is an MLflow model of flavor\(s\) transformers, with 0 checkpoint files; log it with mlflow\.pytorch\.log_model",
    ):
        resolve_checkpoint_file(tmp_path, "models:/hf/1")


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        pytest.param("runs:/0123abc/model", "0123abc", id="runs"),
        pytest.param("runs:/0123abc", "0123abc", id="runs-root"),
        pytest.param("/data/model.pt", None, id="local-path"),
        pytest.param("mlflow-artifacts:/1/x/artifacts/m.pt", None, id="mlflow-artifacts"),
    ],
)
def test_source_run_of_without_registry(uri: str, expected: str | None) -> None:
    assert source_run_of(uri) == expected


@pytest.mark.slow  # the module's store: seconds to create and log into
@pytest.mark.parametrize(
    ("uri", "pattern"),
    [
        pytest.param(
            "models:/tiny-pt2/7",
            r"\(Model Version \(name=tiny-pt2, version=7\) not found\)",
            id="no-version",
        ),
        pytest.param(
            "models:/nobody/1",
            r"\(Model Version \(name=nobody, version=1\) not found\)",
            id="no-model",
        ),
        pytest.param(
            "models:/tiny-pt2@nobody", r"\(Registered model alias nobody not found\)", id="no-alias"
        ),
        pytest.param(
            "models:/m-nothere",
            r"\(Logged model with ID 'm-nothere' not found\)",
            id="no-logged-model",
        ),
        pytest.param(
            "models:/tiny-pt2/Production", r"has no version in stage 'Production'", id="no-stage"
        ),
    ],
)
def test_source_run_of_unknown(tracking: Store, uri: str, pattern: str) -> None:
    with pytest.raises(
        CheckpointNotFoundError, match=rf"^checkpoint\.path={re.escape(repr(uri))}: .*"
    ) as info:
        source_run_of(uri)
    assert re.search(pattern, str(info.value)) and "\n" not in str(info.value)
