"""The built-in chat set: conversations generated from the built-in corpus, so SFT works offline.

Every answer is text from the corpus itself (the opening of a reference topic or of a docstring),
so fine-tuning teaches the model the *form* of a conversation (a question in, an answer about the
asked topic out, then the end-of-turn token) on knowledge it saw in pre-training. Each subject is
asked several ways (the reference topics four ways, each docstring once, so the language's
main subjects are not drowned out by thousands of library functions); some conversations continue ("Tell me more.") with the next part of the text,
some start with a greeting, some have a system prompt. Generation is deterministic (seeded), so
the same Python version always gives the same set.
"""

from __future__ import annotations

import functools
import random
import re

from data.builtin import module_docstrings, topics

SYSTEM_PROMPT = "You are a helpful assistant that answers questions about Python."
TOPIC_QUESTIONS = (
    "Tell me about {subject}.",
    "What can you tell me about {subject}?",
    "Explain {subject}.",
    "What is {subject}?",
)
DEFINITION_QUESTIONS = ("What does {name} do?", "What is {name} for?", "Explain {name}.")
MODULE_QUESTIONS = (
    "What is the {name} module for?",
    "What does the {name} module do?",
    "Tell me about the {name} module.",
)
FOLLOW_UPS = ("Tell me more.", "Go on.", "What else?")
GREETINGS = (
    ("Hello!", "Hello! I am a small language model trained on Python's documentation. Ask me about Python."),
    ("Hi", "Hi! What would you like to know about Python?"),
    ("Good morning.", "Good morning! Ask me anything about Python's statements, types or library."),
    (
        "Who are you?",
        "I am a small language model trained on Python's documentation, here to answer questions about Python.",
    ),
    ("Thank you!", "You are welcome!"),
    ("Thanks, bye.", "Goodbye!"),
)
MAX_ANSWER_CHARS = 400


@functools.cache
def builtin_conversations() -> tuple[list[dict], ...]:
    rng = random.Random(0)
    conversations: list[list[dict]] = []
    for _key, text in topics():
        subject, paragraphs = _topic_subject(text), _prose_paragraphs(text)
        if paragraphs:
            conversations += _ask(rng, [q.format(subject=subject) for q in TOPIC_QUESTIONS], paragraphs)
    for sections in module_docstrings():
        for title, docstring in sections:
            paragraphs = _prose_paragraphs(docstring)
            if not paragraphs:
                continue
            if title.startswith("Module "):
                questions = [q.format(name=title.removeprefix("Module ")) for q in MODULE_QUESTIONS]
            else:
                questions = [q.format(name=title) for q in DEFINITION_QUESTIONS]
            conversations += _ask(rng, rng.sample(questions, 1), paragraphs)
    for question, answer in GREETINGS:
        conversations += [[{"role": "user", "content": question}, {"role": "assistant", "content": answer}]] * 3
    rng.shuffle(conversations)
    return tuple(conversations)


def _ask(rng: random.Random, questions: list[str], paragraphs: list[str]) -> list[list[dict]]:
    """One conversation per phrasing; some greet first, continue, or carry a system prompt."""
    conversations = []
    for question in questions:
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": paragraphs[0]}]
        if len(paragraphs) > 1 and rng.random() < 0.25:
            messages += [
                {"role": "user", "content": rng.choice(FOLLOW_UPS)},
                {"role": "assistant", "content": paragraphs[1]},
            ]
        if rng.random() < 0.1:
            greeting, reply = rng.choice(GREETINGS[:3])
            messages = [{"role": "user", "content": greeting}, {"role": "assistant", "content": reply}, *messages]
        if rng.random() < 0.2:
            messages = [{"role": "system", "content": SYSTEM_PROMPT}, *messages]
        conversations.append(messages)
    return conversations


def _topic_subject(text: str) -> str:
    """'The "assert" statement' -> 'the assert statement'; 'Lambdas' -> 'lambdas'."""
    title = text.splitlines()[0].replace('"', "").strip()
    return title[0].lower() + title[1:] if not title[:2].isupper() else title


def _prose_paragraphs(text: str) -> list[str]:
    """Paragraphs of running text (no headings, grammar or code), each cut to whole sentences."""
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.splitlines()
        if not lines or lines[0].startswith((" ", "\t", ">>>", "*", "=", "-")) or set(lines[-1]) <= set("*=-~^"):
            continue
        paragraph = " ".join(line.strip() for line in lines)
        if len(paragraph) < 20:
            continue
        paragraphs.append(_cut(paragraph[:-1] + "." if paragraph.endswith(":") else paragraph))
    return paragraphs


def _cut(paragraph: str) -> str:
    if len(paragraph) <= MAX_ANSWER_CHARS:
        return paragraph
    sentences = re.split(r"(?<=[.!?])\s+", paragraph)
    kept = sentences[0]
    for sentence in sentences[1:]:
        if len(kept) + 1 + len(sentence) > MAX_ANSWER_CHARS:
            break
        kept += " " + sentence
    return kept if len(kept) <= MAX_ANSWER_CHARS else kept[:MAX_ANSWER_CHARS].rsplit(" ", 1)[0] + " ..."
