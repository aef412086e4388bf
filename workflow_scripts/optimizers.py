"""The optimizers of a training run, and the basis they see the residual stream in.

A run's ``optimizer.name`` is one of
  sgd, adam, adamw  torch's, on every parameter;
  adafactor         torch's Adafactor (factored second moments; ``lr`` caps its relative step
                    size and scales its weight decay), on every parameter;
  muon              torch's Muon on the 2-D weight matrices inside the residual blocks (attention
                    and MLP), AdamW on everything else: the embeddings and the head tied to them,
                    norms, biases, a classifier. That split is what Muon's authors prescribe
                    (K. Jordan, "Muon: An optimizer for hidden layers in neural networks", 2024,
                    https://kellerjordan.github.io/posts/muon/; torch's docstring: "Muon is an
                    optimizer for 2D parameters of neural network hidden layers. Other
                    parameters, such as bias, and embedding, should be optimized by a standard
                    method such as AdamW").

and ``optimizer.basis`` one of
  standard  the optimizer's coordinates are the model's;
  rotated   the optimizer's coordinates of the residual stream are those of a fixed random
            orthogonal basis Q (:func:`optimizer_basis`, seeded by ``basis_seed``, else the
            run's seed): every axis of a parameter that indexes the stream
            (:func:`stream_axes`) is rotated into Q's basis. The optimizer updates shadow
            parameters s = R(p) (R: each stream axis multiplied by Q), fed the gradient rotated
            the same way (R is orthogonal, so that is the gradient with respect to s), and the
            model's parameters are set to p = R^T(s) after every step. For gptr2, whose
            scalar-gain RMSNorm commutes with rotations, R is a symmetry of the model
            (:func:`rotate_stream`), so this is the same as training the rotated model in the
            standard basis and rotating it back: the model's function and its data are the
            same, only the optimizer's per-coordinate statistics (Adam's second moments) live
            in another basis. A stream vector x has coordinates x @ Q in the optimizer's basis.

All of a run's optimizers, one LambdaLR schedule each and the shadow parameters are one
:class:`Optimizers`, which the step loop unscales, clips, steps and checkpoints as a whole.

Imported by the config check at DAG-build time (:func:`optimizer_problem`): torch and
transformers are imported inside the functions that need them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from operator import attrgetter
from typing import TYPE_CHECKING

from workflow_scripts.stage import InputError

if TYPE_CHECKING:
    import torch

    from workflow_scripts.families import Family

NAMES = ("sgd", "adam", "adamw", "muon", "adafactor")
BASES = ("standard", "rotated")
MUON_MOMENTUM = 0.95  # torch's and the Muon write-up's default
BASIS_KEY = 0x6F707469  # the optimizer basis's own random stream, apart from the statistics'

# GPT-2's layout (Conv1D weights are [in, out]): the axes of each parameter that index the
# residual stream. A matrix that reads the stream has it on its input axis, one that writes it
# on its output axis (and its bias); norm gains and the attention and MLP's inner biases have
# none. The LM head is tied to wte; a classifier reads the stream.
GPT2_STREAM_AXES = {
    "wte.weight": (1,),
    "wpe.weight": (1,),
    "attn.c_attn.weight": (0,),
    "attn.c_attn.bias": (),
    "attn.c_proj.weight": (1,),
    "attn.c_proj.bias": (0,),
    "mlp.c_fc.weight": (0,),
    "mlp.c_fc.bias": (),
    "mlp.c_proj.weight": (1,),
    "mlp.c_proj.bias": (0,),
    "lm_head.weight": (1,),
    "score.weight": (1,),
}
ROTATABLE_MODEL_TYPES = ("gpt2",)  # the layouts stream_axes knows


class OptimizerError(InputError):
    """Optimizer settings a run cannot use."""


# --- the config check ---


def optimizer_problem(kind: str, family: Family, settings: Mapping) -> str | None:
    """What is wrong with the optimizer ``settings`` of a ``kind`` run (causal_lm,
    image_classification, sequence_classification) of a model of ``family`` (its registry
    record; a fine-tune's is its base's), or None. The message starts with the setting's key
    under ``optimizer``."""
    if settings["name"] == "muon" and (kind == "image_classification" or not family.hf_blocks):
        return (
            f"name: muon takes the 2-D weight matrices of a transformer's blocks; a {family.name} "
            "model's are convolution kernels, which torch's Muon does not take; use sgd, adam, "
            "adamw or adafactor"
        )
    if settings.get("basis", "standard") == "rotated":
        if kind == "image_classification":
            return (
                "basis: rotated needs a model that a rotation of its residual stream leaves the "
                "same function; a ResNet's ReLUs act on each channel, which fixes its basis; "
                "use basis: standard"
            )
        if not (family.scalar_rms_norm and family.model_types[:1] == ROTATABLE_MODEL_TYPES):
            return (
                f"basis: rotated needs norms that commute with rotations of the stream (gptr2's "
                f"scalar-gain RMSNorm); family {family.name}'s norms have a gain per coordinate "
                "(and LayerNorm subtracts the mean), so a rotation changes the model's function; "
                "use family gptr2 or basis: standard"
            )
    return None


def basis_seed(spec: Mapping) -> int:
    """The seed of a run's optimizer basis: ``optimizer.basis_seed``, else the run's seed."""
    return spec["optimizer"].get("basis_seed", spec["seed"])


# --- the rotation ---


def optimizer_basis(seed: int, width: int) -> torch.Tensor:
    """Q: the [width, width] orthogonal matrix of the rotated basis, float64 on the CPU, a pure
    function of (seed, width): the QR of a Gaussian matrix from numpy's generator seeded with
    [BASIS_KEY, seed], with R's diagonal signs moved into Q (Haar-distributed; the statistics'
    random rotations come from the same code, :func:`rotations.haar_matrix`, on other seeds).
    A stream vector x has coordinates x @ Q in this basis."""
    import numpy as np
    import torch

    from workflow_scripts.rotations import haar_matrix

    return torch.from_numpy(haar_matrix(np.random.default_rng([BASIS_KEY, seed]), width))


def stream_axes(model) -> dict[str, tuple[int, ...]]:
    """{parameter name (as ``model.named_parameters()`` gives it): the axes that index the
    residual stream} of a GPT-2-layout model (gpt2, gptr2, either head); the parameters of its
    norms have none (a scalar gain has none; LayerNorm's per-coordinate ones cannot be
    rotated, which is why a rotation is not a symmetry of GPT-2)."""
    from torch import nn

    from workflow_scripts.models.norms import ScalarRMSNorm

    axes = {}
    for module_name, module in model.named_modules():
        for name, parameter in module.named_parameters(recurse=False):
            full = f"{module_name}.{name}" if module_name else name
            if isinstance(module, (ScalarRMSNorm, nn.LayerNorm)):
                axes.setdefault(id(parameter), ())
                continue
            known = [k for k in GPT2_STREAM_AXES if full == k or full.endswith("." + k)]
            if not known:
                raise OptimizerError(
                    f"parameter {full}: no known stream axes; the rotated basis knows GPT-2's "
                    "layout (gpt2, gptr2)"
                )
            axes.setdefault(id(parameter), GPT2_STREAM_AXES[known[0]])
    return {name: axes[id(p)] for name, p in model.named_parameters()}


def rotate_axes(tensor: torch.Tensor, rotation: torch.Tensor, axes: Iterable[int]):
    """``tensor`` with each of ``axes`` multiplied by ``rotation`` (``t @ rotation`` along that
    axis), as a new contiguous tensor."""
    for axis in axes:
        tensor = (tensor.movedim(axis, -1) @ rotation).movedim(-1, axis)
    return tensor.contiguous()


def rotate_stream(model, rotation: torch.Tensor):
    """Rotate the residual stream of a GPT-2-layout ``model`` in place: every stream axis of
    every parameter multiplied by ``rotation`` (orthogonal, [width, width]), so that the stream
    x of the new model is the old one's x @ rotation at every read-out point. Its logits are
    the same where the norms commute with rotations (gptr2), not where they do not (gpt2's
    LayerNorm). Returns ``model``."""
    import torch

    axes = stream_axes(model)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if axes[name]:
                q = rotation.to(parameter.device, parameter.dtype)
                parameter.copy_(rotate_axes(parameter, q, axes[name]))
    return model


def stream_width(model) -> int:
    return model.get_input_embeddings().weight.shape[1]


class RotatedBasis:
    """The shadow parameters of a model's parameters in the basis Q of its residual stream.

    ``tensors``: what the optimizers update, one per parameter of ``model.parameters()`` in its
    order: the shadow s = R(p) of a parameter with stream axes, the parameter itself otherwise.
    The shadows are the master copy: the model's parameters are set to R^T(s) at the start and
    after every step, so a checkpoint of the model and the shadows resumes exactly.
    """

    def __init__(self, model, rotation: torch.Tensor, seed: int | None = None):
        import torch

        parameter = next(model.parameters())
        self.rotation = rotation.to(parameter.device, parameter.dtype)
        self.seed = seed
        axes = stream_axes(model)
        self.rotated = []  # (the model's parameter, its shadow, stream axes)
        self.tensors = []
        with torch.no_grad():
            for name, p in model.named_parameters():
                if not axes[name]:
                    self.tensors.append(p)
                    continue
                shadow = torch.nn.Parameter(rotate_axes(p.detach(), self.rotation, axes[name]))
                self.rotated.append((p, shadow, axes[name]))
                self.tensors.append(shadow)
        self.parameters_out()

    def gradients_in(self) -> None:
        """The model's gradients, rotated into the basis, as the shadows' gradients."""
        for p, shadow, axes in self.rotated:
            shadow.grad = None if p.grad is None else rotate_axes(p.grad, self.rotation, axes)

    def parameters_out(self) -> None:
        """The model's parameters set to the shadows rotated back: p = R^T(s)."""
        import torch

        with torch.no_grad():
            for p, shadow, axes in self.rotated:
                p.copy_(rotate_axes(shadow, self.rotation.T, axes))

    def zero_grad(self) -> None:
        for p, shadow, _ in self.rotated:
            p.grad = shadow.grad = None

    def state_dict(self) -> list:
        return [shadow.detach() for _, shadow, _ in self.rotated]

    def load_state_dict(self, state: list) -> None:
        import torch

        if len(state) != len(self.rotated):
            raise ValueError(f"{len(state)} shadow parameters for {len(self.rotated)}")
        with torch.no_grad():
            for (_, shadow, _), saved in zip(self.rotated, state):
                shadow.copy_(saved)
        self.parameters_out()


class Optimizers:
    """The optimizers of a run (one, or Muon and AdamW), one LambdaLR schedule each (the same
    factor of each optimizer's own rates), and the rotated basis they may work in.

    The step loop: ``backward``; :meth:`unscale_` (gradients into the basis, then the loss
    scale divided out of each optimizer's); :meth:`clip_grad_norm_`; :meth:`step` (each
    optimizer through the scaler, the model's parameters rotated back, the schedules);
    ``scaler.update()``; :meth:`zero_grad`.
    """

    def __init__(
        self,
        optimizers: list,
        tensors: list,
        lr: float,
        factor: Callable[[int], float],
        basis: RotatedBasis | None = None,
    ):
        import torch

        self.optimizers = optimizers
        self.tensors = tensors  # what they update, in the model's parameter order
        self.lr, self.factor, self.basis = lr, factor, basis
        self.schedules = [torch.optim.lr_scheduler.LambdaLR(o, factor) for o in optimizers]

    def unscale_(self, scaler) -> None:
        if self.basis is not None:
            self.basis.gradients_in()
        for optimizer in self.optimizers:
            scaler.unscale_(optimizer)

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Clip the gradients the optimizers see to ``max_norm`` in total; their norm before
        (the same in either basis: the rotation is orthogonal)."""
        import torch

        return float(torch.nn.utils.clip_grad_norm_(self.tensors, max_norm))

    def step(self, scaler) -> None:
        for optimizer in self.optimizers:
            scaler.step(optimizer)
        if self.basis is not None:
            self.basis.parameters_out()
        for schedule in self.schedules:
            schedule.step()

    def zero_grad(self) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        if self.basis is not None:
            self.basis.zero_grad()

    def learning_rate(self) -> float:
        """The run's ``lr`` times the schedule's factor now (Muon's rate for muon)."""
        return self.lr * self.factor(self.schedules[0].last_epoch)

    def state_dict(self) -> dict:
        return {
            "optimizers": [o.state_dict() for o in self.optimizers],
            "schedules": [s.state_dict() for s in self.schedules],
            "shadows": [] if self.basis is None else self.basis.state_dict(),
        }

    def load_state_dict(self, state: Mapping) -> None:
        if self.basis is not None:
            self.basis.load_state_dict(state["shadows"])
        for optimizer, saved in zip(self.optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(saved)
        for schedule, saved in zip(self.schedules, state["schedules"], strict=True):
            schedule.load_state_dict(saved)

    def basis_record(self) -> dict:
        """What the model's manifest keeps of the basis, so that its stream can be measured in
        the optimizer's coordinates: x @ optimizer_basis(seed, width)."""
        if self.basis is None:
            return {"basis": "standard"}
        return {
            "basis": "rotated",
            "seed": self.basis.seed,
            "width": self.basis.rotation.shape[0],
            "matrix": "workflow_scripts.optimizers.optimizer_basis(seed, width)",
            "coordinates": "x @ Q",
        }


# --- building them ---


def single_optimizer(tensors: Iterable, settings: Mapping):
    """The torch optimizer ``settings`` name (sgd, adam, adamw, adafactor) over ``tensors``."""
    import torch

    name, lr, decay = settings["name"], settings["lr"], settings.get("weight_decay", 0.0)
    if name == "sgd":
        return torch.optim.SGD(
            tensors, lr=lr, momentum=settings.get("momentum", 0.0), weight_decay=decay
        )
    if name == "adafactor":
        return torch.optim.Adafactor(tensors, lr=lr, weight_decay=decay)
    if name not in ("adam", "adamw"):
        raise OptimizerError(
            f"optimizer {name!r}: one optimizer is one of sgd, adam, adamw, adafactor"
        )
    betas = (settings.get("beta1", 0.9), settings.get("beta2", 0.999))
    optimizer = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    return optimizer(tensors, lr=lr, betas=betas, weight_decay=decay)


def hidden_matrices(model, family: Family) -> dict[int, float]:
    """{id of each 2-D weight matrix inside the model's residual blocks: its Muon rate factor}.

    torch's Muon scales a matrix's update by sqrt(max(1, rows / columns)), Keller Jordan's
    choice for a Linear weight [out, in]; GPT-2's Conv1D weights are [in, out], so their
    factor (sqrt(max(1, out / in)) / sqrt(max(1, in / out))) makes the scale the one of the
    same layer written as a Linear."""
    from transformers.pytorch_utils import Conv1D

    blocks = attrgetter(family.hf_blocks)(model.base_model)
    factors = {}
    for module in blocks.modules():
        for parameter in module.parameters(recurse=False):
            if parameter.ndim != 2:
                continue
            factor = 1.0
            if isinstance(module, Conv1D):
                fan_in, fan_out = parameter.shape
                factor = math.sqrt(max(1, fan_out / fan_in)) / math.sqrt(max(1, fan_in / fan_out))
            factors[id(parameter)] = factor
    return factors


def build(model, spec: Mapping, family: Family, factor: Callable[[int], float]) -> Optimizers:
    """The optimizers of run ``spec`` (its ``optimizer`` settings, seed and kind) over ``model``
    (a model of ``family``, on its device), with the schedule ``factor`` of step."""
    import torch

    settings = spec["optimizer"]
    problem = optimizer_problem(spec["kind"], family, settings)
    if problem is not None:
        raise OptimizerError(f"optimizer.{problem}")
    parameters = list(model.parameters())
    basis = None
    tensors = parameters
    if settings.get("basis", "standard") == "rotated":
        seed = basis_seed(spec)
        basis = RotatedBasis(model, optimizer_basis(seed, stream_width(model)), seed)
        tensors = basis.tensors
    if settings["name"] != "muon":
        return Optimizers(
            [single_optimizer(tensors, settings)], tensors, settings["lr"], factor, basis
        )
    lr, decay = settings["lr"], settings.get("weight_decay", 0.0)
    hidden = hidden_matrices(model, family)
    groups: dict[float, list] = {}  # Muon's parameter groups, one per rate factor
    rest = []
    for parameter, tensor in zip(parameters, tensors):
        if id(parameter) in hidden:
            groups.setdefault(hidden[id(parameter)], []).append(tensor)
        else:
            rest.append(tensor)
    if not groups:
        raise OptimizerError("optimizer.name: muon, but the model has no 2-D hidden matrices")
    muon = torch.optim.Muon(
        # the decay is lr x weight_decay a step whatever a group's rate factor
        [{"params": ts, "lr": lr * f, "weight_decay": decay / f} for f, ts in groups.items()],
        lr=lr,
        weight_decay=decay,
        momentum=settings.get("momentum", MUON_MOMENTUM),
    )
    betas = (settings.get("beta1", 0.9), settings.get("beta2", 0.999))
    adamw = torch.optim.AdamW(
        rest, lr=settings.get("adamw_lr", lr), betas=betas, weight_decay=decay
    )
    return Optimizers([muon, adamw], tensors, lr, factor, basis)
