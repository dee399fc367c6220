"""The sweep command: methods x modes x pairs x seeds, resumable, table with the paper's numbers, plots; the
baseline protocols and teacher schedules of the configs it sweeps."""
import json
import os
import sys

import jax
import pytest

from configs import cifar100, default
from conftest import ROOT
from mgd_jax import summarize
from mgd_jax import sweep as sweep_lib
from mgd_jax.errors import ConfigError
from mgd_jax.paper_results import TOP1

CIFAR100 = str(ROOT / "configs" / "cifar100.py")


# configs/smoke.py's settings with the argument a sweep passes (teacher,student,method,mode), like cifar100.py's
SMOKE_SWEEP = '''
import ml_collections

from configs import default, smoke


def get_config(arg):
    teacher, student, method, mode = arg.split(",")
    c = smoke.get_config()
    default.set_pair(c, teacher, student)
    run = default.student_run(method, mode, student_arch=student)
    c.students = ml_collections.ConfigDict({f"{mode}_{method}": run})
    return c
'''


def test_sweep_runs_resumes_and_tabulates(tmp_path, monkeypatch):
    root = str(tmp_path / "sweep")
    (tmp_path / "smoke_sweep.py").write_text(SMOKE_SWEEP)
    args = dict(config_path=str(tmp_path / "smoke_sweep.py"), pairs=[("resnet8", "resnet8")], methods=["kd"],
                modes=["baseline", "mas"], seeds=[0, 1], root=root, devices=jax.devices()[:1])
    res, md = sweep_lib.sweep(**args)
    assert set(res) == {("resnet8,resnet8", "kd", "baseline"), ("resnet8,resnet8", "kd", "mas")}
    assert all(len(v) == 2 for v in res.values())  # two seeds each
    assert "| kd | 0.1 CE + 0.9 logit KD (RepDistiller" in md and "| MAS+kd | " in md and "n=2" in md
    for f in ("results.md", "results.json", "curves.png", "gains.png"):
        assert os.path.getsize(os.path.join(root, f)) > 100
    # the students are the config file's, under its names
    assert sorted(os.listdir(os.path.join(root, "resnet8_resnet8", "seed1", "students"))) == ["baseline_kd", "mas_kd"]
    # the seeds' summaries side by side (mgd_jax.summarize): the same mean ± std as the sweep's table
    seeds = [os.path.join(root, "resnet8_resnet8", f"seed{i}") for i in (0, 1)]
    row = next(ln for ln in summarize.aggregate(seeds).splitlines() if ln.startswith("| student mas_kd"))
    assert row.split(" | ")[2] == md.split("| MAS+kd | ")[1].split(" | ")[1].split(" (last")[0] and row.endswith("| 2 |")
    # finished runs are not trained again
    from mgd_jax import pipeline
    original = pipeline.mesh_lib.shard_batch

    def no_training(rows, mesh):
        assert "mask" in rows, "a finished run was trained again"
        return original(rows, mesh)

    monkeypatch.setattr(pipeline.mesh_lib, "shard_batch", no_training)
    res2, md2 = sweep_lib.sweep(**args)
    assert md2 == md
    assert json.load(open(os.path.join(root, "results.json")))[0]["runs"][0]["seed"] == 0


def test_table_puts_the_paper_beside_ours():
    res = {("resnet56,resnet20", "kd", "mas"): [{"seed": 0, "best": 0.71, "last": 0.70, "curve": [0.7]},
                                                {"seed": 1, "best": 0.73, "last": 0.72, "curve": [0.72]}]}
    md = sweep_lib.table(res, [("resnet56", "resnet20")], ["kd"], ["mas"])
    assert f"72.00 ± 1.41 (last 71.00, n=2) / paper {TOP1[('kd', 'mas')]['resnet56,resnet20']:.2f}" in md


def _runs(best):
    return [{"seed": 0, "best": best, "last": best, "curve": [best]}]


def test_table_puts_the_paper_beside_the_row_of_its_protocol():
    """The paper's baselines are RepDistiller-protocol runs (CE + method): its number goes beside our 'baseline'
    row, not beside the 'none' ablation (CE + logit KD + method); every row names its protocol."""
    k = "resnet56,resnet20"
    res = {(k, "hint", mode): _runs(0.7) for mode in ("baseline", "none", "mag")}
    md = sweep_lib.table(res, [("resnet56", "resnet20")], ["hint"], ["baseline", "none", "mag"])
    rows = {line.split(" | ")[1]: line for line in md.splitlines()[2:]}
    assert set(rows) == {sweep_lib.PROTOCOLS[m] for m in ("baseline", "none", "mag")}
    assert md.splitlines()[0].startswith("| method | protocol | ")
    assert rows[sweep_lib.PROTOCOLS["baseline"]].endswith(f"/ paper {TOP1[('hint', 'none')][k]:.2f} |")
    assert "paper" not in rows[sweep_lib.PROTOCOLS["none"]]
    assert rows[sweep_lib.PROTOCOLS["mag"]].endswith(f"/ paper {TOP1[('hint', 'mag')][k]:.2f} |")
    assert sweep_lib.gain_reference(["baseline", "none", "mas"]) == "none"
    assert sweep_lib.gain_reference(["baseline", "mas"]) == "baseline"


def test_baseline_mode_is_repdistillers_protocol():
    c = cifar100.get_config("resnet56,resnet20,hint,baseline")
    s = c.students.hint_baseline
    assert (s.granularity, s.protocol) == ("none", "repdistiller")
    assert dict(s.weights) == dict(ce=1.0, logit_kd=0.0, method=100.0, granularity=1.0)
    c, names = sweep_lib.run_config(CIFAR100, ("resnet32x4", "ShuffleV1"), ["kd", "crd", "abound"],
                                    ["baseline", "none"], 0)
    assert names[("crd", "none")] == "crd_none" and c.seed == 0 and not c.progress
    w = {name: dict(s.weights) for name, s in c.students.items()}
    assert w["kd_baseline"] == dict(ce=0.1, logit_kd=0.9, method=0.0, granularity=1.0)  # -r 0.1 -a 0.9 -b 0
    assert w["kd_none"] == dict(ce=0.2, logit_kd=0.8, method=1.0, granularity=1.0)  # the MG script
    assert w["crd_baseline"] == dict(ce=1.0, logit_kd=0.0, method=0.8, granularity=1.0)  # -a 0 -b 0.8
    assert w["crd_none"] == dict(ce=1.0, logit_kd=1.0, method=0.8, granularity=1.0)
    assert c.students.abound_baseline.init.optimizer.lr == c.student.optimizer.lr == default.LOW_LR
    for m in default.METHOD_WEIGHTS:
        assert default.REPDISTILLER_WEIGHTS[m]["logit_kd"] == (0.9 if m == "kd" else 0.0), m
    with pytest.raises(ValueError, match="unknown student mode"):
        default.student_run("kd", "plain")


def test_teacher_schedules(monkeypatch):
    """The authors' teacher.py (60/120/180) by default; RepDistiller's (150/180/210) by name."""
    assert cifar100.get_config("resnet56,resnet20,kd,mas").teacher.optimizer.milestones == (60, 120, 180)
    c = cifar100.get_config("resnet56,resnet20,kd,mas,repdistiller")
    assert c.teacher.optimizer.milestones == (150, 180, 210) and c.teacher.epochs == 240
    with pytest.raises(ValueError, match="unknown teacher schedule"):
        cifar100.get_config("resnet56,resnet20,kd,mas,torch")
    c, _ = sweep_lib.run_config(CIFAR100 + ":resnet56,resnet20,kd,mas,repdistiller", ("vgg13", "vgg8"), ["kd"],
                                ["mas"], 0)
    assert c.teacher.optimizer.milestones == (150, 180, 210) and c.teacher.arch == "vgg13"
    # a command-line override still wins
    from absl import flags
    from ml_collections import config_flags
    argv = ["train.py", f"--config={ROOT / 'configs' / 'cifar100.py'}:resnet56,resnet20,kd,mas,repdistiller",
            "--config.teacher.optimizer.milestones=(100,200)"]
    monkeypatch.setattr(sys, "argv", argv)
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, flag_values=fv, lock_config=True)
    fv(argv)
    assert fv.config.teacher.optimizer.milestones == (100, 200)


def test_run_configs_come_from_the_config_file():
    """One get_config("teacher,student,method,mode") per method x mode, the students merged: the same config as
    the file gives for each, with the sweep's seed and --set overrides (typed like train.py's)."""
    notes = []
    c, names = sweep_lib.run_config(CIFAR100, ("vgg13", "MobileNetV2"), ["kd", "fsp"], ["mag", "baseline"], 3,
                                    {"student.epochs": "10", "data.data_dir": "/data"}, notes)
    assert sorted(c.students) == sorted(names.values()) == ["fsp_baseline", "fsp_mag", "kd_baseline", "kd_mag"]
    for (m, mode), name in names.items():
        one = cifar100.get_config(f"vgg13,MobileNetV2,{m},{mode}")
        assert c.students[name].to_dict() == one.students[name].to_dict()
    one.seed, one.progress, one.student.epochs, one.data.data_dir = 3, False, 10, "/data"
    # the milestones (150, 180, 210) of 240 epochs, scaled to the 10 epochs --set asks for, with a line that says so
    one.student.optimizer.milestones = (6, 8, 9)
    assert len(notes) == 1 and "scaled to (6, 8, 9) for --set student.epochs=10" in notes[0]
    assert {k: v for k, v in c.to_dict().items() if k != "students"} == \
        {k: v for k, v in one.to_dict().items() if k != "students"}
    assert c.student.optimizer.lr == default.LOW_LR  # the config file's lr rule


@pytest.mark.parametrize("argv,why", [
    (["--modes=plain"], "--config=CIFAR100:resnet56,resnet20,kd,plain: unknown student mode 'plain'"),
    (["--methods=kd,hinted"], "resnet56,resnet20,hinted,baseline: unknown method 'hinted'"),
    (["--modes=all"], ":resnet56,resnet20,kd,all gives 3 students"),
    (["--set", "student.epoch=3"], "--set student.epoch=3: the config has no field 'student.epoch'"),
    (["--config=NOARG"], "its get_config() takes no argument; a sweep calls it with 'teacher,student,method,mode"),
    (["--config=CIFAR100:resnet56"], "replaces the first fields of the argument"),
    (["--pairs=resnet56,nope"], "config.student.arch='nope': unknown architecture"),
])
def test_sweep_refuses_in_one_line_before_training(tmp_path, capsys, argv, why):
    noarg = tmp_path / "noarg.py"  # a config file whose get_config() takes no argument
    noarg.write_text("from configs import smoke\n\n\ndef get_config():\n    return smoke.get_config()\n")
    argv = [a.replace("CIFAR100", CIFAR100).replace("NOARG", str(noarg)) for a in argv]
    root = tmp_path / "root"
    assert sweep_lib.main([f"--config={CIFAR100}", "--pairs=resnet56,resnet20", f"--root={root}", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and why.replace("CIFAR100", CIFAR100) in err and err.count("\n") == 1, err
    assert not root.exists()  # every run config is checked before anything trains


def test_config_files_import_configs_from_the_repository_root(tmp_path, monkeypatch):
    """Config files say `from configs import default`, resolved from the working directory like train.py's: from
    elsewhere the sweep says so in one line (and the package itself never imports configs/)."""
    monkeypatch.chdir(tmp_path)
    root = os.path.realpath(ROOT)  # also as another test's import left it on the path ("<root>/benchmarks/..")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".") and os.path.realpath(p) != root])
    for name in [m for m in sys.modules if m == "configs" or m.startswith("configs.")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(ConfigError, match="imports the repository's 'configs': run the command from the repository"):
        sweep_lib.run_config(CIFAR100, ("resnet56", "resnet20"), ["kd"], ["mas"], 0)


def test_quickstart_and_smoke_take_the_run_argument():
    """The sweep's argument works on the digits configs too: their own settings, the argument's pair and students."""
    from configs import quickstart, smoke

    for module, settings in ((quickstart, quickstart.get_config()), (smoke, smoke.get_config())):
        c = module.get_config("resnet14,resnet8,crd,all")
        assert (c.teacher.arch, c.student.arch) == ("resnet14", "resnet8")
        assert sorted(c.students) == ["crd_mag", "crd_mas", "crd_none"]
        assert c.students.crd_mas.to_dict() == default.student_run("crd", "mas", student_arch="resnet8").to_dict()
        for field in ("data", "augment", "granularities", "checkpoint"):
            assert c[field] == settings[field], field
        assert c.teacher.optimizer.milestones == settings.teacher.optimizer.milestones  # no schedule argument
        with pytest.raises(ValueError, match="must be 'teacher,student,method,mode'"):
            module.get_config("resnet14,resnet8,crd,mas,repdistiller")
