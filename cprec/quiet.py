"""Library output the user of cprec cannot act on, kept off the terminal in one place.

Two kinds, two tools:

- warnings, log lines and progress bars of libraries: switched off once at start-up of every cprec
  process (``at_start_up``, called by ``cprec.cli.main``; torchrun ranks and the study's stages are
  ``python -m cprec.cli`` processes too). The switches are environment variables, set only where the
  user has not set them (so ``MLFLOW_LOGGING_LEVEL=INFO cprec ...`` brings MLflow's lines back), and
  read by the libraries when they are imported - later, lazily, and by every child process;
- a library's own ``print()`` and bare ``tqdm`` calls (DeepSpeed's), which no switch reaches: captured
  at the one call of ours that makes them (``library_prints``) and logged at DEBUG
  (``--log-level DEBUG`` shows them), or at WARNING when that call fails.

Anything else still shows: cprec's own warnings, and every library warning not listed here.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Iterator

# (category, message regex, module regex, why): ignored, placed in front of the default filters.
LIBRARY_WARNINGS = [
    (
        FutureWarning,
        r"`torch\.distributed\.\w+` is deprecated",
        r"torch\.distributed",
        # DeepSpeed's ZeRO stage 3 calls the deprecated reduce_scatter_tensor/all_gather_into_tensor
        # on every step, and something resets the warnings registry each time: one line per step.
        "DeepSpeed ZeRO-3 collectives",
    ),
]

# (variable, value, why): set at start-up unless the user set it.
LIBRARY_SWITCHES = [
    # transformers' bars ("Loading weights", "Writing model shards") on every load and save of a model.
    ("HF_HUB_DISABLE_PROGRESS_BARS", "1", "transformers and huggingface_hub progress bars"),
    # transformers' notes on tokenizer and model loading (errors still show).
    ("TRANSFORMERS_VERBOSITY", "error", "transformers warnings"),
    # MLflow's own INFO lines ("Creating initial MLflow database tables..."); cprec logs the run.
    ("MLFLOW_LOGGING_LEVEL", "WARNING", "MLflow INFO lines"),
]


def filter_library_warnings() -> None:
    """Ignore ``LIBRARY_WARNINGS`` (placed in front, so they win over the default filters)."""
    for category, message, module, _why in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


def at_start_up() -> None:
    """Switch off what the user cannot act on (``LIBRARY_WARNINGS``, ``LIBRARY_SWITCHES``)."""
    filter_library_warnings()
    for name, value, _why in LIBRARY_SWITCHES:
        os.environ.setdefault(name, value)


@contextlib.contextmanager
def library_prints(log: logging.Logger, what: str) -> Iterator[None]:
    """Capture what a library call prints to stdout/stderr (its ``print()`` calls and bars) and log
    it at DEBUG as ``<what>: <line>``; if the call raises, at WARNING, so the error keeps its context.

    A warning raised inside the call is captured alike. cprec's own log lines are unaffected (the
    logging handler holds the real stream)."""
    buf = io.StringIO()
    level = logging.DEBUG
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            yield
    except BaseException:
        level = logging.WARNING
        raise
    finally:
        for line in buf.getvalue().split("\n"):
            line = line.rsplit("\r", 1)[-1].strip()  # a bar redraws itself after "\r": its last state
            if line:
                log.log(level, "%s: %s", what, line)
