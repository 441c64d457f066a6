"""``bench`` command line. Importing this module imports neither torch nor any model: subcommands
import what they need when they run, so ``bench --help`` and ``bench list`` stay fast."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from bench.errors import RunFailure, UsageError
from bench.registry import ALGORITHMS, COMMANDS, MODELS, Entry, algorithms, did_you_mean, load_object, rewards

#: Subcommands implemented inside bench, dispatched like the registry's COMMANDS
BENCH_COMMANDS = {"export-lora": Entry("bench.lora:main", "Export a run's LoRA adapter (diffusers format) or "
                                                          "merged/full denoiser weights"),
                  "show": Entry("bench.show:main", "A table of runs (algorithm, seed, budget, totals, final and "
                                                   "best evaluation) from run directories; --json, --markdown"),
                  "env": Entry("bench.envinfo:main", "Versions, device and CUDA, and which rewards are loadable "
                                                     "(paste it into a bug report)"),
                  # (cost) docs/COST.md
                  "plan": Entry("bench.cost.estimate:main", "Price one iteration with a measured cost profile (modeled "
                                                   "seconds, batched vs reference trainers) without loading weights")}

EPILOG = """examples:
  bench run --algo treegrpo --budget 10m            # embedded shapes world on CPU
  bench run --algo dancegrpo --budget 3it --out runs/x --set train.lr=1e-5
  bench run --algo treegrpo --preset treegrpo-paper --model sd3.5-medium --model-path DIR --budget 24h
  bench run --resume runs/x --budget 48h             # continue a killed run, extending its budget
  bench list"""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2 too; keep its message, add the hint
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as _v

    try:
        return _v("treebench")
    except PackageNotFoundError:
        return "unknown (not installed)"


def seed_arg(text: str) -> int:
    """--seed: an integer >= 0 (numpy and the seeding helpers refuse negative seeds)."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {v}")
    from bench.config import SEED_MAX

    if v > SEED_MAX:  # torch.manual_seed and numpy take a signed 64-bit seed
        raise argparse.ArgumentTypeError(f"must be at most {SEED_MAX} (2**63 - 1), got {v}")
    return v


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--algo", help=f"algorithm: {', '.join(ALGORITHMS)}, an installed plug-in (bench list) or "
                                  f"module:Class (docs/PLUGINS.md; default treegrpo)")
    p.add_argument("--reward", help="training reward: a name, module:Class, or a weighted spec "
                                    "'hpsv2=1.0,clip_score=1.0' (default: the model preset's)")
    p.add_argument("--eval-rewards", help="comma-separated held-out rewards (default: the model preset's)")
    p.add_argument("--model", help=f"model preset: {', '.join(MODELS)} (default shapes)")
    p.add_argument("--model-path", help="local diffusers pipeline directory (overrides the preset's source)")
    p.add_argument("--budget", help="e.g. 24h, 90m, 45s, 5000samples, 2e6nfe, 300it, or '2h,5000samples' "
                                    "(first reached stops; default 10m)")
    p.add_argument("--seed", type=seed_arg, help="random seed, an integer >= 0 (default 0)")
    p.add_argument("--out", help="run directory (default runs/<algo>_<time>)")
    p.add_argument("--config", help="YAML config file (nested sections or dotted keys)")
    p.add_argument("--preset", help="algorithm preset reproducing a paper's setting (bench list)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key, e.g. --set algo.k=3 --set train.lr=1e-5 (repeatable)")
    p.add_argument("--train-prompts", help="prompt set name or file for training")
    p.add_argument("--eval-prompts", help="prompt set name or file for evaluation")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing run directory (a treebench run, or an empty directory)")
    p.add_argument("--force", action="store_true",
                   help="with --overwrite: also empty a directory that is not a treebench run (its entries are "
                        "named when --overwrite alone refuses)")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue a stopped or killed run from its newest valid checkpoint, with its own "
                        "configuration (only --budget may extend it; see docs/ERRORS.md)")
    p.add_argument("--no-progress", action="store_true", help="no progress output (on a terminal a bar; "
                                                               "otherwise one line per iteration)")
    p.add_argument("--log-with", action="append", default=[], metavar="TRACKER",
                   help="also log to an experiment tracker: tensorboard, wandb (offline unless WANDB_MODE=online)"
                        " or mlflow (RUN/mlflow.db unless MLFLOW_TRACKING_URI); repeatable")
    p.add_argument("--clock", help="wall (default) or a cost profile (e.g. sd3.5-medium-h200): a seconds budget then "
                                   "counts that profile's MODELED seconds, not wall-clock (docs/COST.md)")
    p.add_argument("--fit", action="store_true",
                   help="choose train.micro_batch and model.gradient_checkpointing so the run fits this GPU's memory "
                        "(or --gpu-mem), keeping the algorithm; needs a cost profile (run.cost_profile or --clock) "
                        "with measured memory; settings you --set are kept (docs/COST.md)")
    p.add_argument("--gpu-mem", default=None, metavar="SIZE", help="with --fit: GPU memory to fit, e.g. 24GB "
                                                                   "(default: the CUDA device's)")


def flags_from_args(a: argparse.Namespace) -> dict:
    flags = {"algo.name": a.algo, "reward.name": a.reward, "model.name": a.model, "model.path": a.model_path,
             "budget": a.budget, "seed": a.seed, "out": a.out, "data.train_prompts": a.train_prompts,
             "data.eval_prompts": a.eval_prompts, "model.device": a.device, "run.clock": a.clock}
    if a.eval_rewards:
        flags["eval.rewards"] = [r.strip() for r in a.eval_rewards.split(",") if r.strip()]
    if a.overwrite:
        flags["run.overwrite"] = True
    if getattr(a, "force", False):
        flags["run.force"] = True
    if a.no_progress:
        flags["run.progress"] = False
    if getattr(a, "log_with", None):
        flags["run.log_with"] = [t.strip() for x in a.log_with for t in x.split(",") if t.strip()]
    return flags


def cmd_run(a: argparse.Namespace) -> int:
    from bench import config

    if a.resume:
        from bench.rundir import resume

        cfg = resume.resume_config(a.resume, config.parse_sets(a.sets), config_file=a.config, preset=a.preset,
                                       flags=flags_from_args(a))
    else:
        sets = config.parse_sets(a.sets)
        cfg = config.resolve(sets, config_file=a.config, preset=a.preset, flags=flags_from_args(a))
        if a.fit:
            from bench.cost.fit import fit_run_config

            user = {**(config.load_config_file(a.config) if a.config else {}), **sets}
            cfg = fit_run_config(cfg, user, a.gpu_mem)
    if a.resume and a.fit:
        raise UsageError("--fit with --resume: a resumed run keeps its own micro-batch and checkpointing")
    if a.gpu_mem and not a.fit:
        raise UsageError("--gpu-mem is an option of --fit")
    from bench.run import runner

    try:
        summary = runner.run(cfg, resume=bool(a.resume))
    except RunFailure as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 1
    if summary.stop_reason == "interrupted":
        return 130
    return 0 if summary.stop_reason not in ("error", "nonfinite") else 1


def cmd_list(a: argparse.Namespace) -> int:
    def section(title: str, items: dict) -> None:
        print(f"{title}:")
        width = max(22, *(len(n) for n in items))
        for name, e in items.items():
            print(f"  {name:<{width}} {getattr(e, 'description', '')}")

    section("algorithms", algorithms())
    section("rewards", rewards())
    section("models", MODELS)
    if a.presets:
        print("presets (--algo ALGO --preset NAME):")
        for name, e in algorithms().items():
            try:
                presets = getattr(load_object(e.target), "PRESETS", {}) or {}
            except NotImplementedError:
                continue
            if presets:
                print(f"  {name}:")
            for p, overrides in presets.items():
                print(f"    {p:<22} {', '.join(f'{k}={v}' for k, v in overrides.items())}")
    else:
        print("presets: bench list --presets")
    from bench.engine.prompts import builtin_sets

    print("prompt sets:")
    for name, path in builtin_sets().items():
        print(f"  {name:<22} {path.name}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="bench", description="treebench: benchmark online RL post-training of text-to-image "
                                          "diffusion/flow models under equal budgets.",
                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"treebench {version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    r = sub.add_parser("run", help="train one algorithm under a budget", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(r)
    ls = sub.add_parser("list", help="algorithms, rewards, models, presets, prompt sets")
    ls.add_argument("--presets", action="store_true", help="also list algorithm presets (imports algorithms)")
    for name, e in {**COMMANDS, **BENCH_COMMANDS}.items():
        sub.add_parser(name, help=e.description, add_help=False)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {**COMMANDS, **BENCH_COMMANDS}
    if argv and argv[0] in commands:
        try:
            fn = load_object(commands[argv[0]].target)
        except NotImplementedError as e:
            print(f"bench {argv[0]}: not available: {e}", file=sys.stderr)
            return 2
        return _guard(lambda: int(fn(argv[1:]) or 0))
    parser = build_parser()
    if argv and not argv[0].startswith("-") and argv[0] not in ("run", "list"):
        parser.exit(2, f"bench: error: {did_you_mean(argv[0], ['run', 'list', *commands], 'command')}\n")
    a = parser.parse_args(argv)
    if a.command is None:
        parser.print_help()
        return 0
    return _guard(lambda: {"run": cmd_run, "list": cmd_list}[a.command](a))


def _guard(fn) -> int:  # noqa: ANN001
    try:
        return fn()
    except UsageError as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 2
    except RunFailure as e:  # a fault of the environment (a full disk): what was kept and how to continue
        print(f"bench: error: {e}", file=sys.stderr)
        return 1
    except NotImplementedError as e:
        print(f"bench: not implemented: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
