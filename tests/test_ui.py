"""The chat app, served for real: its API through gradio_client, and its page in headless Chromium."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402
from gradio_client import Client  # noqa: E402

from benchmarks.load import chat_arguments, free_port, reply_text, serve  # noqa: E402
from model.chat_template import prompt_budget, stream_reply  # noqa: E402
from model.checkpoint import load_checkpoint  # noqa: E402
from model.errors import UserError  # noqa: E402
from model.sampling import SamplingConfig  # noqa: E402
from tests.conftest import TINY, run_script  # noqa: E402
from tests.test_cli import assert_clean_error  # noqa: E402
from ui.app import EXAMPLES, build_app, example_prompts  # noqa: E402
from ui.models import ModelStore  # noqa: E402

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
]


@contextlib.contextmanager
def opened_page(url: str) -> Iterator:
    """A page of headless Chromium at `url`, kept off the network; the browser closes afterwards."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(url)
        yield page
        browser.close()


@pytest.fixture(scope="module")
def served(tiny_run, corpus_file, tmp_path_factory):
    """Three runs under one root, the app serving the first, on a free localhost port.

    "wide" is a 6 x 512 model: slow enough per token that a long reply is still streaming when the
    browser test presses stop (the tiny model writes 4,096 tokens in well under a second, and a
    4 x 256 one in about three with the C decode step). Ten steps of two sequences train it enough
    not to end its reply early (30 steps of eight took a minute of the suite).
    """
    root = tmp_path_factory.mktemp("ui") / "out"
    shutil.copytree(tiny_run, root / "first")
    shutil.copytree(tiny_run, root / "second")
    wide = ["--n-layer", "6", "--n-embd", "512", "--n-head", "8", "--n-kv-head", "8", "--context", "256"]
    wide += ["--max-steps", "10", "--batch-size", "2", "--eval-interval", "10"]  # after TINY's: these win
    result = run_script(
        "train.py",
        *TINY,
        *wide,
        "--data",
        str(corpus_file),
        "--out-dir",
        str(root / "wide"),
        "--cache-dir",
        str(root.parent / "cache"),
    )
    assert result.returncode == 0, result.stderr
    os.utime(root / "first" / "LATEST")  # newest, so it is the default
    store = ModelStore(root)
    store.load("first")
    app = build_app(store)
    app.queue(default_concurrency_limit=4)
    _, url, _ = app.launch(
        server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True, ssr_mode=False
    )
    yield store, url
    app.close()


def expected_reply(store: ModelStore, messages: list[dict], max_new_tokens: int) -> str:
    """What the engine itself says, greedily, for this conversation (the UI must say the same)."""
    model = store.current
    _, pieces = stream_reply(
        model.engine, model.template, messages, SamplingConfig(max_new_tokens=max_new_tokens, temperature=0)
    )
    return "".join(pieces).lstrip()


def full_reply(store: ModelStore, messages: list[dict], max_new_tokens: int) -> str:
    """The reply the page gives with the sidebar's defaults and seed 7, computed in-process."""
    model = store.current
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=0.8, top_k=50, top_p=0.95, seed=7)
    _, pieces = stream_reply(model.engine, model.template, messages, sampling)
    return "".join(pieces).lstrip()


def test_chat_reply_streams_through_the_api(served):
    store, url = served
    client = Client(url, verbose=False, analytics_enabled=False)
    job = client.submit(*chat_arguments("Old stone river"), api_name="/chat")
    updates = [update for update in job]
    replies = [reply_text(u) for u in updates]
    final = reply_text(job.result())
    assert len(replies) > 2, "the reply should arrive in several streamed pieces"
    assert final == expected_reply(store, [{"role": "user", "content": "Old stone river"}], 24)
    assert final and all(final.startswith(r) for r in replies if r)


def test_completion_through_the_api(served):
    store, url = served
    client = Client(url, verbose=False, analytics_enabled=False)
    text = client.predict("The garden", 0, 0, 1.0, 16, 1, api_name="/complete")
    engine = store.current.engine
    assert text == "The garden" + engine.generate(["The garden"], SamplingConfig(max_new_tokens=16, temperature=0))[0]


def test_concurrent_chats_do_not_mix(served):
    store, url = served
    prompts = ["river", "lantern harbour", "the quiet village", "bright morning window", "stone"]
    expected = {p: expected_reply(store, [{"role": "user", "content": p}], 40) for p in prompts}

    def ask(prompt: str) -> str:
        client = Client(url, verbose=False, analytics_enabled=False)
        return reply_text(client.predict(*chat_arguments(prompt, max_new_tokens=40), api_name="/chat"))

    with ThreadPoolExecutor(len(prompts)) as pool:
        answers = dict(zip(prompts, pool.map(ask, prompts), strict=True))
    assert answers == expected


def test_bad_settings_are_reported_not_crashed(served):
    _, url = served
    client = Client(url, verbose=False, analytics_enabled=False)
    with pytest.raises(Exception, match="less than minimum value 0"):
        client.predict("hello", "", -5, 0, 1.0, 10, 1, api_name="/chat")
    with pytest.raises(Exception, match="top-k|greater than maximum"):
        client.predict("hello", "", 0.5, 10_000, 1.0, 10, 1, api_name="/chat")
    assert client.predict(*chat_arguments("still alive", max_new_tokens=5), api_name="/chat")  # the server carries on


def test_the_largest_seed_is_used_as_sent(served):
    store, url = served
    client = Client(url, verbose=False, analytics_enabled=False)
    seed = 2**53 - 1  # the largest the page takes: a browser's number holds it exactly
    reply = client.predict(*chat_arguments("Old stone river", 1.0, seed=seed), api_name="/chat")
    sampling = SamplingConfig(max_new_tokens=24, temperature=1.0, seed=seed)
    _, pieces = stream_reply(
        store.current.engine, store.current.template, [{"role": "user", "content": "Old stone river"}], sampling
    )
    assert reply_text(reply) == "".join(pieces).lstrip()


def test_switching_checkpoints_without_restart(served):
    store, url = served
    client = Client(url, verbose=False, analytics_enabled=False)
    info, _curve, status = client.predict("second", api_name="/load_model")
    assert store.current.name == "second" and "`second`" in info and "second" in status
    with pytest.raises(Exception, match="not a run"):
        client.predict("../../etc", api_name="/load_model")
    with pytest.raises(UserError, match="not a run"):  # the store refuses it too, whoever asks
        store.load("../first")
    client.predict("first", api_name="/load_model")
    assert store.current.name == "first"
    served_now = store.current
    assert store.load("first") is served_now  # served already: not read again (a dropdown pick comes twice)


def test_app_starts_without_any_checkpoint_and_a_reload_finds_the_first(tiny_run, tmp_path):
    from playwright.sync_api import expect

    store = ModelStore(tmp_path / "empty")
    app = build_app(store)
    _, url, _ = app.launch(
        server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True, ssr_mode=False
    )
    try:
        client = Client(url, verbose=False, analytics_enabled=False)
        hint = f"No trained model found under {tmp_path / 'empty'}/. Train one with python train.py, then reload this page."
        with pytest.raises(Exception, match=re.escape(hint)):
            client.predict(*chat_arguments("hello"), api_name="/chat")
        with opened_page(url) as page:  # the hint in plain text where the page shows plain text
            box = page.locator("textarea[data-testid=textbox]").first
            box.fill("hello")
            box.press("Enter")
            expect(page.locator("div.validation-error")).to_have_text(hint, timeout=20_000)
            page.get_by_role("tab", name="Complete").click()
            page.get_by_role("button", name="Generate").click()
            expect(page.locator(".toast-body").first).to_contain_text(hint, timeout=20_000)
        shutil.copytree(tiny_run, tmp_path / "empty" / "first")  # "train one, then reload this page"
        with opened_page(url) as page:
            expect(page.get_by_text("Model: first")).to_be_visible(timeout=20_000)
        assert store.current is not None and store.current.name == "first"
    finally:
        app.close()


def test_a_page_shows_the_model_served_now_and_runs_trained_since_it_started(served, tiny_run):
    """Another user's switch, and a run the app was not built with, are what a newly opened page shows."""
    from playwright.sync_api import expect

    store, url = served
    shutil.copytree(tiny_run, store.root / "later")
    client = Client(url, verbose=False, analytics_enabled=False)
    try:
        info, _curve, status = client.predict("later", api_name="/load_model")
        assert store.current.name == "later" and "later" in status
        with opened_page(url) as page:
            expect(page.get_by_text("Model: later")).to_be_visible(timeout=20_000)
            page.get_by_role("tab", name="Model").click()
            expect(page.get_by_label("Checkpoint")).to_have_value("later")
    finally:
        client.predict("first", api_name="/load_model")
        shutil.rmtree(store.root / "later")


def test_a_refused_message_leaves_the_chat_usable(served):
    """The refusal shows, the input stays enabled, and the next message is answered."""
    from playwright.sync_api import expect

    store, url = served
    with opened_page(url) as page:
        expect(page.get_by_text(example_prompts(store.current)[0])).to_be_visible()
        box = page.locator("textarea[data-testid=textbox]").first
        box.fill("word " * 3000)
        box.press("Enter")
        expect(page.get_by_text("longer than the model's context").first).to_be_visible(timeout=20_000)
        expect(box).to_be_enabled()
        box.fill("Old stone river")
        box.press("Enter")
        expect(page.locator("[data-testid=bot]").last).not_to_be_empty(timeout=20_000)
        assert page.locator("[data-testid=user]").count() == 1, "the refused message was never sent"


def test_an_empty_message_is_not_sent(served):
    """A blank box, or one of spaces, sends nothing (as `sample.py --chat` skips a blank line): the page
    says so and the next message is answered."""
    from playwright.sync_api import expect

    _, url = served
    with opened_page(url) as page:
        box = page.locator("textarea[data-testid=textbox]").first
        box.fill("Old stone river")  # first a message, answered: the page is live (a click before may be lost)
        box.press("Enter")
        expect(page.locator("[data-testid=user]")).to_have_count(1, timeout=20_000)
        expect(box).to_be_enabled(timeout=20_000)  # the reply is done (it may be empty)
        for blank in ("", "   "):
            box.fill(blank)
            page.locator("[data-testid=submit-button]").first.click()
            expect(page.get_by_text("The message is empty").first).to_be_visible(timeout=20_000)
            expect(box).to_be_enabled()
        box.fill("The lantern")
        box.press("Enter")  # after the blanks: had they been sent, their bubbles would be before this one
        expect(page.locator("[data-testid=user]")).to_have_count(2, timeout=20_000)
        expect(page.locator("[data-testid=user]")).to_have_text(["Old stone river", "The lantern"])


def words_whose_prompt_is(render, low: int, high: int) -> str:
    """A text of repeated words whose rendered prompt is more than `low` and at most `high` tokens."""
    for n in range(1, 200):
        text = "river " * n
        if low < len(render(text).ids) <= high:
            return text.strip()
    raise AssertionError(f"no text renders to {low + 1}-{high} tokens")


def test_the_checks_before_sending_use_the_reply_length_set(served):
    """With Max new tokens at 1, a message or system prompt that leaves room for one token is taken,
    where the default reply (a quarter of the context) would not leave it room."""
    from playwright.sync_api import expect

    store, url = served
    model = store.current
    context, template = model.engine.context, model.template
    default, smallest = prompt_budget(context, 200), prompt_budget(context, 1)
    message = words_whose_prompt_is(
        lambda t: template.render([{"role": "user", "content": t}], True), default, smallest - 1
    )
    hi = len(template.render([{"role": "user", "content": "hi"}], True).ids) - len(template.render([], True).ids)
    system = words_whose_prompt_is(
        lambda t: template.render([{"role": "system", "content": t}], True), default, smallest - hi
    )
    with opened_page(url) as page:
        max_tokens = page.get_by_label("number input for Max new tokens")
        max_tokens.fill("1")
        max_tokens.press("Enter")
        box = page.locator("textarea[data-testid=textbox]").first
        box.fill(message)
        box.press("Enter")
        expect(page.locator("[data-testid=user]")).to_have_count(1, timeout=20_000)
        expect(box).to_be_enabled(timeout=20_000)
        page.get_by_role("button", name="Clear").first.click()
        page.get_by_placeholder("Optional instructions for the model").fill(system)
        box.fill("hi")  # leaves the system prompt's box: its check runs
        box.press("Enter")
        expect(page.locator("[data-testid=user]")).to_have_count(1, timeout=20_000)
        expect(page.locator("[data-testid=user]")).to_have_text("hi")
        expect(box).to_be_enabled(timeout=20_000)
        expect(page.locator(".toast-body")).to_have_count(0)  # no warning of the system prompt


def test_the_example_prompts_follow_a_model_switch(served, tiny_run):
    from playwright.sync_api import expect

    store, url = served
    shutil.copytree(tiny_run, store.root / "bard")
    for meta_file in (store.root / "bard").glob("step-*/checkpoint.json"):
        meta = json.loads(meta_file.read_text())
        meta_file.write_text(json.dumps({**meta, "data": {**meta["data"], "source": "tinyshakespeare"}}))
    try:
        with opened_page(url) as page:
            expect(page.get_by_text(EXAMPLES["other"][0])).to_be_visible(timeout=20_000)
            page.get_by_role("tab", name="Model").click()
            page.get_by_label("Checkpoint").click()
            page.get_by_role("option", name="bard").click()
            expect(page.get_by_text("Model: bard")).to_be_visible(timeout=20_000)
            page.get_by_role("tab", name="Chat").click()
            expect(page.get_by_text(EXAMPLES["shakespeare"][0])).to_be_visible(timeout=20_000)
            expect(page.get_by_text(EXAMPLES["other"][0])).to_have_count(0)
        with opened_page(url) as page:  # a page opened after the switch
            expect(page.get_by_text(EXAMPLES["shakespeare"][0])).to_be_visible(timeout=20_000)
    finally:
        store.load("first")
        shutil.rmtree(store.root / "bard")


def test_help_names_the_command_and_says_each_default_once():
    result = run_script("-m", "ui", "--help")
    assert result.returncode == 0 and result.stdout.startswith("usage: python -m ui "), result.stdout
    help_text = " ".join(result.stdout.split())  # argparse wraps lines anywhere
    assert (
        "(default: None)" not in help_text and "(default: the newest run under --out-root) (default:" not in help_text
    )
    assert "(default: 7860)" in help_text


def test_a_refusal_from_the_chat_itself_gives_the_message_back(served):
    """A seed out of range is refused by the chat function, not the validator: the message goes back
    into the box, enabled, the chat shows no trace of it, and once the seed is fixed it is answered.
    The seed is one past 2**53, which a browser cannot send as it is typed."""
    from playwright.sync_api import expect

    store, url = served
    with opened_page(url) as page:
        expect(page.get_by_text(example_prompts(store.current)[0])).to_be_visible()
        seed = page.get_by_label("Seed (-1 = random)")
        seed.fill(str(2**53 + 1))  # the browser's number holds it as 2**53: it would be another seed
        seed.press("Tab")
        box = page.locator("textarea[data-testid=textbox]").first
        box.fill("Old stone river")
        box.press("Enter")
        toast = page.locator(".toast-body").first
        expect(toast).to_contain_text("the seed must be a whole number from 0 to 9,007,199,254,740,991", timeout=20_000)
        expect(box).to_be_enabled(timeout=20_000)
        expect(box).to_have_value("Old stone river")
        expect(page.locator("[data-testid=submit-button]").first).to_be_visible()
        expect(page.locator("[data-testid=user]")).to_have_count(0)
        seed.fill("7")
        seed.press("Tab")
        box.press("Enter")
        bot = page.locator("[data-testid=bot]").last
        expect(page.locator("[data-testid=user]")).to_have_count(1, timeout=20_000)
        expect(page.locator("[data-testid=submit-button]").first).to_be_visible(timeout=20_000)
        reply = full_reply(store, [{"role": "user", "content": "Old stone river"}], 200)
        assert " ".join(bot.inner_text().split()) == " ".join(reply.split())


def test_a_system_prompt_the_chat_would_refuse_is_warned_of_when_the_box_is_left(served):
    from playwright.sync_api import expect

    _, url = served
    with opened_page(url) as page:
        system = page.get_by_placeholder("Optional instructions for the model")
        system.fill("word " * 300)  # the tiny model's context is 64 tokens
        page.locator("textarea[data-testid=textbox]").first.click()
        warning = page.locator(".toast-body").first
        expect(warning).to_contain_text("system prompt alone is longer", timeout=20_000)
        expect(warning).to_contain_text("until then the chat refuses every message")


def test_clear_removes_the_dropped_messages_notice(served):
    from playwright.sync_api import expect

    _, url = served
    with opened_page(url) as page:
        box = page.locator("textarea[data-testid=textbox]").first
        notice = page.get_by_text("oldest messages no longer fit")
        for turn in range(4):  # the tiny model's 64-token context holds fewer turns than this
            box.fill("Old stone river and the lantern by the water " * 2)
            box.press("Enter")
            # The box is disabled before the message shows and enabled again once the reply is done
            # (which may be empty: a sampled reply can end at once).
            expect(page.locator("[data-testid=user]")).to_have_count(turn + 1, timeout=20_000)
            expect(box).to_be_enabled(timeout=20_000)
        expect(notice).to_be_visible()
        page.get_by_role("button", name="Clear").first.click()
        expect(page.locator("[data-testid=bot]")).to_have_count(0)
        expect(notice).to_have_count(0)


def damage(run: Path, how: str) -> None:
    """Damage every checkpoint of `run`: its weights, or the metric of checkpoint.json the Model tab shows."""
    for folder in run.glob("step-*"):
        if how == "weights":
            (folder / "model.safetensors").write_bytes(b"not a model")
            continue
        meta = json.loads((folder / "checkpoint.json").read_text())
        meta["metrics"]["val_bpb"] = "x"
        (folder / "checkpoint.json").write_text(json.dumps(meta))


def test_a_run_with_a_damaged_record_is_refused_in_one_line(tiny_run, tmp_path):
    """What checkpoint.json records is checked when the checkpoint opens (tests/test_faults.py has each
    field), so `python -m ui` refuses it before serving anything."""
    shutil.copytree(tiny_run, tmp_path / "run")
    damage(tmp_path / "run", "metrics.val_bpb")
    result = run_script("-m", "ui", "--checkpoint", str(tmp_path / "run"), "--port", str(free_port()), timeout=60)
    assert_clean_error(
        result, r"checkpoint.json records a field of the wrong type \(metrics.val_bpb = \"x\"\); it is damaged"
    )


def test_lines_of_the_log_no_run_writes_are_left_out_of_the_curve(tiny_run, tmp_path):
    shutil.copytree(tiny_run, tmp_path / "out" / "run")
    log = tmp_path / "out" / "run" / "metrics.jsonl"
    good = log.read_text()
    log.write_text(good + '5\n{"step": "x", "train_loss": 1}\n{"step": 99, "train_loss": "y", "val_bpb": null}\n')
    curve = ModelStore(tmp_path / "out").load("run").curve()
    assert len(curve) > 0 and 99 not in set(curve["step"]) and curve["value"].map(type).isin([int, float]).all()


@pytest.mark.parametrize("how", ["weights", "metrics.val_bpb"])
def test_a_run_that_fails_to_load_is_not_shown_as_picked(served, tiny_run, how):
    """It is refused in one line, the picker goes back, the model served before stays served and named,
    and a page opened afterwards shows no error."""
    from playwright.sync_api import expect

    store, url = served
    shutil.copytree(tiny_run, store.root / "broken")
    damage(store.root / "broken", how)
    try:
        with opened_page(url) as page:
            page.get_by_role("tab", name="Model").click()
            picker = page.get_by_label("Checkpoint")
            expect(picker).to_have_value("first")
            picker.click()
            page.get_by_role("option", name="broken").click()
            toast = page.locator(".toast-body")
            expect(toast.first).to_contain_text("broken", timeout=20_000)
            expect(toast.first).to_contain_text("is damaged")
            expect(toast.first).not_to_contain_text("Error(")  # Python's own text of an exception
            expect(picker).to_have_value("first")
            expect(page.get_by_text("Model: first")).to_be_visible()
            assert store.current.name == "first"
            page.reload()
            expect(page.get_by_text("Model: first")).to_be_visible(timeout=20_000)
            page.get_by_role("tab", name="Model").click()
            expect(page.get_by_text("Validation bits per byte")).to_be_visible()
            expect(page.locator(".toast-body")).to_have_count(0)
        assert store.current.name == "first"
    finally:
        shutil.rmtree(store.root / "broken")


@pytest.mark.parametrize("named", ["a run outside --out-root", "a checkpoint folder that is not the run's best"])
def test_the_checkpoint_named_is_served_and_offered_with_the_runs_under_out_root(tiny_run, tmp_path, named):
    """`--checkpoint` outside --out-root adds that run to the picker and nothing else from its folder;
    `--checkpoint RUN/step-N` serves that checkpoint, not the run's best."""
    from playwright.sync_api import expect

    root, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    shutil.copytree(tiny_run, root / "inside")
    for run in (elsewhere / "run", elsewhere / "sibling", root / "multi"):
        shutil.copytree(tiny_run, run)
    best = load_checkpoint(root / "multi").folder
    earlier = best.with_name("step-0000010")  # a checkpoint of the run that BEST does not name
    shutil.copytree(best, earlier)
    meta = json.loads((earlier / "checkpoint.json").read_text())
    (earlier / "checkpoint.json").write_text(json.dumps({**meta, "step": 10}))
    os.utime(root / "multi" / "LATEST")  # the newest run under out/
    if named == "a run outside --out-root":
        checkpoint, name, step, offered = (
            elsewhere / "run",
            str(elsewhere / "run"),
            30,
            [str(elsewhere / "run"), "multi", "inside"],
        )
    else:
        checkpoint, name, step, offered = earlier, "multi/step-0000010", 10, ["multi/step-0000010", "multi", "inside"]
    with serve("--out-root", str(root), "--checkpoint", str(checkpoint)) as (_, url), opened_page(url) as page:
        expect(page.get_by_text(f"Model: {name}")).to_be_visible(timeout=20_000)
        page.get_by_role("tab", name="Model").click()
        expect(page.get_by_text(f"(step {step})")).to_be_visible()
        page.get_by_label("Checkpoint").click()
        expect(page.get_by_role("option")).to_have_text([re.compile(f"(^|\\s){re.escape(o)}$") for o in offered])


def test_refusals_print_no_traceback_in_the_server_terminal(tiny_run):
    """A refused input is the user's to fix: the page says why, and the server's terminal stays quiet."""
    with serve("--checkpoint", str(tiny_run), "--out-root", str(tiny_run.parent)) as (process, url):
        client = Client(url, verbose=False, analytics_enabled=False)
        refusals = {
            "the seed must be": lambda: client.predict(*chat_arguments("hi", seed=2**70), api_name="/chat"),
            "system prompt alone is longer": lambda: client.predict(
                "hi", "word " * 300, 0, 0, 1.0, 8, 1, api_name="/chat"
            ),
            "Shorten it": lambda: client.predict("word " * 3000, 0, 0, 1.0, 8, 1, api_name="/complete"),
            "less than minimum value 0": lambda: client.predict("hi", "", -5, 0, 1.0, 8, 1, api_name="/chat"),
            "greater than maximum value 4096": lambda: client.predict("hi", 0, 0, 1.0, 10**6, 1, api_name="/complete"),
        }
        for message, call in refusals.items():
            with pytest.raises(Exception, match=message):
                call()
        assert (
            reply_text(client.predict(*chat_arguments("still answering", max_new_tokens=4), api_name="/chat"))
            is not None
        )
    terminal = process.stderr.read()
    assert "Traceback" not in terminal and "gradio.exceptions.Error" not in terminal, terminal


def test_the_page_in_a_real_browser(served):
    from playwright.sync_api import expect

    store, url = served
    ARTIFACTS.mkdir(exist_ok=True)
    with opened_page(url) as page:
        expect(page.get_by_text(example_prompts(store.current)[0])).to_be_visible()  # the app is mounted
        seed = page.get_by_label("Seed (-1 = random)")
        seed.fill("7")  # a fixed seed, so the test can know what the full replies would be
        seed.press("Tab")
        box = page.locator("textarea[data-testid=textbox]").first
        box.fill("Old stone river")
        expect(box).to_have_value("Old stone river")
        box.press("Enter")
        expect(page.locator("[data-testid=user]").last).to_contain_text("Old stone river")
        bot = page.locator("[data-testid=bot]").last
        expect(bot).not_to_be_empty(timeout=20_000)
        expect(page.locator("[data-testid=submit-button]").first).to_be_visible(timeout=20_000)
        first_reply = full_reply(store, [{"role": "user", "content": "Old stone river"}], 200)
        assert " ".join(bot.inner_text().split()) == " ".join(first_reply.split())
        page.screenshot(path=str(ARTIFACTS / "chat.png"), full_page=True)

        # A long generation, stopped once it is streaming: the reply is cut short and stops growing.
        store.load("wide")  # as if another user had switched models: the page now talks to the wide one
        max_tokens = page.get_by_label("number input for Max new tokens")
        max_tokens.fill("4096")
        max_tokens.press("Enter")
        box.fill("Tell me everything")
        expect(box).to_have_value("Tell me everything")
        box.press("Enter")
        expect(page.locator("[data-testid=bot]").nth(1)).not_to_be_empty(timeout=20_000)
        stop = page.locator("[data-testid=stop-button]").first
        # force: Gradio's progress text overlays the button while streaming; the click itself is at once,
        # but on a loaded machine the browser can take seconds to settle afterwards.
        stop.click(force=True, timeout=20_000)
        expect(page.locator("[data-testid=submit-button]").first).to_be_visible(timeout=10_000)
        stopped = " ".join(page.locator("[data-testid=bot]").nth(1).inner_text().split())
        time.sleep(1.0)
        assert " ".join(page.locator("[data-testid=bot]").nth(1).inner_text().split()) == stopped
        conversation = [
            {"role": "user", "content": "Old stone river"},
            {"role": "assistant", "content": first_reply},
            {"role": "user", "content": "Tell me everything"},
        ]
        whole = " ".join(full_reply(store, conversation, 4096).split())
        assert whole.startswith(stopped) and len(stopped) < len(whole)  # a strict prefix: it was stopped
        store.load("first")

        page.get_by_role("tab", name="Model").click()
        expect(page.get_by_text("Validation bits per byte")).to_be_visible()
        chart = page.locator(".vega-embed canvas, .vega-embed svg").first
        expect(chart).to_be_visible(timeout=10_000)  # the training curve is drawn
        chart.scroll_into_view_if_needed()
        page.screenshot(path=str(ARTIFACTS / "model-tab.png"), full_page=True)


def test_the_load_test_script_at_a_small_size(tiny_run, tmp_path):
    """benchmarks/load.py against a real server: complete, unmixed replies and flat memory."""
    out = tmp_path / "load.json"
    result = run_script(
        "-m", "benchmarks.load", "--checkpoint", str(tiny_run), "--users", "1", "4",
        "--seconds", "4", "--max-new-tokens", "16", "--out", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(out.read_text())
    assert report["distinct_replies"] >= 4, "replies must differ between prompts, or mixing could not be seen"
    for level, users in zip(report["levels"], (1, 4), strict=True):
        assert level["users"] == users and level["requests"] >= users and level["failures"] == 0
        assert 0 < level["first_token_p50_s"] <= level["latency_p50_s"] <= level["latency_p99_s"]
    assert abs(report["server_mb_growth"]) < report["max_growth_mb"]
    assert "4 users:" in result.stdout and "0 failed" in result.stdout
