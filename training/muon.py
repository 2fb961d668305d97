"""Muon with its Newton-Schulz iterations run on stacks of same-shaped matrices, and the refinements
of nanochat's Muon.

`torch.optim.Muon` orthogonalises one matrix at a time. A small model's matrices are small (320 x 320
and 320 x 896 in the 5-minute default), and on a CPU a product that size leaves most of the matrix
unit idle, so the orthogonalisation took a fifth of the training step. The same products on a stack
of every matrix of one shape (`torch.baddbmm`) run 2.3x as fast on the Xeon with AMX: 27 ms against
62 ms for the 35 matrices of 5 x 320 (benchmarks/NOTES.md, "Muon on stacks of matrices").

On top, the refinements nanochat's Muon has (measured together on the tuning split: "nanochat's Muon"
in benchmarks/NOTES.md). Each is off unless asked for, so the class's defaults take
`torch.optim.Muon`'s steps (a test checks it):
- `polar_express`: each Newton-Schulz iteration gets its own coefficients (Amsel et al. 2025, "The
  Polar Express"; nanochat's table), in place of PyTorch's one polynomial. The table is made for
  five iterations and we run four (`training/optim.py`, NS_STEPS): the first four rows leave the
  update's singular values further from 1 than PyTorch's four do (0.43-1.58 against 0.68-1.14 for
  a Gaussian matrix), and NorMuon then resizes each neuron's step. That combination is what was
  measured; without the table the other three scored level on one seed and 0.004 worse on another.
- `normuon_beta2`: NorMuon (Li et al. 2025). An orthogonalised update moves every direction of a
  matrix equally, but its neurons (rows, one per output) still get updates of unequal size. NorMuon
  keeps a running mean of each neuron's mean squared update (decay `normuon_beta2`), divides the
  neuron's update by its root, then scales the whole update back to the orthogonalised one's
  Frobenius norm, so the learning rate keeps its meaning. In a wide matrix the neurons are the
  columns (the inputs), as in nanochat. Its state is one vector per matrix.
- `cautious_weight_decay`: decay a weight only where this step's update also pulls it towards zero
  (nanochat's "cautious" weight decay), so weight decay never fights the update.
- `momentum_warmup`: the momentum starts at this value and rises linearly to `momentum` over the first
  MOMENTUM_WARMUP_STEPS steps (modded-nanogpt's 0.85 over 300), so the early updates follow the early,
  fast-changing gradients more closely. The steps taken are counted in the optimizer's state.

With `compiled=True` (the trainer passes its `--compile`), the work on either side of the
orthogonalisation runs as two compiled functions per matrix: `momentum_update` before it and
`finish_update` (NorMuon, weight decay, the update) after it. Eager, each of their dozen operations
is a pass over the matrix, and on a CPU that memory traffic was a third of Muon's time: compiled,
Muon's share of the 5 x 320 step fell from 72-73 ms to 51-55 (benchmarks/NOTES.md, "Muon's momentum
and tail, compiled"). Compiling them costs about 15 s the first time, 2 s once inductor has cached them.

The orthogonalisation runs in the precision of the model's own matmuls (`dtype`, the trainer's
`pick_dtype`): bf16, as in PyTorch's Muon, where the hardware multiplies bf16 natively and faster,
and fp32 where it does not. On a CPU without AVX-512 BF16 or AMX (an AVX2-only AMD Zen 3, Intel's laptop chips)
PyTorch emulates bf16 matrix products, and its batched product is the slowest of all: a stack of ten
320 x 896 updates took 860 ms in bf16 against 15 ms in fp32, and Muon in bf16 took 14.6 s of a
16.4 s step of the 5 x 320 (benchmarks/NOTES.md, "A CPU without native bf16").

Everything else is PyTorch's Muon, unchanged: its hyperparameters, its checks and momentum buffers
(`_init_group`, so checkpoints saved by either resume with the other), its per-matrix learning-rate
scale (`_adjust_lr`). Only `step` is replaced.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.optim._muon import _adjust_lr

# (a, b, c) of iterations 1, 2, ...: X <- a X + (b A + c A^2) X with A = X X^T, for inputs divided by
# POLAR_EXPRESS_MARGIN x their Frobenius norm (nanochat's table, made for five iterations)
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)
POLAR_EXPRESS_MARGIN = 1.02
MOMENTUM_WARMUP_STEPS = 300
EXTRAS = {"polar_express": False, "normuon_beta2": 0.0, "cautious_weight_decay": False, "momentum_warmup": None}


def orthogonalise(
    updates: list[torch.Tensor],
    coefficients: Sequence[tuple[float, float, float]],
    eps: float,
    margin: float = 1.0,
    dtype: torch.dtype = torch.bfloat16,
) -> list[torch.Tensor]:
    """The quintic Newton-Schulz iteration of PyTorch's Muon (`torch.optim._muon._zeropower_via_newtonschulz`),
    one iteration per row of `coefficients`, on every update, in `dtype` (PyTorch's is bf16), each matrix
    of a shape stacked with the others of that shape. Each update is first divided by `margin` x its
    Frobenius norm."""
    tall = [update.size(0) > update.size(1) for update in updates]
    wide = [update.T if flip else update for update, flip in zip(updates, tall, strict=True)]
    by_shape: dict[torch.Size, list[int]] = {}  # iterate on the wide orientation: the Gram matrix is the small side
    for i, update in enumerate(wide):
        by_shape.setdefault(update.shape, []).append(i)
    results: list[torch.Tensor] = [torch.empty(0)] * len(updates)
    for indices in by_shape.values():
        stack = torch.stack([wide[i] for i in indices]).to(dtype)
        stack = stack / (margin * stack.norm(dim=(1, 2), keepdim=True)).clamp(min=eps)  # spectral norm at most 1
        for a, b, c in coefficients:
            gram = stack @ stack.mT
            gram_update = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
            stack = torch.baddbmm(stack, gram_update, stack, beta=a)
        for i, result in zip(indices, stack, strict=True):
            results[i] = result.T if tall[i] else result
    return results


def neuron_dim(matrix: torch.Tensor) -> int:
    """The dimension to average over for one value per neuron: a neuron is a row of the weight (an
    output), whose weights run along dimension 1, except in a wide matrix, whose neurons are its
    columns (its inputs)."""
    return 0 if matrix.size(0) < matrix.size(1) else 1


def normalise_neurons(update: torch.Tensor, second_moment: torch.Tensor, beta2: float) -> torch.Tensor:
    """NorMuon: divide each neuron's update by the root of its running mean square (`second_moment`,
    one value per neuron, updated in place), then give the result the Frobenius norm `update` had."""
    dim = neuron_dim(update)
    sum_square = torch.linalg.vector_norm(update, dim=dim, keepdim=True, dtype=torch.float32).square()
    mean_square = sum_square / update.size(dim)
    second_moment.lerp_(mean_square, 1 - beta2)
    scale = second_moment.clamp(min=1e-10).rsqrt()
    scale = scale * (mean_square.sum() / (mean_square * scale.square()).sum().clamp(min=1e-20)).sqrt()
    return update * scale  # a bf16 update times fp32 scales: fp32


def momentum_update(
    grad: torch.Tensor, buffer: torch.Tensor, momentum: float | torch.Tensor, nesterov: bool, dtype: torch.dtype
) -> torch.Tensor:
    """PyTorch's Muon momentum: the buffer (updated in place) follows the gradient, and the update is
    the buffer, or with Nesterov the gradient pulled towards it; in `dtype`, the precision
    Newton-Schulz works in (the same values `orthogonalise` would round it to)."""
    buffer.lerp_(grad, 1 - momentum)
    return (grad.lerp(buffer, momentum) if nesterov else buffer).to(dtype)


def finish_update(
    param: torch.Tensor,
    update: torch.Tensor,
    second_moment: torch.Tensor | None,
    lr: float | torch.Tensor,
    lr_scale: float,
    decay: float | torch.Tensor,
    beta2: float,
    cautious: bool,
) -> None:
    """One matrix's step once its update is orthogonal: NorMuon's neuron-wise sizes (when given the
    matrix's `second_moment`), weight decay (cautious: only where the update also pulls the weight
    towards zero), then the update itself, `lr` x `lr_scale` (the matrix's own factor, fixed by its
    shape). Every operation here reads and writes the whole matrix, so on a CPU this tail is memory
    traffic, which compiling fuses into a few passes (the module docstring). `lr` and `decay` may be
    0-d tensors, so one compiled copy serves every step."""
    if second_moment is not None:
        update = normalise_neurons(update, second_moment, beta2)
    decayed = param * (update * param >= 0) if cautious else param
    if isinstance(lr, torch.Tensor):  # compiled: one expression, which inductor fuses
        param.sub_(decayed * decay + update * (lr * lr_scale))
    else:  # eager: the scalings folded into the in-place kernels
        param.sub_(decayed, alpha=decay).sub_(update, alpha=lr * lr_scale)


class StackedMuon(torch.optim.Muon):
    """`torch.optim.Muon` whose orthogonalisation runs on stacks of same-shaped matrices, with
    nanochat's refinements where asked for (the module docstring)."""

    def __init__(self, params, compiled: bool = False, dtype: torch.dtype = torch.bfloat16, **settings):
        extras = {name: settings.pop(name, default) for name, default in EXTRAS.items()}
        if extras["polar_express"] and settings.get("ns_steps", 5) > len(POLAR_EXPRESS):
            raise ValueError(f"Polar Express has coefficients for at most {len(POLAR_EXPRESS)} iterations")
        if not 0 <= extras["normuon_beta2"] < 1:
            raise ValueError(f"normuon_beta2 must be in [0, 1), got {extras['normuon_beta2']}")
        super().__init__(params, **settings)
        self.compiled = compiled
        self.dtype = dtype  # of the orthogonalisation: the machine's, not a setting saved with the state
        self._scalars: dict[str, torch.Tensor] = {}  # the compiled functions' changing settings, by name
        self._momentum = torch.compile(momentum_update, dynamic=False) if compiled else momentum_update
        self._finish = torch.compile(finish_update, dynamic=False) if compiled else finish_update
        self.defaults.update(extras, steps_taken=0)  # also what `add_param_group` gives a later group
        for group in self.param_groups:  # saved with the optimizer's state, like PyTorch's own settings
            group.update(extras, steps_taken=0)

    def __setstate__(self, state: dict) -> None:
        """Optimizer state saved without these settings (PyTorch's Muon, or before they existed) resumes
        with this optimizer's, past its momentum warm-up."""
        super().__setstate__(state)
        for group in self.param_groups:
            for name, default in EXTRAS.items():
                group.setdefault(name, self.defaults.get(name, default))
            group.setdefault("steps_taken", MOMENTUM_WARMUP_STEPS)

    def _scalar(self, name: str, value: float, device: torch.device) -> float | torch.Tensor:
        """A setting that changes from step to step, as the compiled functions take it: a 0-d tensor
        on the weights' device, an input to the compiled graph (a Python float would be compiled in as
        a constant and recompiled at every new value). One tensor per setting, refilled each step: on a
        GPU a new tensor from a Python number would be a copy from the host, and a CPU tensor would
        mix devices in the compiled graph."""
        if not self.compiled:
            return value
        if name not in self._scalars or self._scalars[name].device != device:
            self._scalars[name] = torch.empty((), device=device)
        return self._scalars[name].fill_(value)

    def _second_moment(self, param: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        """NorMuon's running mean square of each neuron's update, kept in the matrix's state (from zero)."""
        state = self.state[param]
        if "neuron_second_moment" not in state:
            shape = list(update.shape)
            shape[neuron_dim(update)] = 1
            state["neuron_second_moment"] = torch.zeros(shape, dtype=torch.float32, device=update.device)
        return state["neuron_second_moment"]

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, buffers = [], [], []
            self._init_group(group, params, grads, buffers)
            momentum = group["momentum"]
            if group["momentum_warmup"] is not None:
                warmed = min(1.0, group["steps_taken"] / MOMENTUM_WARMUP_STEPS)
                momentum = group["momentum_warmup"] + warmed * (momentum - group["momentum_warmup"])
            group["steps_taken"] += 1
            device = params[0].device if params else torch.device("cpu")
            momentum = self._scalar("momentum", momentum, device)
            updates = [
                self._momentum(g, b, momentum, group["nesterov"], self.dtype)
                for g, b in zip(grads, buffers, strict=True)
            ]
            if group["polar_express"]:
                coefficients, margin = POLAR_EXPRESS[: group["ns_steps"]], POLAR_EXPRESS_MARGIN
            else:
                coefficients, margin = [group["ns_coefficients"]] * group["ns_steps"], 1.0
            orthogonal = orthogonalise(updates, coefficients, group["eps"], margin, self.dtype)
            lr = self._scalar("lr", group["lr"], device)
            decay = self._scalar("decay", group["lr"] * group["weight_decay"], device)
            beta2 = group["normuon_beta2"]
            for param, update in zip(params, orthogonal, strict=True):
                second_moment = self._second_moment(param, update) if beta2 else None
                lr_scale = _adjust_lr(1.0, group["adjust_lr_fn"], param.shape)  # PyTorch's, linear in lr
                self._finish(param, update, second_moment, lr, lr_scale, decay, beta2, group["cautious_weight_decay"])
        return loss
