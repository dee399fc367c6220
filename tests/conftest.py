"""Test setup: 4 virtual CPU devices (multi-device tests), quiet logs, fixture paths."""
import inspect
import os
import pathlib
import sys

# Fast compiles: XLA:CPU's LLVM backend without optimization (the HLO passes still run).  Compiling is most of the
# suite's time (small models, a few steps each).  Child processes get the same flags (``xla_flags``), so a test
# never compares a run compiled one way with a run compiled the other.  MGD_JAX_TEST_FULL_OPT=1: XLA's default
# optimization, what users run (docs/testing.md); an optimization level already in XLA_FLAGS is kept.
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
FAST_COMPILE_FLAGS = () if os.environ.get("MGD_JAX_TEST_FULL_OPT") == "1" else (
    "--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")
_flags = os.environ.get("XLA_FLAGS", "").split()
if not any(f.startswith("--xla_backend_optimization_level") for f in _flags):
    _flags += FAST_COMPILE_FLAGS
# the test process's flags without its device count: what every child process gets
_CHILD_FLAGS = tuple(f for f in _flags if not f.startswith(DEVICE_COUNT_FLAG))
if not any(f.startswith(DEVICE_COUNT_FLAG) for f in _flags):
    _flags.append(f"{DEVICE_COUNT_FLAG}=4")
os.environ["XLA_FLAGS"] = " ".join(_flags)


def one_epoch_cifar100(arg: str):
    """configs/cifar100.py:``arg`` cut to one epoch per stage, batches of 32, no milestones, no progress bar (for
    tfds' mock data)."""
    from configs import cifar100

    c = cifar100.get_config(arg)
    c.progress = False
    c.teacher.epochs = c.analyzer.epochs = c.student.epochs = 1
    for s in (c.teacher, c.analyzer, c.student):
        s.batch_size = 32
        s.optimizer.milestones = ()
    return c


def xla_flags(devices: int | None = None) -> str:
    """XLA_FLAGS for a child process of a test: the test process's flags (its compile options), with ``devices``
    CPU devices if given (else train.py's default, one per core)."""
    return " ".join(_CHILD_FLAGS + ((f"{DEVICE_COUNT_FLAG}={devices}",) if devices else ()))


os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Environment variables by which a launcher (SLURM, Open MPI, PMIx, a Cloud TPU or GKE slice, jax.distributed's own)
# starts processes.  The suite is hermetic: the variables of a launcher it runs under (a CI job inside a SLURM
# allocation, say) are removed for it and the processes it starts; the tests of several processes set their own.
LAUNCHER_VARS = ("SLURM_", "OMPI_", "PMIX_", "TPU_", "MEGASCALE_", "KUBERNETES_", "JOB_COMPLETION_INDEX",
                 "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_COORDINATOR_ADDRESS", "JAX_COORDINATOR_PORT")
for _name in [k for k in os.environ if k.startswith(LAUNCHER_VARS)]:
    del os.environ[_name]
# One persistent XLA compilation cache for the whole suite: the xdist workers and the train.py processes the tests
# start inherit it (the controller loads this file first, and removes the folder at the end).  The random-SIGKILL
# test drops it from its children's environment (a process killed at any moment may be writing an entry; the
# fault-injection kills happen at checkpoint saves, outside compilation).
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="mgd-jax-test-xla-cache-")
    # Every program is cached, not only those that took a second to compile (jax's default): the suite starts
    # train.py processes and builds the same small models and steps many times, and eager initializers (a random
    # draw per parameter shape) compile again in each process otherwise.  (Not in a cache the caller gave.)
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `configs` is a top-level folder of the repository, not of the package
    sys.path.insert(0, str(ROOT))

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures"

from absl import logging as _absl_logging  # noqa: E402

_absl_logging.set_verbosity(_absl_logging.WARNING)

import pytest  # noqa: E402


def once_per_test_run(tmp_path_factory, worker_id, name: str, build) -> pathlib.Path:
    """``build(folder)`` once per test run, shared by the xdist workers (a file lock in the run's base folder): the
    folder it filled, its name ``name``.  A build that failed is redone by the next caller."""
    import fcntl
    import shutil

    base = tmp_path_factory.getbasetemp()
    root = base if worker_id == "master" else base.parent  # xdist: one base folder per worker below it
    folder, done = root / name / "w", root / name / "done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def smoke_workdir(tmp_path_factory, worker_id):
    """configs/smoke.py trained once per test run (1 device) for the tests that only read a finished workdir.

    One xdist worker trains it; every worker gets its own copy, so a test that writes beside the checkpoints
    (evaluate's eval_test.json, say) never races another worker."""
    import pickle
    import shutil

    def train(folder):
        import jax

        from configs import smoke
        from mgd_jax import pipeline

        summary = pipeline.train_and_evaluate(smoke.get_config(), str(folder), devices=jax.devices()[:1])
        (folder.parent / "summary.pickle").write_bytes(pickle.dumps(summary))

    shared = once_per_test_run(tmp_path_factory, worker_id, "smoke_shared", train)
    work = tmp_path_factory.mktemp("smoke") / "w"
    shutil.copytree(shared, work, ignore=shutil.ignore_patterns(".jax_cache"))
    return str(work), pickle.loads((shared.parent / "summary.pickle").read_bytes())


@pytest.fixture
def no_launcher(monkeypatch):
    """This test process's own environment without any launcher's variables (removed for the whole suite above; a
    test that relies on it says so, and what it sets is undone after it)."""
    for k in list(os.environ):
        if k.startswith(LAUNCHER_VARS):
            monkeypatch.delenv(k)
    return monkeypatch


# The longest tests (child processes training the smoke config several times) start first, so that with
# `pytest -n 2` they do not end up alone at the end of the run.
_SLOW_FIRST = ("test_reliability.py::test_kill_at_each_save_boundary", "test_multihost.py::",
               "test_reliability.py::test_sigkill_at_random_moments", "test_fused_students.py::test_a_kill",
               "test_sweep.py::test_sweep_runs", "test_imagenet_multihost.py::", "test_pods.py::test_preempted",
               "test_peer_loss.py::test_a_peer_killed", "test_fused_students.py::test_fused_students_equal",
               "test_imagenet_data_train.py::")

# The tiers (docs/testing.md): `pytest -m "not slow"` is the edit loop, a few minutes on 2 cores; the full suite is
# what CI runs.  A test is slow when it trains: it reads a trained run (the fixtures below), or it is named here
# (it trains, or starts train.py processes, by itself); a test can also say so with @pytest.mark.slow.
_TRAINING_FIXTURES = {"smoke_workdir", "reference_run", "full_run"}
_SLOW = (
    "test_fused_students.py::test_a_kill", "test_imagenet_data_train.py::", "test_imagenet_multihost.py::",
    "test_import_torch.py::test_cli_imports_into_workdir", "test_import_torch.py::test_teacher_of_another_class_count",
    "test_methods_train.py::test_method_trains", "test_methods_train.py::test_kdsvd_on_two_devices",
    "test_multihost.py::", "test_mutual.py::test_mutual_learning_runs", "test_pipeline.py::test_crd_and_init_stage",
    "test_pods.py::test_preempted", "test_pods.py::test_a_notice_during_start_up", "test_reliability.py::test_non_finite",
    "test_sweep.py::test_sweep_runs", "test_tfds_pipeline.py::test_cifar100_config_runs_all_stages",
    "test_transfer.py::test_transfer[", "test_transfer.py::test_transfer_recipe", "test_transfer.py::test_transfer_never",
    "test_init_stage.py::test_init_stage_lr_is_the_students", "test_sharding.py::test_four_devices_equal_one_device",
    "test_sharding.py::test_crd_memory_four_devices",
    # no training, but compiles much (many architectures, whole steps) or starts processes: tens of seconds each
    "test_models.py::test_family_initialisations", "test_models.py::test_preact_features_relate_to_features",
    "test_models.py::test_analyzer_any_number_of_granularities", "test_transfer.py::test_transfer_command_line",
    "test_performance_options.py::test_bfloat16_step", "test_performance_options.py::test_fusion_fence",
    "test_performance_options.py::test_one_cpu_device_per_core", "test_init_stage.py::test_init_stage_params_are_inits",
    "test_init_stage.py::test_init_stage_trains_feature_modules_only", "test_sharding.py::test_teacher_is_frozen",
    "test_modern_methods.py::test_review_loss_against_numpy", "test_modern_methods.py::test_dist_edge_rows",
    "test_modern_methods.py::test_ofd_loss_against_numpy", "test_modern_methods.py::test_ofd_margins_come_from",
    "test_export.py::test_every_architecture_exports", "test_imagenet_torch.py::test_torchvision_resnet_imports",
    "test_imagenet_torch.py::test_cli_teacher_round_trip", "test_imagenet_torch.py::test_mobilenetv1_initialisation",
    "test_imagenet_torch.py::test_torchvision_models_helper", "test_imagenet_torch.py::test_initialisation_is_torch",
    "test_imagenet_data.py::test_grain_worker_processes", "test_analysis.py::test_corruptions",
    "test_cli_mistakes.py::test_train_py_from_outside_the_checkout", "test_cli_mistakes.py::test_tfds_default_location",
    "test_imagenet_methods.py::test_every_method_on_imagenet_pairs",
    "test_imagenet_methods.py::test_imagenet_models_take_real_training_steps",
    "test_imagenet_methods.py::test_student_step_traces",
    "test_bad_inputs.py::test_train_py_one_line_errors", "test_bad_inputs.py::test_missing_cifar_message",
    "test_baselines_reference.py::test_kdsvd_canonical_sign",
)


# Tests that need PyTorch (marked `torch`): CI's venv of the newest stack has no torch (PyPI's torch for Python >= 3.12
# is the CUDA build, several GB), so CI runs them in the venv of the oldest supported stack, with the CPU torch.
_TORCH_MODULES = ("test_import_torch.py::", "test_imagenet_torch.py::")
_TORCH_NEEDS = ('need("torch"', 'need("torchvision"')


def _needs_torch(item) -> bool:
    if any(s in item.nodeid for s in _TORCH_MODULES):
        return True
    try:
        source = inspect.getsource(item.function)
    except (AttributeError, OSError, TypeError):
        return False
    return any(s in source for s in _TORCH_NEEDS)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _TRAINING_FIXTURES & set(getattr(item, "fixturenames", ())) or any(s in item.nodeid for s in _SLOW):
            item.add_marker(pytest.mark.slow)
        if _needs_torch(item):
            item.add_marker(pytest.mark.torch)
    items.sort(key=lambda item: next((i for i, s in enumerate(_SLOW_FIRST) if s in item.nodeid), len(_SLOW_FIRST)))


def pytest_unconfigure(config):
    if _OWN_CACHE and not hasattr(config, "workerinput"):  # the controller (or a run without xdist) made it
        import shutil

        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
