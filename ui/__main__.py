"""`python -m ui`: serve the chat app for the checkpoints under an output folder (and the one --checkpoint names).

Binds to 127.0.0.1 unless --host says otherwise; a public share link and a password only when
asked for; with --auth every route, the API included, needs a login (ui/auth.py). With no
checkpoint at all it still starts, and the page says how to train one.
"""

from __future__ import annotations

import argparse
import socket
from pathlib import Path

from model.errors import UserError, run_cli
from model.flags import HelpFormatter, add_device_flags


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ui", description="Chat with trained checkpoints in the browser.", formatter_class=HelpFormatter
    )
    parser.add_argument(
        "--checkpoint",
        help="run folder, or one of its checkpoint folders (run/step-N), to serve first; the Model tab offers it "
        "too, wherever it is (default: the newest run under --out-root)",
    )
    parser.add_argument(
        "--out-root", default="out", help="folder whose runs the Model tab offers (searched recursively)"
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (0.0.0.0 exposes the app to your network)"
    )
    parser.add_argument("--port", type=int, default=7860, help="port to listen on")
    parser.add_argument("--share", action="store_true", help="also publish a temporary public link through Gradio")
    parser.add_argument("--auth", help="require this user:password to open the page and use the API")
    parser.add_argument(
        "--concurrency", type=int, default=4, help="replies generated at the same time; more requests wait in a queue"
    )
    add_device_flags(parser)
    return parser


def parse_auth(value: str | None) -> tuple[str, str] | None:
    if value is None:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise UserError("--auth takes user:password, both non-empty")
    return user, password


def main() -> None:
    args = build_parser().parse_args()
    auth = parse_auth(args.auth)
    if not 0 < args.port < 65536 or args.concurrency < 1:
        raise UserError("--port must be 1-65535 and --concurrency at least 1")
    check_can_listen(args.host, args.port)  # before loading any model: a busy port is found in a moment
    from ui.app import build_app
    from ui.auth import app_kwargs
    from ui.models import ModelStore

    root = Path(args.out_root)
    if root.exists() and not root.is_dir():
        raise UserError(f"--out-root {root} is a file; give the folder your runs are in")
    store = ModelStore(root, args.device, args.dtype, args.int8_weights)
    first = store.add(args.checkpoint) if args.checkpoint else next(iter(store.runs()), None)
    if first is not None:
        store.load(first)
    app = build_app(store)
    app.queue(default_concurrency_limit=args.concurrency)
    print(f"serving {store.current.name if store.current else 'no model yet'} on http://{args.host}:{args.port}")
    app.launch(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        auth=auth,
        app_kwargs=app_kwargs(auth is not None),
        ssr_mode=False,
        show_error=True,  # a refused input's own message (never a traceback) instead of a generic one
    )


def check_can_listen(host: str, port: int) -> None:
    """Bind `host:port` once and let go, so a busy port or a bad address is one line, not Gradio's traceback."""
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server sets it
            probe.bind(address)
    except OSError as error:
        reason = getattr(error, "strerror", None) or error
        raise UserError(
            f"cannot listen on {host}:{port} ({reason}); pick another --port, or a --host of this machine"
        ) from None


if __name__ == "__main__":
    run_cli(main)
