"""README.md and docs/: links resolve, the README stays a front page, docs/config.md is current, the pages name
files, modules, config files and config fields that exist, and they say nothing about internal work."""
import importlib.util
import os
import re

import pytest

from conftest import ROOT

DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted(DOCS.glob("*.md"))]
EXAMPLE_FILES = {"mgd_jax/methods/pooled_l2.py"}  # the file docs/methods.md shows how to write
README_MAX_LINES = 260


def _prose(text: str) -> str:
    """The text without fenced code blocks (links and headings inside them are not links or headings)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (but - and _), spaces -> '-'."""
    text = re.sub(r"`|\*\*?|\[|\]\([^)]*\)", "", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path) -> set[str]:
    seen, out = {}, set()
    for line in _prose(path.read_text()).splitlines():
        m = re.match(r"#{1,6}\s+(.*)", line)
        if m:
            slug = _slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _links(path):
    """Every markdown link / image target of a page outside code: (target, line number)."""
    text = _prose(path.read_text())
    text = re.sub(r"`[^`\n]*`", "", text)  # inline code
    for m in re.finditer(r"!?\[[^\]]*\]\(([^)\s]+)\)", text):
        yield m.group(1), text.count("\n", 0, m.start()) + 1


def _code_spans(path):
    text = path.read_text()
    return re.findall(r"`([^`\n]+)`", text) + re.findall(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M)


def test_every_page_exists():
    names = {p.name for p in DOCS.glob("*.md")}
    for page in ("cifar100", "imagenet", "methods", "pods", "export", "tools", "library", "speed", "design", "testing",
                 "config"):
        assert f"{page}.md" in names, f"docs/{page}.md is missing"
    assert (ROOT / "CHANGELOG.md").exists()


@pytest.mark.parametrize("page", PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_and_anchors_resolve(page):
    bad = []
    for target, line in _links(page):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            bad.append(f"{page.name}:{line}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{page.name}:{line}: {target} (no heading #{anchor} in {dest.name})")
    assert not bad, "\n".join(bad)


def test_readme_is_a_front_page_that_links_every_docs_page():
    readme = (ROOT / "README.md").read_text()
    n = len(readme.splitlines())
    assert n <= README_MAX_LINES, f"README.md has {n} lines: move detail to docs/ (at most {README_MAX_LINES})"
    linked = {os.path.normpath(t.partition("#")[0]) for t, _ in _links(ROOT / "README.md")}
    missing = [f"docs/{p.name}" for p in DOCS.glob("*.md") if f"docs/{p.name}" not in linked]
    assert not missing, f"README.md does not link {missing}"
    for image in DOCS.glob("*.png"):
        assert any(image.name in p.read_text() for p in PAGES), f"docs/{image.name} is shown on no page"


def test_readme_commands():
    """The first commands a new user meets: install, the quickstart, the fast test tier; and the full suite's
    command, which CI runs."""
    readme = (ROOT / "README.md").read_text()
    first = re.search(r"^```bash\n(.*?)^```", readme, re.S | re.M).group(1)
    commands = [ln.split("#")[0].strip() for ln in first.splitlines() if ln.strip()]
    assert commands[0].startswith("pip install -e ")
    assert commands[1] == "python train.py"
    assert commands[2] == 'python -m pytest -n 2 -m "not slow" tests'
    assert "`python -m pytest -n 2 tests`" in readme
    assert "pip install -e '.[tensorboard]'" in readme


def test_no_internal_work_numbers_or_development_machine():
    exact = (r"\bSPEC\b", r"\bQ\d+\b")  # the method notes' question numbers
    any_case = (r"issue\s*#?\s*\d", r"gvisor", r"this machine", r"this cpu", r"development machine", r"this vm\b")
    bad = []
    for page in PAGES:
        for i, line in enumerate(page.read_text().splitlines(), 1):
            hits = [p for p in exact if re.search(p, line)] + [p for p in any_case if re.search(p, line, re.I)]
            bad += [f"{page.name}:{i}: {p!r}: {line.strip()[:100]}" for p in hits]
    assert not bad, "\n".join(bad)


def test_named_files_and_modules_exist():
    """Paths in code spans (`mgd_jax/...`, `configs/...`, `benchmarks/...`, `tests/...`) exist, and every
    `python -m mgd_jax.X` module can be found."""
    bad = []
    for page in PAGES:
        for span in _code_spans(page):
            for path in re.findall(r"(?<![\w/.])((?:mgd_jax|configs|benchmarks|tests|docs|\.ci)/[\w./-]*)", span):
                path = path.rstrip(".:,")
                if not (ROOT / path).exists() and not any(ch in path for ch in "<*{") and path not in EXAMPLE_FILES:
                    bad.append(f"{page.name}: {path}")
            for module in re.findall(r"python -m (mgd_jax[\w.]*)", span):
                if importlib.util.find_spec(module) is None:
                    bad.append(f"{page.name}: python -m {module}")
    assert not bad, "these do not exist:\n" + "\n".join(sorted(set(bad)))


def test_named_config_files_arguments_and_fields_exist(monkeypatch):
    """Every `--config=configs/X.py[:ARG]` in the pages loads (the file accepts the argument), and every
    `--config.FIELD` is a field of some config (docs/config.md's fields)."""
    from mgd_jax import config_reference
    from mgd_jax.config_reference import load as load_config_file

    monkeypatch.chdir(ROOT)
    fields = set()
    for _, spec in config_reference.TRAIN_CONFIGS + config_reference.TRANSFER_CONFIGS:
        fields |= set(config_reference.flatten(load_config_file(spec)))
    specs, overrides = set(), set()
    for page in PAGES:
        text = page.read_text()
        specs |= set(re.findall(r"--config=(configs/[\w.]+\.py(?::[\w,]+)?)", text))
        overrides |= set(re.findall(r"--config\.([\w.]+[\w])", text))
    placeholder = re.compile(r"(?:^|[.,:])[A-Z_]+(?:$|[.,])")  # T,S,METHOD,MODE; FIELD
    specs = {s for s in specs if not placeholder.search(s.partition(":")[2])}
    overrides = {f for f in overrides if not placeholder.search(f)}
    assert len(specs) >= 5 and len(overrides) >= 10
    bad = []
    for spec in sorted(specs):
        try:
            load_config_file(spec)
        except Exception as e:  # noqa: BLE001 - report every one
            bad.append(f"--config={spec}: {e}")
    for field in sorted(overrides):
        parts = field.split(".")
        if parts[0] == "students" and len(parts) > 2:
            field = ".".join(["students", "<name>", *parts[2:]])
        if field not in fields and not any(f.startswith(field + ".") for f in fields):
            bad.append(f"--config.{field}: no config has this field")
    assert not bad, "\n".join(bad)


def test_config_reference_is_current(monkeypatch, capsys):
    """docs/config.md is what `python -m mgd_jax.config_reference` writes from today's configs."""
    from mgd_jax import config_reference

    monkeypatch.chdir(ROOT)
    status = config_reference.main(["--check"])
    err = capsys.readouterr().err
    assert status == 0, err


def test_config_reference_names_a_field_without_a_description(monkeypatch, tmp_path, capsys):
    """A field that no table describes (a field added to a config) is one error line naming the field, the config
    and where to add its meaning; a description of a field no config has is refused too; a stale file fails
    --check."""
    from mgd_jax import config_reference

    monkeypatch.chdir(ROOT)
    table = dict(config_reference.DESCRIPTIONS)
    del table["student.group_size"]
    table["student.no_such_field"] = "gone"
    monkeypatch.setattr(config_reference, "DESCRIPTIONS", table)
    assert config_reference.main(["--out", str(tmp_path / "c.md")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert ("error: config field 'student.group_size' (configs/default.py) has no description: add "
            "\"student.group_size\": \"<what it means>\" to DESCRIPTIONS in mgd_jax/config_reference.py") in err
    assert any("'student.no_such_field', which no config has" in line for line in err)
    assert not (tmp_path / "c.md").exists()

    monkeypatch.undo()
    monkeypatch.chdir(ROOT)
    stale = tmp_path / "stale.md"
    stale.write_text((DOCS / "config.md").read_text().replace("| `seed` | `0` |", "| `seed` | `1` |"))
    assert config_reference.main(["--check", "--out", str(stale)]) == 1
    assert "is out of date: run `python -m mgd_jax.config_reference`" in capsys.readouterr().err


def test_config_reference_outside_the_repository_root_is_one_line(monkeypatch, tmp_path, capsys):
    from mgd_jax import config_reference

    monkeypatch.chdir(tmp_path)
    assert config_reference.main(["--check"]) == 2
    assert capsys.readouterr().err.strip() == ("error: configs/default.py not found: run from the repository root "
                                               "(the folder that holds configs/)")
