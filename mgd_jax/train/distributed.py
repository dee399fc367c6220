"""Multi-host start-up: ``jax.distributed`` from the config, the environment, or a launcher's environment.

Which processes form the run, first match wins:

1. ``config.distributed.num_processes`` / ``coordinator_address`` / ``process_id``, or the environment variables
   ``JAX_NUM_PROCESSES`` / ``JAX_COORDINATOR_ADDRESS`` / ``JAX_PROCESS_ID`` (config over environment): exactly
   these.  ``num_processes=1`` is one process whatever the launcher says.
2. A launcher's environment, as ``jax.distributed.initialize()`` finds it (``jax/_src/clusters``, in its order):
   Open MPI's ``mpirun``, SLURM's ``srun``, a Cloud TPU pod slice (GKE or GCE), a Kubernetes indexed Job.  It is
   checked here first, so an incomplete one (``srun`` forgotten: a task count but no task id) is one line naming
   the missing variable rather than a hang or a stack trace inside JAX; then JAX reads the process count, this
   process's id and the coordinator from it.  A coordinator address from the config or ``JAX_COORDINATOR_ADDRESS``
   still wins (``JAX_COORDINATOR_PORT`` changes only the port).  One task is one process.
3. Otherwise one process: nothing is initialised.  A coordinator address or process id given without a process
   count, outside any launcher's environment, is refused in one line: it means several processes, and each would
   otherwise train the whole run alone.  (A launcher's job of one process is one process, whatever is set.)

On CPU the cross-process collectives use gloo.

A process that stops without notice (killed, out of memory, its host gone) stops the others: the coordination
service counts a process silent for ``config.distributed.heartbeat_timeout_seconds`` (default 60; JAX's
``heartbeat_timeout_seconds``, whose own default is 100) as lost, and the runtime ends every other process; train.py's
supervisor (``train/supervisor.py``) turns that end into one line and exit status 75.  Shorter detects a lost host
sooner; the heartbeats come from a thread of the runtime, so a long compilation or checkpoint save does not miss
them, but a host stalled (swapping, a hung file system) that long is dropped too.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Mapping

from mgd_jax.errors import ConfigError
from mgd_jax.train import supervisor

_ONE_PROCESS = "set JAX_NUM_PROCESSES=1 (or --config.distributed.num_processes=1) to run as one process"


@dataclasses.dataclass(frozen=True)
class Plan:
    """How this process joins the run: ``kwargs`` for ``jax.distributed.initialize``, where they came from."""
    source: str  # 'config / JAX_* environment', 'SLURM', 'Open MPI', 'Cloud TPU (GKE)', ...
    kwargs: dict
    num_processes: int | None = None  # None: the launcher knows (read by JAX)
    process_id: int | None = None


def _int(name: str, value, where: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {name}={value!r} is not an integer") from None


def _require(env: Mapping[str, str], names, where: str, why: str, fix: str) -> None:
    missing = [v for v in names if not env.get(v)]
    if missing:
        raise ConfigError(f"{where}: {why} but {missing[0]} is not set; {fix}")


def _process_id(env, name: str, n: int, where: str) -> int:
    pid = _int(name, env[name], where)
    if not 0 <= pid < n:
        raise ConfigError(f"{where}: {name}={pid} is outside [0, {n})")
    return pid


def _ompi(env, coordinator) -> Plan | None:
    """``mpirun`` sets OMPI_COMM_WORLD_*; JAX's OmpiCluster takes the coordinator's host from
    OMPI_MCA_orte_hnp_uri, which Open MPI 5 (PRRTE) no longer sets: then the coordinator must be given."""
    if "OMPI_COMM_WORLD_SIZE" not in env:
        return None
    where = "Open MPI"
    n = _int("OMPI_COMM_WORLD_SIZE", env["OMPI_COMM_WORLD_SIZE"], where)
    if n <= 1:
        return None
    why = f"OMPI_COMM_WORLD_SIZE={n}"
    _require(env, ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK"), where, why, f"start the processes with "
             f"mpirun, or {_ONE_PROCESS}")
    pid = _process_id(env, "OMPI_COMM_WORLD_RANK", n, where)
    if env.get("OMPI_MCA_orte_hnp_uri"):
        return Plan(where, dict(coordinator_address=coordinator, cluster_detection_method="ompi"), n, pid)
    if coordinator is None:
        raise ConfigError(f"{where}: {why} but OMPI_MCA_orte_hnp_uri (the launcher's address, not set by Open MPI "
                          f"5) is not set; give the coordinator: JAX_COORDINATOR_ADDRESS=<rank 0's host>:<port> "
                          f"(or --config.distributed.coordinator_address)")
    # as JAX's OmpiCluster: one accelerator per rank of a node (its local rank), or every rank sees all of them
    local = _int("OMPI_COMM_WORLD_LOCAL_RANK", env["OMPI_COMM_WORLD_LOCAL_RANK"], where)
    return Plan(where, dict(coordinator_address=coordinator, num_processes=n, process_id=pid,
                            local_device_ids=[local]), n, pid)


_SLURM_TASK = ("SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID")  # srun sets them per task (SlurmCluster)


def _slurm(env, coordinator) -> Plan | None:
    if "SLURM_JOB_ID" not in env or "SLURM_NTASKS" not in env:
        return None  # outside an allocation, or one without a task count: one process
    where = "SLURM"
    n = _int("SLURM_NTASKS", env["SLURM_NTASKS"], where)
    if n <= 1:
        return None
    _require(env, _SLURM_TASK, where, f"SLURM_NTASKS={n}", f"start every task with `srun python train.py ...`, "
             f"or {_ONE_PROCESS}")
    _int("SLURM_JOB_ID", env["SLURM_JOB_ID"], where)  # JAX derives the coordinator's port from it
    pid = _process_id(env, "SLURM_PROCID", n, where)
    return Plan(where, dict(coordinator_address=coordinator, cluster_detection_method="slurm"), n, pid)


def _cloud_tpu(env, coordinator) -> Plan | None:
    """A Cloud TPU VM: the slice's workers from GKE's environment or from the VM's metadata (JAX's clusters)."""
    from jax._src.clusters import cloud_tpu_cluster as tpu

    if not tpu.running_in_cloud_tpu_vm:  # set when jax is imported on a TPU VM
        return None
    if tpu.GkeTpuCluster.is_env_present():
        where = "Cloud TPU (GKE)"
        _require(env, ("TPU_WORKER_ID",), where, "TPU_WORKER_HOSTNAMES is set", "run the pod from a TPU JobSet / "
                 "Job, or " + _ONE_PROCESS)
        cluster = tpu.GkeTpuCluster
    elif tpu.GceTpuCluster.is_env_present():
        where, cluster = "Cloud TPU", tpu.GceTpuCluster
    else:
        return None
    n = cluster.get_process_count()
    if n <= 1:
        return None  # one host: nothing to coordinate
    pid = cluster.get_process_id()
    return Plan(where, dict(coordinator_address=coordinator, cluster_detection_method=cluster.name), n, pid)


def _kubernetes(env, coordinator) -> Plan | None:
    """An indexed Job (``completionMode: Indexed``) is one process per index; JAX asks the Kubernetes API for the
    Job's parallelism and the coordinator pod, with the ``kubernetes`` package."""
    if not env.get("KUBERNETES_SERVICE_HOST") or "JOB_COMPLETION_INDEX" not in env:
        return None  # a pod that is not part of an indexed Job: one process
    where = "Kubernetes"
    pid = _int("JOB_COMPLETION_INDEX", env["JOB_COMPLETION_INDEX"], where)
    if importlib.util.find_spec("kubernetes") is None:
        raise ConfigError(f"{where}: an indexed Job (JOB_COMPLETION_INDEX={pid}) needs the kubernetes package to "
                          f"find its processes: pip install 'jax[k8s]', or set JAX_COORDINATOR_ADDRESS / "
                          f"JAX_NUM_PROCESSES / JAX_PROCESS_ID; an indexed Job of independent runs: {_ONE_PROCESS}")
    return Plan(where, dict(coordinator_address=coordinator), None, pid)  # JAX's K8sCluster: detected, not named


LAUNCHERS = (_ompi, _slurm, _cloud_tpu, _kubernetes)  # jax.distributed's own order of detection


def plan(cfg, env: Mapping[str, str] | None = None) -> Plan | None:
    """-> how this process joins a multi-process run, or None for a single process (see the module docstring)."""
    cfg = cfg or {}
    env = os.environ if env is None else env

    def pick(key, var, cast):
        v = cfg.get(key, None)
        if v is None or v == "":
            v = env.get(var)
        if v is None or v == "":
            return None
        return _int(f"{var} (config.distributed.{key})", v, "distributed") if cast is int else cast(v)

    timeout = int(cfg.get("timeout_seconds", None) or 300)
    n = pick("num_processes", "JAX_NUM_PROCESSES", int)
    addr = pick("coordinator_address", "JAX_COORDINATOR_ADDRESS", str)
    if n is not None:  # explicit: exactly this
        if n <= 1:
            return None
        pid = pick("process_id", "JAX_PROCESS_ID", int)
        if addr is None or pid is None:
            raise ConfigError(f"distributed: {n} processes need a coordinator address and this process's id "
                              f"(config.distributed.* or JAX_COORDINATOR_ADDRESS / JAX_PROCESS_ID)")
        if not 0 <= pid < n:
            raise ConfigError(f"distributed: process_id={pid} is outside [0, {n})")
        return Plan("config / JAX_* environment", dict(coordinator_address=addr, num_processes=n, process_id=pid,
                                                      initialization_timeout=timeout), n, pid)
    for launcher in LAUNCHERS:
        p = launcher(env, addr)
        if p is not None:
            return dataclasses.replace(p, kwargs={**p.kwargs, "initialization_timeout": timeout})
    pid = pick("process_id", "JAX_PROCESS_ID", int)
    if (addr is not None or pid is not None) and not _launcher_environment(env):
        # meant as one of several processes (a launcher's job of one process is one process): never a silent lone run
        key, var, value = ("coordinator_address", "JAX_COORDINATOR_ADDRESS", addr) if addr is not None else (
            "process_id", "JAX_PROCESS_ID", pid)
        given = f"config.distributed.{key}" if cfg.get(key, None) not in (None, "") else var
        raise ConfigError(f"distributed: {given}={value!r} is set but neither a process count nor a launcher: set "
                          f"JAX_NUM_PROCESSES (or --config.distributed.num_processes) on every process; "
                          f"{_ONE_PROCESS}")
    return None


def _launcher_environment(env) -> bool:
    """A launcher's environment, also of a single process (which then coordinates nothing)."""
    from jax._src.clusters import cloud_tpu_cluster as tpu

    return ("OMPI_COMM_WORLD_SIZE" in env or ("SLURM_JOB_ID" in env and "SLURM_NTASKS" in env)
            or (bool(env.get("KUBERNETES_SERVICE_HOST")) and "JOB_COMPLETION_INDEX" in env)
            or bool(tpu.running_in_cloud_tpu_vm))


def settings(cfg) -> dict | None:
    """``jax.distributed.initialize``'s arguments for this process, or None for a single process."""
    p = plan(cfg)
    return None if p is None else p.kwargs


def maybe_initialize(cfg) -> bool:
    """Initialise jax.distributed for a multi-process run; must run before any device use."""
    p = plan(cfg)
    if p is None:
        return False
    import jax

    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms in ("", "cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # said before connecting: a coordinator that never answers ends the process inside XLA (after the timeout)
    who = "?" if p.process_id is None else p.process_id
    of = "the launcher's processes" if p.num_processes is None else p.num_processes
    print(f"distributed ({p.source}): process {who} of {of} joining; waiting up to "
          f"{p.kwargs['initialization_timeout']} s for the coordinator", flush=True)
    heartbeat = supervisor.heartbeat_timeout(cfg)
    jax.distributed.initialize(**p.kwargs, **heartbeat_kwargs(heartbeat))
    from jax._src import distributed as jax_distributed

    state = jax_distributed.global_state
    print(f"distributed ({p.source}): process {state.process_id} of {state.num_processes}, coordinator "
          f"{state.coordinator_address}, heartbeat timeout {heartbeat} s", flush=True)
    supervisor.note_process(state.process_id, state.num_processes, heartbeat)
    return True


def heartbeat_kwargs(seconds: int) -> dict:
    """``jax.distributed.initialize``'s heartbeat argument where the installed JAX has it
    (``heartbeat_timeout_seconds``, since mid-2025: jax 0.10 here, and the newest releases' fault-tolerance guide
    passes it too): a process silent that long counts as lost, and every process stops.  JAX's own default is
    100 s; versions without the argument fix it (10 missed heartbeats of 10 s)."""
    import inspect

    import jax

    params = inspect.signature(jax.distributed.initialize).parameters
    return {"heartbeat_timeout_seconds": int(seconds)} if "heartbeat_timeout_seconds" in params else {}
