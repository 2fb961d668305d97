"""The Gradio app: Chat, Complete and Model tabs around one shared, switchable model.

Design decisions:
- Generation functions are plain (synchronous) generators: Gradio runs them in worker threads, so
  the event loop never blocks, and each request has its own engine call (its own KV cache and
  RNG), so concurrent chats never mix. The queue's concurrency limit is a flag.
- Settings live in a sidebar shared by the Chat and Complete tabs; values arriving through the
  API are validated by the same `SamplingConfig.validate` as the CLI and reported with `gr.Error`
  (a message on the page, never a stack trace, and no traceback in the server's terminal: a
  refusal is not a fault). A chat message the model cannot take is refused by
  ChatInterface's validator before it is shown in the chat. What the validator cannot see (the
  settings, the system prompt) is refused by the chat function; after such a refusal the message
  goes back into the input box (Gradio 6.31's page would leave the box disabled, see
  `after_failed_chat`).
- The conversation is rendered by model/chat_template.py, the same code as `sample.py --chat`
  and fine-tuning; when it outgrows the context the oldest turns are dropped and the page says so.
- Air-gapped: analytics off, no share link unless asked for, no server-side rendering.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import gradio as gr
from gradio.events import Dependency

from model.chat_template import message_text, prompt_budget, stream_reply
from model.errors import UserError
from model.sampling import SamplingConfig
from ui.models import LoadedModel, ModelStore

EMPTY_MESSAGE = "The message is empty: type something to send."
EXAMPLES = {
    "builtin": ["What does the assert statement do?", "Explain the for statement.", "What is a lambda?"],
    "shakespeare": ["Good morrow, my lord.", "What news from Verona?", "Speak, what hast thou seen?"],
    "other": ["Hello! Who are you?", "Tell me a story.", "What do you know about the sea?"],
}


def train_hint(root: Path, markdown: bool = False) -> str:
    """What to do before any model exists: in Markdown for the page's text, plain for a toast or the
    message under the chat box (which show backticks as they are)."""
    tick = "`" if markdown else ""
    return f"No trained model found under {tick}{root}/{tick}. Train one with {tick}python train.py{tick}, then reload this page."


def example_prompts(model: LoadedModel | None) -> list[str]:
    source = ((model.checkpoint.meta.get("data") or {}).get("source", "") if model else "").lower()
    for key in ("builtin", "shakespeare"):
        if key in source:
            return EXAMPLES[key]
    return EXAMPLES["other"]


def refusal(message: str) -> gr.Error:
    """The error for input the app refuses: its message on the page, and nothing in the server's
    terminal (Gradio prints a traceback for every gr.Error unless `print_exception` is off)."""
    return gr.Error(message, print_exception=False)


def quiet_range(slider: gr.Slider) -> gr.Slider:
    """`slider`, its range check made one of our refusals. The page's sliders stop at their ends, so
    only a value sent through the API is out of range, and Gradio's own refusal of it printed a
    traceback in the server's terminal. (A subclass would do the same, but Gradio writes a .pyi
    file beside the module of every component class.)"""
    check = slider.preprocess

    def preprocess(payload: float) -> float:
        try:
            return check(payload)
        except gr.Error as error:
            raise refusal(error.message) from None

    slider.preprocess = preprocess
    return slider


MAX_SEED = 2**53  # the page's seeds are below this: every whole number there is exact in a browser's number


def sampling_from(temperature, top_k, top_p, max_new_tokens, seed) -> SamplingConfig:
    try:
        sampling = SamplingConfig(
            max_new_tokens=int(max_new_tokens),
            temperature=float(temperature),
            top_k=int(top_k),
            top_p=float(top_p),
            seed=seed_from(seed),
        )
        sampling.validate()
    except (TypeError, ValueError, UserError) as error:
        raise refusal(f"Bad generation setting: {error}") from None
    return sampling


def seed_from(value) -> int | None:
    """The seed typed (-1 or none: a random one). The browser sends a number input's value as a double,
    which past 2**53 is rounded to a neighbour (2**64 - 1 arrives as 2**64), so the page takes seeds
    below 2**53 only, where the seed typed is the seed used; sample.py takes up to 2**64."""
    if value is None or value == -1:
        return None
    if not (isinstance(value, (int, float)) and 0 <= value < MAX_SEED and value == int(value)):
        raise ValueError(
            f"the seed must be a whole number from 0 to {MAX_SEED - 1:,} (2**53 - 1, the largest a browser "
            "keeps exact), or -1 for a random one"
        )
    return int(value)


def system_messages(system: str | None) -> list[dict]:
    """The system prompt as the conversation's first message, or none when the box is blank."""
    return [{"role": "system", "content": system}] if system and system.strip() else []


def chat_steps(app: gr.Blocks, interface: gr.ChatInterface) -> list[int]:
    """The indices of ChatInterface's chat steps (after sending, retrying, clicking an example): its
    events are not returned to us, so they are found by their first two inputs, the message being sent
    and the chat before it."""
    return [
        index for index, step in app.fns.items() if step.inputs[:2] == [interface.saved_input, interface.chatbot_state]
    ]


def build_app(store: ModelStore) -> gr.Blocks:
    def current() -> LoadedModel:
        if store.current is None:
            raise refusal(train_hint(store.root))
        return store.current

    def start_reply(message: str, history: list[dict], system: str, *settings):
        """The model, the fitted prompt and the reply's pieces (not started), or gr.Error for a
        conversation or setting the chat refuses."""
        model, sampling = current(), sampling_from(*settings)
        if not message_text(message).strip():  # what the page's check refuses, from the API
            raise refusal(EMPTY_MESSAGE)
        messages = system_messages(system)
        messages += [
            {"role": m["role"], "content": message_text(m["content"])}
            for m in history
            if m.get("role") in ("user", "assistant")
        ]
        messages.append({"role": "user", "content": message_text(message)})
        try:
            return model, *stream_reply(model.engine, model.template, messages, sampling)
        except UserError as error:
            raise refusal(str(error)) from None

    def chat(message: str, history: list[dict], system: str, *settings) -> Iterator[tuple[str, str]]:
        model, prompt, pieces = start_reply(message, history, system, *settings)
        notice = ""
        if prompt.dropped:
            notice = f"⚠️ The {prompt.dropped} oldest messages no longer fit the model's context ({model.engine.context} tokens) and were left out of what it sees."
        reply = ""
        yield reply, notice
        for piece in pieces:
            reply += piece
            yield reply.lstrip(), notice

    def after_failed_chat(message: str, history: list[dict], system: str, *settings):
        """Make the input usable again after a chat step fails or is stopped.

        ChatInterface re-enables its input in `.then` steps, and Gradio 6.31's page runs no `.then`
        step after a step that raised (it does after one that was stopped), so a refusal left the box
        disabled until a reload. A refusal (the same inputs are refused again here, which a stopped
        reply's are not) also takes the message out of the chat and puts it back in the box, to send
        again once the setting is fixed."""
        usable = {"interactive": True, "submit_btn": interface.textbox.submit_btn, "stop_btn": False}
        try:
            start_reply(message, history, system, *settings)
        except gr.Error:
            return gr.Textbox(value=message, **usable), history, history
        return gr.Textbox(**usable), gr.skip(), gr.skip()

    def check_message(message, *_) -> object:
        """Refuse, before the message is shown in the chat, a message the chat function would refuse
        whatever the settings. Gradio passes ChatInterface's validator the message alone, so this
        checks it with no history or system prompt and the smallest reply a setting asks for (one
        token); the chat function checks the conversation with the settings, and a refusal there
        puts the message back in the box (`after_failed_chat`)."""
        model = store.current
        if model is None:
            return gr.validate(False, train_hint(store.root))
        if not message_text(message).strip():  # as `sample.py --chat` skips a blank line
            return gr.validate(False, EMPTY_MESSAGE)
        try:
            model.template.fit(
                [{"role": "user", "content": message_text(message)}], prompt_budget(model.engine.context, 1)
            )
        except UserError as error:
            return gr.validate(False, str(error))
        return gr.validate(True, "")

    def check_system_prompt(system: str, max_new_tokens) -> None:
        """Warn, as soon as the box is left, of a system prompt the chat would refuse with the reply's
        length set now, before a message is written for nothing."""
        model = store.current
        if model is None:
            return
        try:
            budget = prompt_budget(model.engine.context, int(max_new_tokens))
            model.template.check_system(system_messages(system), budget)
        except (TypeError, ValueError):
            return  # not a number of tokens: the chat says so when a message is sent
        except UserError as error:
            gr.Warning(f"{error} (until then the chat refuses every message)")

    def complete(prompt: str, *settings) -> Iterator[str]:
        model, sampling = current(), sampling_from(*settings)
        tokens = model.engine.encode_prompt(prompt or "")
        if len(tokens) > model.engine.context:
            raise refusal(
                f"The prompt is {len(tokens)} tokens; the model's context is {model.engine.context}. Shorten it."
            )
        text = prompt or ""
        yield text
        for _, piece in model.engine.stream([tokens], sampling):
            text += piece
            yield text

    def switch(name: str):
        try:
            model = store.load(name)
        except UserError as error:
            raise refusal(str(error)) from None
        return model.description, model.curve(), status(model)

    def examples_now():
        """The chat's example prompts for the model served now (they are shown until the first message)."""
        return gr.update(examples=[{"text": text} for text in example_prompts(store.current)])

    def refresh():
        runs = store.runs()
        return gr.Dropdown(choices=runs, value=store.current.name if store.current else None)

    def on_page_load():
        """What the server serves now, not what it served when the app was built: another page may have
        switched models, and runs may have appeared (a first one is loaded, as the hint promises)."""
        if store.current is None and (runs := store.runs()):
            with contextlib.suppress(UserError):  # a damaged newest run: the Model tab says why when picked
                store.load(runs[0])
        model = store.current
        return status(model), refresh(), description(model)

    def status(model: LoadedModel | None) -> str:
        return f"**Model:** `{model.name}`" if model else train_hint(store.root, markdown=True)

    def description(model: LoadedModel | None) -> str:
        return model.description if model else train_hint(store.root, markdown=True)

    model = store.current
    with gr.Blocks(title="pocketgpt", analytics_enabled=False, fill_height=True) as app:
        with gr.Sidebar(label="Settings", open=True):
            status_box = gr.Markdown(status(model))
            temperature = quiet_range(gr.Slider(0, 2, value=0.8, step=0.05, label="Temperature (0 = greedy)"))
            top_k = quiet_range(gr.Slider(0, 200, value=50, step=1, label="Top-k (0 = off)"))
            top_p = quiet_range(gr.Slider(0.05, 1, value=0.95, step=0.05, label="Top-p (1 = off)"))
            max_new_tokens = quiet_range(gr.Slider(1, 4096, value=200, step=1, label="Max new tokens"))
            seed = gr.Number(  # no precision: Gradio would round 1.5 to 2; seed_from refuses it
                value=-1, label="Seed (-1 = random)", info=f"a whole number from 0 to {MAX_SEED - 1:,}"
            )
        settings = [temperature, top_k, top_p, max_new_tokens, seed]
        with gr.Tabs():
            with gr.Tab("Chat", id="chat"):
                notice = gr.Markdown("")
                system = gr.Textbox(
                    label="System prompt", placeholder="Optional instructions for the model", lines=1, render=False
                )
                interface = gr.ChatInterface(
                    chat,
                    additional_inputs=[system, *settings],
                    additional_inputs_accordion="System prompt",
                    additional_outputs=[notice],
                    examples=[[e] for e in example_prompts(model)],
                    run_examples_on_click=True,
                    cache_examples=False,
                    api_name="chat",
                    validator=check_message,
                    analytics_enabled=False,
                    fill_height=True,
                )
                interface.chatbot.clear(lambda: "", None, notice, api_visibility="private")  # no stale notice
                for step in chat_steps(app, interface):
                    Dependency(None, {}, step, None).failure(
                        after_failed_chat,
                        [interface.saved_input, interface.chatbot_state, system, *settings],
                        [interface.textbox, interface.chatbot, interface.chatbot_state],
                        queue=False,
                        api_visibility="private",
                    )
                system.blur(check_system_prompt, [system, max_new_tokens], None, api_visibility="private")
            with gr.Tab("Complete", id="complete"):
                prompt = gr.Textbox(label="Text to continue", lines=4, placeholder="Once upon a time")
                with gr.Row():
                    go = gr.Button("Generate", variant="primary")
                    stop = gr.Button("Stop", variant="stop")
                output = gr.Textbox(label="Text", lines=12, interactive=False)
                event = go.click(complete, [prompt, *settings], output, api_name="complete")
                stop.click(None, None, None, cancels=[event])
            with gr.Tab("Model", id="model") as model_tab:
                with gr.Row():
                    picker = gr.Dropdown(
                        choices=store.runs(),
                        value=model.name if model else None,
                        label="Checkpoint",
                        scale=4,
                        allow_custom_value=True,  # a run trained since the page loaded; ModelStore.load checks it
                    )
                    rescan = gr.Button("Rescan", scale=1)
                info = gr.Markdown(description(model))
                curve = gr.LinePlot(
                    model.curve() if model else None, x="step", y="value", color="series", label="Training curve"
                )
                # .input: a person's pick (or an API call), not the page refreshing the list.
                switched = picker.input(switch, picker, [info, curve, status_box], api_name="load_model")
                switched.failure(
                    refresh,
                    None,
                    picker,
                    api_visibility="private",  # a run that failed to load is not shown as picked
                )
                switched.success(examples_now, None, interface.chatbot, api_visibility="private")
                rescan.click(refresh, None, picker, api_visibility="private")
                # A plot drawn while its tab is hidden has no size: draw it when the tab opens.
                model_tab.select(
                    lambda: store.current.curve() if store.current else None, None, curve, api_visibility="private"
                )
        app.load(on_page_load, None, [status_box, picker, info], api_visibility="private").then(
            examples_now, None, interface.chatbot, api_visibility="private"
        )
    return app
