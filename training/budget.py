"""The time budget is the dial: `--max-minutes` picks the model's size for the machine it runs on.

nanochat derives every setting from one number, the depth. Here that number comes from the budget:
the compute a run can spend is `minutes x 60 x the training FLOP/s this machine reaches`, and the
depth grows with about the fourth root of it (DEPTH_EXPONENT, 0.26), anchored where the sweep found the
optimum on the reference CPU. Parameters ~ depth^3 then grow with compute^0.78: between the square root of
compute-optimal scaling, where data is plentiful, and compute^1 for a fixed corpus seen more and more
times, where more compute is best spent on a bigger model. A 1 MB corpus is the second case: on the
tuning split the sixth root (the square-root rule) picked 4 layers for 5 minutes on a machine where
5 scored 0.03 better. Four budget-and-machine points bound the exponent to 0.24-0.33. Within that
range 0.26 puts the two points nearest a rounding point (the Xeon's 90 seconds and 5 minutes) equally
far from it, 13% in compute; at 1/4 the 5-minute run was 6% from it, and a probe that read the
machine a few percent slow sized it one step too small (benchmarks/NOTES.md). Below the anchor's
compute the depth falls faster, with its square root (BELOW_ANCHOR_EXPONENT): a 2-core Zen 3 trains
in fp32 at 0.47-0.64 of the anchor's rate, where the fourth root gives up to 2.67, so 3 x 192, which took
about 200 steps in 90 seconds and scored 0.04-0.06 bits/byte worse on the tuning split than the
2 x 128's 480 (benchmarks/NOTES.md, "A Zen 3 again").
Everything else follows the depth, nanochat style: width = 64 x depth, one head per 64 dimensions,
and dropout (0.1 a layer past the anchor, at most 0.3), input-token noise and a slower output head
once the model is big enough, and the corpus small enough, for the budget to go over it five times
or more (the corpus is prepared before the model is sized, so its size in tokens is known). And one
depth less from depth 6 on where the smaller model would not yet run out of data (`sized_for_budget`). One
setting follows the minutes instead: from COMPILE_MINUTES on, `torch.compile` (about a minute to
build on first use on two cores, seconds once cached) pays for itself in faster steps.
The schedule ends exactly when the budget does (training/optim.py), or earlier, after MAX_PASSES over
the training data: a 1 MB corpus runs out before a 15-minute budget on two cores does, and the run
that went on memorising it ended worse than the 5-minute one (benchmarks/NOTES.md, "Longer budgets").

The FLOP/s come from timing real training steps of the anchor model (`anchor_step_flops`, training/machine_speed.py), not from
the matmul peak. Small models spend much of a step outside big matmuls (norms, softmax, Muon), and
CPUs differ more in matmul peak than in that: an Intel Xeon with AMX multiplies bf16 matrices 3.7x as
fast as the reference AMD Zen 4 (1,600 against 435 GFLOP/s) but runs the anchor's step only 1.6x as
fast. Sized from the peak it got a 4 x 256 model for 90 seconds, which scored 2.070 on the tuning
split against 2.003 for the 3 x 192 that its step rate picks (benchmarks/NOTES.md). The peak does
say how many passes over the data a compiled run of the sized model will make (`training_rate`):
there the Xeon's big matrices run 2.8x the Zen 4's, and counted at the anchor's rate its runs
were predicted under half the passes they made.

The sweep behind the anchor and the exponent is in benchmarks/NOTES.md. Flags typed on the
command line (or saved in a run being resumed) always win over these choices.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from model.config import ModelConfig

if TYPE_CHECKING:  # training/config.py imports this module
    from training.config import TrainConfig

# The anchor: 90 seconds on the 2-core reference machine (AMD Zen 4), where depth 3 was best. Its
# training step (3 x 192, batch 16 x 256, vocabulary 1,024, eager, bf16) ran there at 15,252 tokens/s
# (median of the suite's three 90-second runs, benchmarks/reference at 80736ed) x 10.9 MFLOP a token.
ANCHOR_DEPTH = 3
ANCHOR_SHAPE = dict(n_layer=ANCHOR_DEPTH, n_embd=192, n_head=3, n_kv_head=3, context=256, vocab_size=1024)
ANCHOR_BATCH = 16
ANCHOR_STEP_FLOPS = 15_252 * 10_922_112  # FLOP/s, = 167 GFLOP/s
ANCHOR_COMPUTE = 1.5 * 60 * ANCHOR_STEP_FLOPS
DEPTH_EXPONENT = 0.26  # depth ~ compute^0.26; 1/6 under-sized data-limited 5-minute runs (benchmarks/NOTES.md)
BELOW_ANCHOR_EXPONENT = 0.5  # ... and ~ compute^0.5 below the anchor's compute: depth 2 under 0.69 of it
MIN_DEPTH, MAX_DEPTH = 2, 12  # 12 x 768 is GPT-2 small, the largest shape this project targets
HEAD_DIM = 64
# Residual dropout per layer past the anchor, and its most: 0.1 at depth 4 (5 minutes on the Zen 4), 0.2 at depth 5
# (5 minutes on the Xeon), 0.3 from depth 6 (10 and 15 minutes on the Xeon); NOTES.md, "Back on the AMD machine".
DROPOUT_PER_LAYER, MAX_DROPOUT = 0.1, 0.3
TOKEN_NOISE = 0.05  # share of input tokens replaced at depth > 3 (0.10 scored worse; benchmarks/NOTES.md)
HEAD_LR = 1.5e-3  # AdamW's learning rate (the head and norm scales) in the cpu preset, half the dataclass default
MEMORISING_HEAD_LR = 7.5e-4  # ... at depth > 3: better on six seeds at 5 minutes, worse at 90 s (NOTES.md)
# ... all three only for runs predicted to see their data this many times or more (`predicted_passes`; NOTES.md,
# "Other corpora"): at 4 passes they cost 0.15 bits/byte on other text, at 8 they gain 0.03-0.05.
MEMORISING_PASSES = 5.0
# A compiled sized model's step reaches this share of the bf16 matmul peak or more (43-48% on the Xeon, 52-61%
# on the Zen 4, 4 x 256 to 6 x 384), which on a machine with fast big matrices is far above the anchor's rate.
COMPILED_MFU = 0.45
# From this depth on, one layer less where the smaller model would not run out of data (`sized_for_budget`);
# depths 3 to 5 are where the sweeps chose between neighbours directly.
STEP_DOWN_FROM = 6
MAX_PASSES = 12.0  # a sized run stops after this many passes over its data (benchmarks/NOTES.md, "Longer budgets")
COMPILE_MINUTES = 3.0  # compiling costs 30-60 s cold, 5-15 s cached; steps 25-42% faster: pays from ~2.5 min (NOTES.md)
# What this rule fills in:
CHOSEN = ("n_layer", "n_embd", "n_head", "n_kv_head", "dropout", "token_noise", "lr", "compile", "max_passes")


def depth_for(minutes: float, step_flops: float) -> int:
    compute = minutes * 60 * step_flops / ANCHOR_COMPUTE  # in units of the anchor's
    depth = round(ANCHOR_DEPTH * compute ** (DEPTH_EXPONENT if compute >= 1 else BELOW_ANCHOR_EXPONENT))
    return max(MIN_DEPTH, min(MAX_DEPTH, depth))


def training_rate(compiled: bool, step_flops: float, peak_flops: float | None) -> float:
    """The model FLOP/s a sized run's steps are expected to reach: the anchor's eager rate, or for a
    compiled run COMPILED_MFU of the machine's matmul peak where that is more. The anchor's small
    matrices hide what big ones gain on a machine built for them: the Xeon with AMX runs the anchor
    1.6-1.7x as fast as the Zen 4 but its compiled 5 x 320 about 2.8x (690 against 249 GFLOP/s)."""
    if compiled and peak_flops:
        return max(step_flops, COMPILED_MFU * peak_flops)
    return step_flops


def predicted_passes(minutes: float, rate: float, shape: ModelConfig, corpus_tokens: int) -> float:
    """How many times a run of `minutes` whose steps reach `rate` model FLOP/s (`training_rate`) will
    go over `corpus_tokens` training tokens with a model of `shape`. A slight under-estimate where the
    anchor's rate stands: the Zen 4's compiled steps run 1.1-1.2x faster than its anchor's."""
    return minutes * 60 * rate / shape.flops_per_token() / corpus_tokens


def shape_for(depth: int) -> dict:
    """nanochat's rule: width 64 x depth, one head (and one key/value head) per 64 dimensions."""
    return dict(n_layer=depth, n_embd=HEAD_DIM * depth, n_head=depth, n_kv_head=depth)


def memorising_dropout(depth: int) -> float:
    """The residual dropout of a run of `depth` layers that will memorise its data (`sized_for_budget`)."""
    return min(MAX_DROPOUT, max(0.0, DROPOUT_PER_LAYER * (depth - ANCHOR_DEPTH)))


def sized_for_budget(
    minutes: float,
    step_flops: float,
    corpus_tokens: int,
    peak_flops: float | None = None,
    compiled: bool | None = None,
    kept: dict | None = None,
) -> dict:
    """The model's shape, regularisation and limits for a run of `minutes` on a machine whose training
    steps reach `step_flops` model FLOP/s (`anchor_step_flops`) and whose bf16 (or the run's dtype)
    matrix products reach `peak_flops`, over `corpus_tokens` training tokens.

    The depth grows with compute^DEPTH_EXPONENT, faster than the square-root rule because a small
    corpus runs out: past MAX_PASSES more passes stop helping and a bigger model is the better use of
    the compute. So where the next smaller model (past the anchor) would not reach MAX_PASSES in the
    budget, the data has not run out and that smaller model is the one trained: on the Zen 4, 15
    minutes takes the 5 x 320 to 11-12 passes and the 6 x 384 to 7.5, and the 5 x 320 scored 0.013
    better (the Xeon's 10 and 15 minutes take either to the cap, where they are level; NOTES.md,
    "Longer budgets on the Zen 4"). It steps down from STEP_DOWN_FROM only: depths 3 to 5 are where
    the sweeps chose between neighbours directly (90 seconds and 5 minutes on both machines).

    A model beyond the anchor depth that the budget lets see its data MEMORISING_PASSES times or more
    (`predicted_passes`) can memorise it, so it also gets residual dropout, DROPOUT_PER_LAYER for each
    layer past the anchor up to MAX_DROPOUT: a deeper model memorises faster (the sweeps: 0.2 at depth
    5 level with 0.25 over six seeds, 0.3 better than 0.2 at depth 6, 0.1 better than 0.2 at depth 4
    on the slower Zen 4, where 5 minutes sees Tiny Shakespeare 7 to 8 times), has TOKEN_NOISE of its
    input tokens replaced by random ones, and its output head learns at half the rate
    (MEMORISING_HEAD_LR). A model that sees its data only a few times needs none of them: on text from
    the Rust documentation the 4 x 256's 5-minute step count scored 0.10 bits/byte worse with them over
    5 MB (1.4 passes) and 0.15 worse over 1.8 MB (4.1 passes), 0.05 better over 0.9 MB (8 passes), as
    on Tiny Shakespeare (7.8 passes, 0.03 better); benchmarks/NOTES.md, "Other corpora".
    Every sized run stops after MAX_PASSES over its data, however long the budget: past that a small
    corpus is memorised faster than it is learnt, and a longer run would end worse than a shorter one.
    Budgets of COMPILE_MINUTES or more are compiled, unless `compiled` (the user's --compile or
    --no-compile) says otherwise; the passes are predicted at the rate of the steps the run will take,
    for the model the run will train: `kept` holds what the rule does not choose (the vocabulary,
    context and embedding tying: GPT-2's 50,257 tokens make each token's step several times dearer).
    """
    if compiled is None:
        compiled = minutes >= COMPILE_MINUTES
    rate = training_rate(compiled, step_flops, peak_flops)

    def passes(depth: int) -> float:
        shape = ModelConfig(**{**ANCHOR_SHAPE, **(kept or {}), **shape_for(depth)})
        return predicted_passes(minutes, rate, shape, corpus_tokens)

    depth = depth_for(minutes, step_flops)
    if depth >= STEP_DOWN_FROM and passes(depth - 1) < MAX_PASSES:
        depth -= 1
    memorises = depth > ANCHOR_DEPTH and passes(depth) >= MEMORISING_PASSES
    if memorises:
        dropout = memorising_dropout(depth)
        noise, lr = TOKEN_NOISE, MEMORISING_HEAD_LR
    else:
        dropout, noise, lr = 0.0, 0.0, HEAD_LR
    chosen = (*shape_for(depth).values(), dropout, noise, lr, compiled, MAX_PASSES)
    return dict(zip(CHOSEN, chosen, strict=True))


def describe(
    minutes: float,
    step_flops: float,
    measured: float,
    peak_flops: float | None,
    corpus_tokens: int,
    config: TrainConfig,
) -> str:
    """One line for the training log: the compute the budget buys and what the run uses."""
    now = "" if measured >= step_flops else f" (the best measured here; {measured / 1e9:,.0f} now)"
    rate = training_rate(config.compile, step_flops, peak_flops)
    steps_at = "" if rate == step_flops else f" at {rate / 1e9:,.0f} GFLOP/s ({COMPILED_MFU:.0%} of the matmul peak)"
    passes_seen = predicted_passes(minutes, rate, config.model_config(), corpus_tokens)
    passes = f"at most {config.max_passes:g} passes over the data" if config.max_passes else "no pass limit"
    return (
        f"budget {minutes:g} min x {step_flops / 1e9:,.0f} GFLOP/s of training steps{now} = "
        f"{minutes * 60 * step_flops:.2g} FLOPs -> {config.n_layer} layers x {config.n_embd} wide, "
        f"~{passes_seen:.1f} passes{steps_at} over {corpus_tokens:,} training tokens, dropout "
        f"{config.dropout:g}, token noise {config.token_noise:g}, head lr {config.lr:g}, "
        f"{'compiled' if config.compile else 'eager'}, {passes} "
        f"({'/'.join('--' + name.replace('_', '-') for name in CHOSEN)} choose yourself)"
    )
