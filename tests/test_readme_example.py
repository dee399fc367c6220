"""README's library example runs as written."""
import re

import numpy as np

from conftest import ROOT


def test_readme_library_example_runs(capsys):
    text = (ROOT / "README.md").read_text()
    code = re.search(r"<!-- library-example -->\s*```python\n(.*?)```", text, re.S).group(1)
    ns = {}
    exec(compile(code, "README.md", "exec"), ns)  # noqa: S102 - our own README
    terms = ns["terms"]
    assert set(terms) == {"ce", "stable_excitation", "granularity/64d_T2", "granularity/256d_T8"}
    assert all(np.isfinite(float(v)) for v in terms.values())
    assert "stable_excitation" in capsys.readouterr().out
