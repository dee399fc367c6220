"""Config checks that run before any data is read or anything is compiled; each error is one line naming the
field and the value."""
from __future__ import annotations

import ml_collections

from mgd_jax.analyzer import parse_granularities
from mgd_jax.data.sources import DATASETS, DIGITS_SPLIT, DIGITS_SPLITS
from mgd_jax.errors import ConfigError  # noqa: F401 - raised here
from mgd_jax.methods import get_method, known_methods
from mgd_jax.models import ARCHITECTURES
from mgd_jax.precision import DTYPES
from mgd_jax.stages.common import MAX_SEED, RUN_SEED
from mgd_jax.stages.student import GRANULARITY_MODES



def _fail(field, value, why):
    raise ConfigError(f"config.{field.lstrip('.')}={value!r}: {why}")


def _check_optimizer(prefix, opt, epochs):
    if not opt.lr > 0:
        _fail(f"{prefix}.optimizer.lr", opt.lr, "learning rate must be > 0")
    if not 0 <= opt.momentum < 1:
        _fail(f"{prefix}.optimizer.momentum", opt.momentum, "momentum must be in [0, 1)")
    if opt.weight_decay < 0:
        _fail(f"{prefix}.optimizer.weight_decay", opt.weight_decay, "weight decay must be >= 0")
    if not 0 < opt.gamma <= 1:
        _fail(f"{prefix}.optimizer.gamma", opt.gamma, "gamma must be in (0, 1]")
    field = f"{prefix}.optimizer.milestones".lstrip(".")
    try:
        ms = list(opt.milestones)
        bad = any(not isinstance(m, (int, float)) or int(m) != m or m <= 0 for m in ms) or ms != sorted(set(ms))
    except TypeError:  # not a sequence, or of things that do not compare
        bad, ms = True, opt.milestones
    if bad:
        _fail(field, ms if not isinstance(ms, list) else tuple(ms), "milestones must be increasing positive epochs, "
              f"e.g. --config.{field}='(30, 45)' or '()' for a constant learning rate")
    if ms and ms[-1] >= epochs:
        fit = tuple(int(m) for m in ms if m < epochs)
        constant = " (a constant learning rate)" if not fit else ""
        _fail(field, tuple(ms), f"a milestone lies at or beyond the last epoch ({epochs} epochs): set milestones "
                                f"below it, e.g. --config.{field}='{fit!r}'{constant}")


def scale_milestones(milestones, from_epochs: int, to_epochs: int) -> tuple[int, ...]:
    """A schedule's milestones for ``from_epochs`` scaled to ``to_epochs`` (each rounded; those that fall on or
    beyond the last epoch, or on epoch 0, dropped), e.g. (150, 180, 210) of 240 -> (15, 18, 21) of 24, () of 1."""
    scaled = (int(round(m * to_epochs / from_epochs)) for m in milestones)
    return tuple(sorted({m for m in scaled if 0 < m < to_epochs}))


def fit_milestones(config, epochs_given: dict, milestones_given, flag: str = "--config.") -> list[str]:
    """For every stage whose ``epochs`` the user changed (``epochs_given``: ``{'student': the file's epochs}``,
    stage paths as in the config: teacher, analyzer, student, mutual, students.<name>.init) and whose milestones
    they did not set (``milestones_given``: stage paths), milestones that no longer fit before the last epoch
    are scaled with the epochs (``scale_milestones``).  Changes ``config``; -> one line per stage changed (``flag``:
    how the command line sets a field).  Not applied when the milestones still fit: the schedule then stays the
    file's."""
    lines = []
    for stage, from_epochs in epochs_given.items():
        if stage in milestones_given:
            continue
        node = config
        try:
            for part in stage.split("."):
                node = node[part]
            epochs, milestones = node.epochs, tuple(node.optimizer.milestones)
        except (KeyError, AttributeError, TypeError):
            continue  # a stage without a schedule: the validation names whatever is wrong
        if not (isinstance(epochs, int) and epochs >= 1 and isinstance(from_epochs, int) and from_epochs >= 1):
            continue
        if milestones and all(isinstance(m, (int, float)) for m in milestones) and max(milestones) >= epochs:
            scaled = scale_milestones(milestones, from_epochs, epochs)
            node.optimizer.milestones = scaled
            constant = " (a constant learning rate)" if not scaled else ""
            lines.append(f"config.{stage}.optimizer.milestones: {milestones}, set for {from_epochs} epochs, scaled "
                         f"to {scaled} for {flag}{stage}.epochs={epochs}{constant}; "
                         f"{flag}{stage}.optimizer.milestones=... chooses them")
    return lines


def _check_stage(prefix, cfg):
    if int(cfg.epochs) != cfg.epochs or cfg.epochs < 1:
        _fail(f"{prefix}.epochs", cfg.epochs, "must be an integer >= 1")
    if int(cfg.batch_size) != cfg.batch_size or cfg.batch_size < 1:
        _fail(f"{prefix}.batch_size", cfg.batch_size, "must be an integer >= 1")
    _check_optimizer(prefix, cfg.optimizer, cfg.epochs)


def validate_transfer_config(cfg) -> None:
    """The transfer recipe (``configs/transfer.py``, after the tool's overrides)."""
    if not _is_seed(cfg.get("seed", 0)):
        _fail("seed", cfg.seed, f"must be an integer from 0 to {MAX_SEED}")
    if cfg.data.name not in DATASETS:
        _fail("data.name", cfg.data.name, f"unknown dataset; known: {', '.join(DATASETS)}")
    _check_stage("", cfg)
    if not cfg.get("low_lr", 1.0) > 0:
        _fail("low_lr", cfg.low_lr, "learning rate must be > 0")
    if cfg.eval_batch_size < 1:
        _fail("eval_batch_size", cfg.eval_batch_size, "must be >= 1")
    if len(cfg.augment.mean) != len(cfg.augment.std) or any(s <= 0 for s in cfg.augment.std):
        _fail("augment.std", tuple(cfg.augment.std), "needs one positive value per channel of augment.mean")


# The top-level fields of a train.py config (configs/default.py); a config without them is not one (e.g. the
# transfer recipe given to train.py).
REQUIRED_SECTIONS = ("data", "augment", "teacher", "analyzer", "student", "students", "granularities")


def _check_types(config) -> None:
    """The structure every later check reads: sections that are config blocks, names that are strings."""
    for name in REQUIRED_SECTIONS:
        if name not in config:
            raise ConfigError(f"the config has no field {name!r}: is it a train.py config (configs/quickstart.py, "
                              f"configs/cifar100.py, ...)?")
    for name in ("data", "augment", "teacher", "analyzer", "student", "students"):
        if not isinstance(config[name], ml_collections.ConfigDict):
            _fail(name, config[name], "must be a config block (its fields: docs/config.md)")
    for who in ("teacher", "analyzer", "student"):
        for field in ("epochs", "batch_size"):
            v = config[who].get(field, None)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                _fail(f"{who}.{field}", v, "must be an integer >= 1")
        if not isinstance(config[who].get("optimizer", None), ml_collections.ConfigDict):
            _fail(f"{who}.optimizer", config[who].get("optimizer", None), "must be a config block (lr, momentum, "
                                                                          "weight_decay, milestones, gamma)")
        for field in ("lr", "momentum", "weight_decay", "gamma"):
            v = config[who].optimizer.get(field, None)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                _fail(f"{who}.optimizer.{field}", v, "must be a number")
    for who in ("teacher", "student"):
        if not isinstance(config[who].get("arch", None), str):
            _fail(f"{who}.arch", config[who].get("arch", None), f"must be an architecture's name; known: "
                                                                 f"{', '.join(ARCHITECTURES)}")
    if not isinstance(config.data.get("name", None), str):
        _fail("data.name", config.data.get("name", None), f"must be a dataset's name; known: {', '.join(DATASETS)}")
    for name, s in config.students.items():
        if not isinstance(s, ml_collections.ConfigDict):
            _fail(f"students.{name}", s, "must be a config block (method, granularity, weights, ...)")


def _check_data(data) -> None:
    """The data block's sizes: limits, the digits' image size and test split."""
    for field in ("train_limit", "test_limit"):
        v = data.get(field, None)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            _fail(f"data.{field}", v, "must be None (all examples) or an integer >= 1")
    size = data.get("image_size", None)
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        _fail("data.image_size", size, "must be an integer >= 1 (pixels)")
    if data.name == "digits" and not data.get("dir", None):
        if size is not None and size % 8:
            _fail("data.image_size", size, "the digits are 8x8 images repeated to the input size: use a multiple "
                                           "of 8 (8, 16, 24, 32, ...)")
        split = data.get("split", DIGITS_SPLIT)
        if split not in DIGITS_SPLITS:
            _fail("data.split", split, f"must be {' or '.join(map(repr, DIGITS_SPLITS))} (the latter: "
                                       f"scikit-learn's train_test_split)")
        test_size = data.get("test_size", 360)
        if isinstance(test_size, bool) or not isinstance(test_size, int) or not 10 <= test_size <= 1787:
            _fail("data.test_size", test_size, "must be an integer in [10, 1787] (the digits' 1797 images, "
                                               "stratified over 10 classes)")


def _check_distributed(dist) -> None:
    """The multi-host block's values that are set (None: from the launcher or JAX_* environment variables)."""
    if dist is None:
        return
    for field, low, what in (("num_processes", 1, "an integer >= 1"), ("process_id", 0, "an integer >= 0"),
                             ("timeout_seconds", 1, "an integer >= 1 (seconds)"),
                             ("heartbeat_timeout_seconds", 1, "an integer >= 1 (seconds)")):
        v = dist.get(field, None)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
            _fail(f"distributed.{field}", v, f"must be None or {what}")


def check_data_sizes(config, train_examples: int, test_examples: int) -> None:
    """After the data is loaded: splits that are empty, or a batch no epoch can fill (``drop_remainder``)."""
    if train_examples < 1 or test_examples < 1:
        which = "training" if train_examples < 1 else "test"
        raise ConfigError(f"config.data (name={config.data.name!r}): the {which} split holds no examples")
    if config.get("drop_remainder", False):
        stages = ["teacher", "analyzer", "student"] + (["mutual"] if config.get("mutual", None) is not None else [])
        for stage in stages:
            b = config[stage].batch_size
            if b > train_examples:
                _fail(f"{stage}.batch_size", b, f"larger than the {train_examples} training examples with "
                                                f"config.drop_remainder=True: no epoch has a full batch, nothing would "
                                                f"train")


def validate_config(config) -> None:
    """ConfigError (one line, naming the field and the value) for a config that cannot work."""
    try:
        _validate(config)
    except (TypeError, AttributeError, KeyError) as e:  # a value of a type no check above expects
        raise ConfigError(f"the config holds a value of the wrong type ({type(e).__name__}: {e}); compare yours "
                          f"(train.py --print_config) with docs/config.md") from None


def _is_seed(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_SEED


def _validate(config) -> None:
    _check_types(config)
    if not _is_seed(config.get("seed", 0)):
        _fail("seed", config.seed, f"must be an integer from 0 to {MAX_SEED}")
    if config.data.name not in DATASETS:
        _fail("data.name", config.data.name, f"unknown dataset; known: {', '.join(DATASETS)}")
    for who in ("teacher", "student"):
        arch = config[who].arch
        if arch not in ARCHITECTURES:
            _fail(f"{who}.arch", arch, f"unknown architecture; known: {', '.join(ARCHITECTURES)}")
    on_device = config.data.get("on_device", None)
    if not (on_device is None or isinstance(on_device, bool)):
        _fail("data.on_device", on_device, "must be None (on for GPU / TPU), True or False")
    prec = config.get("precision", "float32")
    if prec not in DTYPES:
        _fail("precision", prec, f"unknown precision; known: {', '.join(DTYPES)}")
    if prec == "float16":  # its 5-bit exponent under/overflows gradients without loss scaling, which we do not do
        _fail("precision", prec, "float16 needs loss scaling, which is not implemented; use bfloat16 (same speed on "
                                 "GPU / TPU, float32's range) or float32")
    _check_data(config.data)
    ck = config.get("checkpoint", None)
    if ck is not None:
        every, keep = ck.get("every_steps", 0), ck.get("keep", 1)
        if isinstance(every, bool) or not (every is None or (isinstance(every, int) and every >= 0)):
            _fail("checkpoint.every_steps", every, "must be an integer >= 0 (0: at the end of each epoch only)")
        if isinstance(keep, bool) or not (isinstance(keep, int) and keep >= 1):
            _fail("checkpoint.keep", keep, "must be an integer >= 1 (latest checkpoints kept per stage)")
    _check_distributed(config.get("distributed", None))
    cpu_devices = config.get("cpu_devices", None)
    if not (cpu_devices is None or (isinstance(cpu_devices, int) and cpu_devices >= 0)):
        _fail("cpu_devices", cpu_devices, "must be None (one per core), a count, or 0 (XLA's default)")
    _check_stage("teacher", config.teacher)
    _check_stage("analyzer", config.analyzer)
    _check_stage("student", config.student)
    group_size = config.student.get("group_size", 0)
    if not (isinstance(group_size, int) and group_size >= 0):
        _fail("student.group_size", group_size, "must be an integer >= 0 (0: all students in one group)")
    vmap = config.student.get("vmap", "auto")
    if vmap not in ("auto", "on", "off"):
        _fail("student.vmap", vmap, "must be auto, on or off")
    try:
        parse_granularities(config.granularities)
    except (ValueError, TypeError) as e:
        why = str(e) if isinstance(e, ValueError) else "must be ((encoding dim, temperature), ...), e.g. " \
                                                        "((64, 2.0), (256, 8.0))"
        raise ConfigError(f"config.granularities={config.granularities!r}: {why}") from None
    for field in ("mean", "std"):
        v = config.augment.get(field, None)
        if not (isinstance(v, (tuple, list)) and v and all(isinstance(x, (int, float)) for x in v)):
            _fail(f"augment.{field}", v, "must be one number per image channel, e.g. (0.5071, 0.4867, 0.4408)")
    if len(config.augment.mean) != len(config.augment.std) or any(s <= 0 for s in config.augment.std):
        _fail("augment.std", tuple(config.augment.std), "needs one positive value per channel of augment.mean")
    if config.augment.pad < 0:
        _fail("augment.pad", config.augment.pad, "must be >= 0")
    if config.eval_batch_size < 1:
        _fail("eval_batch_size", config.eval_batch_size, "must be >= 1")
    mutual = config.get("mutual", None)
    if mutual is not None:
        if len(mutual.peers) < 2:
            _fail("mutual.peers", tuple(mutual.peers), "mutual learning needs at least 2 peers")
        for a in mutual.peers:
            if a not in ARCHITECTURES:
                _fail("mutual.peers", tuple(mutual.peers), f"unknown architecture {a!r}")
        _check_stage("mutual", mutual)
    if not config.students:
        _fail("students", dict(config.students), "at least one student run is needed")
    for name, s in config.students.items():
        p = f"students.{name}"
        if s.method not in known_methods():
            _fail(f"{p}.method", s.method, f"unknown method; known: {', '.join(known_methods())}")
        if s.granularity not in GRANULARITY_MODES:
            _fail(f"{p}.granularity", s.granularity, f"unknown granularity mode; known: {', '.join(GRANULARITY_MODES)}")
        if not s.temperature > 0:
            _fail(f"{p}.temperature", s.temperature, "temperature must be > 0")
        seed = s.get("seed", None)
        if seed is not None and seed != RUN_SEED and not _is_seed(seed):
            _fail(f"{p}.seed", seed, f"must be an integer from 0 to {MAX_SEED}, or {RUN_SEED} for the run's seed")
        for k in ("ce", "logit_kd", "method", "granularity"):
            if not s.weights[k] >= 0:
                _fail(f"{p}.weights.{k}", s.weights[k], "weights must be >= 0")
        try:
            method = get_method(s.method, **dict(s.get("method_options", None) or {}))
        except ValueError as e:
            raise ConfigError(f"config.{p}.method_options: {e}") from None
        if method.has_init_stage:
            if "init" not in s:
                _fail(f"{p}.init", None, f"method {s.method!r} needs an init stage config (epochs, optimizer)")
            _check_stage(f"{p}.init", ml_collections.ConfigDict({**s.init.to_dict(), "batch_size": 1}))
        if method.needs_contrast and method.mode not in ("exact", "relax"):
            _fail(f"{p}.method_options.mode", method.mode, "CRD mode must be 'exact' or 'relax'")
