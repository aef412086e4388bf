"""The optimizers of a training run: Muon's split of the parameters, the rotated basis (a
symmetry of gptr2, not of gpt2; Adam in it is plain Adam on the rotated model), the config
check, and a checkpoint of every optimizer and basis resuming exactly."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from workflow_scripts import families, optimizers
from workflow_scripts.models import family_module
from workflow_scripts.optimizers import (
    NAMES,
    OptimizerError,
    build,
    optimizer_basis,
    optimizer_problem,
    rotate_stream,
    stream_axes,
)
from workflow_scripts.train import forward

ARCH = {"layers": 2, "width": 16, "heads": 2, "context": 16}
SETTINGS = {
    "sgd": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 0.01},
    "adam": {"name": "adam", "lr": 0.01},
    "adamw": {"name": "adamw", "lr": 0.01, "weight_decay": 0.1},
    "muon": {"name": "muon", "lr": 0.02, "adamw_lr": 0.01, "weight_decay": 0.01},
    # Adafactor's lr caps its step relative to each parameter's RMS (0.02 at initialisation)
    "adafactor": {"name": "adafactor", "lr": 0.1, "weight_decay": 0.01},
}


@pytest.fixture(autouse=True)
def one_thread():
    """One thread, as a run's arithmetic (cpu_threads: 1): fast on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny(family: str, dtype=torch.float64, head: str = "causal_lm", seed: int = 0):
    spec = {"family": family, "arch": ARCH, "seed": seed, "head": head, "num_labels": 3}
    model, _ = family_module(family).init(spec)
    return model.to(dtype)  # eval mode: no dropout


def batches(model, count: int, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    vocabulary = model.get_input_embeddings().weight.shape[0]
    return [torch.randint(vocabulary, (4, 12), generator=generator) for _ in range(count)]


def run_spec(settings: dict, **more) -> dict:
    return {"kind": "causal_lm", "seed": 3, "optimizer": {**settings, **more}}


def no_schedule(step: int) -> float:
    return 1.0


def train_steps(model, optimizers, ids_list, clip: float = 1.0) -> list[float]:
    """The training loop's step (train.train's order) on each batch; the losses."""
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    losses = []
    for ids in ids_list:
        loss, _, _ = forward(model, "causal_lm", {"input_ids": ids})
        loss.backward()
        optimizers.unscale_(scaler)
        optimizers.clip_grad_norm_(clip)
        optimizers.step(scaler)
        scaler.update()
        optimizers.zero_grad()
        losses.append(loss.item())
    return losses


def parameters(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_the_optimizer_basis_is_a_fixed_orthogonal_matrix():
    q = optimizer_basis(7, 24)
    assert q.dtype == torch.float64 and q.shape == (24, 24) and q.device.type == "cpu"
    torch.testing.assert_close(q @ q.T, torch.eye(24, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.equal(q, optimizer_basis(7, 24))  # a pure function of (seed, width)
    assert not torch.allclose(q, optimizer_basis(8, 24))


def test_stream_axes_of_gpt2s_layout():
    model = tiny("gptr2")
    axes = stream_axes(model)
    assert axes["transformer.wte.weight"] == (1,) and axes["transformer.wpe.weight"] == (1,)
    block = {k.removeprefix("transformer.h.0."): v for k, v in axes.items() if ".h.0." in k}
    assert block == {
        "ln_1.weight": (),  # one scalar gain
        "attn.c_attn.weight": (0,),  # reads the stream: [in, out]
        "attn.c_attn.bias": (),
        "attn.c_proj.weight": (1,),  # writes it
        "attn.c_proj.bias": (0,),
        "ln_2.weight": (),
        "mlp.c_fc.weight": (0,),
        "mlp.c_fc.bias": (),
        "mlp.c_proj.weight": (1,),
        "mlp.c_proj.bias": (0,),
    }
    assert model.lm_head.weight is model.transformer.wte.weight  # the tied head: wte's axes


@pytest.mark.parametrize("head", ["causal_lm", "sequence_classification"])
def test_a_rotation_of_the_stream_is_a_symmetry_of_gptr2(head):
    model = tiny("gptr2", head=head)
    ids = batches(model, 1)[0]
    q = optimizer_basis(1, ARCH["width"])
    with torch.no_grad():
        before = model(input_ids=ids, output_hidden_states=True)
        after = rotate_stream(model, q)(input_ids=ids, output_hidden_states=True)
    assert (before.logits - after.logits).abs().max() < 1e-10
    # the new model's stream is the old one's in Q's coordinates, at every read-out point
    for old, new in zip(before.hidden_states, after.hidden_states):
        assert (old @ q - new).abs().max() < 1e-10


def test_a_rotation_of_the_stream_is_not_a_symmetry_of_gpt2():
    """LayerNorm subtracts the mean over coordinates and scales each by its own gain: a
    rotation changes the function (this is why the rotated control is gptr2's)."""
    model = tiny("gpt2")
    ids = batches(model, 1)[0]
    with torch.no_grad():
        before = model(input_ids=ids).logits
        after = rotate_stream(model, optimizer_basis(1, ARCH["width"]))(input_ids=ids).logits
    assert (before - after).abs().max() > 0.1 * before.std()


@pytest.mark.parametrize("name", ["adam", "adamw", "adafactor"])
def test_the_rotated_basis_is_training_the_rotated_model_and_rotating_back(name):
    """The optimizer in basis Q on gptr2 = the same optimizer in the standard basis on the
    model rotated by Q, rotated back by Q^T, to float64 rounding; and it is not the standard
    basis's training (the per-coordinate statistics differ)."""
    spec = run_spec(SETTINGS[name], basis="rotated")
    q = optimizer_basis(spec["seed"], ARCH["width"])
    data = batches(tiny("gptr2"), 4)

    rotated_basis = tiny("gptr2")
    optimizers = build(rotated_basis, spec, families.get("gptr2"), no_schedule)
    assert optimizers.basis is not None
    train_steps(rotated_basis, optimizers, data)

    rotated_model = rotate_stream(tiny("gptr2"), q)
    plain = {**spec, "optimizer": SETTINGS[name]}
    train_steps(
        rotated_model, build(rotated_model, plain, families.get("gptr2"), no_schedule), data
    )
    rotate_stream(rotated_model, q.T)

    standard = tiny("gptr2")
    train_steps(standard, build(standard, plain, families.get("gptr2"), no_schedule), data)

    a, b, c = parameters(rotated_basis), parameters(rotated_model), parameters(standard)
    start = parameters(tiny("gptr2"))
    width = ARCH["width"]
    for key in a:
        difference = (a[key] - b[key]).abs()
        if key.endswith("c_attn.bias"):  # [query, key, value]: the key bias's true gradient
            # is zero (softmax ignores a shift shared by all keys), and Adafactor (epsilon
            # ~1e-16) turns its rounding noise into steps of ~1e-9
            assert difference[width : 2 * width].max() < 1e-7, key
            difference[width : 2 * width] = 0
        assert difference.max() < 1e-10, key
    moved = sum(float((c[k] - start[k]).norm() ** 2) for k in c) ** 0.5
    apart = sum(float((a[k] - c[k]).norm() ** 2) for k in c) ** 0.5
    assert apart > 0.1 * moved  # the basis changes the training


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    model = tiny("gptr2", dtype=torch.float32)
    optimizers = build(model, run_spec(SETTINGS["muon"]), families.get("gptr2"), no_schedule)
    muon, adamw = optimizers.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = {names[id(p)]: g["lr"] for g in muon.param_groups for p in g["params"]}
    in_adamw = {names[id(p)] for g in adamw.param_groups for p in g["params"]}
    expected = {
        f"transformer.h.{i}.{m}.weight" for i in range(2) for m in ("attn.c_attn", "attn.c_proj")
    } | {f"transformer.h.{i}.{m}.weight" for i in range(2) for m in ("mlp.c_fc", "mlp.c_proj")}
    assert set(in_muon) == expected
    assert in_adamw == set(names.values()) - expected
    assert "transformer.wte.weight" in in_adamw and "transformer.wpe.weight" in in_adamw
    # Conv1D weights are [in, out]: the rate is the one Muon gives the layer as a Linear
    lr = SETTINGS["muon"]["lr"]
    assert in_muon["transformer.h.0.mlp.c_fc.weight"] == pytest.approx(2 * lr)  # [16, 64]
    assert in_muon["transformer.h.0.mlp.c_proj.weight"] == pytest.approx(lr / 2)
    assert in_muon["transformer.h.0.attn.c_attn.weight"] == pytest.approx(math.sqrt(3) * lr)
    assert in_muon["transformer.h.0.attn.c_proj.weight"] == pytest.approx(lr)
    assert all(g["lr"] * g["weight_decay"] == pytest.approx(lr * 0.01) for g in muon.param_groups)
    assert adamw.param_groups[0]["lr"] == SETTINGS["muon"]["adamw_lr"]


@pytest.mark.parametrize("name", NAMES)
def test_every_optimizer_learns_a_batch(name):
    model = tiny("gptr2", dtype=torch.float32)
    optimizers = build(model, run_spec(SETTINGS[name]), families.get("gptr2"), no_schedule)
    losses = train_steps(model, optimizers, batches(model, 1) * 15)
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize(
    "name, basis",
    [(name, "standard") for name in NAMES] + [("adam", "rotated"), ("muon", "rotated")],
)
def test_a_checkpoint_of_the_optimizers_resumes_exactly(name, basis):
    """Saved after 3 steps and loaded into new optimizers over a new model: 3 more steps give
    the weights of 6 steps at once, bit for bit (the schedule, each optimizer's state, the
    shadow parameters of a rotated basis)."""
    spec = run_spec(SETTINGS[name], basis=basis)
    family = families.get("gptr2")
    data = batches(tiny("gptr2"), 6)

    def schedule(step: int) -> float:
        return (step + 1) / 4 if step < 4 else 0.5

    straight = tiny("gptr2", dtype=torch.float32)
    train_steps(straight, build(straight, spec, family, schedule), data)

    first = tiny("gptr2", dtype=torch.float32)
    optimizers = build(first, spec, family, schedule)
    train_steps(first, optimizers, data[:3])
    saved = {"model": first.state_dict(), "optimizer": optimizers.state_dict()}
    resumed = tiny("gptr2", dtype=torch.float32, seed=1)  # other weights, overwritten
    again = build(resumed, spec, family, schedule)
    resumed.load_state_dict(saved["model"])
    again.load_state_dict(saved["optimizer"])
    assert again.learning_rate() == optimizers.learning_rate()
    train_steps(resumed, again, data[3:])
    for key, value in parameters(straight).items():
        assert torch.equal(value, parameters(resumed)[key]), key


def test_the_config_check_refuses_what_the_optimizers_cannot_do():
    gptr2, gpt2, resnet = (families.get(n) for n in ("gptr2", "gpt2", "resnet"))
    roberta = families.get("roberta")
    rotated = {"name": "adam", "lr": 0.01, "basis": "rotated"}
    assert optimizer_problem("causal_lm", gptr2, rotated) is None
    assert optimizer_problem("sequence_classification", gptr2, rotated) is None
    assert optimizer_problem("causal_lm", gptr2, SETTINGS["muon"]) is None
    assert optimizer_problem("sequence_classification", roberta, SETTINGS["muon"]) is None
    assert "ReLU" in optimizer_problem("image_classification", resnet, rotated)
    assert "LayerNorm" in optimizer_problem("causal_lm", gpt2, rotated)
    assert optimizer_problem("sequence_classification", roberta, rotated).startswith("basis:")
    assert "convolution" in optimizer_problem("image_classification", resnet, SETTINGS["muon"])
    with pytest.raises(OptimizerError, match="optimizer.basis: rotated needs norms"):
        build(tiny("gpt2"), run_spec(rotated), gpt2, no_schedule)


def test_the_stream_is_also_measured_in_the_optimizers_basis(tmp_path):
    """layer_stats of a model trained in a rotated basis: its kurtosis in that basis equals the
    kurtosis of the same rows rotated beforehand (in float64) and measured in the standard
    basis; a stream with an outlier feature has it in one basis and not in the other."""
    from test_statistics import OPTIONS, value, write_shard

    from workflow_scripts.layer_stats import compute

    rng = np.random.default_rng(0)
    x = rng.standard_normal((600, 32))
    x[:, 3] *= 12  # a privileged direction of the standard basis
    ids = np.arange(600) // 6
    q = optimizers.optimizer_basis(4, 32).numpy()
    rotated = (x.astype(np.float32).astype(np.float64) @ q).astype(np.float32)
    plain = write_shard(tmp_path / "plain.zarr", [x], ids, dtype="float32")
    ahead = write_shard(tmp_path / "ahead.zarr", [rotated], ids, dtype="float32")
    both = compute([plain], 0, [1.0], OPTIONS, basis_seed=4)
    expected = value(compute([ahead], 0, [1.0], OPTIONS), "kurtosis")["value"]
    measured = value(both, "optimizer_basis_kurtosis")["value"]
    assert measured == pytest.approx(expected, rel=1e-5)
    assert value(both, "kurtosis")["value"] > 2 * measured  # the outlier lives in one basis
    assert "optimizer_basis_kurtosis" not in set(compute([plain], 0, [1.0], OPTIONS)["metric"])
