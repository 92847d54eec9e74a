"""meta.parallel.run_units: the units' results in order, in this process or in workers."""

from __future__ import annotations

import operator

import pytest

from emerg_stream.meta.parallel import run_units


def test_results_come_back_in_the_units_order_from_worker_processes(capsys):
    units = [5, 1, 4, 2, 3]
    assert run_units(operator.add, 10, units) == [15, 11, 14, 12, 13]
    got = run_units(operator.add, 10, units, processes=2, progress="units")
    assert got == [15, 11, 14, 12, 13]
    assert "units" in capsys.readouterr().err  # the parent's bar of units done


def test_a_failing_unit_stops_the_job_with_its_error():
    with pytest.raises(ZeroDivisionError):
        run_units(operator.truediv, 1.0, [1.0, 0.0, 2.0], processes=2, progress="units")
    with pytest.raises(ZeroDivisionError):
        run_units(operator.truediv, 1.0, [1.0, 0.0])


def test_auto_processes_follow_the_thread_budget_on_cpu_and_are_one_on_a_gpu(monkeypatch):
    import torch

    from emerg_stream import devices
    from emerg_stream.errors import ConfigError
    from emerg_stream.jobs.reproduce import _processes
    from emerg_stream.threads import THREADS_ENV

    monkeypatch.setenv(THREADS_ENV, "1")
    assert _processes("auto", "cpu") == (1, 1)
    assert _processes("3", "cpu") == (3, 1)  # asked for: each still gets at least one thread
    monkeypatch.setattr(devices, "resolve_device", lambda name: torch.device("cuda"))
    monkeypatch.delenv(THREADS_ENV)
    assert _processes("auto", "cuda")[0] == 1
    with pytest.raises(ConfigError, match="positive integer"):
        _processes("two", "cpu")
