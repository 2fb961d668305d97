"""Load test of the chat UI: many users chatting at once through its real API, for a bounded time.

    python -m benchmarks.load --checkpoint out/chat --users 1 4 16 --seconds 30

Starts `python -m ui` on a free localhost port (or drives `--url`), then for each user count runs
that many simulated users, each with its own `gradio_client.Client`, sending seeded chat requests
back to back until the time is up (each prompt sampled with its own seed). Every reply is checked against the reply the same prompt got
when it was asked alone first: a reply that is cut short, fails, or differs (for example because
it mixed with another user's) counts as a failure. Meanwhile the server's resident memory is
sampled. More users need more memory (worker threads, their caches and allocator arenas), so
"flat" is judged within each level: from a third of the way in, once that many users are
running, to the end. A leak shows as growth there.

Prints a table and writes the figures (requests, failures, latency and time-to-first-token
percentiles, replies per second, server memory) as JSON; exits with status 1 if any request
failed or memory grew by more than `--max-growth-mb`.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import benchmarks
from benchmarks.report import check_writable, write_files
from model.errors import UserError

ROOT = Path(__file__).resolve().parent.parent

PROMPTS = [
    "What does the assert statement do?",
    "Explain the for statement.",
    "What is a lambda?",
    "How do I open a file?",
    "What is a list comprehension?",
    "Tell me about exceptions.",
    "What does import do?",
    "How do classes work?",
    "What is a dictionary?",
    "Explain the while statement.",
    "What is a generator?",
    "How do I define a function?",
    "What is a module?",
    "Explain string formatting.",
    "What does the with statement do?",
    "What is a tuple?",
]


def chat_arguments(message: str, temperature=0.0, top_k=0, top_p=1.0, max_new_tokens=24, seed=1) -> tuple:
    """The UI's `/chat` endpoint's arguments in its order (ui/app.py), the system prompt left empty."""
    return (message, "", temperature, top_k, top_p, max_new_tokens, seed)


def reply_text(result) -> str:
    """The reply in what `/chat` returns or streams: the text itself, or a tuple that starts with it."""
    return result[0] if isinstance(result, (list, tuple)) else result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serve(*ui_args: str, timeout: float = 120):
    """Run `python -m ui ARGS` on a free localhost port; yields (process, url) once it answers."""
    import httpx

    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(
        [sys.executable, "-m", "ui", "--port", str(port), *ui_args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise UserError(f"the UI exited with status {process.returncode}: {process.stderr.read().strip()}")
            try:
                httpx.get(url, timeout=2)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise UserError(f"the UI did not answer on {url} within {timeout:.0f} s") from None
                time.sleep(0.2)
        yield process, url
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()


def resident_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def ask(client, prompt: str, max_new_tokens: int) -> tuple[str, float | None, float]:
    """One chat request in a conversation of its own, streamed: (reply, seconds to first text, seconds in all).

    Sampled at temperature 1 with a seed of its own per prompt: the reply is reproducible, and
    differs from prompt to prompt even for a barely trained model, so a mix-up would show.
    """
    client.reset_session()  # a new conversation: the app keeps each session's history
    start = time.perf_counter()
    first = None
    seed = PROMPTS.index(prompt) + 1
    job = client.submit(*chat_arguments(prompt, 1.0, max_new_tokens=max_new_tokens, seed=seed), api_name="/chat")
    for update in job:
        if first is None and reply_text(update):
            first = time.perf_counter() - start
    return reply_text(job.result()), first, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_level(url, auth, users: int, seconds: float, expected: dict[str, str], max_new_tokens: int, pid) -> dict:
    from gradio_client import Client

    results: list[dict] = []
    lock = threading.Lock()
    memory: list[float] = []
    stop = threading.Event()

    def user(number: int) -> None:
        try:
            client = Client(url, auth=auth, verbose=False, analytics_enabled=False)
        except Exception as error:  # noqa: BLE001 - a user who cannot connect is a failed request
            with lock:
                results.append({"ok": False, "error": f"connect: {error}"})
            return
        turn = 0
        while not stop.is_set():
            prompt = PROMPTS[(number + turn * users) % len(PROMPTS)]
            turn += 1
            try:
                reply, first, total = ask(client, prompt, max_new_tokens)
                record = {"ok": reply == expected[prompt], "first": first, "total": total}
                if reply != expected[prompt]:
                    record["error"] = f"reply to {prompt!r} differs from the reply it gets alone"
            except Exception as error:  # noqa: BLE001 - every failure is counted and reported
                record = {"ok": False, "error": str(error)[:200]}
            with lock:
                results.append(record)

    def watch() -> None:
        while not stop.is_set():
            memory.append((time.perf_counter() - start, resident_mb(pid)))
            stop.wait(0.25)

    threads = [threading.Thread(target=user, args=(n,)) for n in range(users)]
    if pid:
        threads.append(threading.Thread(target=watch))
    start = time.perf_counter()
    try:
        for thread in threads:
            thread.start()
        time.sleep(seconds)
    finally:  # Ctrl-C or SIGTERM too: the users' threads stop after their request, so the process can end
        stop.set()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    ok = [r for r in results if r["ok"]]
    totals = [r["total"] for r in ok]
    firsts = [r["first"] for r in ok if r["first"] is not None]
    figures = {
        "users": users,
        "seconds": round(wall, 1),
        "requests": len(results),
        "failures": len(results) - len(ok),
        "errors": sorted({r["error"] for r in results if not r["ok"]})[:5],
        "replies_per_second": round(len(ok) / wall, 2),
        **{f"latency_p{q}_s": _round(percentile(totals, q / 100)) for q in (50, 90, 99)},
        **{f"first_token_p{q}_s": _round(percentile(firsts, q / 100)) for q in (50, 90, 99)},
    }
    if pid:
        figures.update(memory_figures(memory, seconds, resident_mb(pid)))
    return figures


def memory_figures(memory: list[tuple[float, float]], seconds: float, end: float) -> dict:
    """The server's memory over a level from its samples (seconds in, MB) and its reading at the end.
    Settled is a third of the way in, once this many users' threads and caches exist; the peak counts
    the end reading too (it was below the end when that was the highest)."""
    settled = next((mb for t, mb in memory if t >= seconds / 3), memory[-1][1] if memory else end)
    return {
        "server_mb_settled": round(settled, 1),
        "server_mb_end": round(end, 1),
        "server_mb_peak": round(max([mb for _, mb in memory] + [end]), 1),
        "server_mb_growth": round(end - settled, 1),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def measure(url: str, auth, levels: list[int], seconds: float, max_new_tokens: int, pid: int | None) -> dict:
    from gradio_client import Client

    try:
        client = Client(url, auth=auth, verbose=False, analytics_enabled=False)
    except Exception as error:  # noqa: BLE001 - nothing answers, or what answers is not the chat UI
        reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise UserError(
            f"cannot reach the chat UI at {url} ({reason}); start it (python -m ui --checkpoint RUN) and give its "
            "address with --url, or give --checkpoint to have this test start it"
        ) from None
    expected = {p: ask(client, p, max_new_tokens)[0] for p in PROMPTS}  # each prompt alone, also a warm-up
    report = {
        "url": url,
        "max_new_tokens": max_new_tokens,
        "distinct_replies": len(set(expected.values())),
        "prompts": len(expected),
        "server_mb_after_warmup": round(resident_mb(pid), 1) if pid else None,
        "levels": [],
    }
    for users in levels:
        level = run_level(url, auth, users, seconds, expected, max_new_tokens, pid)
        report["levels"].append(level)
        print(_row(level), flush=True)
    if pid:  # under sustained load at any level, memory must not keep growing
        report["server_mb_growth"] = max(level["server_mb_growth"] for level in report["levels"])
    return report


def _row(level: dict) -> str:
    def s(key):
        value = level.get(key)
        return "-" if value is None else f"{value:.3f}"

    return (
        f"{level['users']:>5} users: {level['requests']:>4} requests, {level['failures']} failed, "
        f"{level['replies_per_second']:.2f}/s, latency p50 {s('latency_p50_s')} p90 {s('latency_p90_s')} "
        f"p99 {s('latency_p99_s')} s, first token p50 {s('first_token_p50_s')} p90 {s('first_token_p90_s')} s"
        + (
            f", server {level['server_mb_end']:.0f} MB (peak {level['server_mb_peak']:.0f})"
            if "server_mb_end" in level
            else ""
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--checkpoint", help="run folder to serve with `python -m ui` for the test")
    target.add_argument("--url", help="drive an already running UI instead (server memory is then not measured)")
    parser.add_argument("--users", type=int, nargs="+", default=[1, 4, 16], help="concurrent users, one level each")
    parser.add_argument("--seconds", type=float, default=30, help="how long each level sends requests")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="reply length asked for")
    parser.add_argument("--concurrency", type=int, default=4, help="the UI's --concurrency when this script starts it")
    parser.add_argument("--auth", help="user:password, for a UI started with --auth")
    parser.add_argument(
        "--max-growth-mb", type=float, default=50, help="server memory growth within a level that counts as a leak"
    )
    parser.add_argument(
        "--out", default=str(ROOT / "benchmarks" / "results" / "load.json"), help="where to write the figures"
    )
    args = parser.parse_args()
    if min(args.users) < 1 or args.seconds <= 0 or args.max_new_tokens < 1:
        raise UserError("--users must be at least 1, --seconds and --max-new-tokens positive")
    check_writable(args.out)
    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    if args.url:
        report = measure(args.url, auth, args.users, args.seconds, args.max_new_tokens, None)
    else:
        ui_args = ["--checkpoint", args.checkpoint, "--concurrency", str(args.concurrency)]
        if args.auth:
            ui_args += ["--auth", args.auth]
        with serve(*ui_args) as (process, url):
            report = measure(url, auth, args.users, args.seconds, args.max_new_tokens, process.pid)
        report["concurrency"] = args.concurrency
    report["max_growth_mb"] = args.max_growth_mb
    out = Path(args.out)
    failed = sum(level["failures"] for level in report["levels"])
    leaked = (report.get("server_mb_growth") or 0) > args.max_growth_mb
    print(
        f"{failed} failed request(s); server memory growth {report.get('server_mb_growth', 'not measured')} MB",
        flush=True,
    )
    write_files(out.parent, {out.name: json.dumps(report, indent=2) + "\n"})
    print(f"wrote {out}")
    if failed or leaked:
        sys.exit(1)


if __name__ == "__main__":
    benchmarks.run(main)
