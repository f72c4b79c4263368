"""balance=gradient (docs/algorithms.md#balancing-the-objectives): the weights against a float64
formula written out by hand, invariance to the alignment loss's scale, the fixed mode kept, the
config's rules and the CLI flags."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from alignprog.cli import app
from alignprog.config import Config, load_config
from alignprog.data import load_dataset, make_loader
from alignprog.errors import ConfigError
from alignprog.training import RunDir
from alignprog.training.loop import fit
from alignprog.training.step import StepMetrics, backward, take_step
from alignprog.training.trainer import Trainer

from helpers import SETS_TINY, TINY

# The balance weighs the two losses on a tensor both read: a head on the shared encoder (the
# default head has a base encoder of its own, where nothing is balanced; tests/test_head_input.py)
SHARED = TINY | {"progress.learnable.input": "embeddings"}
SETS_SHARED = [*SETS_TINY, "--head-input", "embeddings"]


class Toy:
    """A linear 'encoder' E = X W (n, d), an alignment loss s * sum((E a)^2) with a per-column
    weight a (d,) and a linear 'head' p = E v, float64: progress = mean((E v - y)^2). On E,
    g_a = 2 s E a^2 and g_p = (2 / n) (E v - y) v^T; on a, 2 s a sum_i E_i^2; on v,
    (2 / n) E^T (E v - y). With `above`, a is a parameter between E and the alignment loss
    (as GTCC's drop branch, or the fusion when the head reads the base features)."""

    def __init__(self, seed: int = 0, n: int = 7, d: int = 3, above: bool = False) -> None:
        self.above = above
        rng = np.random.default_rng(seed)
        self.x = rng.normal(size=(n, 4))
        self.w0 = rng.normal(size=(4, d))
        self.a0 = rng.uniform(0.5, 2.0, size=(d,))
        self.v0 = rng.normal(size=(d,))
        self.y = rng.uniform(size=(n,))

    def torch_grads(self, scale: float, ratio: float, balance: str = "gradient",
                    lam: float = 10.0):
        w = torch.tensor(self.w0, requires_grad=True)
        a = torch.tensor(self.a0, requires_grad=self.above)
        v = torch.tensor(self.v0, requires_grad=True)
        emb = torch.tensor(self.x) @ w
        alignment = scale * ((emb * a) ** 2).sum()
        progress = ((emb @ v - torch.tensor(self.y)) ** 2).mean()
        owner = SimpleNamespace(balance=balance, balance_ratio=ratio, lam=lam, head_params=[v],
                                alignment_params=[a] if self.above else [])
        total, step_lam = backward(owner, alignment, progress, emb)
        grad_a = a.grad.numpy() if self.above else None
        return w.grad.numpy(), v.grad.numpy(), float(total), float(step_lam), grad_a

    def alignment(self, scale: float) -> float:
        e = self.x @ self.w0
        return scale * ((e * self.a0) ** 2).sum()

    def by_hand(self, scale: float, ratio: float):
        """The balanced gradients of W, v and a and the step's lambda, float64 loops."""
        n, d = self.x.shape[0], self.w0.shape[1]
        e = self.x @ self.w0
        resid = e @ self.v0 - self.y
        g_a = np.zeros((n, d))
        g_p = np.zeros((n, d))
        for i in range(n):
            for j in range(d):
                g_a[i, j] = 2 * scale * e[i, j] * self.a0[j] ** 2
                g_p[i, j] = 2 / n * resid[i] * self.v0[j]
        norm_a = sum(g ** 2 for g in g_a.ravel()) ** 0.5
        norm_p = sum(g ** 2 for g in g_p.ravel()) ** 0.5
        g_e = g_a / norm_a + ratio * g_p / norm_p          # on E, then through E = X W
        g_w = np.zeros_like(self.w0)
        for k in range(self.w0.shape[0]):
            for j in range(d):
                g_w[k, j] = sum(self.x[i, k] * g_e[i, j] for i in range(n))
        g_v = np.array([sum(2 / n * resid[i] * e[i, j] for i in range(n)) for j in range(d)])
        # a sits above E: the alignment's gradient, weighted as the alignment's on E
        g_above = np.array([2 * scale * self.a0[j] * sum(e[i, j] ** 2 for i in range(n))
                            for j in range(d)]) / norm_a
        return g_w, g_v, ratio * norm_a / norm_p, g_above


@pytest.mark.parametrize("above", [False, True])
@pytest.mark.parametrize("ratio", [0.3, 1.0, 10.0])
def test_balanced_gradients_equal_the_formula(ratio, above):
    toy = Toy(above=above)
    g_w, g_v, total, lam, g_above = toy.torch_grads(scale=3.0, ratio=ratio)
    want_w, want_v, want_lam, want_above = toy.by_hand(scale=3.0, ratio=ratio)
    np.testing.assert_allclose(g_w, want_w, rtol=1e-12)
    np.testing.assert_allclose(g_v, want_v, rtol=1e-12)   # the head: grad(progress) itself
    if above:
        np.testing.assert_allclose(g_above, want_above, rtol=1e-12)
    assert lam == pytest.approx(want_lam, rel=1e-12)
    e = toy.x @ toy.w0
    want_total = toy.alignment(3.0) + want_lam * ((e @ toy.v0 - toy.y) ** 2).mean()
    assert total == pytest.approx(want_total, rel=1e-12)


def test_the_alignment_loss_scale_drops_out():
    toy = Toy(seed=1)
    g_w1, g_v1, _, lam1, _ = toy.torch_grads(scale=1.0, ratio=1.0)
    g_w2, g_v2, _, lam2, _ = toy.torch_grads(scale=1e6, ratio=1.0)
    np.testing.assert_allclose(g_w2, g_w1, rtol=1e-9)
    np.testing.assert_allclose(g_v2, g_v1, rtol=1e-12)
    assert lam2 == pytest.approx(1e6 * lam1, rel=1e-9)   # lambda follows the scale instead


def test_a_progress_loss_without_gradient_leaves_the_alignment_alone():
    """A head that gives the embeddings no gradient (v = 0, as a saturated head nearly does):
    weight 0 instead of ratio / 0, lambda 0, nothing infinite."""
    toy = Toy(seed=3)
    toy.v0 = np.zeros_like(toy.v0)
    g_w, g_v, total, lam, _ = toy.torch_grads(scale=5.0, ratio=10.0)
    e = toy.x @ toy.w0
    g_a = 10.0 * e * toy.a0 ** 2
    np.testing.assert_allclose(g_w, toy.x.T @ (g_a / np.linalg.norm(g_a)), rtol=1e-12)
    assert lam == 0.0 and total == pytest.approx(toy.alignment(5.0))
    assert np.isfinite(g_v).all()


def test_a_step_without_progress_scales_the_alignment_gradient_alone():
    toy = Toy(seed=4)
    w = torch.tensor(toy.w0, requires_grad=True)
    emb = torch.tensor(toy.x) @ w
    owner = SimpleNamespace(balance="gradient", balance_ratio=2.0, lam=1.0, head_params=[],
                            alignment_params=[])
    total, lam = backward(owner, 7.0 * (emb ** 2).sum(), None, emb)
    e = toy.x @ toy.w0
    np.testing.assert_allclose(w.grad.numpy(), toy.x.T @ (e / np.linalg.norm(e)), rtol=1e-12)
    assert float(lam) == 0.0 and float(total) == pytest.approx(7.0 * (e ** 2).sum())


def test_a_non_finite_gradient_makes_the_total_nan():
    w = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    emb = w * 1.0
    owner = SimpleNamespace(balance="gradient", balance_ratio=2.0, lam=1.0, head_params=[],
                            alignment_params=[])
    total, _ = backward(owner, (emb * float("inf")).sum(), (emb ** 2).sum(), emb)
    assert torch.isnan(total)


def test_best_is_picked_by_a_score_that_does_not_follow_lambda():
    trainer, _ = _trainer(**{"progress.balance_ratio": 2.0})
    assert trainer.validation_score(10.0, 0.5, 1e9) == pytest.approx(1.0 + 2.0)
    assert trainer.val_reference == [10.0, 0.5]
    # halving the progress loss counts twice as much as halving the alignment loss
    assert trainer.validation_score(10.0, 0.25, 1.0) < trainer.validation_score(5.0, 0.5, 1.0)
    assert trainer.state()["val_reference"] == [10.0, 0.5]
    fixed, _ = _trainer(**{"progress.balance": "fixed"})
    assert fixed.validation_score(10.0, 0.5, 123.0) == 123.0


def test_fixed_balance_is_the_plain_total():
    toy = Toy(seed=2)
    g_w, g_v, total, lam, _ = toy.torch_grads(scale=2.0, ratio=1.0, balance="fixed", lam=10.0)
    e = toy.x @ toy.w0
    resid = e @ toy.v0 - toy.y
    n = len(resid)
    want_w = toy.x.T @ (4.0 * e * toy.a0 ** 2 + 10.0 * 2 / n * np.outer(resid, toy.v0))
    np.testing.assert_allclose(g_w, want_w, rtol=1e-12)
    # lambda-scaled here; the step's rescale_head divides it by lambda afterwards
    np.testing.assert_allclose(g_v, 10.0 * 2 / n * e.T @ resid, rtol=1e-12)
    assert lam == 10.0
    assert total == pytest.approx(toy.alignment(2.0) + 10.0 * (resid ** 2).mean())


def test_balance_needs_the_embeddings():
    owner = SimpleNamespace(balance="gradient", balance_ratio=1.0, lam=1.0, head_params=[],
                            alignment_params=[])
    a = torch.ones((), requires_grad=True)
    with pytest.raises(ValueError, match="embeddings"):
        backward(owner, a * 2, a * 3, None)


def _trainer(**extra) -> tuple[Trainer, object]:
    cfg = load_config(overrides=SHARED | {"train.clip_mode": "none"} | extra)
    trainer = Trainer(cfg, load_dataset(cfg.data), torch.device("cpu"))
    loader = make_loader(trainer.dataset, "train", batch_size=2, shuffle=False, drop_last=True)
    return trainer, next(iter(loader))


def test_the_trainer_step_is_invariant_to_the_alignment_scale():
    """The trainer's step (model, both losses, backward): the alignment loss times 2^20 gives
    every parameter the same gradient up to float32 rounding (a power of two scales exactly;
    another factor changes the rounding of each term, which the soft-DTW gradient's
    cancellations magnify to ~1e-3), and the step's lambda grows by 2^20."""
    results = []
    for scale in (1.0, 2.0 ** 20):
        trainer, batch = _trainer()
        out = trainer.losses(batch, epoch=0, step=0, generators=trainer.generators)
        info = StepMetrics(step=1, epoch=0, lam=trainer.lam, samples=out["samples"],
                           videos=batch.size, frames=int(batch.lengths.sum()),
                           alignment=out["alignment"])
        metrics = take_step(trainer, scale * out["alignment"], out["progress"], info,
                            embeddings=out["embeddings"], release_grads=False)
        grads = [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None]
        results.append((trainer.read(metrics), grads))
    (r1, g1), (r2, g2) = results
    assert r2["lambda"] == pytest.approx(2.0 ** 20 * r1["lambda"], rel=1e-6)
    assert len(g1) == len(g2) > 0
    for a, b in zip(g1, g2):   # a lambda-scaled head or encoder would be off by ~2^20
        assert float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(a)) < 1e-5


@pytest.mark.parametrize("method,head_input", [("lav", "embeddings"), ("gtcc", "embeddings"),
                                               ("lav", "features"), ("gtcc", "features")])
def test_the_one_walk_step_equals_the_weighted_losses_backward(method, head_input):
    """The trainer's backward (one walk, the parameters above the balance point taken with
    g_a) against the definition: the encoder's gradient of alignment / |g_a| + r progress /
    |g_p| and the head's grad(progress), each by its own autograd.grad. GTCC's drop branch
    and, when the head reads the base features, the fusion lie above that point."""
    trainer, batch = _trainer(**{"train.method": method,
                                 "progress.learnable.input": head_input})
    assert trainer.model.head_input == head_input
    above = {id(p) for p in trainer.alignment_params}
    assert bool(above) == (method == "gtcc" or head_input == "features")
    out = trainer.losses(batch, epoch=0, step=0, generators=trainer.generators)
    point, align, prog = out["embeddings"], out["alignment"], out["progress"]
    g_a, = torch.autograd.grad(align, point, retain_graph=True)
    g_p, = torch.autograd.grad(prog, point, retain_graph=True)
    enc = [p for p in trainer.encoder_params if p.requires_grad]
    # each loss's own gradient, then the weighted sum (scaling a loss before its backward
    # instead would round its cancelling terms differently in float32)
    want_enc = []
    grads_a = torch.autograd.grad(align, enc, retain_graph=True, allow_unused=True)
    grads_p = torch.autograd.grad(prog, enc, retain_graph=True, allow_unused=True)
    for ga, gp in zip(grads_a, grads_p):
        parts = [] if ga is None else [ga / g_a.norm()]
        parts += [] if gp is None else [trainer.balance_ratio * gp / g_p.norm()]
        want_enc.append(sum(parts) if parts else None)
    want_head = torch.autograd.grad(prog, trainer.head_params, retain_graph=True)
    backward(trainer, align, prog, point)
    for p, want in zip(enc, want_enc):
        if want is None:
            assert p.grad is None
            continue
        assert p.grad is not None, p.shape
        # laid out as the parameter: CUDA's fused Adam refuses another stride order
        assert p.grad.stride() == p.stride(), (p.shape, p.stride(), p.grad.stride())
        # float32 sums in another order; a lost or doubled term is off by O(1)
        err = torch.linalg.vector_norm(p.grad - want) / torch.linalg.vector_norm(want)
        assert float(err) < 1e-4, (p.shape, id(p) in above, float(err))
    for p, want in zip(trainer.head_params, want_head):
        torch.testing.assert_close(p.grad, want, rtol=1e-5, atol=1e-8)


def test_the_logged_lambda_and_total_are_the_balanced_ones():
    trainer, batch = _trainer(**{"progress.balance_ratio": 2.0})
    out = trainer.losses(batch, epoch=0, step=0, generators=trainer.generators)
    g_a, = torch.autograd.grad(out["alignment"], out["embeddings"], retain_graph=True)
    g_p, = torch.autograd.grad(out["progress"], out["embeddings"])
    want = 2.0 * float(g_a.norm() / g_p.norm())
    trainer, batch = _trainer(**{"progress.balance_ratio": 2.0})   # the same draws again
    record = trainer.read(trainer.step_batch(batch))
    assert record["lambda"] == pytest.approx(want, rel=1e-5)
    assert record["total"] == pytest.approx(
        record["alignment"] + want * record["progress"], rel=1e-5)
    assert record["weighted_progress"] == pytest.approx(want * record["progress"], rel=1e-5)


def test_validation_total_weighs_by_the_epochs_mean_lambda():
    trainer, batch = _trainer()
    lams = [trainer.read(trainer.step_batch(batch))["lambda"] for _ in range(3)]
    val = trainer.validation_losses("train")
    want = val["val_alignment"] + np.mean(lams) * val["val_progress"]
    assert val["val_total"] == pytest.approx(want, rel=1e-5)
    assert int(trainer.lam_steps) == 0   # the next epoch's mean starts afresh


@pytest.mark.parametrize("balance", ["gradient", "fixed"])
@pytest.mark.parametrize("method", ["tcc", "gtcc", "lav", "vava"])
def test_each_method_trains_with_each_balance(method, balance):
    cfg = load_config(overrides=SHARED | {"train.method": method, "progress.balance": balance,
                                        "train.steps": 3})
    result = fit(cfg)
    steps = [h for h in result.history if h["kind"] == "step"]
    assert len(steps) == 3 and not any(s["skipped"] for s in steps)
    assert all(np.isfinite(s["total"]) and s["lambda"] > 0 for s in steps)
    if balance == "fixed":
        assert {s["lambda"] for s in steps} == {cfg.progress.lambda_for(method)}


def test_head_only_stage_and_cumulative_l2_under_the_gradient_balance():
    two = load_config(overrides=SHARED | {"train.steps": 2, "train.two_stage": True,
                                        "train.head_epochs": 1})
    result = fit(two)
    head = [h for h in result.history if h["kind"] == "step" and h.get("stage") == "head"]
    assert head and not any(s["skipped"] for s in head)
    joint = [h for h in result.history if h["kind"] == "step" and h.get("stage") != "head"]
    assert joint and all(s["lambda"] > 0 for s in joint)   # the balanced path ran
    cum = load_config(overrides=SHARED | {"train.steps": 2, "progress.method": "cumulative_l2"})
    steps = [h for h in fit(cum).history if h["kind"] == "step"]
    assert len(steps) == 2 and all(np.isfinite(s["total"]) and s["lambda"] > 0 for s in steps)


def test_config_lambda_alone_means_fixed_and_contradictions_are_errors():
    assert Config().progress.balance == "gradient"
    cfg = load_config(overrides={"progress.lambda_fixed": 1e4})
    assert cfg.progress.balance == "fixed" and cfg.progress.lambda_for("lav") == 1e4
    with pytest.raises(ConfigError, match=r"lambda_fixed \(--lambda\) applies to progress"):
        load_config(overrides={"progress.lambda_fixed": 1e4, "progress.balance": "gradient"})
    with pytest.raises(ConfigError, match="balance_ratio"):
        load_config(overrides={"progress.balance_ratio": 0})
    # a saved config of a fixed run loads as it was
    assert load_config(overrides={"progress.balance": "fixed"}).progress.lambda_fixed is None


def test_cli_flags(tmp_path: Path):
    runner = CliRunner()

    def printed(*args):
        res = runner.invoke(app, ["train", "--print-config", *args])
        assert res.exit_code == 0, res.output
        return res.output

    assert "balance: fixed" in printed("--lambda", "1e4")
    out = printed("--balance", "gradient", "--balance-ratio", "3")
    assert "balance: gradient" in out and "balance_ratio: 3.0" in out
    res = runner.invoke(app, ["train", "--balance", "gradient", "--lambda", "5"])
    assert res.exit_code != 0 and "--balance fixed" in res.output
    res = runner.invoke(app, ["train", "--runs-dir", str(tmp_path), "--name", "b", "--steps",
                              "2", "--balance", "fixed", *SETS_SHARED])
    assert res.exit_code == 0, res.output
    steps = [r for r in _records(tmp_path / "b") if r["kind"] == "step"]
    assert len(steps) == 2 and all(r["lambda"] == 1e6 for r in steps)
    res = runner.invoke(app, ["train", "--runs-dir", str(tmp_path), "--name", "r", "--steps",
                              "2", "--balance-ratio", "3", *SETS_SHARED])
    assert res.exit_code == 0, res.output
    steps = [r for r in _records(tmp_path / "r") if r["kind"] == "step"]
    assert len(steps) == 2 and all(r["lambda"] != 1e6 and r["lambda"] > 0 for r in steps)


def _records(run: Path) -> list[dict]:
    return RunDir.open(run).read_metrics()


def test_resuming_a_run_saved_before_the_balance_setting_keeps_its_fixed_lambda(tmp_path: Path):
    runner = CliRunner()
    args = ["train", "--runs-dir", str(tmp_path), "--name", "old", *SETS_SHARED]
    assert runner.invoke(app, [*args, "--steps", "1"]).exit_code == 0
    saved = tmp_path / "old" / "config.yaml"
    text = saved.read_text()
    lines = [ln for ln in text.splitlines() if not ln.strip().startswith("balance")]
    assert len(lines) == len(text.splitlines()) - 2     # balance and balance_ratio
    saved.write_text("\n".join(lines) + "\n")
    res = runner.invoke(app, [*args, "--steps", "3", "--resume"])
    assert res.exit_code == 0, res.output
    steps = [r for r in _records(tmp_path / "old") if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert [r["lambda"] for r in steps[1:]] == [1e6, 1e6]   # fixed, as the run was trained
