"""The browser chat: `python -m ui` serves a Gradio app for talking to trained checkpoints.

`models.py` finds and loads checkpoints (one shared model, switchable at run time), `app.py`
lays out the Chat, Complete and Model tabs, `__main__.py` is the command line. Generation goes
through the same engine and chat template as `sample.py`.

The app must work air-gapped, so telemetry is switched off here, before Gradio or the Hugging Face
hub client are imported (the hub client otherwise makes a blocking call at start-up).
"""

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
