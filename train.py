"""Train teacher, multi-granularity analyzer and students.

    python train.py                                   # offline quickstart (digits), workdir runs/quickstart
    python train.py --config=configs/cifar100.py:resnet56,resnet20,kd,mas --workdir=runs/x
    python train.py --config=configs/smoke.py --config.student.epochs=4 --print_config   # the config, then exit

Running the same command again resumes where it stopped; finished stages are not redone.  On SIGTERM (a
preemption notice) the run saves its latest checkpoint at the next step and exits with status 75.  A config file
given by a relative path is read from the working directory, or else from beside this file (so ``python
path/to/train.py`` works from anywhere).  A mistake (a config field that does not exist, a value that cannot work,
a dataset that is not built) is one line ``error: ...`` with exit status 2, and leaves no empty workdir behind.
"""
import os
import signal
import sys

# A preemption notice during the imports and start-up, before the run's own handler is in place: kept and handed
# on (preemption.watch() for one process; re-raised for jax.distributed's handler on several), not a dead process.
_EARLY_SIGTERM = []
signal.signal(signal.SIGTERM, lambda signum, frame: _EARLY_SIGTERM.append(signum))
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # a supervised worker starts with it blocked

from absl import flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = "configs/quickstart.py"
DEFAULT_WORKDIR = "runs/quickstart"
USAGE = "python train.py [--config=FILE[:ARG]] [--workdir=DIR] [--config.FIELD=VALUE ...] [--print_config]"
HELP_FLAGS = ("-h", "--help", "-help", "--helpshort", "--helpfull", "-?")

# What each top-level field of a config holds (configs/default.py); --help lists the loaded config's fields.
SECTIONS = {
    "seed": "random seed of every stage (each stage offsets it)",
    "data": "the dataset (name: digits, cifar100, cifar10, stl10, imagenet2012, image_folder)",
    "augment": "training augmentation and normalisation",
    "drop_remainder": "drop the last, smaller training batch of an epoch",
    "eval_batch_size": "batch size of every evaluation",
    "granularities": "the analyzer's tubes: ((encoding dim, temperature), ...)",
    "progress": "progress bars on a terminal",
    "compilation_cache": "persistent XLA compilation cache in <workdir>/.jax_cache (off for several CPU processes)",
    "cpu_devices": "CPU only: XLA devices to split a batch over (None: one per core)",
    "precision": "compute dtype of the backbones: float32 or bfloat16",
    "checkpoint": "checkpoint frequency and how many to keep",
    "distributed": "multi-host settings (unset: from JAX_* environment variables)",
    "teacher": "stage 1, the teacher",
    "analyzer": "stage 2, the teacher's multi-granularity analyzer",
    "student": "stage 3, the students' shared settings",
    "students": "one entry per student: method, granularity (none, mag, mas), weights, temperature, ...",
    "mutual": "deep mutual learning (instead of teacher -> student)",
}


class UsageError(Exception):
    """A command-line mistake of train.py's own (a config file that cannot be loaded, a flag's value)."""


def _config_path(spec: str) -> str:
    """``FILE[:ARG]`` with a relative FILE that is not in the working directory but beside train.py: that one."""
    path, colon, arg = spec.partition(":")
    if path and not os.path.isabs(path) and not os.path.exists(path):
        beside = os.path.join(HERE, path)
        if os.path.exists(beside):
            return beside + colon + arg
    return spec


def _resolve_argv(argv: list[str]) -> list[str]:
    """``argv`` with its ``--config`` file resolved by ``_config_path`` (both ``--config=F`` and ``--config F``)."""
    out = list(argv)
    for i, a in enumerate(out):
        if i == 0:
            continue
        if a.startswith(("--config=", "-config=")):
            flag, _, spec = a.partition("=")
            out[i] = f"{flag}={_config_path(spec)}"
        elif a in ("--config", "-config") and i + 1 < len(out):
            out[i + 1] = _config_path(out[i + 1])
    return out


def _config_spec(argv: list[str]) -> str:
    """The ``--config`` value of ``argv`` (the last one), or the default."""
    spec = _config_path(DEFAULT_CONFIG)
    for i, a in enumerate(argv[1:], 1):
        if a.startswith(("--config=", "-config=")):
            spec = a.partition("=")[2]
        elif a in ("--config", "-config") and i + 1 < len(argv):
            spec = argv[i + 1]
    return spec


def _check_config_file(spec: str) -> None:
    """A config file that is not there, or not a file, named before ml_collections tries to import it."""
    path = spec.partition(":")[0]
    if not path:
        raise UsageError("--config is empty: give a config file, e.g. --config=configs/quickstart.py")
    if not os.path.exists(path):
        where = "" if os.path.isabs(path) else f" (looked in {os.getcwd()}" + \
            (f" and beside train.py in {HERE})" if os.path.abspath(os.getcwd()) != HERE else ")")
        raise UsageError(f"--config={spec}: no such file{where}")
    if os.path.isdir(path):
        raise UsageError(f"--config={spec}: {path} is a folder, not a config file (e.g. configs/quickstart.py)")


def _unknown_override(e: BaseException, argv: list[str]) -> str:
    """ml_collections resolves ``--config.a.b=v`` overrides when the flag is defined: a field the config does not
    have fails there as a KeyError/AttributeError holding only the field's name."""
    while e.args and isinstance(e.args[0], BaseException):  # AttributeError(KeyError("'lr'\nDid you mean ..."))
        e = e.args[0]
    text = str(e.args[0]) if e.args else str(e)
    key, *hint = [ln.strip() for ln in text.splitlines() if ln.strip()] or ["?"]
    key = key.strip("\"' ")
    culprits = [a for a in argv[1:] if a.startswith("--config.") and key in a.split("=")[0].split(".")]
    arg = culprits[0] if culprits else "--config.*"
    return f"{arg}: the config has no field {key!r}" + (f" ({hint[0]})" if hint else "") + \
        " (train.py --help lists the fields)"


def _one_line(e: BaseException) -> str:
    """A flag / config-file error as one line: ml_collections embeds the config file's own traceback in the
    message; its last line ('ValueError: unknown method ...') is what the user needs."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    head, last = lines[0], lines[-1]
    if len(lines) > 1 and ":" in last and last.split(":", 1)[0].replace(".", "").isidentifier():
        last = last.split(":", 1)[1].strip()  # 'ValueError: unknown method' -> 'unknown method'
    if head.startswith("flag --") and len(lines) > 1:
        return f"{head.split(':', 1)[0][len('flag '):]}: {last}"
    return last if len(lines) > 1 else head


def parse_flags(argv: list[str]) -> flags.FlagValues:
    """train.py's flags from ``argv`` (``argv[0]`` the program), in a FlagValues of their own (so a test can parse
    several command lines in one process).  Raises UsageError (one line) for a bad --config: a missing file, a
    config argument the file refuses, an unknown or mistyped override, a config file that fails to import."""
    fv = flags.FlagValues()
    try:
        spec = _config_spec(argv)
        _check_config_file(spec)
        config_flags.DEFINE_config_file("config", _config_path(DEFAULT_CONFIG), "Config file (ml_collections): "
                                        "FILE[:ARG]; --config.FIELD=VALUE overrides one of its fields.",
                                        flag_values=fv, lock_config=True, sys_argv=argv)
        flags.DEFINE_string("workdir", DEFAULT_WORKDIR, "Directory for checkpoints, metrics and the summary.",
                            flag_values=fv)
        flags.DEFINE_boolean("print_config", False, "Print the resolved config (the file, the overrides, scaled "
                                                    "milestones) and exit.", flag_values=fv)
        extra = fv(argv)[1:]
        if extra:
            raise UsageError(f"unexpected argument {extra[0]!r}: train.py takes --config=FILE, --config.FIELD=VALUE, "
                             f"--workdir=DIR, --print_config (see --help)")
        config = fv.config  # a file that failed to load raises on first use: here, not in main()
        if not hasattr(config, "get"):
            raise UsageError(f"--config={spec}: its get_config() returned a {type(config).__name__}, not a "
                             f"ConfigDict")
        config.get("seed", None)
    except UsageError:
        raise
    except (KeyError, AttributeError) as e:
        raise UsageError(_unknown_override(e, argv)) from None
    except (flags.Error, OSError, ValueError, TypeError) as e:
        raise UsageError(_one_line(e)) from None
    except Exception as e:  # noqa: BLE001 - the config file's own code failed (NameError, SyntaxError, ImportError)
        first = (str(e).strip().splitlines() or [""])[0]
        raise UsageError(f"--config={_config_spec(argv)}: cannot load it ({type(e).__name__}: {first})") from None
    if not fv.workdir:
        raise UsageError("--workdir is empty: give the folder for checkpoints, metrics and the summary")
    return fv


def _overridden(fv: flags.FlagValues) -> dict:
    """The ``--config.FIELD=VALUE`` overrides given: ``{field: value}``."""
    return dict(config_flags.get_override_values(fv["config"]))


def fit_schedules(fv: flags.FlagValues) -> list[str]:
    """Milestones of a stage whose epochs the command line shortened, and whose milestones it did not set, scaled
    to the new epochs when they no longer fit (``config_validation.fit_milestones``); -> the lines that say so."""
    from mgd_jax.config_validation import fit_milestones

    given = _overridden(fv)
    epochs = {}
    for field in given:
        if field == "epochs" or field.endswith(".epochs"):
            stage = field[:-len(".epochs")] if field != "epochs" else ""
            default = fv[f"config.{field}"].default  # the file's value
            if stage and isinstance(default, int):
                epochs[stage] = default
    chosen = set()
    for field in given:
        for tail in (".optimizer.milestones", ".optimizer"):
            if field.endswith(tail):
                chosen.add(field[:-len(tail)])
        chosen.add(field)  # a whole stage block given
    return fit_milestones(fv.config, epochs, chosen)


def help_text(argv: list[str]) -> str:
    """``--help``: usage, the flags, and the top-level fields of the config the command names (or the default)."""
    doc = (__doc__ or "").strip()
    lines = [f"usage: {USAGE}", "", doc, "", "flags:",
             f"  --config=FILE[:ARG]     a config file (default {DEFAULT_CONFIG}); ARG: its get_config argument,",
             "                          e.g. --config=configs/cifar100.py:resnet56,resnet20,kd,mas",
             "  --config.FIELD=VALUE    override one field of it (typed as the field), e.g. --config.student.epochs=30",
             f"  --workdir=DIR           checkpoints, metrics and the summary (default {DEFAULT_WORKDIR})",
             "  --print_config          print the resolved config (file + overrides) and exit",
             "  --help                  this text", ""]
    try:
        rest = [a for a in argv if a not in HELP_FLAGS]
        config = parse_flags(rest).config
        source = _config_spec(rest)
    except UsageError:
        config, source = None, None
    lines.append("config fields" + (f" of {source}" if source else "") + " (every field with its default and meaning: "
                 "docs/config.md; the values: --print_config):")
    import textwrap

    names = list(config.keys()) if config is not None else list(SECTIONS)
    for name in names:
        value = config[name] if config is not None else None
        text = SECTIONS.get(name, "")
        if hasattr(value, "keys") and name != "students":
            text += ("; " if text else "") + "fields: " + ", ".join(value.keys())
        elif name == "students" and hasattr(value, "keys"):
            text += f"; here: {', '.join(value.keys())}"
        lines += textwrap.wrap(text, 118, initial_indent=f"  {name:<19}", subsequent_indent=" " * 21) or [f"  {name}"]
    return "\n".join(lines) + "\n"


def config_text(config) -> str:
    """The config as ``field = value`` lines, one per field, in the form ``--config.field=value`` takes."""
    def flat(prefix, value):
        if hasattr(value, "items"):
            for k, v in value.items():
                yield from flat(f"{prefix}.{k}" if prefix else k, v)
        else:
            yield f"{prefix} = {value!r}"

    return "\n".join(flat("", config)) + "\n"


def main(argv=None) -> int:
    """train.py with ``argv`` (``sys.argv`` by default; ``argv[0]`` the program) -> its exit status (0; 2 for a
    user mistake, one line on stderr; 75 after a preemption notice)."""
    own_command = argv is None  # else main() was called in-process: the supervisor's worker runs these arguments
    argv = _resolve_argv(sys.argv if argv is None else list(argv))
    if any(a in HELP_FLAGS for a in argv[1:]):
        sys.stdout.write(help_text(argv))
        return 0
    try:
        fv = parse_flags(argv)
    except UsageError as e:
        print("error: " + "; ".join(line.strip() for line in str(e).splitlines() if line.strip()), file=sys.stderr)
        return 2
    if not flags.FLAGS.is_parsed():  # absl's own flags at their defaults, for libraries that read them
        flags.FLAGS.mark_as_parsed()
    logging.set_verbosity(logging.ERROR)  # orbax logs every save at INFO, tfds warns about empty folders
    from mgd_jax.errors import USER_ERRORS, one_line, remove_if_unused

    config, workdir = fv.config, fv.workdir
    from mgd_jax.train import supervisor

    for line in fit_schedules(fv):
        if not supervisor.is_worker():  # a supervised worker's supervisor (the same command) printed it already
            print(line, flush=True)
    if fv.print_config:
        print(config_text(config), end="", flush=True)
        return 0
    existed = os.path.exists(os.path.abspath(os.path.expanduser(workdir)))
    from mgd_jax.train import cpu, distributed, faults, preemption, supervisor

    faults.hold_start("main", lambda: bool(_EARLY_SIGTERM))  # tests only: MGD_JAX_HOLD_AT (train/faults.py)
    try:
        from mgd_jax.config_validation import validate_config

        validate_config(config)  # before the devices, jax.distributed or the workdir: a mistake costs nothing
        if supervisor.needed(config.get("distributed", None)):  # several processes: a lost peer is one line
            worker = None if own_command else [sys.executable, os.path.abspath(__file__), *argv[1:]]
            return supervisor.run(config.get("distributed", None), _EARLY_SIGTERM, command=worker)  # 75 (its module)
        cpu.configure_host_devices(config.get("cpu_devices", None))  # before XLA starts (reads XLA_FLAGS)
        several = distributed.maybe_initialize(config.get("distributed", None))
        if several and _EARLY_SIGTERM:
            os.kill(os.getpid(), signal.SIGTERM)  # jax.distributed's handler is in place now: it tells every process
        import jax
        if not config.get("compilation_cache", True):
            jax.config.update("jax_compilation_cache_dir", None)
        elif several and jax.default_backend() == "cpu":
            # CPU processes joined by gloo: one that loads a step from the cache while another compiles it can hang
            # in the step's first collective (jax 0.12), so each compiles its own
            jax.config.update("jax_compilation_cache_dir", None)
            if jax.process_index() == 0:
                print("compilation cache: off for several CPU processes (each compiles its steps)", flush=True)
        elif not os.environ.get("JAX_COMPILATION_CACHE_DIR"):  # a cache shared by several runs wins (tests)
            # compiled steps are reused by a resumed or repeated run
            jax.config.update("jax_compilation_cache_dir",
                              os.path.join(os.path.abspath(os.path.expanduser(workdir)), ".jax_cache"))
        from mgd_jax.pipeline import train_and_evaluate
        from mgd_jax.train import checkpoint

        checkpoint.QUIET_AFTER_DISK_FULL = True  # we exit right after the one-line error

        with preemption.watch():  # SIGTERM: checkpoint at the next step boundary, exit EXIT_CODE
            if _EARLY_SIGTERM:
                preemption.notify()
            train_and_evaluate(config, workdir)
    except preemption.Preempted as e:
        import jax

        who = f"process {jax.process_index()} of {jax.process_count()}: " if jax.process_count() > 1 else ""
        print(f"preempted: {who}{e}; run the same command to resume from there", file=sys.stderr, flush=True)
        sys.exit(preemption.EXIT_CODE)  # a normal exit: orbax and jax.distributed shut down in order
    except USER_ERRORS as e:
        from mgd_jax.train import checkpoint

        sys.stdout.flush()
        sys.stderr.flush()
        where = os.path.abspath(os.path.expanduser(workdir))
        if not os.path.exists(os.path.join(where, "config.json")):  # refused before training: nothing to tear down
            remove_if_unused(where, existed)
            print(f"error: {one_line(e)}", file=sys.stderr, flush=True)
            supervisor.settle()
            return 2
        os.write(checkpoint.real_stderr_fd(), f"error: {one_line(e)}\n".encode())
        supervisor.settle()  # several processes: process 0 exits last (its peers' own error, not a lost peer)
        # the stages closed their checkpoints and metrics on the way out; skip interpreter teardown, where a
        # failed save's background threads (orbax, after a full disk) would print their own tracebacks
        os._exit(2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
