"""The ablation harness: spec merging and validation, runs on disk, resuming, the report, parallel subprocesses."""

from __future__ import annotations

import copy
import csv
import json
import math
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from mossvl_lab.cli import main
from mossvl_lab.streaming.cache_policies import VisionWindow
from mossvl_lab.streaming.events import CacheEvicted
from mossvl_lab.training import ablate
from mossvl_lab.training import evaluate as evaluate_module
from mossvl_lab.training.ablate import AblationSpecError, load_spec, parse_spec, plan, run_all
from mossvl_lab.training.evaluate import DEFAULT_EVAL_CLIPS

TINY = {
    "name": "tiny",
    "base": {"preset": "video-preview-tiny", "toy_vision": True,
             "overrides": {"text.num_layers": 2, "text.cross_attention_layers": [1]},
             "processor": {"realtime_system_prompt": "Watch."},
             "train": {"steps": 2, "batch_size": 1, "warmup_steps": 1, "eval_clips": 0, "clip_seconds": [2, 3]},
             "eval": {"clips": 1}},
    "seeds": [0, 1],
    "variants": {"baseline": {}, "window_1": {"eval": {"cache_policy": {"window": {"frames": 1}}}}},
}



def spec_with(**changes):
    """TINY with top-level keys replaced (a deep copy: tests never share nested dicts)."""
    return {**copy.deepcopy(TINY), **changes}


def test_variants_merge_over_base_section_by_section():
    data = spec_with(base={**TINY["base"], "gate_init": 0.25,
                           "eval": {"cache_policy": {"window": {"frames": 4}}, "clips": 3}},
                     variants={"plain": {},
                               "pooled": {"eval": {"cache_policy": {"pool": {"after_frames": 2, "factor": 2}}}},
                               "unwindowed": {"eval": {"cache_policy": None}, "gate_init": 0.0},
                               "long": {"train": {"steps": 5}, "overrides": {"text.num_layers": 3}}})
    spec = parse_spec(data)
    got = {v.name: v for v in spec.variants}
    assert list(got) == ["plain", "pooled", "unwindowed", "long"] and spec.seeds == (0, 1)
    assert got["plain"].eval == {"clips": 3, "cache_policy": {"window": {"frames": 4}}, "clip_seconds": None,
                                 "qa": None, "qa_per_clip": 2}
    assert got["pooled"].eval["cache_policy"] == {"pool": {"after_frames": 2, "factor": 2}}  # replaced, not mixed
    assert got["unwindowed"].eval["cache_policy"] is None and got["unwindowed"].gate_init == 0.0
    assert got["plain"].gate_init == 0.25 and got["plain"].toy_vision is True
    assert got["long"].train == {**TINY["base"]["train"], "steps": 5}
    assert got["long"].overrides == {"text.num_layers": 3, "text.cross_attention_layers": [1]}
    assert got["plain"].train == TINY["base"]["train"]  # the base itself is untouched by the variants
    assert parse_spec(spec_with(base={"preset": "moss-vl-tiny"})).variants[0].eval["clips"] == DEFAULT_EVAL_CLIPS


def test_yaml_and_json_specs_read_alike(tmp_path):
    (tmp_path / "a.yaml").write_text(yaml.safe_dump({k: v for k, v in TINY.items() if k != "name"}))
    (tmp_path / "b.json").write_text(json.dumps(TINY))
    from_yaml, from_json = load_spec(tmp_path / "a.yaml"), load_spec(tmp_path / "b.json")
    assert from_yaml.name == "a" and from_json.name == "tiny"  # the file name unless the spec names itself
    assert from_yaml.variants == from_json.variants and from_yaml.seeds == from_json.seeds
    (tmp_path / "bad.yaml").write_text("base: [unclosed")
    with pytest.raises(AblationSpecError, match="bad.yaml: cannot read"):
        load_spec(tmp_path / "bad.yaml")


def _variant(settings):
    return {"variants": {"v": settings}}


@pytest.mark.parametrize("changes, match", [
    ({"variant": {}}, r"unknown top-level key\(s\) \['variant'\]"),
    ({"seeds": []}, "seeds must be a non-empty list"),
    ({"seeds": [0, -1]}, "seeds must be a non-empty list of integers >= 0"),
    ({"seeds": [1, 1]}, "duplicates"),
    ({"variants": {}}, "variants must be a non-empty mapping"),
    ({"name": "a/b"}, "name 'a/b' must be"),
    ({"variants": {"../up": {}}}, r"variant name '\.\./up' is not safe"),
    ({"base": ["preset"]}, "base must be a mapping"),
    (_variant({"override": {}}), r"variant 'v': unknown key\(s\) \['override'\]"),
    (_variant({"train": [1]}), "variant 'v': train must be a mapping"),
    ({"base": {}}, "variant 'baseline': no preset .*set base.preset"),
    (_variant({"toy_vision": "yes"}), "toy_vision must be true or false"),
    (_variant({"eval": {"clip_seconds": [3, 2]}}), r"clip_seconds must be \[min, max\]"),
    (_variant({"eval": {"qa": "yes"}}), "qa must be true, false or null"),
    (_variant({"eval": {"qa_per_clip": -1}}), "qa_per_clip must be an integer >= 0"),
    (_variant({"preset": "tiny-vp"}), "variant 'v': unknown preset 'tiny-vp'; available: .*video-preview-tiny"),
    (_variant({"overrides": {"cross_attention.gat": "ones"}}),
     "variant 'v': overrides: .*'cross_attention.gat' does not name a config field"),
    (_variant({"overrides": {"cross_attention.gate": "sometimes"}}), "variant 'v': overrides: .*expected one of"),
    (_variant({"processor": {"video_min_pixel": 1}}), r"variant 'v': processor: .*unknown setting\(s\)"),
    (_variant({"processor": {"video_fps": 0}}), "variant 'v': processor: .*video_fps must be positive"),
    (_variant({"train": {"step": 3}}), r"unknown TrainConfig field\(s\) \['step'\]"),
    (_variant({"train": {"seed": 3}}), "do not set seed"),
    (_variant({"train": {"out_dir": "x"}}), "do not set out_dir"),
    (_variant({"train": {"steps": 0}}), "train: TrainConfig: invalid steps=0"),
    (_variant({"gate_init": "open"}), "gate_init must be a number"),
    (_variant({"eval": {"clip": 3}}), r"eval: unknown key\(s\) \['clip'\]"),
    (_variant({"eval": {"clips": 0}}), "eval: clips must be an integer in 1..200"),
    (_variant({"eval": {"cache_policy": {"windw": {"frames": 2}}}}), "eval: unknown cache policy 'windw'"),
    (_variant({"eval": {"cache_policy": {"window": {"frames": 0}}}}), "eval: .*frames must be an integer >= 1"),
])
def test_spec_errors_name_the_problem(changes, match):
    with pytest.raises(AblationSpecError, match=match):
        parse_spec(spec_with(**changes))


def test_only_must_name_variants(tmp_path):
    spec = parse_spec(spec_with())
    assert [r.label for r in plan(spec, tmp_path, ("window_1",))] == ["window_1/seed0", "window_1/seed1"]
    assert plan(spec, tmp_path)[1].dir == tmp_path / "runs" / "baseline" / "seed1"
    with pytest.raises(AblationSpecError, match=r"unknown variant\(s\) \['windw'\]"):
        plan(spec, tmp_path, ("windw",))


def test_ablation_end_to_end_resume_and_report(tmp_path, monkeypatch, capsys):
    sessions = []

    class Recording(evaluate_module.RealtimeSession):
        """Records each evaluation session's cache policies and how many eviction events they emitted."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            sessions.append({"policies": list(self.cache_policies), "evicted": 0})

        def step(self):
            events = super().step()
            sessions[-1]["evicted"] += sum(isinstance(e, CacheEvicted) for e in events)
            return events

    monkeypatch.setattr(evaluate_module, "RealtimeSession", Recording)
    spec_path, out = tmp_path / "tiny.yaml", tmp_path / "out"
    spec_path.write_text(yaml.safe_dump(TINY))
    assert main(["ablate", str(spec_path), "--out", str(out)]) == 0
    text = capsys.readouterr().out

    # one session per run (1 eval clip), in run order; the window policy reached its runs' sessions and acted
    assert [s["policies"] for s in sessions] == [[], [], [VisionWindow(frames=1)], [VisionWindow(frames=1)]]
    assert [s["evicted"] > 0 for s in sessions] == [False, False, True, True]

    for variant in ("baseline", "window_1"):
        for seed in (0, 1):
            run = out / "runs" / variant / f"seed{seed}"
            record = json.loads((run / "metrics.json").read_text())
            assert record["variant"] == variant and record["seed"] == seed and record["metrics"]["clips"] == 1
            assert len(json.loads((run / "train_log.json").read_text())["history"]) == 2
            assert json.loads((run / "config.json").read_text())["variant"]["train"]["steps"] == 2
            # window_1 differs from baseline only in evaluation: it reuses baseline's trained weights
            assert record["reused_training"] == (variant == "window_1")
    for seed in (0, 1):
        reused = json.loads((out / "runs" / "window_1" / f"seed{seed}" / "train_log.json").read_text())
        trained = json.loads((out / "runs" / "baseline" / f"seed{seed}" / "train_log.json").read_text())
        assert reused["history"] == trained["history"] and Path(reused["reused_from"]).parent == out / "trained"
    assert len(list((out / "trained").iterdir())) == 2  # one trained model per seed, no leftover staging dirs
    with (out / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["variant"], r["seed"]) for r in rows] == [("baseline", "0"), ("baseline", "1"),
                                                          ("window_1", "0"), ("window_1", "1")]
    summary = json.loads((out / "summary.json").read_text())["variants"]
    with (out / "summary.csv").open() as handle:
        summary_rows = {r["variant"]: r for r in csv.DictReader(handle)}
    for variant in ("baseline", "window_1"):
        for metric in ("final_loss", "train_seconds", "event_recall", "caption_exact_match"):
            values = np.array([float(r[metric]) if r[metric] else np.nan for r in rows if r["variant"] == variant])
            defined = values[~np.isnan(values)]
            want_mean = defined.mean() if defined.size else None
            want_std = defined.std(ddof=1) if defined.size > 1 else None
            got = summary[variant]["metrics"][metric]
            assert got["n"] == defined.size
            assert got["mean"] == (None if want_mean is None else pytest.approx(want_mean, rel=1e-9))
            assert got["std"] == (None if want_std is None else pytest.approx(want_std, rel=1e-9, abs=1e-12))
            cell = summary_rows[variant][f"{metric}_mean"]
            assert (cell == "") if want_mean is None else float(cell) == pytest.approx(want_mean, rel=1e-9)
    assert summary["baseline"]["metrics"]["final_loss"]["std"] > 0  # two seeds really trained differently
    for name in ("final_loss", "train_seconds", "event_recall"):
        image = Image.open(out / "plots" / f"{name}.png")
        assert image.size[0] >= 300 and np.asarray(image.convert("L")).std() > 5
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert table[0].startswith("| variant | recall | false alarms | caption EM | TS-QA | delay")
    assert [line.split("|")[1].strip() for line in table[2:]] == ["baseline", "window_1"]
    assert text.count("started") == 4 and text.count(": done in ") == 4

    # a second invocation finds every run done: nothing is executed, nothing rewritten
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/*.json")}
    monkeypatch.setattr(ablate, "execute_run", lambda run_dir: pytest.fail(f"re-ran {run_dir}"))
    assert main(["ablate", str(spec_path), "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("skipped (done)") == 4
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/*.json")} == stamps

    # --report-only rebuilds the tables from the runs alone
    before = (out / "results.csv").read_text()
    (out / "results.csv").unlink()
    assert main(["ablate", str(spec_path), "--out", str(out), "--report-only"]) == 0
    assert (out / "results.csv").read_text() == before

    # a spec changed under finished runs is refused instead of mixing settings
    changed = spec_with()
    changed["base"]["train"]["steps"] = 3
    spec_path.write_text(yaml.safe_dump(changed))
    with pytest.raises(SystemExit, match="made with other train settings"):
        main(["ablate", str(spec_path), "--out", str(out)])


def test_jobs_run_concurrently(tmp_path, monkeypatch):
    spec = parse_spec(spec_with(seeds=[0, 1, 2]))
    lock, active, peak = threading.Lock(), [0], [0]

    def fake_launch(run, jobs):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.2)
        with lock:
            active[0] -= 1
        ablate.write_json(run.dir / "metrics.json", {"fake": True})
        return True, "ok"

    monkeypatch.setattr(ablate, "_launch", fake_launch)
    lines = []
    assert run_all(plan(spec, tmp_path), jobs=2, echo=lines.append) == []
    assert peak[0] == 2 and len(list(tmp_path.glob("runs/*/*/metrics.json"))) == 6
    assert sum(": done in " in line for line in lines) == 6


def test_a_run_in_a_subprocess(tmp_path):
    spec = parse_spec(spec_with(seeds=[3], variants={"baseline": {}}))
    runs = plan(spec, tmp_path)
    lines = []
    assert run_all(runs, jobs=2, echo=lines.append) == []
    record = json.loads((runs[0].dir / "metrics.json").read_text())
    assert record["seed"] == 3 and record["metrics"]["clips"] == 1 and math.isfinite(record["final_loss"])
    assert record["summary"] in (runs[0].dir / "log.txt").read_text()  # the worker's own output


def test_a_failing_run_is_reported_and_fails_the_command(tmp_path, capsys):
    # the trainer refuses the toy tower for MOSS-VL (SystemExit): that run fails, the command says so
    spec_path = tmp_path / "bad.yaml"
    spec_path.write_text(yaml.safe_dump(spec_with(base={"preset": "moss-vl-tiny", "toy_vision": True},
                                                  seeds=[0])))
    with pytest.raises(SystemExit, match="no finished runs"):
        main(["ablate", str(spec_path), "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert out.count("FAILED") == 2 and "--toy-vision needs" in out
    assert not list((tmp_path / "out").glob("runs/*/*/metrics.json"))


def test_shipped_specs_are_valid():
    root = Path(__file__).resolve().parents[2] / "docs" / "ablation_specs"
    video = {v.name: v for v in load_spec(root / "video_preview.yaml").variants}
    assert list(video) == ["baseline", "no_gates", "no_key_rope", "window_2", "window_1"]
    assert video["no_gates"].overrides == {"cross_attention.gate": "ones"}
    assert video["window_2"].eval["cache_policy"] == {"window": {"frames": 2}}
    assert video["window_1"].eval["cache_policy"] == {"window": {"frames": 1}}
    moss = {v.name: v for v in load_spec(root / "moss_vl.yaml").variants}
    assert list(moss) == ["baseline", "no_timestamps", "rope_1d"]
    assert moss["no_timestamps"].processor["frame_timestamps"] is False
    assert all(v.preset == "moss-vl-tiny" and v.train["offline_qa_fraction"] == 0.3 for v in moss.values())
