"""The training loop: prepare, build, step, evaluate, sample, checkpoint, report.

Design decisions:
- One program for one process or many (torchrun): the data for each step depends only on
  (seed, step) (see data/loader.py), gradients are averaged by DDP, and only rank 0 evaluates,
  prints and writes. The same flags give the same global batch either way.
- Budgets: `--max-steps`, `--max-minutes`, `--max-passes` over the training data, or several
  (whichever ends first). The learning-rate schedule follows the budget, so a time-limited run
  decays into its deadline, and a pass-limited one into its last pass.
- Resume restores everything the next step depends on: weights, optimizer moments, step, elapsed
  time and RNG state; the data order needs no state. So a resumed run continues with the same
  losses it would have had.
- Evaluation reports validation loss and bits per byte on a fixed slice of the validation tokens,
  prints a short sample through the generation engine, appends to `metrics.jsonl` and saves a
  checkpoint, all of the weights the run delivers: the output temperature (set by the passes made over
  the training data, or fitted on held-out training tokens with `--calibration-tokens`) folded into the
  final norm (training/calibration.py). Training goes on from its own norm, which the checkpoint's
  trainer state keeps for `--resume`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from data.conversations import load_conversations
from data.loader import Batches, ConversationBatches
from data.prepare import DEFAULT_CACHE, Prepared, prepare
from model.chat_template import TurnsTemplate, prompt_budget, stream_reply
from model.checkpoint import METRICS, POINTER, Checkpoint, load_checkpoint, save_checkpoint, strangers, write_failed
from model.config import ModelConfig
from model.device import autocast, can_compile, machine_name, matmul_peak_flops, pick_dtype, remembered_best
from model.engine import Engine
from model.errors import UserError
from model.evaluate import bits_per_byte, score
from model.files import writable_folder, write_atomically
from model.gpt import GPT
from model.sampling import SamplingConfig
from training import distributed
from training.allocator import keep_freed_memory
from training.budget import MEMORISING_PASSES, describe
from training.calibration import fit_temperature, held_out_count, temperature_for_passes
from training.config import (
    MODEL_SHAPE,
    RUN_IDENTITY,
    TrainConfig,
    assemble,
    budget_minutes,
    check_unchanged,
    checked_config,
    inherited,
    saved_arguments,
    to_dict,
)
from training.machine_speed import anchor_step_flops, peak_name
from training.memory import check_fits
from training.optim import build_optimizers, cooling, lr_factor, set_lr
from training.run_lock import remove_if_unused, run_folder_lock


class Trainer:
    def __init__(
        self,
        config: TrainConfig,
        base: Checkpoint | None,
        resuming: bool,
        peak_flops: float | None = None,
        dist: distributed.Distributed | None = None,
    ):
        self.config = config
        self.dist = dist or distributed.setup(config.device)
        self.device = self.dist.device
        self.dtype = pick_dtype(self.device, config.dtype)
        self.out_dir = Path(config.out_dir)
        # The MFU's denominator, measured before seeding: its random matrices would move the dropout masks.
        self.peak_flops = peak_flops or matmul_peak_flops(self.device, self.dtype)
        torch.manual_seed(config.seed)

        self.chat = bool(config.chat_data)
        if self.chat and base is None:
            raise UserError("chat fine-tuning starts from a trained model: add --init-from out/base (or --resume)")
        self.data = None if self.chat else prepare_corpus(config, base, self.dist)
        if resuming and self.data:
            check_same_data(self.data.manifest, base.meta.get("data") or {}, config.data)
        self.tokenizer = base.load_tokenizer() if self.chat else self.data.tokenizer
        self.data_info = base.meta.get("data") if self.chat else self.data.manifest
        self.chat_info = base.meta.get("chat") if base else None
        self.model = base.load_model(self.device) if base else GPT(self._model_config()).to(self.device)
        if base:  # --dropout belongs to this run, also when it starts from a checkpoint
            self.model.set_dropout(config.dropout)
        self.optimizers = build_optimizers(self.model, config, self.dtype, fused=self.device.type == "cuda")
        self.calibration_tokens = None  # held-out training tokens that fit the output temperature
        self.step, self.elapsed, self.tokens_seen = 0, 0.0, 0
        if resuming:
            self._restore(base)
        if self.dist.is_main:  # the log keeps only steps a checkpoint holds: a fresh run's starts empty
            self._forget_metrics_after(self.step)
        self.train_model = self.model
        if config.compile:
            self.train_model = torch.compile(self.train_model)
        if self.dist.world > 1:
            self.train_model = DistributedDataParallel(self.train_model)
        context = self.model.config.context
        if self.chat:
            self.batches, self.val_batches = self._conversation_batches(context)
        else:
            train_tokens = self.data.tokens("train")
            if config.calibration_tokens:  # the end of the training split, never trained on
                held_out = held_out_count(config.calibration_tokens, len(train_tokens))
                self.calibration_tokens = train_tokens[len(train_tokens) - held_out :]
                train_tokens = train_tokens[: len(train_tokens) - held_out]
            try:
                self.batches = Batches(
                    train_tokens, context, config.seed, config.token_noise, self.tokenizer.doc_separator
                )  # noise replaces inputs by ordinary ids, those below the special tokens
            except ValueError:
                raise UserError(
                    f"the training text is shorter than one window of {context} tokens; use more text or a smaller --context"
                ) from None
            self.val_tokens = self.data.tokens("val")
        self.token_bytes = torch.tensor(self.tokenizer.token_byte_lengths())
        self.rows_per_micro = config.batch_size // config.grad_accum // self.dist.world  # whole: checked_config
        self.metrics: dict = {}
        self.best: dict = base.meta.get("best", {}) if resuming else {}  # step and val_bpb of the best evaluation
        self.stop_requested = False
        self.stop_signal = signal.SIGINT  # the signal that asked for the stop: the exit status says which
        self.step_rates: list[float] = []  # tokens per second of each step of this session

    def request_stop(self, signum: int = signal.SIGINT, _frame=None) -> None:
        """Finish the current step, save a checkpoint and return (Ctrl-C and SIGTERM call this)."""
        if self.stop_requested:  # a second Ctrl-C means "now"
            raise KeyboardInterrupt
        self.stop_requested, self.stop_signal = True, signum

    def stopped_early(self) -> bool:
        """Whether a signal ended the run before its budget did (its checkpoint is saved to resume)."""
        return self.stop_requested and self._progress() < 1

    def _conversation_batches(self, context: int) -> tuple[ConversationBatches, ConversationBatches]:
        """Load, check, render and pack the conversations; report everything skipped or cut."""
        c = self.config
        conversations = load_conversations(c.chat_data, c.messages_column, c.max_conversations)
        template = TurnsTemplate(self.tokenizer)
        problems = list(conversations.problems)
        batches = []
        for split, items in (("train", conversations.train), ("val", conversations.val)):
            rendered = []
            for number, conversation in enumerate(items, start=1):
                r = template.render(conversation)
                if len(r.ids) > context + 1:
                    if not any(r.mask[1 : context + 1]):
                        problems.append(
                            f"{split} conversation {number}: no assistant reply within the context; skipped"
                        )
                        continue
                    problems.append(
                        f"{split} conversation {number}: {len(r.ids)} tokens, cut to the context of {context}"
                    )
                rendered.append((r.ids, r.mask))
            if not rendered:
                raise UserError(
                    f"no usable {split} conversations in {conversations.description}: none has an assistant reply "
                    f"within the model's context of {context} tokens; shorten them"
                )
            batches.append(ConversationBatches(rendered, context, c.seed))
        self.chat_info = {
            "template": template.name,
            "data": conversations.description,
            "conversations": len(conversations.train),
        }
        self.sample_question = first_fitting_question(
            template, conversations.val, prompt_budget(context, c.sample_tokens)
        )
        if self.dist.is_main:
            print(
                f"chat data: {conversations.description}: {len(conversations.train):,} train / {len(conversations.val):,} val conversations"
            )
            if problems:
                print(f"warning: {len(problems)} conversation(s) skipped or cut:")
                for problem in problems[:20]:
                    print(f"  {problem}")
                if len(problems) > 20:
                    print(f"  ... and {len(problems) - 20} more")
        return batches[0], batches[1]

    def _model_config(self) -> ModelConfig:
        return replace(self.config.model_config(), vocab_size=self.data.tokenizer.n_vocab)

    def _restore(self, checkpoint: Checkpoint) -> None:
        try:  # checkpoint.json's description of the state is not checksummed: a damaged one is refused here
            state = checkpoint.load_trainer_state()
            for optimizer, saved in zip(self.optimizers, state["optimizers"], strict=True):
                optimizer.load_state_dict(saved)
            if "trained_norm" in state:  # the model file's final norm has the output temperature folded in
                with torch.no_grad():
                    self.model.norm.weight.copy_(state["trained_norm"])
            self.step, self.elapsed, self.tokens_seen = state["step"], state["elapsed"], state["tokens_seen"]
            torch.set_rng_state(state["rng"])
            if "cuda_rng" in state and self.device.type == "cuda":
                torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise UserError(
                f"{checkpoint.folder} has a damaged trainer state ({type(error).__name__}: {error}); "
                "resume from an earlier checkpoint or start a new run with --init-from"
            ) from None
        self.metrics = checkpoint.meta.get("metrics", {})

    def _forget_metrics_after(self, step: int) -> None:
        """Drop the log lines of steps a crash undid (all of them for an attempt killed before its first
        checkpoint), so the log reads like one run."""
        path = self.out_dir / METRICS
        lines = path.read_text().splitlines() if path.is_file() else []
        kept = [line for line in lines if _logged_step(line) <= step]
        if len(kept) != len(lines):
            write_atomically(path, "".join(line + "\n" for line in kept))

    # -- the loop -----------------------------------------------------------------------------

    def run(self) -> dict:
        c = self.config
        self._announce()
        bar = tqdm(
            total=1000,
            initial=int(1000 * min(1.0, self._progress())),  # a resumed run's rate counts only this session
            disable=not (c.progress and self.dist.is_main),
            bar_format="{l_bar}{bar}| {elapsed}<{remaining}{postfix}",
        )
        last_saved = self.step if c.resume else -1
        if c.resume and self._progress() >= 1 and self.dist.is_main:
            print(
                f"nothing to do: the run is at step {self.step}, the end of the budget it was resumed with; "
                "give a larger --max-steps or --max-minutes to train it further"
            )
        start = time.perf_counter() - self.elapsed
        previous_handlers = self._install_signal_handlers()
        while (progress := self._progress()) < 1 and not self.dist.any(self.stop_requested):
            factor = lr_factor(self.step, progress, c.warmup_steps, c.cooldown)
            set_lr(self.optimizers, factor)
            if not self.chat:  # clean inputs once the learning rate cools: the model settles on the real text
                self.batches.noisy = not cooling(progress, c.cooldown)
            step_start = time.perf_counter()
            loss, positions = self._train_step()
            self.step += 1
            self.tokens_seen += positions
            self.elapsed = self.dist.maximum(time.perf_counter() - start)  # one clock for all ranks
            tokens_per_sec = positions / (time.perf_counter() - step_start)
            self.step_rates.append(tokens_per_sec)
            bar.n = int(1000 * min(1.0, self._progress()))
            bar.set_postfix_str(f" step {self.step} loss {loss:.3f} {tokens_per_sec:,.0f} tok/s", refresh=True)
            if self.step % c.log_interval == 0:
                self._log(
                    {
                        "step": self.step,
                        "time": round(self.elapsed, 2),
                        "train_loss": loss,
                        "lr_factor": factor,
                        "tokens_per_sec": tokens_per_sec,
                        "mfu": self._mfu(tokens_per_sec),
                    }
                )
            if c.eval_interval and self.step % c.eval_interval == 0 and self._progress() < 1:
                self._evaluate_and_save(bar)
                last_saved = self.step
                start = time.perf_counter() - self.elapsed  # evaluation time does not count against training
        if last_saved != self.step:
            self._evaluate_and_save(bar)
        bar.close()
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
        if self.step_rates and self.dist.is_main:
            rate = self._median_rate()
            print(
                f"throughput: median {rate:,.0f} tokens/s per step = {rate * self.model.flops_per_token() / 1e9:,.0f} GFLOP/s, "
                f"MFU {self._mfu(rate):.0%} of the {self.peak_flops / 1e9:,.0f} GFLOP/s {str(self.dtype).removeprefix('torch.')} "
                "matmul peak measured at start"
            )
        if self.dist.is_main and c.max_passes and self._passes() / c.max_passes >= 1:
            budget = f" of {c.max_minutes:g}" if c.max_minutes else ""
            why = ": more passes memorise a corpus this small; more text, not more time, would help"
            print(
                f"stopped after {c.max_passes:g} passes over the training data (--max-passes) at {self.elapsed / 60:.1f}"
                f"{budget} minutes{why if c.max_passes >= MEMORISING_PASSES else ''}"
            )
        if self.stopped_early() and self.dist.is_main:
            print(f"stopped at step {self.step}; continue with: python train.py --resume --out-dir {self.out_dir}")
        self.dist.close()
        return self.metrics

    def _install_signal_handlers(self) -> dict:
        """Route Ctrl-C and SIGTERM to request_stop (only possible in the main thread)."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, self.request_stop)
        return previous

    def _median_rate(self) -> float:
        return statistics.median(self.step_rates)

    def _mfu(self, tokens_per_sec: float) -> float:
        """Model FLOPs utilisation: model FLOP/s (6N + attention, per process) over the measured matmul peak."""
        return tokens_per_sec / self.dist.world * self.model.flops_per_token() / self.peak_flops

    def _progress(self) -> float:
        c = self.config
        steps = self.step / c.max_steps if c.max_steps else 0.0
        minutes = self.elapsed / 60 / c.max_minutes if c.max_minutes else 0.0
        passes = self._passes() / c.max_passes if c.max_passes else 0.0
        return max(steps, minutes, passes)

    def _passes(self) -> float:
        """Passes made over the pre-training tokens so far (a pass is every window of them once)."""
        return self.tokens_seen / len(self.batches.tokens)

    def _train_step(self) -> tuple[float, int]:
        """One optimizer step: its mean loss, and the positions it computed over all processes (a chat
        batch is padded to its longest conversation, which is usually shorter than the context)."""
        c = self.config
        total, positions = 0.0, 0
        self.dist.seed_own_stream(c.seed, self.step)  # each rank its own dropout masks, the same when resumed
        for micro in range(c.grad_accum):
            first = (micro * self.dist.world + self.dist.rank) * self.rows_per_micro
            x, y = self.batches.get(self.step, range(first, first + self.rows_per_micro), c.batch_size, self.device)
            positions += x.numel() * self.dist.world
            sync = micro == c.grad_accum - 1 or self.dist.world == 1
            with contextlib.nullcontext() if sync else self.train_model.no_sync():  # one-shot: both passes inside
                with autocast(self.device, self.dtype):
                    loss = self.train_model(x, y) / c.grad_accum
                loss.backward()
            total += loss.item()
        if c.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
        for optimizer in self.optimizers:
            optimizer.step()
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss = self.dist.mean(total)
        if not math.isfinite(loss):
            raise UserError(f"the loss became {loss} at step {self.step}; lower --lr / --muon-lr or use --dtype fp32")
        return loss, positions

    def _evaluate_and_save(self, bar: tqdm) -> None:
        """Evaluate, sample and save the weights this run delivers: the output temperature folded into the
        final norm. Training then goes on from its own norm (kept in the checkpoint for --resume)."""
        temperature = self._output_temperature() if self.dist.is_main else 1.0
        if temperature == 1.0:
            self._evaluate_and_save_weights(bar)
            return
        norm = self.model.norm.weight
        trained_norm = norm.detach().clone()
        with torch.no_grad():
            norm.div_(temperature)
        try:
            self._evaluate_and_save_weights(bar, trained_norm, temperature)
        finally:
            with torch.no_grad():
                norm.copy_(trained_norm)

    def _output_temperature(self) -> float:
        """Fitted on the held-out training tokens with --calibration-tokens, else set by the passes made
        over the training data (--pass-temperature); 1 for chat fine-tuning (training/calibration.py)."""
        if self.calibration_tokens is not None:
            return fit_temperature(self.model, self.calibration_tokens, self.token_bytes, self.dtype)
        if self.config.pass_temperature and not self.chat:
            return temperature_for_passes(self._passes())
        return 1.0

    def _evaluate_and_save_weights(
        self, bar: tqdm, trained_norm: torch.Tensor | None = None, temperature: float = 1.0
    ) -> None:
        """Evaluate, sample and save the model as it is; `trained_norm` is the final norm training resumes from
        when the model's one has the output `temperature` folded in."""
        if self.dist.is_main:
            c = self.config
            if self.chat:  # loss and bits per byte of the held-out assistant replies
                result = score(self.model, self.val_batches.in_order(16, self.device), self.token_bytes, self.dtype)
            else:
                result = bits_per_byte(
                    self.model, self.val_tokens, self.token_bytes, max_tokens=c.eval_tokens, dtype=self.dtype
                )
            self.metrics = {
                "step": self.step,
                "val_loss": result["loss"],
                "val_bpb": result["bpb"],
                "time": round(self.elapsed, 2),
                "tokens_seen": self.tokens_seen,
            }
            if self.chat and "special_loss" in result:  # the loss on the replies' end-of-turn tokens
                self.metrics["val_end_loss"] = result["special_loss"]
            if trained_norm is not None:
                self.metrics["temperature"] = round(temperature, 4)
            if self.step_rates:
                rate = self._median_rate()
                self.metrics.update(tokens_per_sec=round(rate), mfu=round(self._mfu(rate), 4))
            self._log(self.metrics)
            is_best = not self.best or result["bpb"] < self.best["val_bpb"]
            if is_best:
                self.best = {"step": self.step, "val_bpb": result["bpb"]}
            message = f"step {self.step}: val loss {result['loss']:.4f}, val {result['bpb']:.4f} bits/byte"
            if (end := self.metrics.get("val_end_loss")) is not None:
                message += f", end of reply {end:.3f} nats (p = {math.exp(-end):.2f})"
            if trained_norm is not None:
                message += f" (output temperature {temperature:.3f})"
            if c.sample_tokens:
                message += f"\n--- sample ---\n{self._sample().strip()}\n--------------"
            bar.write(message)
            self._save(is_best, trained_norm)
        self.dist.barrier()

    def _sample(self) -> str:
        engine = Engine(self.model, self.tokenizer, self.dtype, int8_weights=True)  # as sample.py generates
        sampling = SamplingConfig(max_new_tokens=self.config.sample_tokens, seed=self.config.seed)
        if self.chat and self.sample_question is None:
            text = "(no validation conversation opens with a question short enough to leave room for a reply)"
        elif self.chat:
            messages = [{"role": "user", "content": self.sample_question}]
            _, pieces = stream_reply(engine, TurnsTemplate(self.tokenizer), messages, replace(sampling, temperature=0))
            text = f"user: {self.sample_question}\nmodel: {''.join(pieces)}"
        else:
            text = engine.generate([""], sampling)[0]
        self.model.train()
        return text

    def _save(self, best: bool, trained_norm: torch.Tensor | None = None) -> None:
        meta = {
            "train": to_dict(self.config),
            "metrics": self.metrics,
            "best": self.best,
            "data": self.data_info,
            "tokens_seen": self.tokens_seen,
            "elapsed_seconds": self.elapsed,
            "chat": self.chat_info,
        }
        state = {
            "optimizers": [optimizer.state_dict() for optimizer in self.optimizers],
            "step": self.step,
            "elapsed": self.elapsed,
            "tokens_seen": self.tokens_seen,
            "rng": torch.get_rng_state(),
        }
        if self.device.type == "cuda":  # a GPU's dropout masks come from its own generator
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        if trained_norm is not None:  # the model's norm holds the temperature; training resumes from this
            state["trained_norm"] = trained_norm
        save_checkpoint(self.out_dir, self.step, self.model, self.tokenizer, meta, state, best)

    def _log(self, record: dict) -> None:
        if self.dist.is_main:
            try:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                with open(self.out_dir / METRICS, "a") as file:
                    file.write(json.dumps(record) + "\n")
            except OSError as error:
                raise write_failed(self.out_dir, str(self.out_dir / METRICS), error) from None

    def _announce(self) -> None:
        if not self.dist.is_main:
            return
        c, m = self.config, self.model.config

        budget = " and ".join(
            filter(
                None,
                [
                    c.max_steps and f"{c.max_steps} steps",
                    c.max_minutes and f"{c.max_minutes:g} minutes",
                    c.max_passes and f"{c.max_passes:g} passes over the data",
                ],
            )
        )
        if not self.chat:
            splits = self.data.manifest["splits"]
            print(
                f"data: {self.data.manifest['source']}: {splits['train']['tokens']:,} train / {splits['val']['tokens']:,} val tokens "
                f"({self.tokenizer.kind} tokenizer, {self.tokenizer.n_vocab} ids)"
            )
        print(
            f"model: {self.model.num_parameters() / 1e6:.2f}M parameters, {m.n_layer} layers x {m.n_embd} wide, context {m.context}\n"
            f"training: {c.optimizer}, batch {c.batch_size} x {m.context} tokens, {self.device.type} {str(self.dtype).removeprefix('torch.')}, "
            f"{self.dist.world} process(es), budget {budget}, from step {self.step} -> {self.out_dir}",
            flush=True,
        )
        if c.compile:
            print(
                "compiling the model: the first step waits for it (about a minute on a 2-core CPU the first time, "
                "seconds once inductor has cached it)",
                flush=True,
            )


def check_same_data(now: dict, then: dict, source: str) -> None:
    """Refuse to resume on text that changed since the run began (its size in bytes or tokens): the
    losses would no longer continue the run's, and its best checkpoint was chosen on another text."""
    was = then.get("splits") or {}
    changed = [
        f"{split} {was[split]['bytes']:,} bytes then, {sizes['bytes']:,} now"
        for split, sizes in now["splits"].items()
        if split in was and was[split] != sizes
    ]
    if changed:
        raise UserError(
            f"the training data ({source}) changed since this run began ({'; '.join(changed)}); "
            "restore it to resume, or start a new run from this one with --init-from"
        )


def first_fitting_question(template: TurnsTemplate, conversations: list[list[dict]], budget: int) -> str | None:
    """The first user message of a conversation that fits a sample's prompt alone, for the sample each
    evaluation prints (training takes longer conversations than a prompt can hold: it needs no reply's room)."""
    for conversation in conversations:
        question = next(m["content"] for m in conversation if m["role"] == "user")
        with contextlib.suppress(UserError):
            template.fit([{"role": "user", "content": question}], budget)
            return question
    return None


def _logged_step(line: str) -> int:
    """The step of one metrics.jsonl line (a torn last line from a crash counts as past every step)."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return 1 << 62


def prepare_corpus(config: TrainConfig, base: Checkpoint | None, dist: distributed.Distributed) -> Prepared:
    """The run's token files (data/prepare.py), rank 0 first: the others then find them in the cache."""
    c = config

    def run() -> Prepared:
        return prepare(
            c.data,
            val_data=c.val_data,
            text_column=c.text_column,
            tokenizer_kind=c.tokenizer,
            vocab_size=c.vocab_size,
            tokenizer=base.load_tokenizer() if base else None,
            max_bytes=c.max_bytes,
            cache_dir=cache_folder(c),
            progress=c.progress and dist.is_main,
        )

    failure = None
    if dist.is_main:
        try:
            prepared = run()
        except BaseException as error:  # told to the others below, rather than leaving them at a barrier
            failure = error
    if dist.any(failure is not None):  # where the others wait for rank 0's files
        if failure is not None:
            raise failure
        time.sleep(10)  # rank 0 says why and exits first (torchrun then stops this process), not a gloo traceback
        raise SystemExit(2)
    return prepared if dist.is_main else run()


def cache_folder(config: TrainConfig) -> Path:
    """Where prepared data (and the machine's remembered peak, training/budget.py) are kept."""
    return Path(config.cache_dir) if config.cache_dir else DEFAULT_CACHE


def assemble_for(device: torch.device, typed: dict, saved: dict | None, *sizing) -> TrainConfig:
    """`assemble`, for a device that may not compile. Without a C++ compiler a CPU cannot: a typed
    --compile is an error, and a run the budget rule chose to compile (or a resumed run that saved it)
    is assembled again as a typed --no-compile, with a note, so that the rule sizes it for the eager
    steps it will take (the Xeon's 10 minutes: a 5 x 320 eager, where compiled steps earn the 6 x 384)."""
    config = assemble(typed, saved, *sizing)
    if not config.compile or can_compile(device):
        return config
    if typed.get("compile"):
        raise UserError("--compile needs a C++ compiler on a CPU (g++, or $CXX); install one or drop --compile")
    print("note: no C++ compiler (g++, or $CXX) for torch.compile; training without it (slower steps)", file=sys.stderr)
    return assemble({**typed, "compile": False}, saved, *sizing)


def check_new_run_folder(out_dir: Path) -> None:
    """A new run writes into an empty folder, or one only an earlier attempt of a run wrote into, and
    can write there: it would delete other checkpoints' folders and rewrite the log, and a folder it
    cannot write is better found now than after the first evaluation."""
    if (out_dir / POINTER).exists():
        raise UserError(f"{out_dir} already holds a run; use --resume to continue it or another --out-dir")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out-dir {out_dir} is a file; give a folder for the run")
    if foreign := strangers(out_dir):
        raise UserError(
            f"{out_dir} holds files that are not a run's ({', '.join(foreign[:3])}); give a new or empty --out-dir"
        )
    writable_folder(out_dir, "--out-dir")


def train(typed: dict) -> tuple[Trainer, dict]:
    """Assemble the config (see training/config.py), open any base checkpoint and run."""
    base, resuming, saved = None, bool(typed.get("resume")), None
    if resuming:
        out_dir = typed.get("out_dir") or assemble({k: v for k, v in typed.items() if k != "resume"}).out_dir
        if (Path(out_dir) / "checkpoint.json").exists():  # a run's step folder, which sample.py accepts
            raise UserError(
                f"{out_dir} is one checkpoint of a run: give --resume its run folder ({Path(out_dir).parent}), "
                "or start a new run from it with --init-from"
            )
        if Path(out_dir).is_dir() and not (Path(out_dir) / POINTER).exists():
            raise UserError(
                f"nothing to resume in {out_dir}: it holds no checkpoint yet; start the run without --resume"
            )
        base = load_checkpoint(out_dir, latest=True)
        saved = saved_arguments(base.meta.get("train"), str(base.folder / "checkpoint.json"))
        check_unchanged(typed, saved, RUN_IDENTITY + MODEL_SHAPE, "resumed run")
    unsized = checked_config(typed, saved)  # device and dtype, by the same layering as everything else
    out_dir, main_process = Path(unsized.out_dir), os.environ.get("RANK", "0") == "0"
    made_here = not resuming and not out_dir.exists() and main_process
    if not resuming:
        check_new_run_folder(out_dir)
    try:
        with run_folder_lock(out_dir, take=main_process):
            return train_in_folder(typed, unsized, base, resuming, saved)
    except BaseException:
        if made_here:
            remove_if_unused(out_dir)
        raise


def train_in_folder(
    typed: dict, unsized: TrainConfig, base: Checkpoint | None, resuming: bool, saved: dict | None
) -> tuple[Trainer, dict]:
    """The rest of `train`, once the run folder is this process's: open any --init-from base, size the
    model for the budget where the rule applies, and run."""
    if unsized.init_from:
        base = load_checkpoint(unsized.init_from)
        taken = inherited(base.meta, chat=bool(unsized.chat_data))
        check_unchanged(typed, taken, tuple(taken), "base model")
        if unsized.chat_data and "eval_tokens" in typed:
            raise UserError(
                "--eval-tokens applies to pre-training; chat fine-tuning scores every validation conversation"
            )
        typed = {**taken, **typed}
    dist = distributed.setup(unsized.device)  # first: under torchrun each rank measures its own GPU
    try:
        trainer = sized_trainer(typed, unsized, base, resuming, saved, dist)
        return trainer, trainer.run()
    except BaseException:
        dist.close()  # a process that leaves with its group open aborts ("terminate called ...")
        raise


def sized_trainer(
    typed: dict,
    unsized: TrainConfig,
    base: Checkpoint | None,
    resuming: bool,
    saved: dict | None,
    dist: distributed.Distributed,
) -> Trainer:
    """The run's trainer, its model sized for the budget where the rule applies (rank 0 measures the
    machine for all processes: ranks that measured apart could size different models)."""
    device = dist.device
    if device.type == "cpu":
        keep_freed_memory()  # no page faults for memory a step frees and the next takes again
    sizing = budget_minutes(typed, saved) is not None  # the machine's speed and the corpus choose the model
    dtype = pick_dtype(device, unsized.dtype)
    # The MFU's denominator; budget runs are the benchmark's, so theirs is measured for longer.
    peak_flops = matmul_peak_flops(device, dtype, seconds=1.0 if sizing else 0.3)
    measured = step_flops = best_peak = corpus_tokens = None
    if sizing:
        if dist.is_main:
            measured, machine = anchor_step_flops(device, dtype), machine_name(device, dtype)
            step_flops = remembered_best(measured, machine, cache_folder(unsized))
            best_peak = remembered_best(peak_flops, peak_name(machine), cache_folder(unsized))
        measured, step_flops, best_peak = dist.from_main([measured, step_flops, best_peak])
        corpus_tokens = prepare_corpus(unsized, base, dist).manifest["splits"]["train"]["tokens"]
    config = assemble_for(device, typed, saved, step_flops, corpus_tokens, best_peak)
    if sizing and dist.is_main:
        print(describe(config.max_minutes, step_flops, measured, best_peak, corpus_tokens, config))
    if device.type == "cpu":
        shape = base.model_config if base else config.model_config()
        check_fits(shape, config.batch_size // config.grad_accum)
    return Trainer(config, base, resuming, peak_flops, dist)
