"""A study server killed with SIGKILL mid-study loses no committed answer: `edit-harness study
serve` runs as a subprocess, a rater answers items over HTTP, the server is killed -9 (while more
answers are being sent), restarted on the same folder, and every answer it confirmed is there;
the rater resumes at the first unanswered item."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from harness.study import builder as B
from harness.study import db as D

from ._study_fixtures import REPO_ROOT, study_run, wait_up


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return study_run(tmp_path_factory)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(study: Path, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "harness.cli", "study", "serve", str(study), "--port", str(port)],
                         stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env, cwd=str(REPO_ROOT))
    try:
        wait_up(f"http://127.0.0.1:{port}", timeout=60)
    except OSError:
        p.kill()
        raise AssertionError(f"server did not start: {log.read_text()[-2000:]}")
    return p


def _page(base: str, tok: str) -> dict | None:
    with urllib.request.urlopen(f"{base}/r/{tok}", timeout=10) as r:
        html = r.read().decode()
    m = re.search(r'<script type="application/json" id="page-data">(.*?)</script>', html, re.S)
    return json.loads(m.group(1)) if m else None


def _post(base: str, tok: str, item: str, value: int) -> int:
    body = json.dumps({"item": item, "answers": [{"question": "success", "slot": 0, "value": value}]}).encode()
    req = urllib.request.Request(f"{base}/api/answer", data=body, method="POST", headers={
        "Content-Type": "application/json", "Authorization": f"Bearer {tok}"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_kill_9_mid_study_keeps_every_committed_answer(run, tmp_path):
    st = B.create_study([run], "sr", tmp_path / "study", raters=2, edits_per_item=1,
                        questions=[{"id": "success", "text": "Accept?", "kind": "binary"}])
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    server = _serve(st.study_dir, port, log)
    committed: dict[str, dict[str, int]] = {"rater-01": {}, "rater-02": {}}
    try:
        # rater-01 answers 4 items one by one
        tok = st.tokens["rater-01"]
        for i in range(4):
            d = _page(base, tok)
            assert _post(base, tok, d["item"], i % 2) == 200
            committed["rater-01"][d["item"]] = i % 2
        # rater-02 keeps answering in a thread while the server is killed: whatever got a 200
        # before the kill is committed; a request cut off by the kill may or may not be
        tok2 = st.tokens["rater-02"]
        stop = threading.Event()
        in_flight: list[str] = []

        def rater2():
            while not stop.is_set():
                try:
                    d = _page(base, tok2)
                    if d is None:
                        return
                    in_flight.append(d["item"])
                    if _post(base, tok2, d["item"], 1) == 200:
                        committed["rater-02"][d["item"]] = 1
                except OSError:
                    return

        t = threading.Thread(target=rater2, daemon=True)
        t.start()
        deadline = time.time() + 30
        while len(committed["rater-02"]) < 3 and time.time() < deadline:
            time.sleep(0.02)
        os.kill(server.pid, signal.SIGKILL)
        assert server.wait(timeout=10) == -signal.SIGKILL
        stop.set()
        t.join(timeout=15)
        assert len(committed["rater-02"]) >= 3
        # the database as the killed server left it (no clean shutdown, WAL not checkpointed)
        f = D.answers_frame(st.study_dir)
        for rater, answers in committed.items():
            got = {r["item"]: r["value"] for r in f[f.rater == rater].to_dict("records")}
            assert all(got.get(i) == v for i, v in answers.items()), (rater, answers, got)
            # anything beyond the confirmed answers can only be the one request cut off by the kill
            extra = set(got) - set(answers)
            assert len(extra) <= 1 and extra <= set(in_flight[-1:])
        server = _serve(st.study_dir, port, log)
        # after the restart: rater-01 resumes at their 5th item, and the answers are all there
        d = _page(base, st.tokens["rater-01"])
        assert d["done"] == 4 and d["item"] not in committed["rater-01"]
        assert _post(base, st.tokens["rater-01"], d["item"], 1) == 200
        assert _post(base, st.tokens["rater-01"], d["item"], 0) == 409
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
    f = D.answers_frame(st.study_dir)
    r1 = {r["item"]: r["value"] for r in f[f.rater == "rater-01"].to_dict("records")}
    assert len(r1) == 5 and all(r1[i] == v for i, v in committed["rater-01"].items())
