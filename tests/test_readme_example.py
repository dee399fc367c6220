"""The library example of docs/library.md (linked from README.md) and the seeds config of docs/speed.md run as
written."""
import re

import numpy as np

from conftest import ROOT


def test_library_example_runs(capsys):
    text = (ROOT / "docs" / "library.md").read_text()
    code = re.search(r"<!-- library-example -->\s*```python\n(.*?)```", text, re.S).group(1)
    ns = {}
    exec(compile(code, "docs/library.md", "exec"), ns)  # noqa: S102 - our own documentation
    terms = ns["terms"]
    assert set(terms) == {"ce", "stable_excitation", "granularity/64d_T2", "granularity/256d_T8"}
    assert all(np.isfinite(float(v)) for v in terms.values())
    assert "stable_excitation" in capsys.readouterr().out


def test_seeds_example_runs():
    """docs/speed.md's config of one student per seed: each a student of its own seed, the config valid."""
    from mgd_jax.config_validation import validate_config

    text = (ROOT / "docs" / "speed.md").read_text()
    code = re.search(r"<!-- seeds-example -->\s*```python\n(.*?)```", text, re.S).group(1)
    ns = {}
    exec(compile(code, "docs/speed.md", "exec"), ns)  # noqa: S102 - our own documentation
    c = ns["c"]
    validate_config(c)
    assert {name: s.seed for name, s in c.students.items()} == {
        f"kd_{m}_seed{k}": k for m in ("mag", "mas", "none") for k in (0, 1, 2)}
