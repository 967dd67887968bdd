"""Scripts marked ``@pytest.mark.background(script, env=..., timeout=...)`` (the Triton interpreter
checks: minutes of one busy Python thread each, in a subprocess) start one after another in a
background thread as soon as collection has ended, so that they use the second core while the rest
of the suite runs. A marked test takes its script's result from the ``background`` fixture: it waits
for it if the script is running, and runs it itself if the thread has not reached it yet. Only the
selected tests' scripts run. ``FASTMED_TEST_BACKGROUND=0`` runs every script in its own test."""

import os
import subprocess
import sys
import threading

import pytest


class _Script:
    def __init__(self, script: str, env: dict, timeout: float):
        # at the lowest priority: the suite's own (multi-threaded) tests come first, the script
        # takes what they leave of the cores
        self.argv = [sys.executable, "-c", "import os; os.nice(19)\n" + script]
        self.env = dict(os.environ, **env)
        self.timeout = timeout
        self.started = False
        self.done = threading.Event()
        self.proc = None
        self.result = None  # a CompletedProcess, or the exception that ended the run

    def run(self) -> None:
        try:
            with _lock:  # not after the session has ended (its end kills the scripts it finds running)
                if _stopping:
                    raise RuntimeError("the test session has ended")
                self.proc = subprocess.Popen(self.argv, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                             text=True)
            try:
                out, err = self.proc.communicate(timeout=self.timeout)
            except subprocess.TimeoutExpired as exc:
                self.proc.kill()
                self.proc.communicate()
                self.result = exc
            else:
                self.result = subprocess.CompletedProcess(self.argv, self.proc.returncode, out, err)
        except BaseException as exc:  # noqa: BLE001 - handed to the test that wants the result
            self.result = exc
        finally:
            self.done.set()


_lock = threading.Lock()
_scripts: dict = {}  # node id -> _Script
_queue: list = []
_stopping = False


def pytest_configure(config):
    config.addinivalue_line("markers", "background(script, env=None, timeout=900): a Python script run in a "
                                       "subprocess, started early in a background thread (see tests/conftest.py)")


def _claim():
    with _lock:
        while _queue:
            s = _queue.pop(0)
            if not s.started:
                s.started = True
                return s
    return None


def _worker():
    while (s := _claim()) is not None:
        s.run()


def pytest_collection_finish(session):
    for item in session.items:
        m = item.get_closest_marker("background")
        if m is not None:
            _scripts[item.nodeid] = _Script(m.args[0], m.kwargs.get("env") or {}, m.kwargs.get("timeout", 900))
    if os.environ.get("FASTMED_TEST_BACKGROUND", "1") != "0" and len(_scripts) > 0:
        # the last tests' scripts first: the early ones are likely to be reached before the thread gets to them
        _queue.extend(reversed(list(_scripts.values())))
        threading.Thread(target=_worker, name="background scripts", daemon=True).start()


def pytest_sessionfinish(session):
    global _stopping
    with _lock:
        _stopping = True
        _queue.clear()
        running = [s.proc for s in _scripts.values() if s.started and not s.done.is_set() and s.proc is not None]
    for p in running:  # a stopped run (-x, Ctrl-C) leaves no script behind
        p.kill()


@pytest.fixture
def background(request):
    s = _scripts.get(request.node.nodeid)
    if s is None:
        raise RuntimeError("the background fixture needs a @pytest.mark.background(script) test")
    with _lock:
        mine = not s.started
        s.started = True
    if mine:
        s.run()
    s.done.wait()
    if isinstance(s.result, BaseException):
        raise s.result
    return s.result
