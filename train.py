"""Train teacher, multi-granularity analyzer and students.

    python train.py                                   # offline quickstart (digits), workdir runs/quickstart
    python train.py --config=configs/cifar100.py:resnet56,resnet20,kd,mas --workdir=runs/x

Running the same command again resumes where it stopped; finished stages are not redone.  On SIGTERM (a
preemption notice) the run saves its latest checkpoint at the next step and exits with status 75.
"""
import os
import signal
import sys

# A preemption notice during the imports and start-up, before the run's own handler is in place: kept and handed
# on (preemption.watch() for one process; re-raised for jax.distributed's handler on several), not a dead process.
_EARLY_SIGTERM = []
signal.signal(signal.SIGTERM, lambda signum, frame: _EARLY_SIGTERM.append(signum))
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})  # a supervised worker starts with it blocked

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402



def _unknown_override(e: BaseException) -> None:
    """ml_collections resolves ``--config.a.b=v`` overrides when the flag is defined: a field the config does not
    have fails there, at import, as a KeyError/AttributeError holding only the field's name."""
    while e.args and isinstance(e.args[0], BaseException):  # AttributeError(KeyError("'lr'\nDid you mean ..."))
        e = e.args[0]
    text = str(e.args[0]) if e.args else str(e)
    key, *hint = [ln.strip() for ln in text.splitlines() if ln.strip()] or ["?"]
    key = key.strip("\"' ")
    culprits = [a for a in sys.argv[1:] if a.startswith("--config.") and key in a.split("=")[0].split(".")]
    arg = culprits[0] if culprits else "--config.*"
    print(f"error: {arg}: the config has no field {key!r}" + (f" ({hint[0]})" if hint else ""), file=sys.stderr)
    sys.exit(2)


try:
    config_flags.DEFINE_config_file("config", "configs/quickstart.py", "Config file (ml_collections).",
                                    lock_config=True)
except (KeyError, AttributeError) as e:
    _unknown_override(e)
flags.DEFINE_string("workdir", "runs/quickstart", "Directory for checkpoints, metrics and the summary.")
FLAGS = flags.FLAGS


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


def parse_flags(argv):
    """absl's parser, but a bad --config (missing file, a config argument the file refuses, an unknown or mistyped
    override) is one line on stderr and exit status 2, not a traceback."""
    try:
        rest = FLAGS(argv)
        FLAGS.config.get("seed", None)  # a file that failed to load raises on first use: here, not in main()
        return rest
    except (KeyError, AttributeError) as e:
        _unknown_override(e)
    except (flags.Error, OSError, ValueError, TypeError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)


def main(argv):
    del argv
    logging.set_verbosity(logging.ERROR)  # orbax logs every save at INFO, tfds warns about empty folders
    from mgd_jax.errors import USER_ERRORS
    from mgd_jax.train import cpu, distributed, preemption, supervisor

    try:
        if supervisor.needed(FLAGS.config.get("distributed", None)):  # several processes: a lost peer is one line
            sys.exit(supervisor.run(FLAGS.config.get("distributed", None), _EARLY_SIGTERM))  # and 75 (its module)
        cpu.configure_host_devices(FLAGS.config.get("cpu_devices", None))  # before XLA starts (reads XLA_FLAGS)
        if distributed.maybe_initialize(FLAGS.config.get("distributed", None)) and _EARLY_SIGTERM:
            os.kill(os.getpid(), signal.SIGTERM)  # jax.distributed's handler is in place now: it tells every process
        import jax
        if not FLAGS.config.get("compilation_cache", True):
            jax.config.update("jax_compilation_cache_dir", None)
        elif not os.environ.get("JAX_COMPILATION_CACHE_DIR"):  # a cache shared by several runs wins (tests)
            # compiled steps are reused by a resumed or repeated run
            jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.abspath(FLAGS.workdir), ".jax_cache"))
        from mgd_jax.pipeline import train_and_evaluate
        from mgd_jax.train import checkpoint

        checkpoint.QUIET_AFTER_DISK_FULL = True  # we exit right after the one-line error

        with preemption.watch():  # SIGTERM: checkpoint at the next step boundary, exit EXIT_CODE
            if _EARLY_SIGTERM:
                preemption.notify()
            train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except preemption.Preempted as e:
        import jax

        who = f"process {jax.process_index()} of {jax.process_count()}: " if jax.process_count() > 1 else ""
        print(f"preempted: {who}{e}; run the same command to resume from there", file=sys.stderr, flush=True)
        sys.exit(preemption.EXIT_CODE)  # a normal exit: orbax and jax.distributed shut down in order
    except USER_ERRORS as e:
        from mgd_jax.train import checkpoint

        sys.stdout.flush()
        sys.stderr.flush()
        os.write(checkpoint.real_stderr_fd(), f"error: {e}\n".encode())
        supervisor.settle()  # several processes: process 0 exits last (its peers' own error, not a lost peer)
        # the stages closed their checkpoints and metrics on the way out; skip interpreter teardown, where a
        # failed save's background threads (orbax, after a full disk) would print their own tracebacks
        os._exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
