"""Bad input gets a teaching message and exit code 2, before any model is loaded or directory touched.

Every row of the table in docs/ERRORS.md is one case here: the test runs ``bench.cli.main(argv)`` and
compares the printed message with the table's, exactly (temporary paths written as ``<tmp>``).
Regenerate the table after changing a message: ``python tests/test_validation.py > /tmp/rows.md``.
"""

import json
import os
import re
import sys
from pathlib import Path

import pytest

from bench.cli import main

DOC = Path(__file__).resolve().parent.parent / "docs" / "ERRORS.md"


def R(*args):
    """A ``bench run`` on the tiny model with a fresh run directory unless the case names one."""
    a = ["run", "--model", "tiny-random", "--no-progress", *args]
    if "--out" not in args and "--resume" not in args:
        a += ["--out", "{tmp}/out"]
    return a


# (id, what was wrong, argv); "{tmp}" is a directory holding the files made by ``workspace``
CASES = [
    ("algo-unknown", "unknown algorithm", R("--algo", "treegrpoo")),
    ("reward-unknown", "unknown reward", R("--algo", "grpo", "--reward", "brightnes")),
    ("reward-spec", "malformed weighted reward spec", R("--algo", "grpo", "--reward", "brightness=abc")),
    ("reward-option", "option a reward does not take", R("--algo", "grpo", "--set", "reward.options={brightness: {gamma: 2}}")),
    ("model-unknown", "unknown model preset", ["run", "--model", "shapez", "--out", "{tmp}/out"]),
    ("model-path", "model directory without a pipeline", R("--algo", "grpo", "--model-path", "{tmp}/empty_dir")),
    ("key-unknown", "unknown config key", R("--set", "train.lrr=1e-4")),
    ("section-unknown", "unknown config section", R("--set", "trian.lr=1e-4")),
    ("algo-key-unknown", "setting the algorithm does not have", R("--algo", "treegrpo", "--set", "algo.kk=3")),
    ("config-file-key", "unknown key in a YAML config file", R("--config", "{tmp}/bad_key.yaml")),
    ("config-file-missing", "config file that does not exist", R("--config", "{tmp}/none.yaml")),
    ("config-file-list", "config file that is not a mapping", R("--config", "{tmp}/list.yaml")),
    ("set-syntax", "--set without '='", R("--set", "nokey")),
    ("value-steps", "sampler.steps < 1", R("--set", "sampler.steps=0")),
    ("value-lr", "negative learning rate", R("--set", "train.lr=-1")),
    ("value-precision", "unknown mixed precision", R("--set", "model.mixed_precision=fp8")),
    ("value-checkpoint-every", "negative checkpoint interval", R("--set", "run.checkpoint_every=-1")),
    ("value-keep", "keep no checkpoint", R("--set", "run.keep_checkpoints=0")),
    ("value-nonfinite", "unknown NaN policy", R("--set", "run.on_nonfinite=ignore")),
    ("budget-unit", "budget with an unknown unit", R("--algo", "grpo", "--budget", "5x")),
    ("budget-empty", "empty budget", R("--algo", "grpo", "--budget", "")),
    ("budget-zero", "zero budget", R("--algo", "grpo", "--budget", "0it")),
    ("budget-negative", "negative budget", R("--algo", "grpo", "--budget=-3it")),
    ("budget-twice", "a currency limited twice", R("--algo", "grpo", "--budget", "10m,5m")),
    ("treegrpo-d-window", "TreeGRPO depth d larger than the window",
     R("--algo", "treegrpo", "--set", "algo.d=3", "--set", "algo.window=2")),
    ("treegrpo-k0", "TreeGRPO k < 1", R("--algo", "treegrpo", "--set", "algo.k=0")),
    ("treegrpo-one-leaf", "TreeGRPO trees with a single leaf", R("--algo", "treegrpo", "--set", "algo.k=1")),
    ("treegrpo-window-steps", "TreeGRPO window beyond the number of steps",
     R("--algo", "treegrpo", "--set", "sampler.steps=3", "--set", "algo.window=5")),
    ("treegrpo-depth-steps", "TreeGRPO depth beyond the number of steps",
     R("--algo", "treegrpo", "--set", "sampler.steps=3", "--set", "algo.d=4")),
    ("mixgrpo-window-steps", "MixGRPO window beyond the number of steps",
     R("--algo", "mixgrpo", "--set", "sampler.steps=3", "--set", "algo.window=4")),
    ("dancegrpo-group", "DanceGRPO group of one", R("--algo", "dancegrpo", "--set", "algo.group_size=1")),
    ("ddpo-min-count", "DDPO min_count above buffer_size",
     R("--algo", "ddpo", "--set", "algo.min_count=20", "--set", "algo.buffer_size=10")),
    ("preset-unknown", "unknown algorithm preset", R("--algo", "treegrpo", "--preset", "nope")),
    ("prompts-missing", "prompt file that does not exist", R("--algo", "grpo", "--train-prompts", "{tmp}/none.txt")),
    ("prompts-empty", "prompt file with no prompts", R("--algo", "grpo", "--train-prompts", "{tmp}/empty.txt")),
    ("prompts-jsonl", "malformed JSON Lines prompt file", R("--algo", "grpo", "--train-prompts", "{tmp}/bad.jsonl")),
    ("prompts-jsonl-key", "JSON Lines prompt without a \"prompt\" key",
     R("--algo", "grpo", "--eval-prompts", "{tmp}/nokey.jsonl")),
    ("prompts-binary", "prompt file that is not UTF-8", R("--algo", "grpo", "--train-prompts", "{tmp}/binary.txt")),
    ("out-under-file", "run directory below a file", R("--algo", "grpo", "--out", "{tmp}/a_file/run")),
    ("out-is-file", "run directory that is a file", R("--algo", "grpo", "--out", "{tmp}/a_file")),
    ("out-exists", "existing non-empty directory", R("--algo", "grpo", "--out", "{tmp}/full_dir")),
    ("out-exists-run", "existing run without --resume/--overwrite", R("--algo", "grpo", "--out", "{tmp}/old_run")),
    ("resume-missing", "--resume of a missing directory", ["run", "--resume", "{tmp}/none"]),
    ("resume-not-run", "--resume of a directory that is not a run", ["run", "--resume", "{tmp}/full_dir"]),
    ("resume-changed", "--resume with a changed setting",
     ["run", "--resume", "{tmp}/old_run", "--set", "train.lr=0.5", "--set", "algo.group_size=3"]),
    ("resume-algo", "--resume with another algorithm", ["run", "--resume", "{tmp}/old_run", "--algo", "treegrpo"]),
    ("resume-shrink", "--resume with a smaller budget", ["run", "--resume", "{tmp}/old_run", "--budget", "2it"]),
    ("resume-overwrite", "--resume with --overwrite", ["run", "--resume", "{tmp}/old_run", "--overwrite"]),
    ("resume-out", "--resume with another --out", ["run", "--resume", "{tmp}/old_run", "--out", "{tmp}/other"]),
    ("device-cuda", "--device cuda without a GPU", R("--algo", "grpo", "--device", "cuda")),
    ("command-unknown", "unknown command", ["rnu"]),
    ("seed-not-int", "--seed that is not an integer", R("--seed", "abc")),
    ("seed-negative", "negative --seed", R("--seed", "-1")),
    ("value-fp16", "fp16 without a gradient scaler", R("--set", "model.mixed_precision=fp16")),
    ("tracker-unknown", "unknown experiment tracker", R("--algo", "grpo", "--log-with", "wandbb")),
    ("reward-weights-late", "training reward whose weights are missing (looked for on first use)",
     R("--algo", "grpo", "--reward", "_late_weights:LateWeights")),
    ("eval-reward-weights-late", "held-out reward whose weights are missing (looked for on first use)",
     R("--algo", "grpo", "--eval-rewards", "brightness,_late_weights:LateWeights")),
    ("sweep-grid-value", "sweep grid value no trial can run",
     ["sweep", "--algo", "treegrpo", "--model", "tiny-random", "--grid", "k=2,x", "--budget-per-trial", "1it",
      "--out", "{tmp}/sweep"]),
    ("sweep-seed-negative", "negative sweep --seed",
     ["sweep", "--algo", "grpo", "--model", "tiny-random", "--seed", "-1", "--out", "{tmp}/sweep"]),
    # ---- inputs a hand probe broke (issue #30) ----
    ("value-nan", "a setting that is not a number (NaN would turn CFG off)", R("--set", "sampler.guidance=nan")),
    ("value-inf", "an infinite setting", R("--set", "train.lr=inf")),
    ("value-algo-inf", "an infinite algorithm setting", R("--algo", "grpo", "--set", "algo.clip_range=-inf")),
    ("set-section", "a whole section set to a value", R("--set", "train=5")),
    ("set-section-mapping", "a whole section set to a mapping", R("--set", "algo={k: 2}")),
    ("seed-too-large", "--seed beyond 64 bits", R("--seed", "18446744073709551616")),
    ("set-seed-too-large", "seed beyond 64 bits through --set", R("--set", "seed=18446744073709551616")),
    ("budget-inf-nfe", "a budget too large to be finite", R("--algo", "grpo", "--budget", "1e309nfe")),
    ("budget-inf-it", "an iteration budget too large to be finite", R("--algo", "grpo", "--budget", "1e309it")),
    ("budget-inf-samples", "a sample budget too large to be finite", R("--algo", "grpo", "--budget", "1e309samples")),
    ("budget-fraction", "a fractional iteration budget", R("--algo", "grpo", "--budget", "0.5it")),
    ("resume-manifest-empty", "--resume of a run whose manifest has an empty config",
     ["run", "--resume", "{tmp}/bad_empty"]),
    ("resume-manifest-budget", "--resume of a run whose manifest config has no budget",
     ["run", "--resume", "{tmp}/bad_budget"]),
    ("resume-manifest-section", "--resume of a run whose manifest config has train: 5",
     ["run", "--resume", "{tmp}/bad_section"]),
    ("resume-manifest-value", "--resume of a run whose manifest holds a value the config refuses",
     ["run", "--resume", "{tmp}/bad_value"]),
    ("resume-force", "--resume with --force", ["run", "--resume", "{tmp}/old_run", "--force"]),
    ("force-alone", "--force without --overwrite", R("--algo", "grpo", "--force")),
    ("overwrite-not-run", "--overwrite of a directory that is not a treebench run",
     R("--algo", "grpo", "--out", "{tmp}/full_dir", "--overwrite")),
    ("overwrite-link", "--overwrite of a symbolic link", R("--algo", "grpo", "--out", "{tmp}/link_dir", "--overwrite")),
    ("overwrite-cwd", "--overwrite of the working directory (run from inside a run directory)",
     R("--algo", "grpo", "--out", ".", "--overwrite")),
]

#: cases run from inside ``{tmp}/old_run`` (a treebench run: only the working-directory rule refuses)
CHDIR = {"overwrite-cwd": "old_run"}


def workspace(tmp: Path) -> None:
    (tmp / "empty_dir").mkdir()
    (tmp / "bad_key.yaml").write_text("sampler:\n  stepz: 3\n")
    (tmp / "list.yaml").write_text("- sampler.steps: 3\n")
    (tmp / "empty.txt").write_text("# only a comment\n\n")
    (tmp / "bad.jsonl").write_text('{"prompt": "a red circle"}\n{"prompt": "a blue square"\n')
    (tmp / "nokey.jsonl").write_text('{"text": "a red circle"}\n')
    (tmp / "binary.txt").write_bytes(b"\xff\xfe\x00a red circle\n")
    (tmp / "a_file").write_text("not a directory\n")
    (tmp / "full_dir").mkdir()
    (tmp / "full_dir" / "notes.txt").write_text("something\n")
    from bench import config

    run = tmp / "old_run"
    run.mkdir()
    cfg = config.resolve({"sampler.steps": 3}, flags={"algo.name": "grpo", "model.name": "tiny-random",
                                                      "budget": "4it", "out": str(run)})
    (run / "manifest.json").write_text(json.dumps({"schema_version": 1, "config": cfg}))
    (run / "iterations.jsonl").write_text('{"iteration": 0}\n{"iteration": 1}\n')
    (tmp / "link_dir").symlink_to(tmp / "old_run")
    no_budget = {k: v for k, v in cfg.items() if k != "budget"}
    bad_value = json.loads(json.dumps(cfg))
    bad_value["train"]["lr"] = -1
    for name, bad in (("bad_empty", {}), ("bad_budget", no_budget), ("bad_section", {**cfg, "train": 5}),
                      ("bad_value", bad_value)):
        (tmp / name).mkdir()
        (tmp / name / "manifest.json").write_text(json.dumps({"schema_version": 1, "config": bad}))


def run_case(argv, tmp: Path, capsys) -> tuple[int, str]:
    argv = [a.replace("{tmp}", str(tmp)) for a in argv]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse errors
        code = e.code
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    start = next((i for i, ln in enumerate(lines) if re.match(r"^bench( \w+)?: error:", ln)), None)
    msg = "\n".join(lines[start:]) if start is not None else err.strip()
    return code, msg.replace(str(tmp), "<tmp>")


def to_cell(msg: str) -> str:
    """A message as a table cell: a code span (double backticks allow backticks inside), lines joined
    with " ⏎ ", pipes escaped."""
    return "`` " + msg.replace("|", "\\|").replace("\n", " ⏎ ") + " ``"


def same_message(cell: str, doc_cell: str) -> bool:
    """Exact match, except that the "Valid: a, b, c." lists of registries may have grown since the
    table was written."""
    def norm(x: str) -> str:
        return re.sub(r"Valid: [^`]*?\.( |$)", r"Valid: <list>.\1", x)

    return norm(cell) == norm(doc_cell)


def doc_rows() -> dict[str, str]:
    rows = {}
    for line in DOC.read_text().splitlines():
        m = re.match(r"^\| `([a-z0-9-]+)` \|.*\| (.*) \|$", line)
        if m:
            rows[m.group(1)] = m.group(2)
    return rows


@pytest.fixture(scope="module")
def rows():
    return doc_rows()


@pytest.mark.parametrize("case_id,what,argv", CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_the_documented_message(case_id, what, argv, rows, tmp_path, capsys, monkeypatch):
    if case_id == "device-cuda":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    workspace(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    inside = sorted(p.name for p in (tmp_path / "old_run").iterdir())
    if case_id in CHDIR:
        monkeypatch.chdir(tmp_path / CHDIR[case_id])
    code, msg = run_case(argv, tmp_path, capsys)
    assert code == 2, msg
    assert case_id in rows, f"docs/ERRORS.md has no row for {case_id}; message: {msg}"
    assert same_message(to_cell(msg), rows[case_id]), msg
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing created
    assert sorted(p.name for p in (tmp_path / "old_run").iterdir()) == inside  # nothing deleted
    assert json.loads((tmp_path / "old_run" / "manifest.json").read_text())["config"]["budget"] == "4it"


def test_every_documented_row_is_tested():
    assert set(doc_rows()) == {c[0] for c in CASES}


if __name__ == "__main__":  # print the table rows from the current messages
    import tempfile

    class _Cap:
        def readouterr(self):
            class R_:
                err = _buf.getvalue()
            _buf.seek(0)
            _buf.truncate()
            return R_()

    import io

    _buf = io.StringIO()
    sys.stderr = _buf
    for case_id, what, argv in CASES:
        with tempfile.TemporaryDirectory() as d:
            workspace(Path(d))
            here = os.getcwd()
            if case_id in CHDIR:
                os.chdir(Path(d) / CHDIR[case_id])
            try:
                code, msg = run_case(argv, Path(d), _Cap())
            finally:
                os.chdir(here)
        shown = " ".join(a if a and " " not in a else repr(a) for a in argv).replace("{tmp}", "<tmp>")
        print(f"| `{case_id}` | {what}: {to_cell('bench ' + shown)} | {code} | {to_cell(msg)} |", file=sys.__stdout__)
