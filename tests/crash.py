"""Run a project script and kill -9 it at an exact point: `python tests/crash.py SPEC script.py ARGS...`.

SPEC is `module:attribute:N[:TEXT]`: the process sends itself SIGKILL at the start of the Nth call
of that function (counting only calls whose arguments mention TEXT, if given). The kill is real, so
nothing gets to clean up; only the moment is chosen, which is what lets a test hit the inside of a
checkpoint write every time rather than by luck. With CRASH_SIGNAL=SIGTERM (or another signal's
name) in the environment the process sends itself that signal instead, which it may handle.
"""

from __future__ import annotations

import importlib
import os
import runpy
import signal
import sys


def arm(spec: str) -> None:
    module_name, attribute, count, *text = spec.split(":")
    owner = importlib.import_module(module_name)
    *path, name = attribute.split(".")
    for part in path:
        owner = getattr(owner, part)
    original = getattr(owner, name)
    calls = 0

    def tripwire(*args, **kwargs):
        nonlocal calls
        if not text or text[0] in repr(args):
            calls += 1
            if calls == int(count):
                sys.stdout.flush()
                os.kill(os.getpid(), signal.Signals[os.environ.get("CRASH_SIGNAL", "SIGKILL")])
        return original(*args, **kwargs)

    setattr(owner, name, tripwire)


if __name__ == "__main__":
    spec, script, *args = sys.argv[1:]
    sys.path.insert(0, os.getcwd())
    arm(spec)
    sys.argv = [script, *args]
    runpy.run_path(script, run_name="__main__")
