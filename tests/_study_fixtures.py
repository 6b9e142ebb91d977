"""Shared by the study tests (tests/test_study_*.py): one tiny run made with the harness on the
embedded sample set (made once per test session, cached here), studies built from it, and a
waitress server in a thread."""
from __future__ import annotations

import contextlib
import re
import threading
import time
import urllib.request
from pathlib import Path

from harness.cli import main

IDS = "[chelsea_eyes_blue,coffee_cup_blue,flower_purple]"  # samples identity and recolor both edit
FAST = ["metrics=pixel", "progress=false", f"dataset.ids={IDS}"]
METHODS = ["identity", "recolor (space=lab, strength=0.4)", "recolor (space=lab, strength=0.8)"]
_RUNS: dict[str, Path] = {}
REPO_ROOT = Path(__file__).resolve().parents[1]


def study_run(tmp_path_factory) -> Path:
    """A run folder with identity, recolor at strength 0.8 and recolor at 0.4 on three samples."""
    if "run" not in _RUNS:
        results = tmp_path_factory.mktemp("study_run")
        assert main(["run", "-m", "method=identity,recolor", f"results_dir={results}", *FAST]) == 0
        assert main(["run", "method=recolor", "method.strength=0.4", f"results_dir={results}", *FAST]) == 0
        _RUNS["run"] = results / "sample-pixel"
    return _RUNS["run"]


def label_words() -> list[str]:
    """Strings that would betray a method: every label, and the distinctive parts of them."""
    return [*METHODS, "identity", "recolor", "strength", "space=lab"]


@contextlib.contextmanager
def served(study_dir: Path):
    """The study served by waitress on a free port in a daemon thread; yields the base URL."""
    from harness.study.app import make_server

    server = make_server(study_dir, "127.0.0.1", 0, threads=4)
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    base = f"http://127.0.0.1:{server.effective_port}"
    wait_up(base)
    try:
        yield base
    finally:
        server.close()
        server.task_dispatcher.shutdown()
        t.join(timeout=5)
        server.study_app.extensions["study_db"].dispose()


def wait_up(base: str, timeout: float = 20.0) -> None:
    end = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(base + "/", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            if time.time() > end:
                raise
            time.sleep(0.1)


def token_of(link: str) -> str:
    m = re.search(r"/r/([A-Za-z0-9_-]+)$", link)
    assert m, link
    return m.group(1)
