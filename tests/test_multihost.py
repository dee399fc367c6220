"""Two processes on 127.0.0.1 with 2 CPU devices each == one process (the session's smoke run, 1 device)."""
import os
import socket
import subprocess
import sys

import chex
import orbax.checkpoint as ocp
import pytest

from conftest import ROOT, xla_flags
from mgd_jax.train import checkpoint as ckpt_lib

STAGES = ["teacher", "analyzer", "students/mas_kd"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(devices, **extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("JAX_") or k in ("JAX_PLATFORMS", "JAX_COMPILATION_CACHE_DIR")}
    env["XLA_FLAGS"] = xla_flags(devices)
    env.update(extra)
    return env


def _final(workdir, like=None, stages=STAGES):
    out = {}
    for stage in stages:
        ck = ckpt_lib.StageCheckpoints(os.path.join(workdir, stage, "checkpoints"))
        if like is None:
            step = ck.latest.latest_step()
            out[stage] = ck.latest.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
        else:  # written by another topology (2 processes): restore onto this one
            out[stage] = ck.restore_latest(like[stage])[0]
        ck.close()
    return out


@pytest.mark.timeout(400)  # two child runs of up to 280 s each, side by side: they fail on their own deadlines first
def test_two_processes_with_two_devices_each_equal_one_device(smoke_workdir, tmp_path):
    """2 processes x 2 CPU devices (the layout of a pod: several devices per process) give the parameters of the
    session's 1-device smoke run (BatchNorm statistics are over the global batch, so the device count does not
    change the numbers beyond float32 noise: tests/test_sharding.py)."""
    cmd = [sys.executable, "train.py", "--config=configs/smoke.py"]
    one, _ = smoke_workdir
    two = str(tmp_path / "two")
    port = _free_port()
    # a cache of their own that would take every step (no minimum compile time): several CPU processes must not
    # use it (a process that loaded a step from it while the other compiled it could hang, jax 0.12)
    cache = tmp_path / "cache"
    cache.mkdir()
    procs = [subprocess.Popen(cmd + [f"--workdir={two}", "--config.distributed.timeout_seconds=120"], cwd=ROOT,
                              env=_env(2, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                                       JAX_PROCESS_ID=str(i), JAX_COMPILATION_CACHE_DIR=str(cache),
                                       JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=280)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "mesh: 4 x cpu" in outs[0]
    assert "compilation cache: off for several CPU processes" in outs[0]
    assert not os.listdir(cache), os.listdir(cache)
    ref = _final(one)
    chex.assert_trees_all_close(ref, _final(two, like=ref), atol=1e-5, rtol=1e-5)


def test_distributed_settings_from_config_and_environment(no_launcher):
    """(Without the launcher variables of the environment the tests run in: CI may run inside SLURM.)"""
    monkeypatch = no_launcher
    from mgd_jax.config_validation import ConfigError
    from mgd_jax.train import distributed

    monkeypatch.delenv("JAX_NUM_PROCESSES", raising=False)
    assert distributed.settings({}) is None
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1234")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    s = distributed.settings({"timeout_seconds": 30})
    assert s == dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=1, initialization_timeout=30)
    assert distributed.settings({"process_id": 0})["process_id"] == 0  # config wins
    with pytest.raises(ConfigError, match="process_id=5 is outside"):
        distributed.settings({"process_id": 5})
    monkeypatch.delenv("JAX_NUM_PROCESSES")  # an address or id without a count (no launcher): refused, not ignored
    with pytest.raises(ConfigError, match="JAX_COORDINATOR_ADDRESS='127.0.0.1:1234' is set but neither a process "
                                          "count nor a launcher: .*JAX_NUM_PROCESSES=1"):
        distributed.settings({})
    with pytest.raises(ConfigError, match="config.distributed.coordinator_address='h:1' is set"):
        distributed.settings({"coordinator_address": "h:1"})
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS")
    with pytest.raises(ConfigError, match="JAX_PROCESS_ID=1 is set but neither a process count nor a launcher"):
        distributed.settings({})
    monkeypatch.delenv("JAX_PROCESS_ID")
    assert distributed.settings({}) is None
