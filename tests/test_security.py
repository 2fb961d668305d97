"""Nothing let in: no code runs from a checkpoint, the UI reads only its own folder, binds to
localhost, and with --auth answers nobody who has not logged in, on any route."""

from __future__ import annotations

import json
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from gradio_client import Client

from benchmarks.load import chat_arguments, reply_text, serve
from model.checkpoint import Checkpoint, _sha256, load_checkpoint
from model.errors import UserError
from tests.conftest import ROOT, run_script
from tests.test_cli import assert_clean_error
from tests.test_ui import opened_page
from ui.models import ModelStore


class Planted:
    """Unpickling this creates the marker file: proof that code from the file ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture
def booby_trapped(tiny_run, tmp_path) -> tuple[Path, Path]:
    """A copy of a checkpoint whose weights and optimizer state are malicious pickles, checksums
    updated to match (whoever planted them could do that too), plus the usual pickle file names."""
    marker = tmp_path / "code-ran"
    folder = tmp_path / "trapped"
    shutil.copytree(load_checkpoint(tiny_run).folder, folder)
    (folder / "model.safetensors").write_bytes(pickle.dumps(Planted(marker)))
    torch.save({"state": Planted(marker)}, folder / "trainer.safetensors")
    for name in ("pytorch_model.bin", "model.pt", "optimizer.pt"):
        torch.save(Planted(marker), folder / name)
    meta = json.loads((folder / "checkpoint.json").read_text())
    meta["files"].update({name: _sha256(folder / name) for name in ("model.safetensors", "trainer.safetensors")})
    (folder / "checkpoint.json").write_text(json.dumps(meta))
    return folder, marker


def test_the_planted_pickles_are_armed(booby_trapped):
    """The trap works: a loader that unpickles (torch.load without weights_only) runs the code."""
    folder, marker = booby_trapped
    code = f"import pickle; pickle.loads(open({str(folder / 'model.safetensors')!r}, 'rb').read())"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True)
    assert marker.exists()
    marker.unlink()
    code = f"import torch; torch.load({str(folder / 'optimizer.pt')!r}, weights_only=False)"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True)
    assert marker.exists()


def test_loading_a_checkpoint_never_runs_code_from_it(booby_trapped, corpus_file, tmp_path):
    folder, marker = booby_trapped
    with pytest.raises(UserError, match="model.safetensors"):
        load_checkpoint(folder)  # checksums match, but its header is refused: a pickle is no safetensors file
    checkpoint = Checkpoint(folder, json.loads((folder / "checkpoint.json").read_text()))  # past that check
    with pytest.raises(UserError, match="model.safetensors"):
        checkpoint.load_model()
    with pytest.raises(UserError, match="trainer.safetensors"):
        checkpoint.load_trainer_state()
    assert_clean_error(run_script("sample.py", "--checkpoint", str(folder)), "model.safetensors")
    assert_clean_error(
        run_script("-m", "model.evaluate", "--checkpoint", str(folder), "--text", str(corpus_file)), "model.safetensors"
    )
    init = run_script(
        "train.py", "--preset", "tiny", "--init-from", str(folder), "--data", str(corpus_file),
        "--out-dir", str(tmp_path / "new"), "--cache-dir", str(tmp_path / "cache"), "--no-progress",
    )  # fmt: skip
    assert_clean_error(init, "model.safetensors")
    assert not marker.exists(), "code from the checkpoint ran"


def test_no_project_code_unpickles():
    """Weights and optimizer state are safetensors and JSON; nothing calls a pickle loader."""
    sources = [p for p in ROOT.rglob("*.py") if not {"tests", ".venv", "venv"} & set(p.relative_to(ROOT).parts)]
    pattern = re.compile(r"torch\.load\(|pickle\.loads?\(|import pickle|import dill|joblib\.load")
    offenders = [str(p.relative_to(ROOT)) for p in sources if pattern.search(p.read_text())]
    assert sources and not offenders


def test_the_ui_serves_only_runs_under_its_folder(tiny_run, tmp_path):
    root, outside = tmp_path / "out", tmp_path / "private"
    shutil.copytree(tiny_run, root / "good")
    shutil.copytree(tiny_run, outside / "secret")
    (root / "link").symlink_to(outside / "secret")  # a run folder that is a link to elsewhere
    shutil.copytree(tiny_run, root / "sneaky")  # a run whose checkpoint folder is a link to elsewhere
    step = load_checkpoint(root / "sneaky").folder
    shutil.rmtree(step)
    step.symlink_to(load_checkpoint(outside / "secret").folder)
    shutil.copytree(tiny_run, root / "pointer")  # a run whose BEST names a folder outside it
    (root / "pointer" / "BEST").write_text("../../private/secret/" + step.name + "\n")

    store = ModelStore(root)
    assert "link" not in store.runs()
    for name in (
        "link",
        "../private/secret",
        str(outside / "secret"),
        "sneaky",
        "pointer",
        "good/../../private/secret",
    ):
        with pytest.raises(UserError):
            store.load(name)
    assert store.load("good").name == "good"


def listening_addresses(port: int) -> set[str]:
    """The local addresses a socket is listening on at `port`, read from the kernel's tables."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, port_hex = local.rsplit(":", 1)
            if state == "0A" and int(port_hex, 16) == port:  # 0A = LISTEN
                if len(address) == 8:
                    address = ".".join(str(b) for b in reversed(bytes.fromhex(address)))
                found.add(address)
    return found


@pytest.mark.parametrize("host_args, expected", [([], {"127.0.0.1"}), (["--host", "0.0.0.0"], {"0.0.0.0"})])
def test_the_ui_listens_on_localhost_unless_told_otherwise(host_args, expected, tmp_path):
    with serve("--out-root", str(tmp_path / "empty"), *host_args) as (_, url):
        assert listening_addresses(int(url.rsplit(":", 1)[1].strip("/"))) == expected


def routes() -> list[tuple[str, str]]:
    """Every (method, path) the UI's web server answers, as this Gradio version builds it."""
    import gradio as gr

    from ui.app import build_app
    from ui.auth import app_kwargs

    app = gr.routes.App.create_app(build_app(ModelStore(Path("no-runs"))), app_kwargs=app_kwargs(True))

    def walk(items):
        for route in items:
            if hasattr(route, "path"):
                for method in sorted(getattr(route, "methods", None) or ["GET"]):
                    if method not in ("HEAD", "OPTIONS"):
                        yield method, route.path
            else:  # an included router
                yield from walk(route.original_router.routes)

    return list(walk(app.routes))


def test_auth_protects_every_route_the_api_included(tiny_run, tmp_path):
    from ui.auth import is_public

    run = tmp_path / "out" / "run-qz7"  # a name the login page must not give away
    shutil.copytree(tiny_run, run)
    every = routes()
    assert len(every) > 40 and ("POST", "/gradio_api/queue/join") in every
    with serve("--checkpoint", str(run), "--auth", "alice:s3cret") as (_, url):
        base = url.rstrip("/")
        for method, path in every:
            concrete = re.sub(r"\{[^}]+\}", "x", path)
            with httpx.stream(method, base + concrete, timeout=10) as response:
                if is_public(path) or (method, path) == ("GET", "/"):
                    assert response.status_code != 401, path
                else:
                    assert response.status_code == 401, (method, path, response.status_code)
        page = httpx.get(base + "/").text  # the login form, and nothing about the app
        assert 'type="password"' in page and run.name not in page and "api" not in page.lower()
        with pytest.raises(Exception):  # noqa: B017 - gradio_client raises its own types for 401
            Client(url, verbose=False, analytics_enabled=False).predict(*chat_arguments("hello"), api_name="/chat")
        with pytest.raises(Exception, match="(?i)login|credentials|auth"):
            Client(url, auth=("alice", "wrong"), verbose=False, analytics_enabled=False)
        client = Client(url, auth=("alice", "s3cret"), verbose=False, analytics_enabled=False)
        reply = client.predict(*chat_arguments("Old stone river", max_new_tokens=12), api_name="/chat")
        assert reply_text(reply).strip()
        _log_in_with_a_browser(url)


def _log_in_with_a_browser(url: str) -> None:
    from playwright.sync_api import expect

    with opened_page(url) as page:
        page.get_by_label("username").fill("alice")
        page.get_by_label("password").fill("wrong")
        page.get_by_role("button", name="Login").click()
        expect(page.get_by_text("Incorrect credentials")).to_be_visible(timeout=10_000)
        page.get_by_label("password").fill("s3cret")
        page.get_by_role("button", name="Login").click()
        expect(page.locator("textarea[data-testid=textbox]").first).to_be_visible(timeout=20_000)


def test_auth_flag_is_checked(tmp_path):
    result = run_script("-m", "ui", "--out-root", str(tmp_path), "--auth", "nopassword")
    assert_clean_error(result, "user:password")
