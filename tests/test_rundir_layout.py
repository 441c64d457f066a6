"""The run directory's one owner (bench/rundir/layout.py): names, schema check, tolerant readers."""

import json

import pytest

from bench.errors import UsageError
from bench.rundir import layout
from bench.rundir.layout import RunDir


def _run(tmp_path, schema=layout.SCHEMA_VERSION):
    d = tmp_path / "run"
    d.mkdir(parents=True)
    (d / layout.MANIFEST).write_text(json.dumps({"schema_version": schema, "config": {"seed": 0}}))
    return d


def test_manifest_schema_is_checked(tmp_path):
    d = _run(tmp_path)
    assert RunDir(d).manifest()["config"] == {"seed": 0}
    newer = _run(tmp_path / "n", schema=layout.SCHEMA_VERSION + 1)
    with pytest.raises(UsageError, match="newer treebench"):
        RunDir(newer).manifest()
    foreign = _run(tmp_path / "f", schema=0)
    with pytest.raises(UsageError, match="older or foreign"):
        RunDir(foreign).manifest()


def test_resume_refuses_another_schema(tmp_path):
    from bench.rundir.resume import saved_config

    d = _run(tmp_path, schema=layout.SCHEMA_VERSION + 1)
    with pytest.raises(UsageError, match="newer treebench"):
        saved_config(d)


def test_jsonl_reader_drops_a_partial_last_line_and_refuses_a_bad_middle_one(tmp_path):
    d = _run(tmp_path)
    (d / layout.EVALS).write_text('{"iteration": 0}\n{"iteration": 8}\n{"itera')
    assert [r["iteration"] for r in RunDir(d).evals()] == [0, 8]
    assert layout.read_jsonl(d / layout.EVALS)[1] == [3]
    (d / layout.EVALS).write_text('{"iteration": 0}\nnot json\n{"iteration": 8}\n')
    with pytest.raises(layout.JSONLError, match=":2:"):
        RunDir(d).evals()
    recs, bad = layout.read_jsonl(d / layout.EVALS, strict=False)
    assert [r["iteration"] for r in recs] == [0, 8] and bad == [2]
    assert RunDir(d).iterations() == [] and RunDir(d).final() is None  # absent files read as empty


def test_find_runs_skips_checkpoints_and_samples(tmp_path):
    a = _run(tmp_path / "a")
    b = _run(tmp_path / "b")
    # a manifest inside a checkpoint or the samples folder is not a run
    for sub in (layout.CHECKPOINTS, layout.SAMPLES):
        (a / sub / "x").mkdir(parents=True)
        (a / sub / "x" / layout.MANIFEST).write_text("{}")
    assert layout.find_runs(tmp_path) == [a, b]
    assert layout.find_runs(a) == [a]
    assert layout.find_runs(tmp_path / "missing") == []
    assert RunDir(a).is_run() and not RunDir(tmp_path).is_run() and not RunDir(a).has_checkpoint()


def test_exported_run_reads_like_the_run_and_is_reproducible(tmp_path):
    d = _run(tmp_path)
    (d / layout.EVALS).write_text('{"iteration": 0, "eval/r": 0.5}\n')
    scores = "".join(json.dumps({"iteration": 0, "prompt_index": p, "image_index": 0, "scores": {"r": p / 10}}) + "\n"
                     for p in range(50))
    (d / layout.EVAL_SCORES).write_text(scores)
    (d / layout.CHECKPOINTS / "step_1").mkdir(parents=True)
    (d / layout.SAMPLES).mkdir()
    out = tmp_path / "shipped"
    written = layout.export_run(d, out)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted([layout.MANIFEST, layout.EVALS, layout.EVAL_SCORES + ".gz"]) == sorted(p.name for p in written)
    shipped, orig = RunDir(out), RunDir(d)
    assert shipped.manifest() == orig.manifest() and shipped.evals() == orig.evals()
    assert shipped.eval_scores() == orig.eval_scores() and len(shipped.eval_scores()) == 50
    assert (out / (layout.EVAL_SCORES + ".gz")).stat().st_size < len(scores)
    # byte-identical on re-export (no time stamp in the gzip header): a re-run changes no shipped file needlessly
    first = (out / (layout.EVAL_SCORES + ".gz")).read_bytes()
    layout.export_run(d, tmp_path / "again")
    assert (tmp_path / "again" / (layout.EVAL_SCORES + ".gz")).read_bytes() == first
    (out / (layout.EVAL_SCORES + ".gz")).write_bytes(b"not gzip")
    with pytest.raises(layout.JSONLError, match="gzip"):
        shipped.eval_scores()
    with pytest.raises(UsageError, match="not a run directory"):
        layout.export_run(tmp_path / "nothing", tmp_path / "x")
