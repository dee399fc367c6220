"""Train teacher, multi-granularity analyzer and students.

    python train.py                                   # offline quickstart (digits), workdir runs/quickstart
    python train.py --config=configs/cifar100.py:resnet56,resnet20,kd,mas --workdir=runs/x

Running the same command again resumes where it stopped; finished stages are not redone.
"""
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", "configs/quickstart.py", "Config file (ml_collections).",
                                lock_config=True)
flags.DEFINE_string("workdir", "runs/quickstart", "Directory for checkpoints, metrics and the summary.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    logging.set_verbosity(logging.ERROR)  # orbax logs every save at INFO, tfds warns about empty folders
    from mgd_jax.errors import USER_ERRORS
    from mgd_jax.train import distributed

    from mgd_jax.train import cpu

    try:
        cpu.configure_host_devices(FLAGS.config.get("cpu_devices", None))  # before XLA starts (reads XLA_FLAGS)
        distributed.maybe_initialize(FLAGS.config.get("distributed", None))  # before any device is touched
        if FLAGS.config.get("compilation_cache", True):  # compiled steps are reused by a resumed or repeated run
            import jax
            jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.abspath(FLAGS.workdir), ".jax_cache"))
        from mgd_jax.pipeline import train_and_evaluate

        train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
