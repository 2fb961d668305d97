"""The network and the generation engine: causality, KV cache = recomputation, learning."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from model import native
from model.config import ModelConfig
from model.engine import SHORT_PROMPT, Engine, with_matrices_in
from model.gpt import GPT, causal_attention
from model.sampling import Sampler, SamplingConfig
from model.tokenizer import END_OF_TURN, build_char

TOKENIZER = build_char(["abcdefghijklmnopqrstuvwxyz .,\n"])


def tiny_model(context: int = 32, n_kv_head: int = 2, seed: int = 0, n_embd: int = 32, spare_ids: int = 0) -> GPT:
    torch.manual_seed(seed)
    vocab_size = TOKENIZER.n_vocab + spare_ids  # spare ids: rows the tokenizer never uses
    config = ModelConfig(
        vocab_size=vocab_size, context=context, n_layer=2, n_embd=n_embd, n_head=4, n_kv_head=n_kv_head
    )
    return GPT(config).eval()


@torch.no_grad()
def on_the_int8_grid(model: GPT) -> GPT:
    """Round every matrix so that the decode step's int8 copy of it (norm scales folded in, one scale
    per output row) is exact: then the int8 step must compute what the model computes."""
    folds = [(layer.input_layernorm, [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj])
             for layer in model.layers]  # fmt: skip
    folds += [(layer.post_attention_layernorm, [layer.mlp.gate_proj, layer.mlp.up_proj]) for layer in model.layers]
    folds += [(None, [layer.self_attn.o_proj, layer.mlp.down_proj]) for layer in model.layers]
    folds += [(model.norm, [model.lm_head])]
    for norm, linears in folds:
        fold = 1.0 if norm is None else norm.weight * norm.weight.numel() ** 0.5
        for linear in linears:
            folded = linear.weight * fold
            scale = folded.abs().amax(dim=1, keepdim=True) / 127
            linear.weight.copy_((folded / scale).round() * scale / fold)
    return model


def test_future_tokens_never_change_past_logits():
    model = tiny_model()
    tokens = torch.randint(0, TOKENIZER.n_vocab, (2, 24))
    changed = tokens.clone()
    changed[:, 12:] = torch.randint(0, TOKENIZER.n_vocab, (2, 12))
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    assert torch.allclose(a[:, :12], b[:, :12], atol=1e-6)
    assert not torch.allclose(a[:, 12:], b[:, 12:], atol=1e-3)


class SlidingWindow:
    """Stands in for a cache in GPT.forward: caches nothing, lets each position attend to itself and
    the `width - 1` before it, except the first `pads` positions (left padding, which nothing else
    sees and which takes no rotary positions)."""

    def __init__(self, length: int, width: int, pads: int = 0):
        i = torch.arange(length)
        self.positions = (i - pads).clamp(min=0)[None]
        band = (i[:, None] >= i[None]) & (i[:, None] - i[None] < width) & (i[None] >= pads)
        self.attn_mask = (band | torch.eye(length, dtype=torch.bool))[None, None]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return k, v


def reference_greedy(model: GPT, prompt: list[int], steps: int, pads: int = 0) -> list[int]:
    """Greedy decoding that recomputes the whole sequence every token (no cache), each position
    attending to the newest `context` ones: what the engine's rolling cache computes (`pads`: the
    prompt left-padded by that many positions, as in a batch with a longer prompt)."""
    sequence, out = [0] * pads + list(prompt), []
    for _ in range(steps):
        window = SlidingWindow(len(sequence), model.config.context, pads)
        with torch.no_grad():
            logits = model(torch.tensor([sequence]), cache=window)[0, -1, : TOKENIZER.n_vocab].clone()
        logits[list(TOKENIZER.special_ids.values())] = float("-inf")  # generation never emits them
        out.append(int(logits.argmax()))
        sequence.append(out[-1])
    return out


def engine_texts(
    engine: Engine, prompts: list[list[int]], steps: int, sampling: SamplingConfig | None = None
) -> list[str]:
    """Each row's text from the engine's stream: `steps` tokens, greedy unless `sampling` says otherwise."""
    texts = [""] * len(prompts)
    sampling = replace(sampling or SamplingConfig(temperature=0, stop_at_special=False), max_new_tokens=steps)
    for row, piece in engine.stream(prompts, sampling):
        texts[row] += piece
    return texts


def test_kv_cache_generation_equals_full_recomputation_also_past_the_context():
    model = tiny_model(context=16)
    engine = Engine(model, TOKENIZER)
    prompt = [TOKENIZER.doc_separator, *TOKENIZER.encode("hello there")]
    steps = 50  # wraps the 16-token ring several times
    expected = TOKENIZER.decode(reference_greedy(model, prompt, steps))
    assert engine_texts(engine, [prompt], steps) == [expected]


@pytest.mark.parametrize("use_c", [True, False])
def test_a_left_padded_row_keeps_its_padding_masked_until_the_ring_overwrites_it(use_c):
    """Past the context a batch's rows share one ring, so a padded row attends to the newest `context`
    positions of its padded sequence (pads masked), which is what the reference computes."""
    model = tiny_model(context=16)
    engine = Engine(model, TOKENIZER, use_c=use_c)
    assert bool(engine.decoder.native) == use_c, "the C decode step needs a C compiler (cc)"
    prompts = [[TOKENIZER.doc_separator, *TOKENIZER.encode(text)] for text in ("hello there, friend", "hi")]
    pads = len(prompts[0]) - len(prompts[1])
    steps = 40
    expected = [TOKENIZER.decode(reference_greedy(model, prompts[0], steps))]
    expected.append(TOKENIZER.decode(reference_greedy(model, prompts[1], steps, pads)))
    assert pads > 2 and engine_texts(engine, prompts, steps) == expected


@pytest.mark.parametrize("weights", ["initial", "large"])
@pytest.mark.parametrize("decoder", ["c fp32", "c int8", "c bf16 cache", "torch"])
@pytest.mark.parametrize("width", [32, 40, 72])
def test_the_fused_decode_step_computes_what_the_model_computes(weights, decoder, width):
    # Grouped-query attention: 4 query heads, 2 key/value heads. A vocabulary of 266 leaves a partial
    # block of 4 outputs in the C step's int8 dot products; width 72 gives heads of 18, a block of
    # 16 and a tail in its attention's dot products.
    model = tiny_model(context=32, n_kv_head=2, n_embd=width, spare_ids=0 if width == 32 else 266 - TOKENIZER.n_vocab)
    # Small initial weights show the norms' epsilon; weights as large as a trained model's show every folded scale.
    with torch.no_grad():
        for name, param in model.named_parameters() if weights == "large" else ():
            param.copy_(
                1 + 0.3 * torch.randn_like(param) if name.endswith("norm.weight") else 0.3 * torch.randn_like(param)
            )
    int8 = decoder.endswith("int8")
    if int8:  # rounding the weights is what int8 costs (benchmarks/NOTES.md); the arithmetic is checked here
        on_the_int8_grid(model)
    bf16 = decoder.endswith("bf16 cache")  # a bf16 engine: bf16 prefill, keys and values cached in bf16
    dtype = torch.bfloat16 if bf16 else torch.float32
    engine = Engine(model, TOKENIZER, dtype, use_c=decoder.startswith("c"), int8_weights=int8)
    assert bool(engine.decoder.native) == decoder.startswith("c"), "the C decode step needs a C compiler (cc)"
    # fp32 must agree to rounding error; int8 to that of the activations, which it rounds to 16 bits;
    # bf16 to bf16's (each cached key and value rounded by up to 2^-9).
    tolerance = 0.03 if bf16 else 1e-3 if int8 else 1e-4
    tokens = torch.randint(0, TOKENIZER.n_vocab, (2, 20))
    valid = torch.ones_like(tokens, dtype=torch.bool)
    valid[1, :5] = False  # row 1 is left-padded: its first five positions must be masked out
    with torch.no_grad():
        for t in (6, 7, 19):
            cache, _ = engine._prefill(tokens[:, :t], valid[:, :t])
            assert cache.keys.dtype == cache.values.dtype == dtype
            step = engine._step(cache, tokens[:, t], valid[:, : t + 1])
            alone = [model(tokens[row : row + 1, 5 * row : t + 1])[0, -1] for row in (0, 1)]
            full = torch.stack(alone)
            assert (step - full).abs().max() < tolerance * full.abs().max(), t
            assert cache.length == t + 1


def test_the_portable_c_step_built_without_processor_tuning_computes_the_same(monkeypatch):
    """The build for this processor vectorises the int8 dot products with its widest instructions; the
    baseline build, which a CPU the compiler does not know gets, is checked too."""
    from model import native

    monkeypatch.setattr(native, "TUNED", [])  # no -march=native: the compiler's baseline instructions
    native.load.cache_clear()
    try:
        model = tiny_model(context=32, n_kv_head=2, n_embd=40)
        with torch.no_grad():  # weights as large as a trained model's
            for param in model.parameters():
                param.copy_(0.3 * torch.randn_like(param) + (1 if param.dim() == 1 else 0))
        engine = Engine(on_the_int8_grid(model), TOKENIZER, int8_weights=True)
        assert engine.decoder.native, "the C decode step needs a C compiler (cc)"
        assert native.load()._name == str(native._library_path(native._compiler(), native.FLAGS))  # the untuned build
        tokens = torch.randint(0, TOKENIZER.n_vocab, (1, 12))
        with torch.no_grad():
            cache, _ = engine._prefill(tokens[:, :11], torch.ones(1, 11, dtype=torch.bool))
            step = engine._step(cache, tokens[:, 11], torch.ones(1, 12, dtype=torch.bool))
            full = model(tokens)[:, -1]
        assert (step - full).abs().max() < 1e-3 * full.abs().max()
    finally:
        native.load.cache_clear()  # the next test loads the tuned library again


def c_decoder_and_cache(rows: int):
    """A C decoder of a 16-token tiny model, and an empty fp32 key/value cache for `rows` rows."""
    model = tiny_model(context=16)
    decoder = Engine(model, TOKENIZER).decoder
    assert decoder.native, "the C decode step needs a C compiler (cc)"
    c = model.config
    keys = torch.zeros(c.n_layer, rows, c.n_kv_head, c.context, c.head_dim)
    return decoder, c, keys, torch.zeros_like(keys)


def test_the_c_decode_step_refuses_tokens_lengths_masks_and_caches_outside_its_arrays():
    decoder, c, keys, values = c_decoder_and_cache(rows=1)
    too_long = torch.ones(1, c.context + 1, dtype=torch.bool)  # a mask reaching past the ring's slots
    for token, length, mask in ((c.vocab_size, 3, None), (-1, 3, None), (0, -1, None), (0, 3, too_long)):
        with pytest.raises(IndexError):
            decoder.step(torch.tensor([token]), torch.tensor([3]), keys, values, length, mask)
    short = keys[:, :, :, :8].contiguous()  # a cache shorter than the context it would be indexed by
    with pytest.raises(ValueError):
        decoder.step(torch.tensor([0]), torch.tensor([3]), short, short.clone(), 3, None)
    assert keys.abs().sum() == 0 and values.abs().sum() == 0  # refused before writing anything
    assert (
        decoder.step(torch.tensor([c.vocab_size - 1]), torch.tensor([3]), keys, values, c.context - 1, None)
        .isfinite()
        .all()
    )


@pytest.mark.parametrize("length", [1, SHORT_PROMPT])
def test_a_short_prompt_fed_through_the_decode_step_fills_the_cache_a_forward_pass_would(length):
    model = tiny_model(context=16)
    engine = Engine(model, TOKENIZER)
    assert engine.decoder.native, "the C decode step needs a C compiler (cc)"
    tokens, valid = torch.randint(0, TOKENIZER.n_vocab, (1, length)), torch.ones(1, length, dtype=torch.bool)
    with torch.no_grad():
        stepped, logits = engine._prefill(tokens, valid)
        engine.decoder.native = None  # the batched forward pass, as for a longer prompt
        batched, expected = engine._prefill(tokens, valid)
    assert torch.allclose(logits, expected, atol=1e-4) and stepped.length == batched.length == length
    assert torch.allclose(stepped.keys, batched.keys, atol=1e-5)
    assert torch.allclose(stepped.values, batched.values, atol=1e-5)
    assert torch.equal(stepped.positions, batched.positions)


@pytest.mark.parametrize("tied", [False, True])
def test_the_prefill_with_matrices_cast_once_computes_exactly_what_autocast_computes(tied):
    model = tiny_model()
    if tied:
        model.lm_head.weight = model.embed_tokens.weight
    tokens = torch.randint(0, TOKENIZER.n_vocab, (2, 20))
    cast = with_matrices_in(model, torch.bfloat16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(cast(tokens), model(tokens))
    assert cast.lm_head.weight.dtype == torch.bfloat16
    assert (
        model.lm_head.weight.dtype == model.embed_tokens.weight.dtype == cast.embed_tokens.weight.dtype == torch.float32
    )


def test_a_prompt_longer_than_the_context_is_conditioned_on_its_newest_tokens():
    model = tiny_model(context=16)
    engine = Engine(model, TOKENIZER)
    prompt = [TOKENIZER.doc_separator, *TOKENIZER.encode("a long prompt, longer than the window")]
    assert len(prompt) > 16
    assert engine_texts(engine, [prompt], 10) == engine_texts(engine, [prompt[-16:]], 10)


def test_a_batch_of_different_prompts_matches_each_prompt_alone():
    model = tiny_model(context=64)
    engine = Engine(model, TOKENIZER)
    prompts = [engine.encode_prompt(text) for text in ("a", "the quick brown fox", "jumps over")]
    batch = engine_texts(engine, prompts, 20)
    alone = [engine_texts(engine, [p], 20)[0] for p in prompts]
    assert batch == alone


def test_sampling_is_reproducible_with_a_seed_and_respects_stops():
    engine = Engine(tiny_model(), TOKENIZER)
    sampling = SamplingConfig(max_new_tokens=30, temperature=1.0, top_k=10, top_p=0.9, seed=7)
    first, second = engine.generate(["ab"], sampling), engine.generate(["ab"], sampling)
    assert first == second
    text = first[0]
    stop = text[5:7]
    stopped = engine.generate(
        ["ab"], SamplingConfig(max_new_tokens=30, temperature=1.0, top_k=10, top_p=0.9, seed=7, stop=(stop,))
    )
    assert stopped[0] == text[: text.find(stop)]
    longer, shorter = text[4:8], text[6:8]  # the shorter one ends inside the longer one
    earliest = text[: min(text.find(longer), text.find(shorter))]
    for stops in ((shorter, longer), (longer, shorter)):
        sampling = SamplingConfig(max_new_tokens=30, temperature=1.0, top_k=10, top_p=0.9, seed=7, stop=stops)
        assert engine.generate(["ab"], sampling)[0] == earliest, stops


@pytest.mark.parametrize("stops", [("he", "the"), ("the", "he")])
def test_several_stops_cut_at_the_earliest_match_whatever_their_order(stops):
    from model.engine import TextStream

    for pieces in ([b"And the end"], [b"And t", b"he end"], [b"And th", b"e end"]):
        stream = TextStream(stops)
        text = "".join(stream.push(piece) for piece in pieces) + stream.push(b"", final=True)
        assert text == "And " and stream.stopped, (pieces, text)


def sampler_for(draw: str, **knobs) -> Sampler:
    """A Sampler that draws in C ("c", which needs a compiler) or in PyTorch ("torch")."""
    library = native.load() if draw == "c" else None
    assert library or draw == "torch", "the C sampling step needs a C compiler (cc)"
    return Sampler(SamplingConfig(**knobs), TOKENIZER, torch.device("cpu"), library)


@pytest.mark.parametrize("draw", ["c", "torch"])
def test_sampling_draws_from_the_tempered_softmax_cut_by_top_k_and_top_p(draw):
    n, rows = TOKENIZER.n_vocab, 20_000
    logits = torch.full((n,), float("-inf"))  # six possible tokens, the rest banned
    logits[10:16] = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -1.0])

    def frequencies(**knobs) -> torch.Tensor:
        tokens = sampler_for(draw, seed=0, **knobs).draw(logits.expand(rows, n).contiguous())
        return torch.bincount(tokens, minlength=n).float() / rows

    def softmax_of(kept: int, temperature: float) -> torch.Tensor:
        cut = logits.clone()
        cut[10 + kept :] = float("-inf")
        return torch.softmax(cut / temperature, dim=-1)

    # 20,000 draws: the standard error of a frequency is at most 0.0036, so 0.015 is four of them.
    assert (frequencies(temperature=1.0) - softmax_of(6, 1.0)).abs().max() < 0.015
    assert (frequencies(temperature=0.5) - softmax_of(6, 0.5)).abs().max() < 0.015
    assert (frequencies(temperature=1.0, top_k=3) - softmax_of(3, 1.0)).abs().max() < 0.015
    # Probabilities 0.42, 0.25, 0.15, 0.09, ...: the first three reach 0.7 only with the third one.
    assert (frequencies(temperature=1.0, top_p=0.7) - softmax_of(3, 1.0)).abs().max() < 0.015


@pytest.mark.parametrize(
    "knobs",
    [
        dict(temperature=0),
        dict(temperature=0.7),
        dict(temperature=1.3, top_k=5),
        dict(temperature=1.0, top_p=0.8),
        dict(temperature=0.9, top_k=40, top_p=0.9),
        dict(temperature=1.0, top_k=TOKENIZER.n_vocab),  # k as large as the vocabulary: no cut
        dict(temperature=1.0, top_k=2**32 + 1),  # larger than a C int holds (it would wrap to 1): no cut
        dict(temperature=1.0, stop_at_special=False),  # every special token banned
    ],
)
def test_the_c_sampler_draws_exactly_the_tokens_of_the_pytorch_rule(knobs):
    """Same logits and the same random numbers (one seed): the same token in every row. The logits
    are wider than the vocabulary, as a model's may be, and the likeliest ones in each row are banned."""
    in_c, in_torch = sampler_for("c", seed=3, **knobs), sampler_for("torch", seed=3, **knobs)
    torch.manual_seed(0)
    logits = 3 * torch.randn(500, TOKENIZER.n_vocab + 6)
    logits[:, in_c.banned] += 20
    drawn = in_c.draw(logits)
    assert torch.equal(drawn, in_torch.draw(logits))
    assert drawn.max() < TOKENIZER.n_vocab and not set(drawn.tolist()) & set(in_c.banned.tolist())
    assert len(set(drawn.tolist())) > (1 if knobs["temperature"] == 0 else 50)  # not a constant


@pytest.mark.parametrize("temperature", [1e-30, 1e-40, 1e-46])  # 1e-46 is 0 as a float32
@pytest.mark.parametrize("draw", ["c", "torch"])
def test_a_tiny_temperature_draws_the_likeliest_token(draw, temperature):
    """Logits over a tiny temperature overflow to +-inf, whose softmax is NaN: never a banned token."""
    greedy = sampler_for(draw, temperature=0)
    torch.manual_seed(0)
    logits = 3 * torch.randn(500, TOKENIZER.n_vocab + 6)
    logits[:, greedy.banned] += 20
    for top_p in (1.0, 0.9):
        tiny = sampler_for(draw, seed=3, temperature=temperature, top_p=top_p)
        assert torch.equal(tiny.draw(logits), greedy.draw(logits)), top_p


@pytest.mark.parametrize(
    "knobs",
    [dict(temperature=0), dict(temperature=1.0), dict(temperature=1.0, top_k=8, top_p=0.9)],
)
def test_decoding_runs_of_tokens_in_c_generates_what_the_pytorch_loop_generates(knobs):
    """Three prompts of different lengths (left-padded), 70 tokens each: the C loop's runs of up to
    TOKENS_PER_CALL tokens run across the wrap of the 32-slot ring and end at the last token, and rows stop
    at different times on the end-of-turn token, which this model draws often."""
    model = tiny_model(context=32)
    with torch.no_grad():
        model.lm_head.weight[TOKENIZER.special_ids[END_OF_TURN]] *= 0.3 if knobs["temperature"] else 0.0
        model.lm_head.weight[TOKENIZER.special_ids[END_OF_TURN]] += 0.05
    prompts = [TOKENIZER.encode(text) for text in ("a", "the quick brown fox", "jumps over")]
    sampling = SamplingConfig(seed=11, **knobs)
    in_c, in_torch = Engine(model, TOKENIZER), Engine(model, TOKENIZER, use_c=False)
    assert in_c.decoder.native, "the C decode step needs a C compiler (cc)"
    texts = [engine_texts(engine, prompts, 70, sampling) for engine in (in_c, in_torch)]
    assert texts[0] == texts[1]
    lengths = sorted(len(TOKENIZER.encode(text)) for text in texts[0])
    assert lengths[0] < lengths[-1] and lengths[-1] > 32, lengths  # rows ended apart, one went past the context


def test_the_c_decode_loop_ends_when_every_row_is_done_and_refuses_masks_past_the_ring():
    decoder, c, keys, values = c_decoder_and_cache(rows=2)
    last, positions = torch.tensor([3, 4]), torch.tensor([0, 0])
    greedy = sampler_for("c", temperature=0, stop_at_special=False)
    done = torch.tensor([0, 0], dtype=torch.uint8)
    drawn = decoder.decode_tokens(greedy, last, positions, keys, values, 0, None, done, 8)
    assert drawn.shape == (8, 2) and done.tolist() == [0, 0]  # no token stops a row
    stop = int(drawn[0, 0])  # row 0's first token now stops it; row 1 never draws it and is done already
    assert stop not in drawn[:, 1].tolist()
    greedy.stop_flags[stop] = 1
    done = torch.tensor([0, 1], dtype=torch.uint8)
    assert decoder.decode_tokens(greedy, last, positions, keys, values, 0, None, done, 8).shape == (1, 2)
    assert done.tolist() == [1, 1]
    too_long = torch.ones(2, c.context + 1, dtype=torch.bool)  # masks more positions than the ring has slots
    with pytest.raises(IndexError):
        decoder.decode_tokens(greedy, last, positions, keys, values, 10, too_long, done, 8)
    with pytest.raises(IndexError):
        decoder.decode_tokens(greedy, torch.tensor([3, c.vocab_size]), positions, keys, values, 0, None, done, 8)


def test_generation_never_emits_special_tokens_except_the_ones_that_stop_it():
    model = tiny_model()
    special = list(TOKENIZER.special_ids.values())
    with torch.no_grad():  # ordinary tokens all score 0, so some special token is the likeliest
        ordinary = [i for i in range(TOKENIZER.n_vocab) if i not in special]
        model.lm_head.weight[ordinary] = 0
        prompt = torch.tensor([[TOKENIZER.doc_separator, *TOKENIZER.encode("ab")]])
        assert int(model(prompt)[0, -1].argmax()) in special
    engine = Engine(model, TOKENIZER)
    text = engine.generate(["ab"], SamplingConfig(max_new_tokens=20, temperature=0, stop_at_special=False))[0]
    assert "<|" not in text and len(text) == 20


def test_streaming_never_splits_a_character():
    from model.engine import TextStream

    stream = TextStream(stops=())
    data = "é😀".encode()
    pieces = [stream.push(data[i : i + 1]) for i in range(len(data))] + [stream.push(b"", final=True)]
    assert [p for p in pieces if p] == ["é", "😀"]


def test_a_tiny_model_overfits_a_small_batch():
    model = tiny_model().train()
    batch = torch.randint(0, TOKENIZER.n_vocab, (4, 17))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(150):
        loss = model(batch[:, :-1], batch[:, 1:])
        first = first or loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert first > 4.0 and loss.item() < 0.1


def test_training_under_bf16_autocast_carries_a_bf16_residual_stream_and_scoring_an_fp32_one():
    """The cast halves the bytes the elementwise passes move in training; scoring and generation must
    not pay for it in precision, and the fp32 embedding must still get its gradient."""
    model = tiny_model()
    batch = torch.randint(0, TOKENIZER.n_vocab, (2, 9))
    seen = []
    model.layers[1].register_forward_pre_hook(lambda block, args: seen.append(args[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.train()(batch[:, :-1], batch[:, 1:]).backward()
        model.eval()(batch)
    model.train()(batch)  # training without autocast (a CPU without bf16): fp32 throughout
    assert seen == [torch.bfloat16, torch.float32, torch.float32]
    gradient = model.embed_tokens.weight.grad
    assert gradient.dtype == torch.float32 and gradient[batch[:, :-1].unique()].abs().sum(dim=1).min() > 0


def test_the_config_counts_the_parameters_the_model_will_have():
    """The memory check (training/memory.py) sizes a run from the config before building it, and the
    budget rule (training/budget.py) weighs shapes by their FLOPs, which count the weights but the embedding."""
    shapes = [
        ModelConfig(),
        ModelConfig(vocab_size=512, n_layer=2, n_embd=64, n_head=2, n_kv_head=1, tie_embeddings=True),
        ModelConfig(vocab_size=300, n_layer=3, n_embd=96, n_head=6, n_kv_head=3, mlp_hidden=200),
    ]
    for config in shapes:
        model = GPT(config)
        assert config.num_parameters() == model.num_parameters()
        assert config.num_parameters(include_embedding=False) == model.num_parameters(include_embedding=False)


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (3, 1)])
def test_cpu_matmul_attention_equals_the_fused_kernel_in_value_and_gradient(heads, kv_heads):
    torch.manual_seed(0)
    q = torch.randn(2, heads, 48, 16, requires_grad=True)
    k, v = (torch.randn(2, kv_heads, 48, 16, requires_grad=True) for _ in range(2))
    ours = causal_attention(q, k, v)
    reference = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=heads != kv_heads)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    grads = torch.autograd.grad(ours.square().sum(), (q, k, v))
    reference_grads = torch.autograd.grad(reference.square().sum(), (q, k, v))
    for grad, reference_grad in zip(grads, reference_grads, strict=True):
        torch.testing.assert_close(grad, reference_grad, rtol=1e-4, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the training dtype: bf16 scores and softmax
        rough = causal_attention(q, k, v)
    assert rough.dtype == torch.bfloat16
    torch.testing.assert_close(rough.float(), reference, rtol=0.05, atol=0.05)


def test_an_asked_for_bf16_that_is_emulated_is_noted_once(capsys):
    from model.device import cpu_has_native_bf16, note_emulated_bf16, pick_dtype

    note_emulated_bf16.cache_clear()
    assert pick_dtype(torch.device("cpu"), "bf16") == torch.bfloat16
    assert pick_dtype(torch.device("cpu"), "bf16") == torch.bfloat16
    noted = capsys.readouterr().err.count("--dtype bf16 is emulated")
    assert noted == (0 if cpu_has_native_bf16() else 1)  # a CPU with bf16 units gets no note
