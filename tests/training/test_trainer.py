"""Batching, the silence-weighted loss, the trainer (overfit + checkpoint round trip) and the eval loop."""

from __future__ import annotations

import math

import pytest
import torch

import mossvl_lab as ml
from mossvl_lab.config import ToyConvConfig, override
from mossvl_lab.data.synthetic import make_clip
from mossvl_lab.streaming.policies import TeacherForcedPolicy
from mossvl_lab.training.batching import collate, go_on_decisions, weighted_lm_loss
from mossvl_lab.training.evaluate import evaluate, stream_clip
from mossvl_lab.training.metrics import score_clip
from mossvl_lab.training.streams import IGNORE, offline_qa_sample, realtime_sample
from mossvl_lab.training.trainer import TrainConfig, clip_seed, lr_at, make_sample, train



def toy_config():
    """video-preview-tiny with the toy conv tower and two decoder layers (cross-attention at 1)."""
    return override(ml.config.preset("video-preview-tiny"),
                    {"vision": ToyConvConfig(image_size=56), "text.num_layers": 2, "text.cross_attention_layers": [1]})


def _open_gates(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gate" in name:
                p.fill_(0.5)  # zero-init gates would hide the vision path from the check
    return model


@pytest.mark.parametrize("preset", ["video-preview-tiny", "moss-vl-tiny"])
def test_padded_batch_gives_each_sample_its_own_loss(preset):
    cfg = toy_config() if preset == "video-preview-tiny" else ml.config.preset(preset)
    size = 56 if preset == "video-preview-tiny" else 64
    model = _open_gates(ml.build_model(cfg)).eval()
    processor = ml.processor_for_model(cfg)
    clips = [make_clip(seed, size=size, min_seconds=3, max_seconds=5) for seed in (1, 2)]
    samples = [realtime_sample(c, processor, cfg) for c in clips]
    if preset == "moss-vl-tiny":  # an offline timestamp-QA sample mixed in: a video of several frames
        clip = make_clip(3, size=size, min_seconds=3, max_seconds=3)  # a seed with timestamp QA
        samples.append(offline_qa_sample(clip, clip.qa[0].question, clip.qa[0].answer, processor))
    assert len({s.input_ids.numel() for s in samples}) == len(samples)  # padding really happens

    batch = collate(samples, cfg.family, cfg.tokens.pad_token_id)
    lengths = [s.input_ids.numel() for s in samples]
    assert batch["input_ids"].shape == (len(samples), max(lengths))
    for b, n in enumerate(lengths):
        assert (batch["input_ids"][b, n:] == cfg.tokens.pad_token_id).all()
        assert (batch["labels"][b, n:] == IGNORE).all() and batch["attention_mask"][b].sum() == n
    if preset == "moss-vl-tiny":
        assert batch["media_nums_per_sample"] == [len(clips[0].frames), len(clips[1].frames), 1]
        assert batch["grid_thw"].shape[0] == sum(batch["media_nums_per_sample"])
    else:
        frames = [len(c.frames) for c in clips]
        assert batch["pixel_values"].shape[:2] == (2, max(frames))
        short = frames.index(min(frames))
        assert (batch["aspect_ratio_ids"][short, min(frames):] == 0).all()
        assert (batch["pixel_values"][short, min(frames):] == 0).all()

    labels, decisions, replies = batch.pop("labels"), batch.pop("decisions"), batch.pop("replies")
    silence = cfg.tokens.silence_token_id
    with torch.no_grad():
        together = model(**batch).logits
        for b, sample in enumerate(samples):
            alone = collate([sample], cfg.family, cfg.tokens.pad_token_id)
            alone_labels, alone_decisions = alone.pop("labels"), alone.pop("decisions")
            alone_replies = alone.pop("replies")
            want, n_want = weighted_lm_loss(model(**alone).logits, alone_labels, silence, 0.3, alone_decisions, 2.0,
                                            alone_replies, 3.0)
            got, n_got = weighted_lm_loss(together[b:b + 1], labels[b:b + 1], silence, 0.3, decisions[b:b + 1], 2.0,
                                          replies[b:b + 1], 3.0)
            assert n_got == n_want > 0
            assert float(got) == pytest.approx(float(want), rel=1e-5)


def test_weighted_loss_by_hand():
    silence = 1
    logits = torch.tensor([[[0.0, 0.0, 0.0],            # predicts position 1 (silence): -log(1/3)
                            [math.log(2.0), 0.0, 0.0],  # predicts position 2 (token 0): -log(2/4)
                            [5.0, 1.0, 2.0],            # position 3 is ignored
                            [9.0, 9.0, 9.0]]])          # the last position predicts nothing
    labels = torch.tensor([[2, silence, 0, IGNORE]])
    loss_sum, n = weighted_lm_loss(logits, labels, silence, 0.5)
    assert int(n) == 2
    assert float(loss_sum) == pytest.approx(0.5 * math.log(3) + math.log(2), abs=1e-6)
    plain, n = weighted_lm_loss(logits, labels, silence, 1.0)
    assert float(plain) == pytest.approx(math.log(3) + math.log(2), abs=1e-6)
    from mossvl_lab.model import causal_lm_loss  # weight 1 is the model's mean CE
    assert float(plain / n) == pytest.approx(float(causal_lm_loss(logits, labels)), abs=1e-6)
    decisions = torch.tensor([[False, True, False, True]])  # the silence target and the ignored one are decisions
    weighted, n = weighted_lm_loss(logits, labels, silence, 0.5, decisions, 3.0)
    assert int(n) == 2 and float(weighted) == pytest.approx(3.0 * 0.5 * math.log(3) + math.log(2), abs=1e-6)
    replies = torch.tensor([[False, True, True, False]])  # both targets are replies; the silence one also decides
    weighted, n = weighted_lm_loss(logits, labels, silence, 0.5, decisions, 3.0, replies, 4.0)
    assert float(weighted) == pytest.approx(4.0 * 3.0 * 0.5 * math.log(3) + 4.0 * math.log(2), abs=1e-6)


def test_go_on_decisions_are_the_ones_after_speech():
    silence, comma, word, frame = 1, 7, 5, 9
    # frame, silence (speak decision) | frame, word (speak decision), word, comma (go on), word, silence (go on)
    ids = [frame, silence, frame, word, word, comma, word, silence]
    labels = torch.tensor([[IGNORE, silence, IGNORE, word, word, comma, word, silence]])
    decisions = torch.tensor([[False, True, False, True, False, True, False, True]])
    assert len(ids) == labels.shape[1]
    go_on = go_on_decisions(decisions, labels, silence)
    assert go_on.tolist() == [[False, False, False, False, False, True, False, True]]
    # on a real stream: one go-on decision per ", " and one per frame with speech (the silence that ends it)
    cfg = ml.config.preset("video-preview-tiny")
    processor = ml.processor_for_model(cfg)
    clip = make_clip(3, size=56, min_seconds=12, max_seconds=12, event_rate=0.5)
    sample = realtime_sample(clip, processor, cfg)
    marked = go_on_decisions(sample.decisions[None], sample.labels[None], cfg.tokens.silence_token_id)[0]
    speech = clip.speech()
    assert "," in "".join(speech.values())
    assert int(marked.sum()) == len(speech) + sum(text.count(",") for text in speech.values())


def test_schedule_and_sample_stream():
    cfg = TrainConfig(steps=110, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55) and lr_at(110, cfg) == pytest.approx(0.1)
    seeds = [clip_seed(i, cfg) for i in range(5000)]
    assert len(set(seeds)) == 5000 and max(seeds) < 1_000_000  # disjoint, never an eval seed
    assert clip_seed(7, TrainConfig(train_seeds=(3, 4))) == 4
    with pytest.raises(ValueError, match="train_seeds"):
        TrainConfig(train_seeds=(1_000_000,))
    qa = TrainConfig(offline_qa_fraction=1.0, clip_seconds=(3, 4))
    mcfg = ml.config.preset("moss-vl-tiny")
    processor = ml.processor_for_model(mcfg)
    sample = make_sample(0, qa, processor, mcfg, 64)
    assert int(sample.vision["grid_thw"].shape[0]) == 1  # the whole clip as one video: offline QA
    again = make_sample(0, qa, processor, mcfg, 64)
    assert torch.equal(sample.input_ids, again.input_ids)  # seeded by the global sample index
    with pytest.raises(ValueError, match="event_rate"):
        TrainConfig(event_rate=1.5)
    vcfg = ml.config.preset("video-preview-tiny")
    vproc = ml.processor_for_model(vcfg)
    speech = lambda rate: sum(len(make_sample(i, TrainConfig(event_rate=rate, clip_seconds=(10, 10)), vproc, vcfg,  # noqa: E731
                                              56).labels) for i in range(4))
    # every frame gets a silence target; events add caption targets, so a denser stream is a longer sequence
    assert speech(0.0) < speech(0.9)


def test_overfit_one_clip_and_reload(tmp_path):
    cfg = toy_config()
    torch.manual_seed(0)
    model = ml.build_model(cfg)
    processor = ml.processor_for_model(cfg)
    tcfg = TrainConfig(steps=30, batch_size=1, lr=3e-3, warmup_steps=3, train_seeds=(5,), clip_seconds=(4, 6),
                       eval_clips=0, out_dir=str(tmp_path / "run"), log_every=10)
    result = train(model, processor, tcfg, progress=False)
    losses = [row["loss"] for row in result.history]
    assert len(losses) == 30 and losses[-1] < 0.5 * losses[0]
    assert (tmp_path / "run" / "train_log.json").is_file()

    loaded = ml.load_model(tmp_path / "run", progress=False)
    loaded_processor = ml.load_processor(tmp_path / "run")
    sample = make_sample(0, tcfg, loaded_processor, loaded.config, 56)
    assert torch.equal(sample.input_ids, make_sample(0, tcfg, processor, cfg, 56).input_ids)
    inputs = collate([sample], cfg.family, cfg.tokens.pad_token_id)
    inputs.pop("labels"), inputs.pop("decisions"), inputs.pop("replies")
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, loaded(**inputs).logits)


@pytest.mark.parametrize("preset", ["video-preview-tiny", "moss-vl-tiny"])
def test_stream_clip_follows_the_targets(preset):
    """Replaying the training decisions through the eval loop reproduces clip.speech(): a perfect score."""
    cfg = toy_config() if preset == "video-preview-tiny" else ml.config.preset(preset)
    model = ml.build_model(cfg).eval()
    processor = ml.processor_for_model(cfg)
    clip = make_clip(11, size=56 if preset == "video-preview-tiny" else 64, min_seconds=6, max_seconds=8)
    sample = realtime_sample(clip, processor, cfg)
    decisions = [int(t) for t, label in zip(sample.input_ids, sample.labels) if label != IGNORE]
    predicted = stream_clip(model, processor, clip, policy=TeacherForcedPolicy(decisions))
    assert predicted == clip.speech() and predicted
    m = score_clip(clip.speech(), predicted, len(clip.frames))
    assert (m.event_recall, m.caption_exact_match, m.mean_delay_frames) == (1.0, 1.0, 0.0)
    assert m.false_alarms == 0


def test_evaluate_smoke_moss_vl_with_timestamp_qa():
    cfg = ml.config.preset("moss-vl-tiny")
    model = ml.build_model(cfg)
    processor = ml.processor_for_model(cfg)
    seeds = [1_000_000]
    clip = make_clip(seeds[0], size=64, min_seconds=3, max_seconds=4)
    assert clip.qa, "pick a held-out seed whose short clip has timestamp questions"
    m = evaluate(model, processor, seeds, clip_seconds=(3, 4), qa_per_clip=1, max_tokens_per_turn=2)
    assert (m.clips, m.frames, m.targets) == (1, len(clip.frames), len(clip.speech()))
    assert m.qa_total == 1 and model.training  # the train/eval mode is restored


def test_offline_samples_ask_several_questions_of_one_kind():
    mcfg = ml.config.preset("moss-vl-tiny")
    processor = ml.processor_for_model(mcfg)
    cfg = TrainConfig(offline_qa_fraction=1.0, offline_qa_turns=3, clip_seconds=(8, 10), event_rate=0.5)
    tok = processor.tokenizer
    saw_several = False
    for index in range(6):
        sample = make_sample(index, cfg, processor, mcfg, 64)
        answers = [a for a in tok.decode([t for t in sample.labels.tolist() if t != IGNORE]).split("<|im_end|>\n") if a]
        kinds = {a.startswith("at ") for a in answers}  # "at T seconds" answers "when"; captions answer "what at"
        assert 1 <= len(answers) <= 3 and len(kinds) == 1
        saw_several |= len(answers) > 1
    assert saw_several
    with pytest.raises(ValueError, match="offline_qa_turns"):
        TrainConfig(offline_qa_turns=0)
    with pytest.raises(ValueError, match="event_kind_weights"):
        TrainConfig(event_kind_weights=(("teleport", 1.0),))


def test_question_pairs_stream_each_clip_twice_with_another_question():
    """Odd samples are the clip of the even one before them, rebuilt here with the other question."""
    from dataclasses import replace
    cfg = ml.config.preset("video-preview-tiny")
    processor = ml.processor_for_model(cfg)
    tcfg = TrainConfig(question_pairs=True, clip_seconds=(6, 8))
    for first in (0, 6):
        even, odd = (make_sample(first + k, tcfg, processor, cfg, 56) for k in (0, 1))
        clip = make_clip(clip_seed(first, tcfg), size=56, min_seconds=6, max_seconds=8, event_rate=tcfg.event_rate)
        assert torch.equal(even.input_ids, realtime_sample(clip, processor, cfg).input_ids)
        assert torch.equal(even.vision["pixel_values"], odd.vision["pixel_values"])
        asked = [s for s in ("square", "circle", "triangle")
                 if f"is the {s}?" in processor.tokenizer.decode(odd.input_ids.tolist())]
        assert len(asked) == 1 and asked[0] != clip.question.shape
        swapped = replace(clip, question=replace(clip.question, shape=asked[0]))
        assert torch.equal(odd.input_ids, realtime_sample(swapped, processor, cfg).input_ids)
        assert torch.equal(odd.labels, realtime_sample(swapped, processor, cfg).labels)
    with pytest.raises(ValueError, match="question_pairs"):
        TrainConfig(question_pairs=True, extra_questions=1)


def test_question_style_reaches_training_samples_and_the_trained_eval(tmp_path):
    """A named-style run streams replies as 'the Square is ...' (its own token) and records the style, so the
    evaluation expects the same spelling."""
    import json

    from mossvl_lab.training.evaluate import eval_clips, trained_eval_settings

    cfg = ml.config.preset("video-preview-tiny")
    processor = ml.processor_for_model(cfg)
    tcfg = TrainConfig(question_style="named", clip_seconds=(6, 8))
    sample = make_sample(0, tcfg, processor, cfg, 56)
    clip = make_clip(clip_seed(0, tcfg), size=56, min_seconds=6, max_seconds=8, event_rate=tcfg.event_rate,
                     question_style="named")
    assert torch.equal(sample.input_ids, realtime_sample(clip, processor, cfg).input_ids)
    subject = clip.question.shape.capitalize()
    assert processor.tokenizer.encode(f" {subject}", add_special_tokens=False) in \
        [[t] for t in sample.input_ids.tolist()]  # one token, and in the stream
    (tmp_path / "train_log.json").write_text(json.dumps({"train_config": {"question_style": "named",
                                                                          "offline_question_first": True}}))
    settings = trained_eval_settings(tmp_path)
    assert settings == {"question_style": "named", "offline_question_first": True}
    held_out = eval_clips([1_000_003], 56, question_style=settings["question_style"])[0]
    assert f"the {held_out.question.shape.capitalize()} is " in held_out.speech()[held_out.question.asked_at]
    with pytest.raises(ValueError, match="question_style"):
        TrainConfig(question_style="shouted")
