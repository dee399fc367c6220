"""Every user mistake in every command-line tool ends in one line ``error: ...`` with exit status 2, naming the
cause, never a traceback; and a run refused before training leaves no workdir behind.

Table-driven: each tool's entry point runs in this process (``main(argv)``, SystemExit caught, stderr captured);
train.py is loaded from its file and its ``main(argv)`` called the same way.  A subprocess only where the point is
the process itself (the default tfds location under another HOME, train.py run from outside the checkout).  The
workdirs the tools read are laid out by hand (a config.json and stage folders): every mistake here is refused
before a checkpoint is restored or anything compiled.
"""
import importlib.util
import json
import os
import signal
import subprocess
import sys

import pytest

from _requires import need
from conftest import ROOT, xla_flags

from configs import smoke
from mgd_jax.train import supervisor


def _load_train():
    """train.py as a module (its SIGTERM handler, installed at import, is put back to pytest's)."""
    previous = signal.getsignal(signal.SIGTERM)
    spec = importlib.util.spec_from_file_location("mgd_jax_train_cli", ROOT / "train.py")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return module


TRAIN = _load_train()


def run_cli(main, argv):
    """-> (exit status, stdout, stderr) of ``main(argv)``, a SystemExit (argparse) taken as the status."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code


def assert_one_line(capsys, code, expected):
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (code, err)
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for text in ([expected] if isinstance(expected, str) else expected):
        assert text in lines[0], (text, lines[0])
    return lines[0]


@pytest.fixture
def train(monkeypatch, capsys):
    """train.py's main with argv; the process-wide settings it changes are restored after the test."""
    from mgd_jax.train import checkpoint

    monkeypatch.setattr(checkpoint, "QUIET_AFTER_DISK_FULL", checkpoint.QUIET_AFTER_DISK_FULL)
    monkeypatch.chdir(ROOT)
    capsys.readouterr()
    return lambda *argv: run_cli(TRAIN.main, ["train.py", *argv])


# --- train.py ----------------------------------------------------------------------------------------------------
SMOKE = "--config=configs/smoke.py"
TRAIN_CASES = [
    (["--bogus=1"], "Unknown command line flag 'bogus'"),
    ([SMOKE, "extra_argument"], "unexpected argument 'extra_argument'"),
    (["--config=configs/nonexistent.py"], "--config=configs/nonexistent.py: no such file"),
    (["--config="], "--config is empty"),
    (["--config=configs"], "configs is a folder, not a config file"),
    ([SMOKE, "--workdir="], "--workdir is empty"),
    (["--config=configs/transfer.py"], "the config has no field 'teacher': is it a train.py config"),
    (["--config=configs/cifar100.py:resnet56,resnet20"], "--config=configs/cifar100.py: config argument must be"),
    (["--config=configs/cifar100.py:resnet56,resnet20,fitnet3,mas"], "unknown method 'fitnet3'"),
    (["--config=configs/cifar100.py:resnet56,resnet20,kd,mgs"], "unknown student mode 'mgs'"),
    ([SMOKE, "--config.teacher.optimizer.lrr=0.1"],
     "--config.teacher.optimizer.lrr=0.1: the config has no field 'lrr'"),
    ([SMOKE, "--config.teacher.epochs=many"], "--config.teacher.epochs=many: invalid literal for int()"),
    ([SMOKE, "--config.student.batch_size=2.5"], "--config.student.batch_size=2.5: invalid literal for int()"),
    ([SMOKE, "--config.students=3"], "--config.students=3: Failed to parse '3'"),
    ([SMOKE, "--config.student.epochs=-1"], "config.student.epochs=-1: must be an integer >= 1"),
    ([SMOKE, "--config.teacher.epochs=0"], "config.teacher.epochs=0: must be an integer >= 1"),
    ([SMOKE, "--config.student.batch_size=-4"], "config.student.batch_size=-4: must be an integer >= 1"),
    ([SMOKE, "--config.analyzer.optimizer.lr=-0.1"], "config.analyzer.optimizer.lr=-0.1: learning rate must be > 0"),
    ([SMOKE, "--config.teacher.arch=resnet9"], "config.teacher.arch='resnet9': unknown architecture"),
    ([SMOKE, "--config.student.arch=vgg99"], "config.student.arch='vgg99': unknown architecture"),
    ([SMOKE, "--config.teacher.lr=0.1"], "--config.teacher.lr=0.1: the config has no field 'lr'"),
    ([SMOKE, "--config.granularities=((64, 2.0), (0, 8.0))"], "granularities[1]: encoding dim must be a positive"),
    ([SMOKE, "--config.granularities=((64, -2.0),)"], "granularities[0]: temperature must be > 0"),
    ([SMOKE, "--config.students.mas_kd.temperature=0.0"], "config.students.mas_kd.temperature=0.0: temperature must"),
    ([SMOKE, "--config.precision=float16"], "config.precision='float16': float16 needs loss scaling"),
    ([SMOKE, "--config.students.mas_kd.method=fitnet3"], "config.students.mas_kd.method='fitnet3': unknown method"),
    ([SMOKE, "--config.students.mas_kd.granularity=mgs"], "unknown granularity mode"),
    ([SMOKE, "--config.data.name=imagenet21k"], "config.data.name='imagenet21k': unknown dataset"),
    ([SMOKE, "--config.precision=fp8"], "config.precision='fp8': unknown precision"),
    ([SMOKE, "--config.granularities=3"], "granularities[0] must be (dim, temperature)"),
    ([SMOKE, "--config.augment.mean=abc"], "config.augment.mean=('abc',): must be one number per image channel"),
    ([SMOKE, "--config.eval_batch_size=0"], "config.eval_batch_size=0: must be >= 1"),
    ([SMOKE, "--config.cpu_devices=-2"], "config.cpu_devices=-2"),
    ([SMOKE, "--config.student.group_size=-1"], "config.student.group_size=-1"),
    ([SMOKE, "--config.students.mas_kd.seed=-3"], "config.students.mas_kd.seed=-3: must be an integer from 0 to "),
    ([SMOKE, "--config.students.mas_kd.seed=99999999999999999"], "mas_kd.seed=99999999999999999: must be an integer"),
    ([SMOKE, "--config.seed=5000000"], "config.seed=5000000: must be an integer from 0 to 4294966"),
    ([SMOKE, "--config.seed=-1"], "config.seed=-1: must be an integer from 0 to"),
    ([SMOKE, "--config.data.image_size=12"], "config.data.image_size=12: the digits"),
    ([SMOKE, "--config.data.split=random"], "config.data.split='random': must be 'stratified' or 'sklearn'"),
    ([SMOKE, "--config.data.train_limit=-5"], "config.data.train_limit=-5"),
    ([SMOKE, "--config.checkpoint.every_steps=-1"], "config.checkpoint.every_steps=-1"),
    ([SMOKE, "--config.checkpoint.keep=0"], "config.checkpoint.keep=0"),
    ([SMOKE, "--config.distributed.num_processes=0"], "config.distributed.num_processes=0: must be None or an integer"),
    ([SMOKE, "--config.distributed.timeout_seconds=-1"], "config.distributed.timeout_seconds=-1"),
    ([SMOKE, "--config.distributed.num_processes=2"], "2 processes need a coordinator address"),
    ([SMOKE, "--config.drop_remainder=True", "--config.teacher.batch_size=1024"],
     "config.teacher.batch_size=1024: larger than the 192 training examples with config.drop_remainder=True"),
    # milestones the user set that do not fit: the fix named exactly
    ([SMOKE, "--config.teacher.optimizer.milestones=(1,5)"],
     "a milestone lies at or beyond the last epoch (2 epochs): set milestones below it, e.g. "
     "--config.teacher.optimizer.milestones='(1,)'"),
    ([SMOKE, "--config.student.optimizer.milestones=(1,1)"], "milestones must be increasing positive epochs"),
    # found after the workdir is created: the pair, the dataset
    (["--config=configs/smoke.py:resnet8x4,resnet8,fsp,mas"], "method 'fsp' cannot pair resnet8x4 -> resnet8"),
    ([SMOKE, "--config.data.name=cifar100", "--config.data.data_dir=/nonexistent/tfds"],
     "dataset 'cifar100' is not built in /nonexistent/tfds/cifar100"),
]


@pytest.mark.parametrize("args,expected", TRAIN_CASES, ids=[" ".join(a)[-60:] for a, _ in TRAIN_CASES])
def test_train_py_mistakes(train, capsys, tmp_path, args, expected):
    workdir = tmp_path / "w"
    code = train(f"--workdir={workdir}", *args)
    assert_one_line(capsys, code, expected)
    assert not workdir.exists(), "a refused run left its workdir behind"


def test_train_py_mistakes_in_files_and_folders(train, capsys, tmp_path):
    (tmp_path / "not_a_config.py").write_text("hello\n")
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "returns_a_list.py").write_text("def get_config():\n    return [1, 2]\n")
    for args, expected in [
            ([f"--config={tmp_path / 'not_a_config.py'}"], "cannot load it (NameError: name 'hello' is not defined)"),
            ([f"--config={tmp_path / 'returns_a_list.py'}"], "returned a list, not a ConfigDict"),
            ([SMOKE, f"--workdir={tmp_path / 'a_file'}"], "not writable"),
            ([SMOKE, f"--workdir={tmp_path / 'a_file' / 'under'}"], "not writable")]:
        assert_one_line(capsys, train(*args), expected)
    assert (tmp_path / "a_file").read_text() == "x"


def test_a_refusal_keeps_a_workdir_that_existed(train, capsys, tmp_path):
    """Only a workdir the refused run created is removed; one that was there (even empty) stays."""
    workdir = tmp_path / "mine"
    workdir.mkdir()
    code = train(f"--workdir={workdir}", SMOKE, "--config.data.name=cifar100", f"--config.data.data_dir={tmp_path}")
    assert_one_line(capsys, code, "is not built in")
    assert workdir.is_dir()


# --- train.py: help, the resolved config, shortened schedules -------------------------------------------------
def test_help_lists_the_config_fields(train, capsys):
    from configs import default

    assert train("--help") == 0
    out = capsys.readouterr().out
    assert "--print_config" in out and "docs/config.md" in out and "--config.FIELD=VALUE" in out
    listed = [line.split()[0] for line in out.split("config fields", 1)[1].splitlines()[1:] if line.startswith("  ")
              and not line.startswith("   ")]
    assert set(default.get_config().keys()) <= set(listed), listed
    assert train("--help", "--config=configs/cifar100.py:resnet56,resnet20,kd,all") == 0
    assert "kd_mag, kd_mas, kd_none" in capsys.readouterr().out


def _printed(out: str) -> dict:
    return dict(line.split(" = ", 1) for line in out.splitlines() if " = " in line)


def test_short_epochs_scale_the_default_milestones(train, capsys, tmp_path, monkeypatch):
    """--config.<stage>.epochs below the file's milestones: the milestones are scaled (one line says so); the
    paper's schedule is untouched when the epochs are not overridden, and milestones the user sets are theirs."""
    cifar = "--config=configs/cifar100.py:resnet56,resnet20,kd,mas"
    assert train(cifar, "--print_config") == 0
    paper = _printed(capsys.readouterr().out)
    assert paper["student.optimizer.milestones"] == "(150, 180, 210)"
    assert paper["teacher.optimizer.milestones"] == "(60, 120, 180)"
    assert paper["analyzer.optimizer.milestones"] == "(30, 45)"

    assert train(cifar, "--config.student.epochs=1", "--config.teacher.epochs=24", "--config.analyzer.epochs=90",
                 "--print_config", f"--workdir={tmp_path / 'w'}") == 0
    out = capsys.readouterr().out
    got = _printed(out)
    assert got["student.optimizer.milestones"] == "()" and got["teacher.optimizer.milestones"] == "(6, 12, 18)"
    assert got["analyzer.optimizer.milestones"] == "(30, 45)"  # 90 epochs: the file's milestones still fit
    notes = [line for line in out.splitlines() if "scaled" in line]
    assert len(notes) == 2 and "config.student.optimizer.milestones: (150, 180, 210), set for 240 epochs, scaled to " \
        "() for --config.student.epochs=1 (a constant learning rate)" in notes[0]
    assert not (tmp_path / "w").exists()  # --print_config trains nothing
    # a multi-process run's worker (started by train.py's supervisor with the same command): the supervisor said it
    monkeypatch.setenv(supervisor.ENV, str(tmp_path / "status.json"))
    assert train(cifar, "--config.student.epochs=1", "--print_config") == 0
    out = capsys.readouterr().out
    assert _printed(out)["student.optimizer.milestones"] == "()" and "scaled" not in out
    monkeypatch.delenv(supervisor.ENV)

    assert train(cifar, "--config.student.epochs=100", "--config.student.optimizer.milestones=(50,)",
                 "--print_config") == 0
    assert _printed(capsys.readouterr().out)["student.optimizer.milestones"] == "(50,)"


def test_data_sizes_after_loading():
    from mgd_jax.config_validation import ConfigError, check_data_sizes

    c = smoke.get_config()
    check_data_sizes(c, 192, 100)
    for n_train, n_test, message in [(0, 100, "the training split holds no examples"),
                                     (192, 0, "the test split holds no examples")]:
        with pytest.raises(ConfigError, match=message):
            check_data_sizes(c, n_train, n_test)
    c.drop_remainder = True
    c.student.batch_size = 256
    with pytest.raises(ConfigError, match=r"config.student.batch_size=256: larger than the 192 training examples"):
        check_data_sizes(c, 192, 100)


def test_scale_milestones():
    from mgd_jax.config_validation import scale_milestones

    assert scale_milestones((150, 180, 210), 240, 24) == (15, 18, 21)
    assert scale_milestones((150, 180, 210), 240, 1) == ()
    assert scale_milestones((150, 180, 210), 240, 2) == (1,)
    assert scale_milestones((6, 9), 12, 3) == (2,)  # 1.5 -> 2, 2.25 -> 2: once


def test_train_py_from_outside_the_checkout(tmp_path):
    """`python path/to/train.py` from another folder: configs/... (and the default config) resolve beside train.py."""
    env = {**os.environ, "XLA_FLAGS": xla_flags()}
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config=configs/smoke.py", "--print_config"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    printed = _printed(r.stdout)
    assert printed["data.train_limit"] == "192" and printed["teacher.arch"] == "'resnet8'"
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--print_config", "--config.teacher.epochs=3"],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert _printed(r.stdout)["teacher.optimizer.milestones"] == "(2,)"  # the quickstart's (6, 9) of 12, scaled
    assert os.listdir(tmp_path) == []


# --- tfds datasets that are not there, or not readable --------------------------------------------------------
def _dataset_info(root, name="cifar100", version="3.0.2", file_format="tfrecord"):
    folder = root / name / version
    folder.mkdir(parents=True)
    (folder / "dataset_info.json").write_text(json.dumps({
        "name": name, "version": version, "fileFormat": file_format,
        "splits": [{"name": "train", "shardLengths": ["5"]}, {"name": "test", "shardLengths": ["5"]}]}))
    return folder


def test_tfds_datasets_not_built_or_not_readable(tmp_path):
    from mgd_jax.data.sources import DatasetNotFoundError, load_tfds, tfds_data_source

    cases = [
        ("missing", None, ["dataset 'cifar100' is not built in", "missing does not exist",
                           "tfds build cifar100 --manual_dir=DIR --file_format=array_record --data_dir="]),
        ("tfrecord", lambda d: _dataset_info(d), ["was built as tfrecord: training reads it with tfds.data_source, "
                                                  "which needs --file_format=array_record", "--overwrite"]),
        ("old", lambda d: _dataset_info(d, version="3.0.1"), ["holds version 3.0.1 only",
                                                                "reads version 3.0.2"]),
        ("no_files", lambda d: _dataset_info(d, file_format="array_record"),
         ["cannot be read (RuntimeError", "are its files missing or damaged?"]),
    ]
    for name, make, expected in cases:
        root = tmp_path / name
        if make:
            make(root)
        with pytest.raises(DatasetNotFoundError) as e:
            load_tfds("cifar100", str(root))
        for text in expected:
            assert text in str(e.value), (name, str(e.value))
        assert "\n" not in str(e.value) and e.value.__cause__ is not None
    with pytest.raises(DatasetNotFoundError, match=r"dataset 'stl10' is not built .* stl10_binary.tar.gz"):
        load_tfds("stl10", str(tmp_path / "missing"))
    with pytest.raises(DatasetNotFoundError, match=r"'imagenet2012' is not built .* --config.data.dir=FOLDER"):
        tfds_data_source("imagenet2012", "train", str(tmp_path / "missing"))
    assert not (tmp_path / "missing").exists()


def test_tfds_default_location_under_another_home(tmp_path):
    """No data_dir, no ~/tensorflow_datasets: tensorflow-datasets 4.9.10 raises KeyError('... splits is empty')
    from data_source; train.py says where it looked and how to build it, and creates nothing."""
    env = {k: v for k, v in os.environ.items() if k != "TFDS_DATA_DIR"}
    env["XLA_FLAGS"] = xla_flags()
    env["HOME"] = str(tmp_path / "home")
    (tmp_path / "home").mkdir()
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config=configs/cifar100.py:resnet8,resnet8,kd,mas",
                        f"--workdir={tmp_path / 'w'}"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    home_tfds = tmp_path / "home" / "tensorflow_datasets"
    assert f"dataset 'cifar100' is not built in {home_tfds}/cifar100/" in lines[0], lines[0]
    assert "`tfds build cifar100 --manual_dir=DIR --file_format=array_record`" in lines[0]
    assert os.listdir(tmp_path / "home") == [] and not (tmp_path / "w").exists()


# --- the tools: a workdir laid out by hand ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A workdir as train.py leaves it, without checkpoints' contents: config.json, the stage folders, a summary."""
    root = tmp_path_factory.mktemp("cli")
    w = root / "run"
    (w).mkdir()
    (w / "config.json").write_text(smoke.get_config().to_json_best_effort(indent=1))
    for stage in ("teacher", "analyzer", "students/mas_kd"):
        (w / stage / "checkpoints" / "best").mkdir(parents=True)
    (w / "summary.json").write_text(json.dumps([
        {"stage": "teacher", "model": "resnet8", "best_acc1": 0.5, "last_acc1": 0.4, "best_acc5": 0.9},
        {"stage": "student mas_kd (kd / mas)", "model": "resnet8", "best_acc1": 0.3, "last_acc1": 0.3,
         "best_acc5": 0.8}]))
    unfinished = root / "unfinished"
    (unfinished / "teacher" / "checkpoints" / "latest").mkdir(parents=True)
    (unfinished / "config.json").write_text((w / "config.json").read_text())
    (root / "empty").mkdir()
    (root / "a_file.txt").write_text("not a workdir")
    (root / "not_an_image.png").write_text("not a png")
    bad = root / "bad_config"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    return root


def _tool_cases(root):
    """(tool module, argv, expected substrings) for every tool; ``root``: the ``work`` fixture's folder."""
    w, f = root / "run", root / "a_file.txt"
    typo = ["--stage=student/x does not exist in", "its stages: teacher", "students/mas_kd",
            "did you mean --stage=students/mas_kd?"]
    img = str(root / "not_an_image.png")
    return [
        # evaluate
        ("evaluate", [f"--workdir={w}"], "the following arguments are required: --stage"),
        ("evaluate", ["--stage=teacher"], "the following arguments are required: --workdir"),
        ("evaluate", [f"--workdir={w}", "--stage=teacher", "--split=val"], "argument --split: invalid choice: 'val'"),
        ("evaluate", [f"--workdir={w}", "--stage=teacher", "--bogus=1"], "unrecognized arguments: --bogus=1"),
        ("evaluate", [f"--workdir={root / 'nowhere'}", "--stage=teacher"], "nowhere does not exist"),
        ("evaluate", [f"--workdir={f}", "--stage=teacher"], "a_file.txt is a file, not a workdir"),
        ("evaluate", [f"--workdir={root / 'empty'}", "--stage=teacher"], "config.json is missing"),
        ("evaluate", [f"--workdir={root / 'bad_config'}", "--stage=teacher"], "not a config.json written by train.py"),
        ("evaluate", [f"--workdir={w}", "--stage=student/x"], typo),
        ("evaluate", [f"--workdir={w}", "--stage=mutual"], "stage 'mutual' has no backbone; use teacher or "
                                                           "students/<name> or analyzer (here: teacher, analyzer, "
                                                           "students/mas_kd)"),
        ("evaluate", [f"--workdir={w}", "--stage=students/mas_kd/init"], "stage 'students/mas_kd/init' has no"),
        ("evaluate", [f"--workdir={w}", "--stage=students/nope"],
         ["--stage=students/nope does not exist in", "did you mean --stage=students/mas_kd?"]),
        ("evaluate", [f"--workdir={w}", "--stage="], "--stage is empty"),
        ("evaluate", [f"--workdir={root / 'unfinished'}", "--stage=teacher"],
         "checkpoints/best does not exist (the stage has not finished its first epoch"),
        # the analysis tools
        ("cka", [f"--workdir={w}", "--stage=student/x"],  # cka lists the stages it takes: not the teacher
         ["--stage=student/x does not exist in", "(its stages: students/mas_kd); did you mean --stage=students/mas_kd?"]),
        ("cka", [f"--workdir={w}", "--stage=analyzer"], "stage 'analyzer' has no backbone"),
        ("cka", [f"--workdir={w}", "--stage=teacher/"], "--stage=teacher/: CKA compares a student with the teacher"),
        ("cka", [f"--workdir={w}", "--stage=teachr"],  # a typo of the stage cka refuses is not pointed at it
         ["--stage=teachr does not exist in", "(its stages: students/mas_kd)"]),
        ("cka", [f"--workdir={w}", "--stage=students/mas_kd", "--examples=1"], "--examples=1: CKA needs at least 2"),
        ("cka", [f"--workdir={w}", "--stage=students/mas_kd", "--examples=abc"], "argument --examples: invalid int"),
        ("cka", [f"--workdir={w}", "--stage=students/mas_kd", f"--out={f}"], "a_file.txt is a file, not a folder"),
        ("robustness", [f"--workdir={w}", "--stages=,"], "--stages is empty"),
        ("robustness", [f"--workdir={w}", "--stages=teacher,student/x"], typo),
        ("robustness", [f"--workdir={w}", "--stages=analyzer"], "stage 'analyzer' has no backbone"),
        ("robustness", [f"--workdir={w}"], "the following arguments are required: --stages"),
        # export, export_torch, predict
        ("export", [f"--workdir={w}", "--stage=student/x", "--format=stablehlo"], typo),
        ("export", [f"--workdir={w}", "--stage=analyzer", "--format=stablehlo"], "has no backbone to export"),
        ("export", [f"--workdir={w}", "--stage=teacher", "--format=pdf"], "--format=pdf: use one or more of"),
        ("export", [f"--workdir={w}", "--stage=teacher", "--format=stablehlo", "--atol=-1"],
         "tolerances must be >= 0"),
        ("export", [f"--workdir={w}", "--stage=teacher", "--atol=x"], "argument --atol: invalid float value"),
        ("export_torch", [f"--workdir={w}", "--stage=student/x", f"--out={root / 'x.pth'}"], typo),
        ("export_torch", [f"--workdir={w}", "--stage=teacher", f"--out={root}"], "is a folder: give a file name"),
        ("export_torch", [f"--workdir={w}", "--stage=teacher", f"--out={root / 'no' / 'x.pth'}"],
         "the folder " + str(root / "no") + " does not exist"),
        ("export_torch", [f"--workdir={w}", "--stage=teacher"], "the following arguments are required: --out"),
        ("predict", [img], "give either --model=FILE or --workdir=DIR --stage=STAGE"),
        ("predict", [], "the following arguments are required: images"),
        ("predict", [f"--model={f}", img], "not a .onnx or .stablehlo file"),
        ("predict", [f"--model={root}", img], "is a folder: give its model.onnx or model.stablehlo"),
        ("predict", [f"--model={root / 'model.onnx'}", img], "model.onnx does not exist"),
        ("predict", [f"--workdir={w}", "--stage=teacher", "--top=0", img], "--top=0: must be at least 1"),
        ("predict", [f"--workdir={w}", "--stage=student/x", img], typo),
        # transfer
        ("transfer", [f"--workdir={w}", "--stage=student/x"], typo),
        ("transfer", [f"--workdir={w}", "--stage=teacher", "--dataset=mnist"], "unknown transfer dataset 'mnist'"),
        ("transfer", [f"--workdir={w}", "--stage=teacher", "--epochs=-1"], "config.epochs=-1: must be an integer"),
        ("transfer", [f"--workdir={w}", "--stage=teacher", "--config.seed=99999999999999999999"],
         "config.seed=99999999999999999999: must be an integer from 0 to"),
        ("transfer", [f"--workdir={w}", "--stage=teacher", "--epochs=abc"], "argument --epochs: invalid int value"),
        ("transfer", [f"--workdir={w}", "--stage=teacher", "--config.epochz=3"], "the config has no field 'epochz'"),
        ("transfer", [f"--workdir={w}", "--stage=teacher", "--config=configs/none.py"], "configs/none.py does not"),
        # import_torch (before any file is read)
        ("import_torch", ["--arch=resnet56"], "the following arguments are required: --teacher, --workdir"),
        ("import_torch", ["--arch=resnet57", f"--teacher={f}", f"--workdir={root / 'imp'}"],
         "--arch='resnet57': unknown architecture"),
        ("import_torch", ["--arch=resnet56", f"--teacher={root / 'none.pth'}", f"--workdir={root / 'imp'}"],
         "--teacher=" + str(root / "none.pth") + ": no such file"),
        ("import_torch", ["--arch=resnet56", f"--teacher={root}", f"--workdir={root / 'imp'}"],
         "a folder, not a checkpoint file"),
        ("import_torch", ["--arch=resnet56", f"--teacher={f}", f"--workdir={root / 'imp'}", "--num_classes=0"],
         "--num_classes=0: must be an integer >= 1"),
        ("import_torch", ["--arch=resnet56", f"--teacher={f}", f"--workdir={f}"], "is a file, not a folder"),
        # sweep (before anything trains)
        ("sweep", ["--pairs=resnet56", f"--root={root / 'sw'}"], "--pairs: resnet56 is not teacher,student"),
        ("sweep", ["--pairs=resnet56,resnet20", f"--root={root / 'sw'}", "--seeds=a"], "--seeds=a: integers"),
        ("sweep", ["--pairs=resnet56,resnet20", f"--root={root / 'sw'}", "--seeds=0,0"], "distinct integers"),
        ("sweep", ["--pairs=resnet56,resnet20", f"--root={root / 'sw'}", "--methods=kdd"], "unknown method 'kdd'"),
        ("sweep", ["--pairs=resnet56,resnet20", f"--root={root / 'sw'}", "--modes=mgs"], "unknown student mode 'mgs'"),
        ("sweep", ["--pairs=resnet56,resnet99", f"--root={root / 'sw'}"], "'resnet99': unknown architecture"),
        ("sweep", ["--pairs=resnet56,resnet20", f"--root={root / 'sw'}", "--set", "student.epochs"],
         "--set student.epochs: use FIELD=VALUE"),
        ("sweep", ["--pairs=resnet56,resnet20", f"--root={root / 'sw'}", "--set", "student.epochs=-1"],
         "config.student.epochs=-1: must be an integer >= 1"),
        ("sweep", ["--pairs=resnet56,resnet20", f"--root={root / 'sw'}", "--set", "student.epochz=1"],
         "the config has no field 'student.epochz'"),
        ("sweep", ["--pairs=resnet56,resnet20", f"--root={f}"], "a_file.txt is a file, not a folder"),
        ("sweep", ["--pairs=resnet56,resnet20", f"--root={root / 'sw'}", "--config=configs/nope.py"],
         "config file configs/nope.py does not exist"),
        ("sweep", ["--pairs=resnet56,resnet20", f"--root={root / 'sw'}", "--config=configs/transfer.py:a,b,c,d"],
         "unknown transfer dataset"),
        # summarize
        ("summarize", [], "the following arguments are required: workdirs"),
        ("summarize", [str(root / "nowhere")], "nowhere does not exist"),
        ("summarize", [str(f)], "a_file.txt is a file, not a workdir"),
        ("summarize", [str(root / "empty")], "summary.json does not exist"),
        ("summarize", [str(w), str(w)], "is given twice"),
        ("summarize", [str(w), f"--out={root}"], "give a file name, not a folder"),
        ("summarize", [str(w), f"--out={root / 'no' / 't.md'}"], "does not exist"),
        ("summarize", [str(w), "--group_by=seed"], "argument --group_by: invalid choice: 'seed'"),
    ]


def _tool_main(name):
    from mgd_jax import evaluate, export, export_torch, import_torch, predict, summarize, sweep, transfer
    from mgd_jax.analysis import cka, robustness

    return {"evaluate": evaluate, "export": export, "export_torch": export_torch, "import_torch": import_torch,
            "predict": predict, "summarize": summarize, "sweep": sweep, "transfer": transfer, "cka": cka,
            "robustness": robustness}[name].main


def test_tool_mistakes(work, capsys, monkeypatch):
    """Every row: one line naming the cause, exit status 2 (the whole table in one test: ~70 rows, each refused
    before anything heavy)."""
    monkeypatch.chdir(ROOT)
    capsys.readouterr()
    before = sorted(os.listdir(work))
    for tool, argv, expected in _tool_cases(work):
        code = run_cli(_tool_main(tool), argv)
        try:
            assert_one_line(capsys, code, expected)
        except AssertionError as e:
            raise AssertionError(f"{tool} {' '.join(argv)}: {e}") from None
    assert sorted(os.listdir(work)) == before, "a refused tool wrote something"


def test_a_refused_sweep_leaves_no_folders(tmp_path, capsys, monkeypatch):
    """The sweep's first run refused after its folders were made (the dataset is not built): none is left."""
    from mgd_jax import sweep

    monkeypatch.chdir(ROOT)
    code = run_cli(sweep.main, ["--config=configs/smoke.py", "--pairs=resnet8,resnet8", "--methods=kd", "--modes=mas",
                                f"--root={tmp_path / 'sw'}", "--set", "data.name=cifar100", "--set",
                                f"data.data_dir={tmp_path / 'tfds'}"])
    assert_one_line(capsys, code, "dataset 'cifar100' is not built in")
    assert not (tmp_path / "sw").exists()


def test_a_message_of_several_lines_is_printed_as_one(capsys):
    from mgd_jax.analysis.common import cli
    from mgd_jax.errors import ConfigError

    @cli
    def main(argv):
        raise ConfigError("--config.x=1: the library says\n  what it says\n")

    assert main([]) == 2
    assert capsys.readouterr().err == "error: --config.x=1: the library says; what it says\n"


def test_import_torch_refuses_files_that_are_not_checkpoints(tmp_path, capsys):
    from mgd_jax import import_torch

    torch = need("torch")
    for name, blob in [("text.pth", b"hello world\n"), ("empty.pth", b""), ("random.pth", os.urandom(3000))]:
        (tmp_path / name).write_bytes(blob)
        code = run_cli(import_torch.main, ["--arch=resnet8", f"--teacher={tmp_path / name}",
                                           f"--workdir={tmp_path / 'w'}"])
        assert_one_line(capsys, code, f"{name}: refused, it is not a weights-only PyTorch checkpoint")
    for name, obj, expected in [("tensor.pth", torch.zeros(3), "holds a Tensor, not a state_dict"),
                                ("int_keys.pth", {0: torch.zeros(3)}, "holds a dict with keys that are not names"),
                                ("foreign.pth", {"a": torch.zeros(3)}, "key 'a' has no place in this architecture")]:
        torch.save(obj, tmp_path / name)
        code = run_cli(import_torch.main, ["--arch=resnet8", f"--teacher={tmp_path / name}",
                                           f"--workdir={tmp_path / 'w'}"])
        assert_one_line(capsys, code, expected)
    assert not (tmp_path / "w").exists()


def test_a_stage_folder_that_is_not_a_checkpoint(work, tmp_path, capsys):
    """A best/ folder holding something else than an orbax checkpoint: one line, not orbax's traceback."""
    from mgd_jax import evaluate

    w = tmp_path / "w"
    w.mkdir()
    (w / "config.json").write_text((work / "run" / "config.json").read_text())
    (w / "teacher" / "checkpoints" / "best" / "3").mkdir(parents=True)
    (w / "teacher" / "checkpoints" / "best" / "3" / "junk").write_text("junk")
    code = run_cli(evaluate.main, [f"--workdir={w}", "--stage=teacher"])
    assert_one_line(capsys, code, str(w / "teacher" / "checkpoints" / "best"))


# --- summarize: runs of one config, or one table per config -----------------------------------------------------
def _run_dir(root, name, seed, rows, **changes):
    c = smoke.get_config()
    c.seed = seed
    for field, value in changes.items():
        node = c
        *path, last = field.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    d = root / name
    d.mkdir()
    (d / "config.json").write_text(c.to_json_best_effort(indent=1))
    (d / "summary.json").write_text(json.dumps([{"stage": s, "model": "resnet8", "best_acc1": a, "last_acc1": a,
                                                  "best_acc5": 1.0} for s, a in rows]))
    return str(d)


def test_summarize_refuses_different_configs_unless_grouped(tmp_path, capsys):
    from mgd_jax import summarize

    a = _run_dir(tmp_path, "a", 0, [("teacher", 0.5), ("student x", 0.25)])
    b = _run_dir(tmp_path, "b", 1, [("teacher", 0.7), ("student x", 0.35)])
    c = _run_dir(tmp_path, "c", 0, [("teacher", 0.9), ("student y", 0.8)], **{"student.arch": "resnet14"})
    table = summarize.aggregate([a, b])  # seeds of one config: averaged
    assert "| teacher | resnet8 | 60.00 ± 14.14 |" in table and "| 2 |" in table
    assert run_cli(summarize.main, [a, b, c]) == 2
    line = assert_one_line(capsys, 2, ["were trained with different configs",
                                       "first difference: config.student.arch = \"resnet8\" vs \"resnet14\"",
                                       "--group_by=config"])
    assert line
    assert run_cli(summarize.main, [a, c, b, "--group_by=config"]) == 0
    out = capsys.readouterr().out
    assert out.count("### config") == 2 and "student.arch=\"resnet14\"" in out
    first, second = out.split("### config 2")
    assert "60.00 ± 14.14" in first and "| student x | resnet8 | 30.00 ± 7.07 |" in first
    assert "| student y | resnet8 | 80.00 ± 0.00 |" in second and "student x" not in second


def test_summarize_reads_a_student_at_the_runs_seed_as_a_run_from_before_student_seeds():
    """``students.<name>.seed`` at -1 (the default: the run's seed) is the same identity as a config.json written
    before the field existed; a student's own seed is a difference, named."""
    from mgd_jax.summarize import first_difference, run_identity

    old = {"seed": 0, "students": {"kd_mas": {"method": "kd", "granularity": "mas"}}}
    new = {"seed": 1, "students": {"kd_mas": {"method": "kd", "granularity": "mas", "seed": -1}}}
    own = {"seed": 1, "students": {"kd_mas": {"method": "kd", "granularity": "mas", "seed": 3}}}
    assert first_difference(run_identity(old), run_identity(new)) is None
    assert first_difference(run_identity(new), run_identity(own)) == ("students.kd_mas.seed", "-1", "3")
    assert first_difference(run_identity(old), run_identity(own))[0] == "students.kd_mas.seed"


def test_summarize_keeps_every_row(tmp_path):
    """A row only some runs have is shown with its own n, never dropped."""
    from mgd_jax import summarize

    a = _run_dir(tmp_path, "a", 0, [("teacher", 0.5)])
    b = _run_dir(tmp_path, "b", 1, [("teacher", 0.7), ("student z", 0.4)])
    table = summarize.aggregate([a, b])
    assert "| teacher | resnet8 | 60.00 ± 14.14 | 60.00 ± 14.14 | 100.00 ± 0.00 | 2 |" in table
    assert "| student z | resnet8 | 40.00 ± 0.00 | 40.00 ± 0.00 | 100.00 ± 0.00 | 1 |" in table


# --- the analyzer's non-finite loss: the likely cause and what to lower -----------------------------------------
def test_nonfinite_analyzer_hint(tmp_path):
    from mgd_jax.stages.analyzer import nonfinite_hint

    c = smoke.get_config()
    c.teacher.epochs = 1
    teacher = tmp_path / "teacher"
    teacher.mkdir()
    (teacher / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "test/acc1": 0.11}) + "\n")
    hint = nonfinite_hint(str(teacher), c, 10)
    assert "likely cause: an undertrained teacher (best test top-1 11.0%, chance 10.0%, after 1 epoch(s))" in hint
    assert "lower the analyzer's learning rate config.analyzer.optimizer.lr=0.01 (e.g. " \
           "--config.analyzer.optimizer.lr=0.001)" in hint
    (teacher / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "test/acc1": 0.93}) + "\n")
    assert "the teacher looks trained (best test top-1 93.0%)" in nonfinite_hint(str(teacher), c, 10)
    assert "accuracy is unknown (no teacher/metrics.jsonl); lower the analyzer's learning rate" in \
        nonfinite_hint(str(tmp_path / "imported"), c, 10)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_analyzer_stops_on_nan_with_the_cause(tmp_path):
    """A 1-epoch teacher and an analyzer lr far too high: the stop names the teacher's top-1 and the lr field."""
    import jax

    from mgd_jax import pipeline
    from mgd_jax.errors import NonFiniteLossError

    c = smoke.get_config()
    c.teacher.epochs = 1
    c.teacher.optimizer.milestones = ()
    c.analyzer.optimizer.lr = 1e12
    with pytest.raises(NonFiniteLossError) as e:
        pipeline.train_and_evaluate(c, str(tmp_path / "w"), devices=jax.devices()[:1])
    text = str(e.value)
    assert text.startswith("analyzer") and "\n" not in text
    assert "an undertrained teacher (best test top-1" in text and "after 1 epoch(s)" in text
    assert "lower the analyzer's learning rate config.analyzer.optimizer.lr=1e+12" in text
