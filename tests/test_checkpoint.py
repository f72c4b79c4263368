"""Checkpoints: exact round trips (weights, optimizer, RNG), atomic saves, no pickle, errors."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import alignprog.training.checkpoint as ckpt
from alignprog.errors import AlignprogError
from alignprog.training.checkpoint import (
    CheckpointError,
    checkpoint_name,
    checkpoint_step,
    load_checkpoint,
    read_checkpoint_meta,
    save_checkpoint,
)


class TinyNet(nn.Module):
    """Linear -> GRU -> dropout -> Linear: parameters of several shapes, a stochastic layer."""

    def __init__(self, d_in: int = 5, hidden: int = 7) -> None:
        super().__init__()
        self.proj = nn.Linear(d_in, hidden)
        self.gru = nn.GRU(hidden, hidden, batch_first=True)
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(hidden, 1)
        self.register_buffer("calls", torch.zeros((), dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        h, _ = self.gru(self.proj(x))  # (B, T, H)
        return self.head(self.drop(h)).squeeze(-1)  # (B, T)


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor) -> float:
    opt.zero_grad()
    loss = (model(x) ** 2).mean()  # dropout draws from the global torch RNG
    loss.backward()
    opt.step()
    return loss.item()


def _trained(steps: int = 3) -> tuple[TinyNet, torch.optim.Adam, torch.Tensor]:
    torch.manual_seed(0)
    model = TinyNet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=1e-4)
    x = torch.randn(2, 6, 5)
    for _ in range(steps):
        _train_step(model, opt, x)
    return model, opt, x


def _fresh() -> tuple[TinyNet, torch.optim.Adam]:
    torch.manual_seed(123)  # different initial weights from _trained
    model = TinyNet()
    return model, torch.optim.Adam(model.parameters(), lr=0.5)


def _assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype, k
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def test_checkpoint_names():
    assert checkpoint_name(1234) == "step-00001234"
    assert checkpoint_step("step-00001234") == 1234
    assert checkpoint_step("step-9") == 9
    assert checkpoint_step("best") is None
    assert checkpoint_step(".step-1.tmp-abc") is None
    with pytest.raises(ValueError):
        checkpoint_name(-1)


def test_round_trip_is_exact_and_training_continues_bit_identically(tmp_path: Path):
    model, opt, x = _trained()
    gen = torch.Generator().manual_seed(7)
    torch.rand(3, generator=gen)
    np.random.seed(5)
    random.seed(5)
    state = {"step": 3, "epoch": 1, "best_val": 0.25, "history": [1.5, float("nan")],
             "note": "x", "nothing": None}
    path = tmp_path / checkpoint_name(3)
    save_checkpoint(path, model=model, optimizer=opt, state=state,
                    meta={"model": {"hidden": 7}}, generators={"sampler": gen})

    # What the original produces next, from the RNG states at save time.
    expected_rand = torch.rand(4)
    expected_np = np.random.rand(3)
    expected_py = random.random()
    expected_gen = torch.rand(4, generator=gen)
    original_sd = {k: v.clone() for k, v in model.state_dict().items()}
    original_opt = opt.state_dict()

    # Perturb every RNG, then load into a differently initialised model and optimizer.
    torch.manual_seed(999)
    np.random.seed(999)
    random.seed(999)
    gen2 = torch.Generator().manual_seed(999)
    model2, opt2 = _fresh()
    loaded = load_checkpoint(path, model=model2, optimizer=opt2, generators={"sampler": gen2})

    assert loaded["step"] == 3 and loaded["best_val"] == 0.25 and loaded["note"] == "x"
    assert loaded["history"][0] == 1.5 and math.isnan(loaded["history"][1])
    assert loaded["nothing"] is None
    _assert_same_state(model2.state_dict(), original_sd)
    sd2 = opt2.state_dict()
    assert sd2["param_groups"] == original_opt["param_groups"]  # betas stays a tuple
    assert sd2["state"].keys() == original_opt["state"].keys()
    for i in sd2["state"]:
        _assert_same_state(sd2["state"][i], original_opt["state"][i])
    assert torch.equal(torch.rand(4), expected_rand)
    assert np.array_equal(np.random.rand(3), expected_np)
    assert random.random() == expected_py
    assert torch.equal(torch.rand(4, generator=gen2), expected_gen)

    # One more step from each copy, starting from identical RNG states: bit-identical.
    load_checkpoint(path, model=model2, optimizer=opt2, generators={"sampler": gen2})
    loss2 = _train_step(model2, opt2, x)
    load_checkpoint(path, restore_rng=True)  # global RNG back to the save point for the original
    loss1 = _train_step(model, opt, x)
    assert loss1 == loss2
    _assert_same_state(model.state_dict(), model2.state_dict())
    for i, s in opt.state_dict()["state"].items():
        _assert_same_state(s, opt2.state_dict()["state"][i])


def test_load_without_rng_restore_leaves_global_rng(tmp_path: Path):
    model, opt, _ = _trained(1)
    save_checkpoint(tmp_path / "c", model=model, optimizer=opt, state={}, meta={})
    torch.manual_seed(42)
    expected = torch.rand(3)
    torch.manual_seed(42)
    load_checkpoint(tmp_path / "c", model=model, restore_rng=False)
    assert torch.equal(torch.rand(3), expected)


def test_missing_generator_is_an_error(tmp_path: Path):
    model, opt, _ = _trained(1)
    save_checkpoint(tmp_path / "c", model=model, optimizer=None, state={}, meta={},
                    generators={"a": torch.Generator()})
    with pytest.raises(CheckpointError, match=r"generator\(s\) b .*has: a"):
        load_checkpoint(tmp_path / "c", generators={"b": torch.Generator()})
    with pytest.raises(CheckpointError, match="no optimizer state"):
        load_checkpoint(tmp_path / "c", optimizer=opt)


def test_fresh_optimizer_and_no_optimizer(tmp_path: Path):
    model = TinyNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)  # no state yet
    save_checkpoint(tmp_path / "c", model=model, optimizer=opt, state={"step": 0}, meta={})
    opt2 = torch.optim.SGD(TinyNet().parameters(), lr=0.5)
    load_checkpoint(tmp_path / "c", optimizer=opt2)
    assert opt2.param_groups[0]["lr"] == 0.1 and opt2.param_groups[0]["momentum"] == 0.9
    with pytest.raises(CheckpointError, match="for SGD, not Adam"):
        load_checkpoint(tmp_path / "c", optimizer=torch.optim.Adam(TinyNet().parameters()))


def test_tied_and_non_contiguous_tensors(tmp_path: Path):
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4, bias=False)
            self.b = nn.Linear(4, 4, bias=False)
            self.b.weight = self.a.weight  # tied
            self.register_buffer("t", torch.arange(12.0).reshape(3, 4).t())  # non-contiguous
            self.register_buffer("part", self.t[1])  # a view overlapping another buffer

    model = Tied()
    save_checkpoint(tmp_path / "c", model=model, optimizer=None, state={}, meta={})
    model2 = Tied()
    with torch.no_grad():
        model2.a.weight.zero_()
    load_checkpoint(tmp_path / "c", model=model2, restore_rng=False)
    _assert_same_state(model2.state_dict(), model.state_dict())
    assert model2.b.weight is model2.a.weight


def test_failed_save_keeps_previous_checkpoint_and_leaves_no_temp_dirs(tmp_path, monkeypatch):
    model, opt, x = _trained(1)
    path = tmp_path / "checkpoints" / "best"
    save_checkpoint(path, model=model, optimizer=opt, state={"step": 1}, meta={"v": 1})
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    _train_step(model, opt, x)
    real_write = ckpt._write_tensors

    def failing(p: Path, tensors):
        if p.name == ckpt.OPTIMIZER_FILE:
            raise OSError("disk full")
        real_write(p, tensors)

    monkeypatch.setattr(ckpt, "_write_tensors", failing)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, model=model, optimizer=opt, state={"step": 2}, meta={"v": 2})
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["best"]

    # A failure at the final rename also keeps the old checkpoint.
    monkeypatch.setattr(ckpt, "_write_tensors", real_write)
    real_rename = ckpt.os.rename

    def failing_rename(src, dst):
        if Path(src).name.startswith(".best.tmp-"):
            raise OSError("rename failed")
        real_rename(src, dst)

    monkeypatch.setattr(ckpt.os, "rename", failing_rename)
    with pytest.raises(OSError, match="rename failed"):
        save_checkpoint(path, model=model, optimizer=opt, state={"step": 2}, meta={"v": 2})
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["best"]

    # And a successful save replaces it.
    monkeypatch.setattr(ckpt.os, "rename", real_rename)
    save_checkpoint(path, model=model, optimizer=opt, state={"step": 2}, meta={"v": 2})
    assert load_checkpoint(path, restore_rng=False) == {"step": 2}
    assert read_checkpoint_meta(path)["meta"] == {"v": 2}
    assert sorted(p.name for p in path.parent.iterdir()) == ["best"]


def test_stale_temp_dirs_of_a_killed_save_are_removed(tmp_path: Path):
    model = TinyNet()
    (tmp_path / ".step-00000001.tmp-dead").mkdir()
    (tmp_path / ".step-00000001.tmp-dead" / "model.safetensors").write_bytes(b"partial")
    save_checkpoint(tmp_path / "step-00000001", model=model, optimizer=None, state={}, meta={})
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000001"]


def test_no_pickle(tmp_path: Path, monkeypatch):
    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load must not be used")

    monkeypatch.setattr(torch, "load", no_pickle)
    monkeypatch.setattr(torch, "save", no_pickle)
    model, opt, _ = _trained(2)
    path = tmp_path / "c"
    save_checkpoint(path, model=model, optimizer=opt, state={"step": 2}, meta={},
                    generators={"g": torch.Generator()})
    load_checkpoint(path, model=TinyNet(), optimizer=_fresh()[1],
                    generators={"g": torch.Generator()})
    names = sorted(p.name for p in path.iterdir())
    assert names == ["meta.json", "model.safetensors", "optimizer.safetensors", "rng.safetensors",
                     "state.json"]
    for p in path.iterdir():
        if p.suffix == ".json":
            json.loads(p.read_text(), parse_constant=lambda c: pytest.fail(f"{p}: bare {c}"))
        else:
            assert p.read_bytes()[8:9] == b"{"  # safetensors: u64 header length, JSON header


def test_meta_contents(tmp_path: Path):
    save_checkpoint(tmp_path / "c", model=TinyNet(), optimizer=None, state={},
                    meta={"head": {"arch": "gru", "input": "aligned"}, "step": 5})
    meta = read_checkpoint_meta(tmp_path / "c")
    assert meta["format"] == "alignprog-checkpoint"
    assert meta["schema_version"] == 1
    assert meta["meta"] == {"head": {"arch": "gru", "input": "aligned"}, "step": 5}
    assert "model.safetensors" in meta["files"] and "optimizer.safetensors" not in meta["files"]


def test_state_must_be_json(tmp_path: Path):
    with pytest.raises(CheckpointError, match=r"state\.best: a tensor .*item\(\)"):
        save_checkpoint(tmp_path / "c", model=TinyNet(), optimizer=None,
                        state={"best": torch.tensor(1.0)}, meta={})
    assert not any(tmp_path.iterdir())
    save_checkpoint(tmp_path / "c", model=TinyNet(), optimizer=None,
                    state={"best": np.float32(0.5), "n": np.int64(3)}, meta={})
    assert load_checkpoint(tmp_path / "c", restore_rng=False) == {"best": 0.5, "n": 3}


def test_schema_version_errors(tmp_path: Path):
    path = tmp_path / "c"
    save_checkpoint(path, model=TinyNet(), optimizer=None, state={}, meta={})
    meta = json.loads((path / "meta.json").read_text())
    (path / "meta.json").write_text(json.dumps(meta | {"schema_version": 2}))
    with pytest.raises(CheckpointError, match="schema_version 2 was written by a newer alignprog"):
        load_checkpoint(path)
    (path / "meta.json").write_text(json.dumps(meta | {"schema_version": "one"}))
    with pytest.raises(CheckpointError, match="unknown checkpoint schema_version 'one'"):
        read_checkpoint_meta(path)
    (path / "meta.json").write_text(json.dumps(meta | {"format": "something-else"}))
    with pytest.raises(CheckpointError, match="not an alignprog checkpoint"):
        read_checkpoint_meta(path)
    (path / "meta.json").unlink()
    with pytest.raises(CheckpointError, match=r"no meta\.json"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_checkpoint(tmp_path / "missing")


def test_missing_and_unexpected_keys_are_readable(tmp_path: Path):
    path = tmp_path / "c"
    save_checkpoint(path, model=TinyNet(), optimizer=None, state={}, meta={})

    class Bigger(TinyNet):
        def __init__(self) -> None:
            super().__init__()
            self.extra = nn.Linear(7, 2)

    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, model=Bigger())
    msg = str(info.value)
    assert isinstance(info.value, AlignprogError)
    assert "missing keys (in the model, not in the checkpoint): extra.weight, extra.bias" in msg

    class Smaller(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(5, 7)

    with pytest.raises(CheckpointError, match=r"unexpected keys \(in the checkpoint, not in the "
                                              r"model\): calls, gru\.bias_hh_l0, .*head\.weight "):
        load_checkpoint(path, model=Smaller())

    class Tiny2(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.Sequential(*[nn.Linear(2, 2) for _ in range(6)])

    with pytest.raises(CheckpointError, match=r"missing keys .*: layers\.0\.weight, .* and 4 more"):
        load_checkpoint(path, model=Tiny2())

    with pytest.raises(CheckpointError, match=r"shape mismatches: proj\.weight checkpoint "
                                              r"\(7, 5\) vs model \(7, 4\)"):
        load_checkpoint(path, model=TinyNet(d_in=4))

    # strict=False loads the common keys (an alignment checkpoint into a model with a new head).
    bigger = Bigger()
    load_checkpoint(path, model=bigger, strict=False, restore_rng=False)
    small = Smaller()
    load_checkpoint(path, model=small, strict=False, restore_rng=False)


def test_damaged_weights_file(tmp_path: Path):
    path = tmp_path / "c"
    save_checkpoint(path, model=TinyNet(), optimizer=None, state={}, meta={})
    (path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read tensors"):
        load_checkpoint(path, model=TinyNet())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fused", [False, True])
def test_cuda_round_trip(tmp_path: Path, fused: bool):
    """CUDA parameters and optimizer state (fused Adam keeps `step` on the GPU), CUDA RNG, and
    map_location."""
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = TinyNet().to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, fused=fused)
    x = torch.randn(2, 6, 5, device=dev)
    for _ in range(2):
        _train_step(model, opt, x)
    gen = torch.Generator(device=dev).manual_seed(3)
    path = tmp_path / "c"
    save_checkpoint(path, model=model, optimizer=opt, state={"step": 2}, meta={},
                    generators={"cuda_gen": gen})
    expected = torch.rand(5, device=dev)
    expected_gen = torch.rand(5, device=dev, generator=gen)
    load_checkpoint(path)  # global RNGs back to the save point
    loss1 = _train_step(model, opt, x)

    torch.cuda.manual_seed_all(99)
    model2 = TinyNet().to(dev)
    opt2 = torch.optim.Adam(model2.parameters(), lr=0.5, fused=fused)
    gen2 = torch.Generator(device=dev).manual_seed(99)
    load_checkpoint(path, model=model2, optimizer=opt2, generators={"cuda_gen": gen2},
                    map_location="cuda")
    assert torch.equal(torch.rand(5, device=dev), expected)
    assert torch.equal(torch.rand(5, device=dev, generator=gen2), expected_gen)
    load_checkpoint(path, restore_rng=True)
    loss2 = _train_step(model2, opt2, x)
    assert loss1 == loss2
    _assert_same_state(model.state_dict(), model2.state_dict())
    for i, s in opt.state_dict()["state"].items():
        _assert_same_state(s, opt2.state_dict()["state"][i])

    cpu_model = TinyNet()
    load_checkpoint(path, model=cpu_model, restore_rng=False)  # map_location="cpu" default
    assert cpu_model.proj.weight.device.type == "cpu"
