"""Export a checkpoint to the Hugging Face format: a folder that `transformers` loads with
`AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained`, offline, with no custom code.

    python -m model.export --checkpoint out/chat --out hf/chat

Design decisions:
- The target is Qwen3 (`Qwen3ForCausalLM`), because our network is Qwen3 at a small size: the same
  pre-norm RMSNorm blocks, QK norm, rotary embeddings in the rotate-half layout, SwiGLU MLP, no
  biases, grouped-query attention and separate or tied embeddings, with the same module names
  (model/gpt.py). The weights therefore go across unchanged; only a `model.` prefix is added.
- Nothing is trusted on faith. The checkpoint's model description must consist of fields this
  mapping knows (a field from a newer version refuses the export rather than being dropped), and
  when `transformers` is installed the export is loaded back and its logits and tokenization are
  compared with ours before the folder is put in place; a mismatch is an error, not a warning.
- The tokenizer becomes a Hugging Face `tokenizers` pipeline that reproduces tiktoken exactly: our
  split pattern, then byte-level BPE whose merges are derived from the tiktoken ranks (each token's
  possible halves, in rank order, the conversion `transformers` itself uses for tiktoken models),
  with `ignore_merges` for tiktoken's whole-piece shortcut. Special tokens keep their ids. Like
  our engine's prompts, an encoded text starts with `<|endoftext|>` (the document start the model
  was trained to expect), so `model.generate(**tokenizer(text))` continues as `sample.py` does.
- A chat model gets its chat template as Jinja (model/chat_template.py builds it from the same
  special tokens). A base model gets none: our transcript template has no exact Jinja twin.
- `generation_config.json` carries our sampling defaults and stopping rules: stop at the end of a
  turn or document, never sample the other special tokens.
- The folder is built under a temporary name and renamed into place (model/files.py), so an
  interrupted export never leaves a half-written model where a user expects one.
- Past the context our engine attends to the newest `context` positions (a rolling cache,
  model/engine.py), so the export declares a sliding window as wide as the context in every layer:
  `transformers` then computes the same thing past `max_position_embeddings` too (tested).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from model.chat_template import TurnsTemplate, template_for
from model.checkpoint import POINTER
from model.config import ModelConfig
from model.errors import UserError, run_cli
from model.files import WRITE_ERRORS, fsync_folder, remove_abandoned, settle_files, temporary_name, writable_folder
from model.flags import HelpFormatter
from model.gpt import GPT
from model.sampling import SamplingConfig
from model.tokenizer import DOC_SEPARATOR, END_OF_TURN, SPECIAL_TOKENS, Tokenizer, _bytes_to_unicode

FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Every field of ModelConfig is one or the other; a field added later is refused until it is mapped.
MAPPED = {
    *("vocab_size", "context", "n_layer", "n_embd", "n_head", "n_kv_head", "head_dim", "mlp_hidden"),
    *("rope_theta", "norm_eps", "tie_embeddings"),
}
TRAINING_ONLY = {"dropout"}  # no effect at inference, so nothing to map


def qwen3_config(config: ModelConfig, tokenizer: Tokenizer, dtype: str, chat: bool) -> dict:
    """Our model config as a `Qwen3Config`: each field in MAPPED has its counterpart here."""
    special = tokenizer.special_ids
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": config.vocab_size,
        "hidden_size": config.n_embd,
        "intermediate_size": config.mlp_hidden,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.context,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,  # transformers 4.x reads this key; 5.x moves it into rope_parameters
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "tie_word_embeddings": config.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": True,  # past the context, attend to the newest `context` positions,
        "sliding_window": config.context,  # as our engine's rolling cache does (model/engine.py)
        "max_window_layers": 0,  # in every layer
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": special[DOC_SEPARATOR],
        "eos_token_id": special[END_OF_TURN if chat else DOC_SEPARATOR],
        "pad_token_id": special[DOC_SEPARATOR],
        "dtype": dtype,
        "torch_dtype": dtype,  # the same, under the name transformers 4.x reads
    }


def check_mappable(model_fields: dict) -> None:
    """Refuse a model description with fields this mapping does not know (written by a newer version)."""
    unknown = sorted(set(model_fields) - MAPPED - TRAINING_ONLY)
    if unknown:
        raise UserError(
            f"the checkpoint's model has settings this exporter cannot map onto Qwen3 ({', '.join(unknown)}); "
            "the export would compute something else. Export it with the version of pocketgpt that trained it"
        )
    config = ModelConfig.from_dict(model_fields)
    if config.head_dim % 2:
        raise UserError(f"head_dim {config.head_dim} is odd; rotary embeddings in Qwen3 need an even head size")


def hf_weights(model: GPT, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Our state dict under Qwen3's names (a `model.` prefix on everything but the head)."""
    weights = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            if model.config.tie_embeddings:
                continue  # the same tensor as the embedding; Qwen3 ties it again on load
            weights[name] = tensor
        else:
            weights[f"model.{name}"] = tensor
    return {name: tensor.detach().to(dtype).contiguous() for name, tensor in weights.items()}


def hf_tokenizer(tokenizer: Tokenizer):
    """A `tokenizers.Tokenizer` that encodes exactly like ours (tiktoken ranks -> byte-level BPE merges)."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer

    ranks = tokenizer.ranks
    byte_chars = _bytes_to_unicode()

    def spell(token: bytes) -> str:  # how byte-level BPE in `tokenizers` writes bytes
        return "".join(byte_chars[b] for b in token)

    merges = []
    for token in sorted(ranks, key=ranks.__getitem__):
        halves = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        halves.sort(key=lambda pair: (ranks[pair[0]], ranks[pair[1]]))
        merges += [(spell(left), spell(right)) for left, right in halves]
    vocab = {spell(token): rank for token, rank in ranks.items()}
    result = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    try:
        split = pre_tokenizers.Split(Regex(tokenizer.pattern), behavior="isolated")
    except Exception as error:  # `tokenizers` raises a bare Exception for a regex Oniguruma cannot read
        raise UserError(
            f"the tokenizer's split pattern cannot be written for Hugging Face tokenizers ({error}); "
            "retrain with this version's tokenizer to export"
        ) from None
    result.pre_tokenizer = pre_tokenizers.Sequence(
        [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    result.decoder = decoders.ByteLevel()
    result.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])
    moved = [t for t in SPECIAL_TOKENS if result.token_to_id(t) != tokenizer.special_ids[t]]
    if moved:
        raise UserError(
            f"the exported tokenizer would give {moved[0]} another id; the tokenizer files are inconsistent"
        )
    # A text starts a document, as our engine's prompts and the training data do (model/engine.py).
    start = (DOC_SEPARATOR, tokenizer.doc_separator)
    result.post_processor = processors.TemplateProcessing(
        single=f"{DOC_SEPARATOR} $A", pair=f"{DOC_SEPARATOR} $A {DOC_SEPARATOR} $B", special_tokens=[start]
    )
    return result


def tokenizer_config(tokenizer: Tokenizer, context: int, chat_template: str | None) -> dict:
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": DOC_SEPARATOR,
        "eos_token": END_OF_TURN if chat_template else DOC_SEPARATOR,
        "pad_token": DOC_SEPARATOR,
        "additional_special_tokens": [t for t in SPECIAL_TOKENS if t not in (DOC_SEPARATOR, END_OF_TURN)],
        "model_max_length": context,
        "truncation_side": "left",  # truncation=True keeps a long prompt's newest tokens, as our engine
        "padding_side": "left",  # a batch of prompts padded before them, as our engine: generate() continues each
        "model_input_names": ["input_ids", "attention_mask"],  # no token_type_ids: generate() would refuse them
        "clean_up_tokenization_spaces": False,
    }
    if chat_template:
        config["chat_template"] = chat_template
    return config


def generation_config(tokenizer: Tokenizer) -> dict:
    """Our sampling defaults; stop at the end of a turn or a document, never sample other special tokens."""
    special = tokenizer.special_ids
    defaults = SamplingConfig()
    stops = [special[END_OF_TURN], special[DOC_SEPARATOR]]
    return {
        "bos_token_id": special[DOC_SEPARATOR],
        "eos_token_id": stops,
        "pad_token_id": special[DOC_SEPARATOR],
        "suppress_tokens": [i for i in special.values() if i not in stops],
        "do_sample": True,
        "temperature": defaults.temperature,
        "top_k": defaults.top_k,
        "top_p": defaults.top_p,
        "max_new_tokens": defaults.max_new_tokens,
    }


def write_export(folder: Path, model: GPT, tokenizer: Tokenizer, meta: dict, dtype: str) -> None:
    """Every file of the Hugging Face folder, flushed to disk."""
    template = template_for(meta, tokenizer)
    chat_template = TurnsTemplate.jinja() if isinstance(template, TurnsTemplate) else None
    folder.mkdir()
    documents = {
        "config.json": qwen3_config(model.config, tokenizer, dtype, chat=chat_template is not None),
        "generation_config.json": generation_config(tokenizer),
        "tokenizer_config.json": tokenizer_config(tokenizer, model.config.context, chat_template),
    }
    for name, document in documents.items():
        (folder / name).write_text(json.dumps(document, indent=2, ensure_ascii=False) + "\n")
    hf_tokenizer(tokenizer).save(str(folder / "tokenizer.json"))
    save_file(hf_weights(model, DTYPES[dtype]), str(folder / "model.safetensors"), metadata={"format": "pt"})
    settle_files(folder)


@torch.inference_mode()
def compare_with_transformers(folder: Path, model: GPT, tokenizer: Tokenizer, sample_text: str) -> dict:
    """Load the export with `transformers` and compare logits on a random sequence and ids on `sample_text`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    exported = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()
    ids = torch.randint(
        0, model.config.vocab_size, (1, model.config.context), generator=torch.Generator().manual_seed(0)
    )
    ours = model.eval()(ids)
    theirs = exported(ids).logits
    hf_ids = AutoTokenizer.from_pretrained(folder, local_files_only=True).encode(sample_text)
    return {
        "max_logit_difference": float((ours - theirs).abs().max()),
        "logit_scale": float(ours.abs().max()),
        "same_ids": hf_ids == [tokenizer.doc_separator, *tokenizer.encode(sample_text)],
    }


def export(
    checkpoint_path: Path | str, out: Path | str, dtype: str = "float32", overwrite: bool = False, check: bool = True
) -> dict:
    """Write the Hugging Face folder `out` for a checkpoint; returns what the check measured (if run)."""
    from model.checkpoint import load_checkpoint

    out = Path(out)
    _check_destination(out, overwrite)
    checkpoint = load_checkpoint(checkpoint_path)
    check_mappable(checkpoint.meta["model"])
    model, tokenizer = checkpoint.load_model("cpu"), checkpoint.load_tokenizer()
    _check_finite(model, checkpoint.folder)
    writable_folder(out.parent, "the folder of --out")
    remove_abandoned(out.parent, prefix=out.name)  # only our own leftovers: the folder is the user's
    tmp = temporary_name(out)
    try:
        write_export(tmp, model, tokenizer, checkpoint.meta, dtype)
        result = {"checkpoint": str(checkpoint.folder), "out": str(out), "dtype": dtype}
        if check:
            result.update(_checked(tmp, model, tokenizer, dtype))
        _put_in_place(tmp, out)
    except WRITE_ERRORS as error:
        raise UserError(f"could not write the export to {out}: {error}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


def _checked(folder: Path, model: GPT, tokenizer: Tokenizer, dtype: str) -> dict:
    try:
        import transformers
    except ImportError:
        return {"checked": "no: transformers is not installed (pip install transformers)"}
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    rounded = copy.deepcopy(model).eval()  # ours with the export's precision, so only the code can differ
    for parameter in rounded.parameters():
        parameter.data = parameter.data.to(DTYPES[dtype]).float()
    sample = "The quick brown fox, 1234 times; naïve café — 日本語 🙂\n\n  indented\tline"
    try:
        found = compare_with_transformers(folder, rounded, tokenizer, sample)
    except Exception as error:  # whatever this version of transformers raises while loading
        raise UserError(
            f"transformers {transformers.__version__} could not load the export ({type(error).__name__}: {error}); "
            "nothing was written (--no-check writes it without this check)"
        ) from None
    if not found["max_logit_difference"] <= 1e-3 * max(1.0, found["logit_scale"]) or not found["same_ids"]:  # NaN too
        raise UserError(
            "transformers does not compute what this model computes (largest logit difference "
            f"{found['max_logit_difference']:.3g}, same token ids: {found['same_ids']}); nothing was written"
        )
    return {"checked": "yes: transformers loads it and computes the same logits and token ids", **found}


@torch.inference_mode()
def _check_finite(model: GPT, folder: Path) -> None:
    """Refuse a model whose logits are not numbers (a run that diverged, damaged settings): checked
    or not, such an export would load and generate nothing but one token."""
    ids = torch.arange(model.config.context).remainder(model.config.vocab_size)[None]
    if not torch.isfinite(model.eval()(ids)).all():
        raise UserError(
            f"the model in {folder} computes logits that are not numbers: its weights or settings are damaged "
            "(or its training diverged); export an earlier checkpoint"
        )


def _check_destination(out: Path, overwrite: bool) -> None:
    """`out` must be new, empty, or (with overwrite) an earlier export: never a folder of other files,
    nor inside a run or checkpoint folder, whose step folders training deletes as it saves."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; --out names the folder to create")
    for folder in out.resolve().parents:
        if (folder / "checkpoint.json").is_file() or (folder / POINTER).is_file():
            raise UserError(
                f"--out {out} is inside the run or checkpoint folder {folder}, whose checkpoints training "
                "replaces and deletes; export to a folder outside it"
            )
    existing = {p.name for p in out.iterdir()} if out.is_dir() else set()
    if existing and not existing <= set(FILES):
        raise UserError(
            f"{out} holds files that are not an export ({sorted(existing - set(FILES))[0]}); choose a new folder"
        )
    if existing and not overwrite:
        raise UserError(f"{out} already holds an export; pass --overwrite to replace it")


def _put_in_place(tmp: Path, out: Path) -> None:
    """Rename the finished folder into place; an earlier export is moved aside first, then deleted."""
    old = temporary_name(out.with_name(f"{out.name}.old")) if out.exists() else None
    if old is not None:
        os.replace(out, old)
    os.replace(tmp, out)
    fsync_folder(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m model.export",
        description="Export a checkpoint to a Hugging Face transformers folder (Qwen3 architecture).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--checkpoint", required=True, help="run folder (its best checkpoint) or checkpoint folder")
    parser.add_argument("--out", required=True, help="folder to create for the exported model")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES), help="precision of the exported weights")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    parser.add_argument(
        "--no-check", action="store_true", help="do not load the export with transformers to compare it with ours"
    )
    return parser


def main() -> None:
    args = build_parser().parse_args()
    result = export(args.checkpoint, args.out, args.dtype, args.overwrite, check=not args.no_check)
    print(f"exported {result['checkpoint']} to {result['out']} ({result['dtype']} weights)")
    print(f"checked: {result['checked']}" if "checked" in result else "checked: no (--no-check)")
    if "max_logit_difference" in result:
        print(
            f"largest logit difference: {result['max_logit_difference']:.2e} (logits up to {result['logit_scale']:.1f})"
        )
    print(
        f"load it with: AutoModelForCausalLM.from_pretrained({str(result['out'])!r}) and AutoTokenizer.from_pretrained(...)"
    )


if __name__ == "__main__":
    run_cli(main, sigterm=True)  # a half-built folder is removed, as on Ctrl-C
