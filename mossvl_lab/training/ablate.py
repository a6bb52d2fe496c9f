"""Ablation harness: train and evaluate every variant of a spec over several seeds, then tabulate the results.

    mossvl-lab ablate docs/ablation_specs/video_preview.yaml --jobs 2        # runs, then the report
    mossvl-lab ablate docs/ablation_specs/video_preview.yaml --report-only   # tables and plots from finished runs

A spec (YAML or JSON) has `name` (default: the file name), an optional `description`, `base`, `seeds` and
`variants`. `base` and each variant hold the same sections:

    preset       a preset name (mossvl_lab.config.presets())
    overrides    {dotted ModelConfig field: value}, as mossvl_lab.config.override takes
    toy_vision   true = the toy conv tower (Mllama-layout families)
    gate_init    initial cross-attention gates (default: the trainer's)
    processor    {ProcessingConfig field: value}, e.g. realtime_system_prompt, video_min_pixels
    train        {TrainConfig field: value} (not seed, not out_dir: the harness sets those)
    eval         clips (held-out EVAL_SEEDS used), cache_policy ({window: {frames: 4}}, see
                 evaluate.cache_policy_from_spec), clip_seconds (default: train's), qa, qa_per_clip

A variant merges over `base` section by section: its keys replace the base's keys of the same section (a value
is replaced whole, so `cache_policy: null` removes a base policy). Each variant x seed is one run: the model is
built like the trainer CLI builds it (preset, overrides, toy vision, torch.manual_seed(seed), gates opened),
trained with `trainer.train`, then scored with `evaluate.evaluate`. A run writes `runs/<variant>/seed<k>/`:
config.json (its merged settings), train_log.json (loss history) and, last and atomically, metrics.json, the
marker of a finished run: finished runs are skipped, so a killed ablation resumes where it stopped.

Trained weights are kept in `trained/<settings digest>-seed<k>/`, keyed by everything but `eval`: a variant that
differs from another only in how it is evaluated (a vision-cache window, say) reuses that model instead of
training the same thing again.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import re
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from ..config import ConfigError, override, preset, presets
from ..data.synthetic import EVAL_SEEDS
from ..processing.processor import ProcessingConfig, ProcessingError
from . import train_cli, trainer
from .evaluate import DEFAULT_EVAL_CLIPS, cache_policy_from_spec, default_frame_size, evaluate

TOP_LEVEL = ("name", "description", "base", "seeds", "variants")
SECTIONS = ("preset", "overrides", "toy_vision", "gate_init", "processor", "train", "eval")
MAPPING_SECTIONS = ("overrides", "processor", "train", "eval")
EVAL_DEFAULTS: dict[str, Any] = {"clips": DEFAULT_EVAL_CLIPS, "cache_policy": None, "clip_seconds": None, "qa": None,
                                 "qa_per_clip": 2}
RESERVED_TRAIN = {"seed": "the seeds are the spec's top-level `seeds`",
                  "out_dir": "the harness chooses where runs and their weights go"}
SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


class AblationSpecError(ValueError):
    """The ablation spec is malformed or names something that does not exist; the message says where."""


@dataclass(frozen=True)
class Variant:
    """One variant's settings after merging over `base` (plain JSON data, as config.json stores them)."""

    name: str
    preset: str
    overrides: dict[str, Any]
    toy_vision: bool
    gate_init: float | None
    processor: dict[str, Any]
    train: dict[str, Any]
    eval: dict[str, Any]


@dataclass(frozen=True)
class AblationSpec:
    name: str
    seeds: tuple[int, ...]
    variants: tuple[Variant, ...]
    description: str = ""


@dataclass(frozen=True)
class Run:
    variant: Variant
    seed: int
    dir: Path

    @property
    def label(self) -> str:
        return f"{self.variant.name}/seed{self.seed}"


# ------------------------------------------------------------------------------------------------ spec


def load_spec(path: str | Path) -> AblationSpec:
    """Read and validate a spec file (.json as JSON, anything else as YAML)."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise AblationSpecError(f"{path}: cannot read the spec: {exc}") from None
    return parse_spec(data, default_name=path.stem, where=str(path))


def parse_spec(data: Any, *, default_name: str = "ablation", where: str = "spec") -> AblationSpec:
    """Validate plain spec data and merge every variant over `base`."""
    def fail(message: str) -> NoReturn:
        raise AblationSpecError(f"{where}: {message}")

    if not isinstance(data, dict):
        fail(f"expected a mapping with keys {list(TOP_LEVEL)}, got {type(data).__name__}")
    unknown = sorted(set(data) - set(TOP_LEVEL))
    if unknown:
        fail(f"unknown top-level key(s) {unknown}; allowed: {list(TOP_LEVEL)}")
    name = data.get("name") or default_name
    if not isinstance(name, str) or not SAFE_NAME.fullmatch(name):
        fail(f"name {name!r} must be letters, digits, '_', '-' or '.' (it names the output directory)")
    seeds = data.get("seeds")
    if not isinstance(seeds, list) or not seeds or not all(_is_int(s) and s >= 0 for s in seeds):
        fail(f"seeds must be a non-empty list of integers >= 0, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        fail(f"seeds has duplicates: {seeds}")
    variants = data.get("variants")
    if not isinstance(variants, dict) or not variants:
        fail("variants must be a non-empty mapping {variant name: settings} ({} for the base itself)")
    base = _section_map(data.get("base") or {}, "base", fail)
    merged = []
    for vname, settings in variants.items():
        if not isinstance(vname, str) or not SAFE_NAME.fullmatch(vname) or vname in (".", ".."):
            fail(f"variant name {vname!r} is not safe as a directory name (letters, digits, '_', '-', '.')")
        variant = merge(base, _section_map(settings or {}, f"variant {vname!r}", fail), vname)
        try:
            validate_variant(variant, seeds[0])
        except AblationSpecError as exc:
            fail(f"variant {vname!r}: {exc}")
        merged.append(variant)
    return AblationSpec(name=name, seeds=tuple(seeds), variants=tuple(merged),
                        description=str(data.get("description") or ""))


def _section_map(settings: Any, owner: str, fail: Callable[[str], NoReturn]) -> dict[str, Any]:
    if not isinstance(settings, dict):
        fail(f"{owner} must be a mapping of {list(SECTIONS)}, got {settings!r}")
    unknown = sorted(set(settings) - set(SECTIONS))
    if unknown:
        fail(f"{owner}: unknown key(s) {unknown}; allowed: {list(SECTIONS)}")
    for key in MAPPING_SECTIONS:
        if not isinstance(settings.get(key) or {}, dict):
            fail(f"{owner}: {key} must be a mapping, got {settings[key]!r}")
    return settings


def merge(base: dict[str, Any], variant: dict[str, Any], name: str) -> Variant:
    """`variant` over `base`: mapping sections merge key by key (a key's value is replaced whole), the scalar
    sections are replaced; eval defaults fill what neither sets."""
    out: dict[str, Any] = {}
    for key in MAPPING_SECTIONS:
        out[key] = {**(base.get(key) or {}), **(variant.get(key) or {})}
    out["eval"] = {**EVAL_DEFAULTS, **out["eval"]}
    for key in ("preset", "toy_vision", "gate_init"):
        out[key] = variant.get(key, base.get(key))
    toy = False if out["toy_vision"] is None else out["toy_vision"]
    return Variant(name=name, preset=out["preset"], overrides=out["overrides"], toy_vision=toy,
                   gate_init=out["gate_init"], processor=out["processor"], train=out["train"], eval=out["eval"])


def validate_variant(variant: Variant, seed: int) -> None:
    """Check everything that can be checked without building a model; raise AblationSpecError."""
    if variant.preset is None:
        raise AblationSpecError(f"no preset (set base.preset to one of: {', '.join(presets())})")
    if variant.preset not in presets():
        raise AblationSpecError(f"unknown preset {variant.preset!r}; available: {', '.join(presets())}")
    if not isinstance(variant.toy_vision, bool):
        raise AblationSpecError(f"toy_vision must be true or false, got {variant.toy_vision!r}")
    if variant.gate_init is not None and (isinstance(variant.gate_init, bool)
                                          or not isinstance(variant.gate_init, (int, float))):
        raise AblationSpecError(f"gate_init must be a number, got {variant.gate_init!r}")
    try:
        cfg = override(preset(variant.preset), variant.overrides)
    except (ConfigError, TypeError, ValueError) as exc:
        raise AblationSpecError(f"overrides: {exc}") from None
    try:
        ProcessingConfig.from_dict({**ProcessingConfig.for_model(cfg).to_dict(), **variant.processor})
    except (ProcessingError, TypeError, ValueError) as exc:
        raise AblationSpecError(f"processor: {exc}") from None
    train_config(variant.train, seed)
    unknown = sorted(set(variant.eval) - set(EVAL_DEFAULTS))
    if unknown:
        raise AblationSpecError(f"eval: unknown key(s) {unknown}; allowed: {list(EVAL_DEFAULTS)}")
    ev = variant.eval
    if not _is_int(ev["clips"]) or not 1 <= ev["clips"] <= len(EVAL_SEEDS):
        raise AblationSpecError(f"eval: clips must be an integer in 1..{len(EVAL_SEEDS)}, got {ev['clips']!r}")
    span = ev["clip_seconds"]
    if span is not None and not (isinstance(span, list) and len(span) == 2 and all(map(_is_int, span))
                                 and 1 <= span[0] <= span[1]):
        raise AblationSpecError(f"eval: clip_seconds must be [min, max] with 1 <= min <= max, got {span!r}")
    if ev["qa"] is not None and not isinstance(ev["qa"], bool):
        raise AblationSpecError(f"eval: qa must be true, false or null (the family's default), got {ev['qa']!r}")
    if not _is_int(ev["qa_per_clip"]) or ev["qa_per_clip"] < 0:
        raise AblationSpecError(f"eval: qa_per_clip must be an integer >= 0, got {ev['qa_per_clip']!r}")
    try:
        cache_policy_from_spec(ev["cache_policy"])
    except ValueError as exc:
        raise AblationSpecError(f"eval: {exc}") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def train_config(train: dict[str, Any], seed: int) -> Any:
    """TrainConfig from spec data (lists become the tuples TrainConfig holds); AblationSpecError names bad fields."""
    reserved = [f"{key} ({why})" for key, why in RESERVED_TRAIN.items() if key in train]
    if reserved:
        raise AblationSpecError(f"train: do not set {'; '.join(reserved)}")
    names = {f.name for f in dataclasses.fields(trainer.TrainConfig)} - set(RESERVED_TRAIN)
    unknown = sorted(set(train) - names)
    if unknown:
        raise AblationSpecError(f"train: unknown TrainConfig field(s) {unknown}; known: {sorted(names)}")
    try:
        return trainer.TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in train.items()}, seed=seed)
    except (TypeError, ValueError) as exc:
        raise AblationSpecError(f"train: {exc}") from None


# ------------------------------------------------------------------------------------------------ runs


def plan(spec: AblationSpec, out: Path, only: tuple[str, ...] = ()) -> list[Run]:
    """Every variant x seed run (only the variants named in `only`, when given), variant-major."""
    names = [v.name for v in spec.variants]
    missing = sorted(set(only) - set(names))
    if missing:
        raise AblationSpecError(f"--only names unknown variant(s) {missing}; the spec has {names}")
    return [Run(v, seed, out / "runs" / v.name / f"seed{seed}")
            for v in spec.variants if not only or v.name in only for seed in spec.seeds]


def run_record(run: Run) -> dict[str, Any]:
    """What config.json holds: the run's merged settings; a finished run made with other settings is stale."""
    return {"variant": dataclasses.asdict(run.variant), "seed": run.seed}


def write_json(path: Path, data: Any) -> None:
    """Write via a temporary file and a rename, so a killed run never leaves half a file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def trained_dir(run_dir: Path, variant: Variant, seed: int) -> Path:
    """Where the weights of this variant's training (everything but `eval`) and seed live: runs/<v>/seed<k> sits
    two levels below the ablation's root."""
    settings = {k: v for k, v in dataclasses.asdict(variant).items() if k not in ("name", "eval")}
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return run_dir.parents[2] / "trained" / f"{digest}-seed{seed}"


def _train_or_reuse(run_dir: Path, variant: Variant, seed: int, tcfg: Any) -> tuple[Any, Any, dict[str, Any]]:
    """(model, processor, train log) trained now, or loaded when another variant already trained the same."""
    import mossvl_lab as ml

    shared = trained_dir(run_dir, variant, seed)
    if (shared / "train.json").exists():
        log = {**json.loads((shared / "train.json").read_text()), "reused_from": str(shared)}
        return ml.load_model(shared, progress=False), ml.load_processor(shared), log
    argv = ["--preset", variant.preset, "--seed", str(seed), "--out", str(run_dir)]
    argv += [a for k, v in variant.overrides.items() for a in ("--override", f"{k}={json.dumps(v)}")]
    argv += [a for k, v in variant.processor.items() for a in ("--processor", f"{k}={json.dumps(v)}")]
    argv += ["--toy-vision"] if variant.toy_vision else []
    argv += ["--gate-init", repr(float(variant.gate_init))] if variant.gate_init is not None else []
    model, processor = train_cli.build_from_args(train_cli.parse_args(argv))
    result = trainer.train(model, processor, tcfg, progress=False)
    log = {"history": result.history, "evals": result.evals, "seconds": result.seconds,
           "cpu_seconds": result.cpu_seconds}
    staging = shared.with_name(f".{shared.name}.{os.getpid()}.tmp")
    ml.save_model(model, staging)
    processor.save_pretrained(staging)
    write_json(staging / "train.json", log)  # written last: the marker of complete weights
    try:
        os.replace(staging, shared)
    except OSError:  # a concurrent run with the same training finished first; its weights are as good
        import shutil
        shutil.rmtree(staging, ignore_errors=True)
    return model, processor, log


def execute_run(run_dir: Path) -> dict[str, Any]:
    """Train (or reuse, see trained_dir) and evaluate the run described by `run_dir/config.json`; write
    train_log.json, then metrics.json."""
    record = json.loads((run_dir / "config.json").read_text())
    variant, seed = Variant(**record["variant"]), record["seed"]
    tcfg = train_config(variant.train, seed)
    model, processor, log = _train_or_reuse(run_dir, variant, seed, tcfg)
    write_json(run_dir / "train_log.json", log)
    ev = variant.eval
    started = time.perf_counter()
    metrics = evaluate(model, processor, EVAL_SEEDS[:ev["clips"]],
                       frame_size=tcfg.frame_size or default_frame_size(processor),
                       clip_seconds=tuple(ev["clip_seconds"] or tcfg.clip_seconds), qa=ev["qa"],
                       qa_per_clip=ev["qa_per_clip"], max_tokens_per_turn=tcfg.max_tokens_per_turn,
                       cache_policy=cache_policy_from_spec(ev["cache_policy"], model),
                       question_style=tcfg.question_style, offline_question_first=tcfg.offline_question_first)
    out = {"variant": variant.name, "seed": seed, "metrics": metrics.to_dict(), "summary": metrics.summary(),
           "train_seconds": log["seconds"], "eval_seconds": time.perf_counter() - started,
           "final_loss": log["history"][-1]["loss"], "reused_training": "reused_from" in log}
    write_json(run_dir / "metrics.json", out)
    return out


def _stale(run: Run) -> str | None:
    """Which settings of a finished run differ from the spec's now (None when they all match)."""
    path = run.dir / "config.json"
    stored = json.loads(path.read_text())["variant"] if path.exists() else {}
    current = json.loads(json.dumps(run_record(run)))["variant"]
    changed = [key for key in current if stored.get(key) != current[key]]
    return f"{run.dir} was made with other {'/'.join(changed)} settings than the spec's" if changed else None


def _launch(run: Run, jobs: int) -> tuple[bool, str]:
    """Run one ablation run: in this process when jobs == 1, else as a one-thread subprocess (log in log.txt)."""
    if jobs == 1:
        try:
            return True, execute_run(run.dir)["summary"]
        except (Exception, SystemExit) as exc:  # the trainer reports bad CLI-level settings by SystemExit
            traceback.print_exc()
            return False, f"{type(exc).__name__}: {exc}"
    import mossvl_lab

    root = str(Path(mossvl_lab.__file__).resolve().parents[1])  # the subprocess imports this same copy
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    log = run.dir / "log.txt"
    with log.open("w") as handle:
        code = subprocess.run([sys.executable, "-m", "mossvl_lab.training.ablate", str(run.dir), "--threads", "1"],
                              stdout=handle, stderr=subprocess.STDOUT, env=env).returncode
    if code:
        tail = log.read_text().strip().splitlines()[-1:] or [""]
        return False, f"exit code {code} ({tail[0]}); log: {log}"
    return True, json.loads((run.dir / "metrics.json").read_text())["summary"]


def run_all(runs: list[Run], jobs: int = 1, echo: Callable[[str], Any] = print) -> list[Run]:
    """Execute the runs without a metrics.json, `jobs` at a time; print a line per run; return the failed ones."""
    if jobs < 1:
        raise ValueError(f"jobs must be >= 1, got {jobs}")
    stale = [why for run in runs if (run.dir / "metrics.json").exists() and (why := _stale(run))]
    if stale:
        raise AblationSpecError("; ".join(stale) + ": delete those run directories or use another --out")
    started = time.perf_counter()
    todo = []
    for k, run in enumerate(runs, 1):
        if (run.dir / "metrics.json").exists():
            echo(f"[{k}/{len(runs)}] {run.label}: skipped (done)")
        else:
            todo.append((k, run))

    def one(item: tuple[int, Run]) -> Run | None:
        k, run = item
        write_json(run.dir / "config.json", run_record(run))
        echo(f"[{k}/{len(runs)}] {run.label}: started ({time.perf_counter() - started:.0f} s elapsed)")
        t0 = time.perf_counter()
        ok, detail = _launch(run, jobs)
        echo(f"[{k}/{len(runs)}] {run.label}: {'done' if ok else 'FAILED'} in {time.perf_counter() - t0:.1f} s "
             f"({time.perf_counter() - started:.0f} s elapsed): {detail}")
        return None if ok else run

    if jobs == 1:  # in this thread, so Ctrl-C stops the run at once
        return [run for run in map(one, todo) if run is not None]
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return [run for run in pool.map(one, todo) if run is not None]


def main(argv: list[str] | None = None) -> int:
    """Worker entry (`python -m mossvl_lab.training.ablate RUN_DIR`): execute one planned run."""
    parser = argparse.ArgumentParser(prog="python -m mossvl_lab.training.ablate",
                                     description="execute one run of an ablation (its config.json)")
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    print(execute_run(args.run_dir)["summary"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
