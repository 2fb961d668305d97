"""With `--auth`, every route answers only a logged-in user: the page, the API, the event streams.

Gradio's own `auth` guards the routes that run the app (config, queue, predictions) but leaves
a few helpers open (who-am-I, heartbeat and cancel streams, run history), and its login page
embeds the app's whole API description, the names of the runs on offer included. So this ASGI
middleware sits in front of every route. Before login, `/` is a small login form of ours that
posts to Gradio's own `/login`, which sets the session cookie; only that, logout, the icon and
the start-up ping Gradio's launch sends itself (it answers only true or false) are open.
Everything else needs a session cookie that Gradio issued, checked the way Gradio checks it.
The automatic FastAPI schema and docs pages are switched off with or without auth.
"""

from __future__ import annotations

import json
from http.cookies import SimpleCookie

# Open before login: the login flow itself, the icon, and Gradio's start-up ping.
PUBLIC_PATHS = {"/login", "/login/", "/logout", "/favicon.ico", "/gradio_api/startup-events"}
NO_SCHEMA = {"openapi_url": None, "docs_url": None, "redoc_url": None}
LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>pocketgpt: log in</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{font-family:system-ui,sans-serif;display:grid;place-items:center;min-height:90vh}
form{display:grid;gap:.6em;min-width:16em}button{padding:.5em}#error{color:#b00}</style></head>
<body><form id="login"><h1>pocketgpt</h1>
<label>username <input name="username" autocomplete="username" required></label>
<label>password <input name="password" type="password" autocomplete="current-password" required></label>
<button type="submit">Login</button><p id="error" role="alert"></p></form>
<script>
document.getElementById("login").addEventListener("submit", async (event) => {
  event.preventDefault();
  const response = await fetch("login", {method: "POST", body: new FormData(event.target)});
  if (response.ok) { location.reload(); } else { document.getElementById("error").textContent = "Incorrect credentials"; }
});
</script></body></html>
"""


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS


class RequireLogin:
    """ASGI middleware: refuse (401) any non-public request without a valid Gradio session."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket") and not is_public(scope["path"]):
            gradio = scope["app"]  # set by Starlette before the middleware stack runs
            if getattr(gradio, "auth", None) and not _logged_in(scope, gradio):
                if scope["type"] == "http" and scope["path"] == "/" and scope["method"] == "GET":
                    await _respond(send, 200, "text/html; charset=utf-8", LOGIN_PAGE.encode())
                else:
                    await _refuse(scope, send)
                return
        await self.app(scope, receive, send)


def app_kwargs(auth: bool) -> dict:
    """Keyword arguments for the FastAPI app Gradio creates (`launch(app_kwargs=...)`)."""
    from starlette.middleware import Middleware

    return {**NO_SCHEMA, "middleware": [Middleware(RequireLogin)]} if auth else dict(NO_SCHEMA)


def _logged_in(scope, gradio) -> bool:
    cookies = SimpleCookie()
    for name, value in scope.get("headers", []):
        if name == b"cookie":
            cookies.load(value.decode("latin-1"))
    for name in (f"access-token-{gradio.cookie_id}", f"access-token-unsecure-{gradio.cookie_id}"):
        if name in cookies and cookies[name].value in gradio.tokens:
            return True
    return False


async def _refuse(scope, send) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 4401})
        return
    await _respond(send, 401, "application/json", json.dumps({"detail": {"error": "Not authenticated"}}).encode())


async def _respond(send, status: int, content_type: str, body: bytes) -> None:
    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
