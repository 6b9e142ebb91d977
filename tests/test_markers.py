"""The suite's markers: ``gpu`` tests run only where CUDA is available, ``slow`` ones with --runslow;
checked on a generated test file run by pytest in-process, with this suite's conftest hooks."""
from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

TESTS = """
import pytest

@pytest.mark.gpu
def test_on_gpu():
    pass

@pytest.mark.slow
def test_long():
    pass

@pytest.mark.gpu
class TestGpuClass:
    def test_method(self):
        pass

def test_plain():
    pass
"""

CONFTEST = """
from tests.conftest import pytest_addoption, pytest_collection_modifyitems  # noqa: F401
"""

INI = """
[pytest]
markers =
    slow: long-running
    gpu: needs CUDA
"""


@pytest.fixture
def generated(pytester):
    pytester.makeini(INI)
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_generated=TESTS)
    return pytester


def _outcomes(recorder) -> dict[str, str]:
    """test name -> passed / failed / skipped."""
    out = {}
    for rep in recorder.getreports("pytest_runtest_logreport"):
        if rep.when == "call" or rep.skipped:
            out[rep.nodeid.split("::", 1)[1]] = rep.outcome
    return out


@pytest.mark.parametrize("cuda", [False, True])
def test_gpu_tests_run_only_with_cuda(generated, monkeypatch, cuda):
    import tests.conftest as conftest

    monkeypatch.setattr(conftest, "cuda_available", lambda: cuda)
    result = generated.inline_run("-rs", "-p", "no:faulthandler")
    got = _outcomes(result)
    gpu_outcome = "passed" if cuda else "skipped"
    assert got == {"test_on_gpu": gpu_outcome, "TestGpuClass::test_method": gpu_outcome,
                   "test_long": "skipped", "test_plain": "passed"}
    if not cuda:
        reasons = [rep.longrepr[2] for rep in result.getreports("pytest_runtest_logreport") if rep.skipped]
        assert sum("gpu: needs a CUDA device" in r for r in reasons) == 2
        assert sum("slow: run with --runslow" in r for r in reasons) == 1


def test_slow_tests_run_with_runslow(generated, monkeypatch):
    import tests.conftest as conftest

    monkeypatch.setattr(conftest, "cuda_available", lambda: False)
    result = generated.inline_run("--runslow", "-p", "no:faulthandler")
    got = _outcomes(result)
    assert got["test_long"] == "passed" and got["test_plain"] == "passed"
    assert got["test_on_gpu"] == "skipped"


def test_no_torch_import_without_gpu_tests(pytester, monkeypatch):
    """Collecting no gpu test does not ask torch (importing it costs seconds)."""
    import tests.conftest as conftest

    def boom():
        raise AssertionError("cuda_available() called without a gpu test")

    monkeypatch.setattr(conftest, "cuda_available", boom)
    pytester.makeini(INI)
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_plain="def test_a():\n    pass\n")
    pytester.inline_run("-p", "no:faulthandler").assertoutcome(passed=1)


def test_cuda_available_asks_torch():
    import torch

    import tests.conftest as conftest

    assert conftest.cuda_available() is bool(torch.cuda.is_available())
