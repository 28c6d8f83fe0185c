"""Test setup: the Triton kernels run on CUDA when present, else in the Triton interpreter.

TRITON_INTERPRET must be in the environment before flashvit.kernels is imported (it is read when the
kernels are decorated), so it is set here, first.
"""

import os
import sys
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# pytest-xdist (README's `-n auto`): the interpreter runs a kernel on one core, so the cores go to workers; each
# worker's torch takes its share of them, not all (workers x threads > cores only adds contention).
if os.environ.get("PYTEST_XDIST_WORKER_COUNT") and DEVICE == "cpu":
    torch.set_num_threads(max(1, _cores() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist's: unknown to a run without it
def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto`: a worker per core, at most 8 (each holds torch and the interpreter: 1.2 GB resident in one serial run)."""
    return max(1, min(_cores(), 8))


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture(autouse=True)
def _seeds(request):
    """fresh_seed's inputs a function of the test alone, not of the tests before it in the process."""
    from tests import helpers

    helpers.reset_seeds(request.node.nodeid)


@pytest.fixture(autouse=True)
def memcheck():
    """In the interpreter, every kernel load and store must land inside a tensor argument (tests/sanitizer.py)."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        yield
        return
    from tests import sanitizer

    assert sanitizer.install(), "the Triton interpreter could not be hooked for the memory checker"
    sanitizer.violations.clear()
    yield
    found, sanitizer.violations[:] = list(sanitizer.violations), []
    assert not found, "out-of-bounds kernel memory access:\n" + "\n".join(found[:5])


def pytest_addoption(parser):
    parser.addoption("--deep", action="store_true", help="long property-fuzzing runs (random seed, 10x examples)")


def pytest_configure(config):
    try:  # property fuzzing: fixed seed and 200 examples per op in CI, `--deep` for longer random runs
        from hypothesis import HealthCheck, settings

        common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
        settings.register_profile("ci", max_examples=200, derandomize=True, **common)
        settings.register_profile("deep", max_examples=2000, **common)
        # On a GPU each new shape can mean a fresh kernel compile: fewer examples there (gpu_check budget).
        settings.register_profile("gpu", max_examples=15, derandomize=True, **common)
        settings.load_profile("deep" if config.getoption("--deep") else "gpu" if torch.cuda.is_available() else "ci")
    except ImportError:
        pass
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (bf16 dots, speed); runs in bench/gpu_check.sh")
    config.addinivalue_line("markers", "slow: longer CPU tests")
    config.addinivalue_line("markers", "aot: ahead-of-time compile gate (CPU-side; compiles for sm_80/sm_90)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; runs in bench/gpu_check.sh")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# An illegal memory access (or the like) leaves the process's CUDA context unusable: every later test in the
# same pytest-xdist worker fails with the same error (run 5: one fault, then 9 follow-on failures in one worker). So a
# worker that hits one exits after that test's report; xdist starts a fresh worker for the rest.
CUDA_CONTEXT_LOST = ("an illegal memory access was encountered", "unspecified launch failure",
                     "misaligned address", "an illegal instruction was encountered")


def cuda_context_lost(exc: BaseException) -> bool:
    """True for the CUDA errors after which the process's CUDA context cannot run anything."""
    text = str(exc)
    return any(s in text for s in CUDA_CONTEXT_LOST)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and call.excinfo is not None and cuda_context_lost(call.excinfo.value):
        item.flashvit_cuda_lost = True
        report.sections.append(("flashvit", "CUDA context lost: this test's worker exits after it"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    yield
    if getattr(item, "flashvit_cuda_lost", False) and os.environ.get("PYTEST_XDIST_WORKER"):
        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(1)  # let the worker's report reach the controller first
        os._exit(3)
