"""A Hub that accepts connections and never answers: every command that talks to the Hub ends within
the time its limits allow (`modeling/hub_client.py`), with exit status 2 and a message that says what
it was doing and that the Hub did not answer. Nothing is written."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mla_zoo.modeling.hub_client import BROWSE_ATTEMPTS, TRANSFER_ATTEMPTS
from mla_zoo.zoo.cli import main

TIMEOUT = 1.0  # HF_HUB_ETAG_TIMEOUT and HF_HUB_DOWNLOAD_TIMEOUT here
BACKOFF = (1, 2, 4, 8, 8)  # huggingface_hub's sleeps between retries


def bound(attempts: int) -> float:
    """The longest a command may take: every attempt times out, with the client's back-off between them."""
    return attempts * TIMEOUT + sum(BACKOFF[: attempts]) + 3.0  # + 3 s for the command's own work


class SilentHub:
    """Accepts every connection on 127.0.0.1 and never sends a byte."""

    def __init__(self):
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.conns: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    def __enter__(self):
        self.thread.start()
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def __exit__(self, *exc):
        self.sock.close()
        for conn in self.conns:
            conn.close()


@pytest.fixture(scope="module")
def endpoint():
    with SilentHub() as url:
        yield url


@pytest.fixture
def silent_hub(endpoint, monkeypatch, tmp_path):
    from huggingface_hub import constants, hf_api

    for name, value in {"ENDPOINT": endpoint, "HF_HUB_ETAG_TIMEOUT": TIMEOUT, "HF_HUB_DOWNLOAD_TIMEOUT": TIMEOUT,
                        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
                        "HF_HUB_CACHE": str(tmp_path / "hf-cache"), "HF_HUB_OFFLINE": False}.items():
        monkeypatch.setattr(constants, name, value, raising=False)
    monkeypatch.setattr(hf_api.api, "endpoint", endpoint)
    monkeypatch.setenv("HF_TOKEN", "hf_fault_test_token")
    return endpoint


def run_within(argv: list[str], seconds: float) -> tuple[int | None, float]:
    """main(argv) in a thread: (its exit status, or None if it was still running after `seconds`; the time)."""
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(main(argv)), daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(seconds + 30)  # a hanging command fails the test instead of hanging it
    return (result[0] if result else None), time.monotonic() - started


@pytest.fixture(scope="module")
def release(tiny_release) -> Path:
    """A built release of the tiny recipe (conftest's, as test_zoo's), to publish."""
    return tiny_release[0]


COMMANDS = [
    ("list", lambda r, t: ["list"], BROWSE_ATTEMPTS, "listing the models of mla-zoo failed"),
    ("info", lambda r, t: ["info", "mla-zoo/x"], BROWSE_ATTEMPTS, "reading mla-zoo/x failed"),
    ("pull a version", lambda r, t: ["pull", "mla-zoo/x@0.1.0"], TRANSFER_ATTEMPTS,
     "downloading mla-zoo/x@v0.1.0 failed"),
    ("pull the latest", lambda r, t: ["pull", "mla-zoo/x", "--local-dir", str(t / "pulled")], TRANSFER_ATTEMPTS,
     "failed"),
    ("publish", lambda r, t: ["publish", str(r)], TRANSFER_ATTEMPTS, "preparing mla-zoo/Tiny-Llama-MLA failed"),
    ("convert a Hub id", lambda r, t: ["convert", "mla-zoo/x", "-o", str(t / "mla")], TRANSFER_ATTEMPTS,
     "mla-zoo/x: no such local path, and as a Hub id: downloading mla-zoo/x@main failed"),
    ("eval a Hub id", lambda r, t: ["eval", "mla-zoo/x", "--text", str(r / "hub" / "README.md")], TRANSFER_ATTEMPTS,
     "downloading mla-zoo/x@main failed"),
]


@pytest.mark.parametrize("name,argv,attempts,action", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_every_hub_command_ends_within_its_limits(name, argv, attempts, action, release, silent_hub, tmp_path,
                                                  capsys):
    code, seconds = run_within(argv(release, tmp_path), bound(attempts))
    err = capsys.readouterr().err
    assert code == 2, f"{name}: still running after {seconds:.0f} s" if code is None else err
    assert seconds < bound(attempts), f"{name}: {seconds:.1f} s"
    assert action in err and "cannot reach the Hub at " + silent_hub in err, err[-1500:]
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


def test_publish_dry_run_says_it_could_not_check(release, silent_hub, capsys):
    code, seconds = run_within(["publish", str(release), "--dry-run"], bound(BROWSE_ATTEMPTS))
    out = capsys.readouterr().out
    assert code == 0 and seconds < bound(BROWSE_ATTEMPTS)
    assert "could not check the Hub" in out and "cannot reach the Hub" in out


def test_the_timeouts_come_from_the_environment(endpoint, tmp_path):
    """`mla-zoo list` in a process of its own, limited by HF_HUB_ETAG_TIMEOUT as the user sets it."""
    env = {**os.environ, "HF_ENDPOINT": endpoint, "HF_HUB_ETAG_TIMEOUT": "1", "HF_HOME": str(tmp_path / "hf"),
           "HF_HUB_OFFLINE": "0"}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "mla_zoo.zoo.cli", "list"], env=env, capture_output=True, text=True,
                          timeout=300)
    seconds = time.monotonic() - started
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "no answer within 1 s" in proc.stderr or "ReadTimeout" in proc.stderr, proc.stderr[-2000:]
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "mla_zoo.zoo.cli", "--version"], env=env, capture_output=True, timeout=300)
    startup = time.monotonic() - started
    assert seconds - startup < bound(BROWSE_ATTEMPTS), (seconds, startup)
