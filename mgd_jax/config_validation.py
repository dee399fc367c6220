"""Config checks that run before any data is read or anything is compiled; each error is one line naming the
field and the value."""
from __future__ import annotations

import ml_collections

from mgd_jax.analyzer import parse_granularities
from mgd_jax.data.sources import DATASETS
from mgd_jax.errors import ConfigError  # noqa: F401 - raised here
from mgd_jax.methods import get_method, known_methods
from mgd_jax.models import ARCHITECTURES
from mgd_jax.precision import DTYPES
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
    ms = list(opt.milestones)
    if any(int(m) != m or m <= 0 for m in ms) or ms != sorted(set(ms)):
        _fail(f"{prefix}.optimizer.milestones", tuple(ms), "milestones must be increasing positive epochs")
    if ms and ms[-1] >= epochs:
        _fail(f"{prefix}.optimizer.milestones", tuple(ms), f"a milestone lies beyond the last epoch ({epochs})")


def _check_stage(prefix, cfg):
    if int(cfg.epochs) != cfg.epochs or cfg.epochs < 1:
        _fail(f"{prefix}.epochs", cfg.epochs, "must be an integer >= 1")
    if int(cfg.batch_size) != cfg.batch_size or cfg.batch_size < 1:
        _fail(f"{prefix}.batch_size", cfg.batch_size, "must be an integer >= 1")
    _check_optimizer(prefix, cfg.optimizer, cfg.epochs)


def validate_transfer_config(cfg) -> None:
    """The transfer recipe (``configs/transfer.py``, after the tool's overrides)."""
    if cfg.data.name not in DATASETS:
        _fail("data.name", cfg.data.name, f"unknown dataset; known: {', '.join(DATASETS)}")
    _check_stage("", cfg)
    if not cfg.get("low_lr", 1.0) > 0:
        _fail("low_lr", cfg.low_lr, "learning rate must be > 0")
    if cfg.eval_batch_size < 1:
        _fail("eval_batch_size", cfg.eval_batch_size, "must be >= 1")
    if len(cfg.augment.mean) != len(cfg.augment.std) or any(s <= 0 for s in cfg.augment.std):
        _fail("augment.std", tuple(cfg.augment.std), "needs one positive value per channel of augment.mean")


def validate_config(config) -> None:
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
    cpu_devices = config.get("cpu_devices", None)
    if not (cpu_devices is None or (isinstance(cpu_devices, int) and cpu_devices >= 0)):
        _fail("cpu_devices", cpu_devices, "must be None (one per core), a count, or 0 (XLA's default)")
    _check_stage("teacher", config.teacher)
    _check_stage("analyzer", config.analyzer)
    _check_stage("student", config.student)
    group_size = config.student.get("group_size", 0)
    if not (isinstance(group_size, int) and group_size >= 0):
        _fail("student.group_size", group_size, "must be an integer >= 0 (0: all students in one group)")
    try:
        parse_granularities(config.granularities)
    except ValueError as e:
        raise ConfigError(f"config.granularities={tuple(map(tuple, config.granularities))!r}: {e}") from None
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
