"""The library example of docs/library.md (linked from README.md) runs as written."""
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
