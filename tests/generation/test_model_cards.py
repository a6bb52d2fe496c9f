"""The model cards' code runs unchanged on tiny checkpoints, except the two loading lines.

The public cards' text is not available here, so their code blocks are reconstructed from the specs as a user would
write them (moss-video-preview §6.2: queue worker with a video and with an image; moss-vl §8.2: batched multi-turn
with session_states and a follow-up). Call shapes are kept exact: query dict keys, the queue protocol (pieces until
"<|round_end|>", then {"stop_offline_generate": True}) and the return structure. Values that only cost time on CPU
(max_new_tokens) are small. The only edits: the `AutoProcessor.from_pretrained` / `AutoModelForCausalLM
.from_pretrained` statements become `processor = ml.load_processor(path)` / `model = ml.load_model(path)`.
"""

from __future__ import annotations

import re
import textwrap
import threading

import numpy as np
import pytest
import torch
from PIL import Image

import mossvl_lab as ml
from mossvl_lab.generation.offline import offline_batch_generate
from mossvl_lab.processing.video import write_video

VIDEO_PREVIEW_VIDEO_CARD = '''
import queue
import threading

import torch
from transformers import AutoModelForCausalLM, AutoProcessor

model_path = "fnlp-vision/moss-video-preview-realtime-sft"
video_path = "data/example_video.mp4"

processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=True, frame_extract_num_threads=1)
model = AutoModelForCausalLM.from_pretrained(
    model_path,
    trust_remote_code=True,
    torch_dtype=torch.bfloat16,
    device_map="auto",
    attn_implementation="flash_attention_2",
)

new_queries = queue.Queue()
output_text_queue = queue.Queue()

generation_thread = threading.Thread(
    target=model.offline_generate,
    args=(processor, new_queries, output_text_queue),
    kwargs={"vision_chunked_length": 64},
)
generation_thread.start()

prompt = "Describe this video in detail."
query = {
    "prompt": "\\n" + prompt,
    "videos": [video_path],
    "media_kwargs": {"video_fps": 1.0, "video_minlen": 8, "video_maxlen": 256},
    "thinking_mode": "no_thinking",
    "system_prompt_type": "video",
    "generate_kwargs": {
        "temperature": 1.0,
        "top_k": 50,
        "top_p": 1.0,
        "max_new_tokens": 12,
        "repetition_penalty": 1.05,
    },
}
new_queries.put(query)

while True:
    text = output_text_queue.get()
    if text == "<|round_end|>":
        break
    print(text, end="", flush=True)
print()

new_queries.put({"stop_offline_generate": True})
generation_thread.join()
'''

VIDEO_PREVIEW_IMAGE_CARD = '''
import queue
import threading

import torch
from PIL import Image
from transformers import AutoModelForCausalLM, AutoProcessor

model_path = "fnlp-vision/moss-video-preview-realtime-sft"

processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=True, frame_extract_num_threads=1)
model = AutoModelForCausalLM.from_pretrained(
    model_path,
    trust_remote_code=True,
    torch_dtype=torch.bfloat16,
    device_map="auto",
    attn_implementation="flash_attention_2",
)

new_queries = queue.Queue()
output_text_queue = queue.Queue()
generation_thread = threading.Thread(target=model.offline_generate, args=(processor, new_queries, output_text_queue))
generation_thread.start()

image = Image.open("data/example_image.jpg").convert("RGB")
query = {
    "prompt": "\\n" + "What is in this image?",
    "images": [image],
    "thinking_mode": "no_thinking",
    "system_prompt_type": "text_image",
    "generate_kwargs": {"temperature": 1.0, "top_k": 50, "top_p": 1.0, "max_new_tokens": 12,
                        "repetition_penalty": 1.05},
}
new_queries.put(query)

while True:
    text = output_text_queue.get()
    if text == "<|round_end|>":
        break
    print(text, end="", flush=True)
print()

new_queries.put({"stop_offline_generate": True})
generation_thread.join()
'''

MOSS_VL_BATCH_CARD = '''
import torch
from transformers import AutoModelForCausalLM, AutoProcessor

checkpoint = "OpenMOSS-Team/MOSS-VL-Base-0408"
processor = AutoProcessor.from_pretrained(checkpoint, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(
    checkpoint,
    trust_remote_code=True,
    torch_dtype=torch.bfloat16,
    device_map="auto",
)

generate_kwargs = {
    "max_new_tokens": 8,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "repetition_penalty": 1.0,
    "do_sample": False,
}
media_kwargs = {"min_pixels": 4096, "max_pixels": 16777216, "video_fps": 1.0, "min_frames": 1, "max_frames": 256}

queries = [
    {
        "prompt": "Describe this image.",
        "images": ["data/example_image.jpg"],
        "media_kwargs": media_kwargs,
        "generate_kwargs": generate_kwargs,
    },
    {
        "prompt": "What happens in this video?",
        "videos": ["data/example_video.mp4"],
        "media_kwargs": media_kwargs,
        "generate_kwargs": generate_kwargs,
    },
]

with torch.no_grad():
    result = model.offline_batch_generate(processor, queries, session_states=None, vision_chunked_length=64)

for item in result["results"]:
    print(f"[{item['index']}] {item['text']}")

# multi-turn: feed the returned session states back with follow-up questions
session_states = result["session_states"]
followups = [
    {"prompt": "What colors stand out the most?", "generate_kwargs": generate_kwargs},
    {"prompt": "Write a haiku about the sea.", "generate_kwargs": generate_kwargs, "reset_session": True},
]

with torch.no_grad():
    followup_result = model.offline_batch_generate(
        processor, followups, session_states=session_states, vision_chunked_length=64
    )

for item in followup_result["results"]:
    print(f"[{item['index']}] {item['text']}")
session_states = followup_result["session_states"]
'''

_PROCESSOR_LOAD = re.compile(r"^processor = AutoProcessor\.from_pretrained\(.*?\)\n", re.M | re.S)
_MODEL_LOAD = re.compile(r"^model = AutoModelForCausalLM\.from_pretrained\(.*?\n\)\n|"
                         r"^model = AutoModelForCausalLM\.from_pretrained\(.*?\)\n", re.M | re.S)


def _with_tiny_loading(card: str) -> str:
    """Replace exactly the two loading statements, nothing else."""
    code, n_proc = _PROCESSOR_LOAD.subn("processor = ml.load_processor(path)\n", card)
    code, n_model = _MODEL_LOAD.subn("model = ml.load_model(path)\n", code)
    assert (n_proc, n_model) == (1, 1)
    return code


@pytest.fixture(scope="module")
def card_dir(tmp_path_factory):
    """Working directory of the cards: data/example_video.mp4 (4 s, 2 fps) and data/example_image.jpg."""
    root = tmp_path_factory.mktemp("card")
    frames = np.zeros((8, 48, 64, 3), np.uint8)
    for i in range(8):
        frames[i] = (30 * i, 200 - 20 * i, 120)
        frames[i, 12:36, 4 + 6 * i:20 + 6 * i] = 255
    write_video(frames, root / "data" / "example_video.mp4", fps=2.0)
    pixels = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "data" / "example_image.jpg")
    return root


def _checkpoint(tmp_path_factory, preset: str):
    cfg = ml.config.preset(preset)
    torch.manual_seed(0)
    model = ml.build_model(cfg)
    with torch.no_grad():  # non-zero gates, so the media reach the text
        for name, param in model.named_parameters():
            if name.endswith("gate"):
                param.fill_(0.7)
    path = tmp_path_factory.mktemp(preset)
    ml.save_model(model, path)
    ml.processor_for_model(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def video_preview_ckpt(tmp_path_factory):
    return _checkpoint(tmp_path_factory, "video-preview-tiny")


@pytest.fixture(scope="module")
def moss_vl_ckpt(tmp_path_factory):
    return _checkpoint(tmp_path_factory, "moss-vl-tiny")


def _run_card(card: str, path, card_dir, monkeypatch) -> dict:
    monkeypatch.chdir(card_dir)
    namespace = {"__name__": "__main__", "ml": ml, "path": str(path)}
    before = {t for t in threading.enumerate() if not t.daemon}
    exec(compile(_with_tiny_loading(textwrap.dedent(card)), "<model card>", "exec"), namespace)
    assert {t for t in threading.enumerate() if not t.daemon} == before  # the card's worker thread ended
    return namespace


def test_loading_lines_are_the_only_edit():
    for card in (VIDEO_PREVIEW_VIDEO_CARD, VIDEO_PREVIEW_IMAGE_CARD, MOSS_VL_BATCH_CARD):
        original, edited = card.strip().splitlines(), _with_tiny_loading(card).strip().splitlines()
        removed = [line for line in original if line not in edited]
        added = [line for line in edited if line not in original]
        assert added == ["processor = ml.load_processor(path)", "model = ml.load_model(path)"]
        assert all("from_pretrained" in line or line.startswith((" ", ")")) for line in removed)


@pytest.mark.parametrize("card", [VIDEO_PREVIEW_VIDEO_CARD, VIDEO_PREVIEW_IMAGE_CARD], ids=["video", "image"])
def test_video_preview_queue_card(card, video_preview_ckpt, card_dir, monkeypatch, capsys):
    ns = _run_card(card, video_preview_ckpt, card_dir, monkeypatch)
    printed = capsys.readouterr().out
    assert not ns["generation_thread"].is_alive() and ns["output_text_queue"].empty()
    # independent expectation: the same query through batched (non-streaming) generation on the same checkpoint
    expected = offline_batch_generate(ns["model"], ns["processor"], [ns["query"]])["results"][0]
    assert printed == expected["text"] + "\n"
    assert expected["text"].strip() and "[ERROR]" not in printed
    assert "specializing in video analysis" in expected["input_text"] or "text and/or images" in expected["input_text"]


def test_moss_vl_batch_card(moss_vl_ckpt, card_dir, monkeypatch, capsys):
    ns = _run_card(MOSS_VL_BATCH_CARD, moss_vl_ckpt, card_dir, monkeypatch)
    lines = capsys.readouterr().out.splitlines()
    result, followup = ns["result"], ns["followup_result"]
    for out in (result, followup):
        assert set(out) == {"results", "session_states"}
        assert [r["index"] for r in out["results"]] == [0, 1]
        assert all(set(r) == {"index", "text", "input_text", "messages"} for r in out["results"])
    assert lines[:2] == [f"[{r['index']}] {r['text']}" for r in result["results"]]
    assert lines[2:] == [f"[{r['index']}] {r['text']}" for r in followup["results"]]
    image_chat, video_chat = ns["session_states"]
    assert [m["role"] for m in image_chat] == ["user", "assistant", "user", "assistant"]
    assert image_chat[:2] == result["session_states"][0]  # the follow-up continued the first conversation
    assert [m["role"] for m in video_chat] == ["user", "assistant"]  # reset_session started over
    assert "<|image|>" in followup["results"][0]["input_text"]
    assert "<|video|>" not in followup["results"][1]["input_text"]
    assert all(r["text"] for r in result["results"] + followup["results"])
