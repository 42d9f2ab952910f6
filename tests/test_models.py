"""Forecasters on a real store: the one-step interface, normalisation, loss, save/load, options."""
from __future__ import annotations

import ast
import io
from pathlib import Path

import numpy as np
import pytest
import torch

from weathermodel.configuration import from_dict
from weathermodel.data.config import PrepareConfig
from weathermodel.data.dataset import WindowDataset, read_summary
from weathermodel.data.prepare import prepare
from weathermodel.models.config import LossConfig, ModelConfig
from weathermodel.models.forecaster import Forecaster, ModelMetadata
from weathermodel.models.graph import GraphNetwork
from weathermodel.models.io import CheckpointError, load_model, save_model
from weathermodel.models.loss import WeightedMSELoss, channel_weights

PACKAGE = Path(__file__).resolve().parents[1] / "weathermodel"
TINY = {"graph": {"mesh_refinement": 2, "latent_size": 16, "processor_layers": 2},
        "transformer": {"patch_size": 2, "embed_dim": 16, "depth": 2, "num_heads": 2,
                        "window": 2}}


@pytest.fixture(scope="module")
def store(ncep_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models") / "ncep.zarr"
    return prepare(from_dict(PrepareConfig, {"sources": [{"path": str(ncep_file)}],
                                             "output": str(out), "end": "2013-01-15"}),
                   progress=False)


@pytest.fixture(autouse=True)
def graph_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEATHERMODEL_CACHE", str(tmp_path / "cache"))


def make_model(store: Path, kind: str, **options) -> Forecaster:
    torch.manual_seed(0)
    summary = read_summary(store)
    config = from_dict(ModelConfig, {"kind": kind, "history": 2, **TINY, **options})
    return Forecaster(config, ModelMetadata.from_summary(summary), summary.statics)


def batch(store: Path, n: int = 2) -> dict[str, torch.Tensor]:
    dataset = WindowDataset(store, history=2, rollout=2)
    samples = [dataset[i] for i in range(n)]
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


@pytest.mark.parametrize("kind", ["graph", "transformer"])
def test_one_step_interface_and_rollout(store: Path, kind: str) -> None:
    model = make_model(store, kind)
    data = batch(store)
    nxt = model(data["inputs"], data["forcings"][:, :3])
    assert nxt.shape == (2, 1, 25, 53) and torch.isfinite(nxt).all()
    # an untrained residual model stays near persistence: within a few tendency stds
    change = (nxt - data["inputs"][:, -1]).abs().mean() / model.tendency_std.mean()
    assert change < 20
    rolled = model.rollout(data["inputs"], data["forcings"], steps=2)
    assert rolled.shape == (2, 2, 1, 25, 53)
    torch.testing.assert_close(rolled[:, 0], nxt)


def test_residual_prediction_and_normalised_inputs(store: Path) -> None:
    model = make_model(store, "graph")
    for parameter in model.network.output[-1].parameters():  # zero the last layer
        torch.nn.init.zeros_(parameter)
    data = batch(store)
    nxt = model(data["inputs"], data["forcings"][:, :3])
    torch.testing.assert_close(nxt, data["inputs"][:, -1])  # zero tendency = persistence
    x = model.network_inputs(data["inputs"], data["forcings"][:, :3])
    states = x[:, :2]
    assert abs(float(states.mean())) < 1.0 and 0.3 < float(states.std()) < 3.0
    summary = read_summary(store)
    expected = (data["inputs"][0, 0, 0].numpy() - summary.mean[0]) / summary.std[0]
    np.testing.assert_allclose(x[0, 0].numpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["graph", "transformer"])
def test_gradients_reach_every_parameter(store: Path, kind: str) -> None:
    model = make_model(store, kind)
    data = batch(store)
    loss = WeightedMSELoss(model.metadata.latitude, model.metadata.channel_variables,
                           model.metadata.channel_levels, model.tendency_std, LossConfig())
    loss(model.rollout(data["inputs"], data["forcings"], 2), data["targets"]).backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.count_nonzero(parameter.grad) > 0, name


@pytest.mark.parametrize("kind", ["graph", "transformer"])
def test_save_and_load_give_bit_identical_outputs(store: Path, kind: str,
                                                  tmp_path: Path) -> None:
    model = make_model(store, kind).eval()
    data = batch(store)
    path = save_model(model, tmp_path / "model.pt")
    again = load_model(path).eval()
    with torch.no_grad():
        assert torch.equal(model(data["inputs"], data["forcings"][:, :3]),
                           again(data["inputs"], data["forcings"][:, :3]))
    assert again.config == model.config
    payload = torch.load(path, weights_only=True)  # plain data only
    assert payload["metadata"]["channels"] == ["2m_temperature"]


def test_corrupt_and_foreign_files_are_refused(store: Path, tmp_path: Path) -> None:
    path = save_model(make_model(store, "graph"), tmp_path / "model.pt")
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(tmp_path / "cut.pt")
    buffer = io.BytesIO()
    torch.save({"format_version": 99}, buffer)
    (tmp_path / "future.pt").write_bytes(buffer.getvalue())
    with pytest.raises(CheckpointError, match="version 99"):
        load_model(tmp_path / "future.pt")

    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    torch.save({"format_version": 1, "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError):
        load_model(tmp_path / "evil.pt")


def test_activation_checkpointing_and_bf16(store: Path) -> None:
    data = batch(store)
    outputs, grads = [], []
    for checkpointing in (False, True):
        model = make_model(store, "graph", activation_checkpointing=checkpointing)
        out = model(data["inputs"], data["forcings"][:, :3])
        out.square().mean().backward()
        outputs.append(out.detach())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(outputs[0], outputs[1])
    torch.testing.assert_close(grads[0], grads[1])
    # bf16 comes from the caller's autocast (Fabric's precision): the forecaster must not
    # switch it off (it once opened autocast(enabled=False) inside forward)
    low = make_model(store, "graph")
    inner_dtypes = []
    for linear in (m for m in low.network.modules() if isinstance(m, torch.nn.Linear)):
        linear.register_forward_hook(lambda module, args, output: inner_dtypes.append(
            output.dtype))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        reduced = low(data["inputs"], data["forcings"][:, :3])
    assert inner_dtypes and set(inner_dtypes) == {torch.bfloat16}
    assert reduced.dtype == torch.float32 and torch.isfinite(reduced).all()
    scale = float(low.tendency_std.mean())
    assert float((reduced - outputs[0]).abs().max()) < 0.5 * scale


def test_graph_network_is_equivariant_to_longitude_rotation() -> None:
    """A global 6-degree grid rolled by 72 degrees (a symmetry of the icosahedral mesh),
    with every input channel (states, forcings, statics) rolled too, rolls the output."""
    latitude = np.linspace(-90, 90, 31)
    longitude = np.arange(60) * 6.0
    torch.manual_seed(0)
    network = GraphNetwork(from_dict(ModelConfig, {**TINY}).graph, 5, 3, latitude,
                           longitude).double().eval()
    x = torch.randn(1, 5, 31, 60, dtype=torch.float64)
    with torch.no_grad():
        out = network(x)
        rolled = network(torch.roll(x, 12, dims=-1))
        shifted = network(torch.roll(x, 5, dims=-1))  # 30 degrees: not a mesh symmetry
    torch.testing.assert_close(rolled, torch.roll(out, 12, dims=-1), atol=1e-9, rtol=1e-9)
    assert not torch.allclose(shifted, torch.roll(out, 5, dims=-1), atol=1e-6)


def test_loss_weights_equal_brute_force() -> None:
    latitude = np.array([-60.0, -20.0, 20.0, 60.0])
    variables = ["temperature", "temperature", "2m_temperature"]
    levels = [500.0, 1000.0, float("nan")]
    config = LossConfig(area_weighting="cos", level_weighting="pressure",
                        variable_weights={"2m_temperature": 2.0})
    np.testing.assert_allclose(channel_weights(variables, levels, config),
                               [500 / 750, 1000 / 750, 2.0])
    scale = torch.tensor([2.0, 1.0, 0.5])
    loss = WeightedMSELoss(latitude, variables, levels, scale, config)
    rng = np.random.default_rng(0)
    prediction = rng.standard_normal((2, 3, 4, 5))
    target = rng.standard_normal((2, 3, 4, 5))
    w_lat = np.cos(np.radians(latitude)) / np.cos(np.radians(latitude)).mean()
    w_ch = np.array([500 / 750, 1000 / 750, 2.0])
    w_ch = w_ch / w_ch.mean()
    brute = 0.0
    for b in range(2):
        for c in range(3):
            for i in range(4):
                for j in range(5):
                    brute += w_lat[i] * w_ch[c] * ((prediction[b, c, i, j] - target[b, c, i, j])
                                                   / scale[c].item()) ** 2
    brute /= prediction.size
    value = loss(torch.tensor(prediction, dtype=torch.float32),
                 torch.tensor(target, dtype=torch.float32))
    assert float(value) == pytest.approx(brute, rel=1e-5)


LAYERS = {"conventions": 0, "units": 0, "errors": 0, "configuration": 0, "data": 1,
          "models": 2, "training": 3, "inference": 3, "evaluation": 4, "cli": 5, "demo": 5,
          "plan": 5, "__main__": 5,
          # the package's public facade (load_forecaster), imported lazily on first use
          "__init__": 5}


def test_imports_go_one_way_down_the_layers() -> None:
    """conventions -> data -> models -> training / inference -> evaluation -> demo, plan, cli
    (and the package facade)."""
    for file in PACKAGE.rglob("*.py"):
        relative = file.relative_to(PACKAGE).with_suffix("")
        own = LAYERS.get(relative.parts[0], 0)
        for node in ast.walk(ast.parse(file.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            for name in names:
                parts = name.split(".")
                if parts[0] != "weathermodel" or len(parts) < 2:
                    continue
                target = LAYERS.get(parts[1], 0)
                assert target <= own, f"{relative} (layer {own}) imports {name} (layer {target})"
                if own == 3 and target == 3:
                    assert parts[1] == relative.parts[0], f"{relative} imports {name}"
