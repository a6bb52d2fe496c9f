"""Chat templates, system prompts and placeholder expansion against strings written from the specs."""

from __future__ import annotations

import pytest

from mossvl_lab.processing import templates as T

# ---- spec text, copied (moss-video-preview §5.3; each "\n" of the spec is a newline, \` a backquote)
SPEC_VIDEO_PREVIEW_REALTIME = (
    'You are a helpful AI assistant. You perceive and understand the surrounding environment in real-time'
    ' through the camera and interact with the user. Whether or not the user actively asks questions, you'
    ' continuously observe and analyze visual information, maintaining awareness of the environment.\n\nC'
    'ore Abilities:\n- Continuous Perception: Always observe and analyze the visual information captured '
    'by the camera in real-time. This perception does not stop even when there is no user interaction.\n-'
    ' Observation-Based Answers: All answers must be based on visual observations, including both histori'
    'cal and real-time data. Do not make guesses without evidence from visual input.\n- Dynamic Adjustmen'
    't: When you observe changes relevant to the user\'s question, promptly update and adjust your answer'
    's to ensure timeliness and accuracy.\n\nInteraction Rules:\n- Always base your answers on observed v'
    'isual information.\n- If you notice significant changes related to the user\'s question, proactively'
    ' and promptly update your answer.\n- When you are unable to answer or have finished answering, outpu'
    't `<|silence|>` directly.\n\nYour goal is to be the user\'s reliable "eyes", helping them understand'
    ' and perceive the world around them.'
)
# moss-vl §6.3 (note the em dash and the backquotes)
SPEC_MOSS_VL_REALTIME = (
    'You are a helpful AI assistant specializing in real-time video analysis. The video streams to you fr'
    'ame by frame. At every frame, you decide independently whether to respond or stay silent \u2014 output `<'
    '|silence|>` when nothing relevant has happened, and respond when the visual content warrants it.'
)
SPEC_MOSS_VL_USER = (
    'As the video streams frame by frame, respond to this question whenever the visual evidence lets you '
    'answer or updates a previous answer; otherwise stay silent.\n\nQuestion: '
)


def test_realtime_system_prompts_are_byte_exact():
    assert T.VIDEO_PREVIEW_REALTIME_SYSTEM_PROMPT.encode() == SPEC_VIDEO_PREVIEW_REALTIME.encode()
    assert T.MOSS_VL_REALTIME_SYSTEM_PROMPT.encode() == SPEC_MOSS_VL_REALTIME.encode()
    assert "output `<|silence|>` directly.\n\nYour goal" in T.VIDEO_PREVIEW_REALTIME_SYSTEM_PROMPT
    assert b"stay silent \xe2\x80\x94 output `<|silence|>` when" in T.MOSS_VL_REALTIME_SYSTEM_PROMPT.encode()
    assert T.realtime_system_prompt("video_preview") == SPEC_VIDEO_PREVIEW_REALTIME
    assert T.realtime_system_prompt("moss_vl") == SPEC_MOSS_VL_REALTIME
    assert T.moss_vl_realtime_user_prompt("Where is the cup?") == SPEC_MOSS_VL_USER + "Where is the cup?"
    assert T.moss_vl_realtime_user_prompt().endswith("\n\nQuestion: What happens in the video?")


def test_offline_system_prompts_and_aliases():
    video = ("You are a helpful AI assistant specializing in video analysis. Respond to the user's request based on "
             "the provided video content.")
    text_image = ("You are a helpful AI assistant. Respond to the user's request based on the provided text and/or "
                  "images.")
    assert T.offline_system_prompt("no_thinking", "video") == video
    assert T.offline_system_prompt("no_thinking", "text_image") == text_image
    for alias in ("default", "standard", None):
        assert T.offline_system_prompt(alias, "video") == video
    for alias in ("image", "text", "image_text", "Text/Image", "text-image"):
        assert T.offline_system_prompt("no_thinking", alias) == text_image
    assert T.offline_system_prompt(has_video=True) == video
    assert T.offline_system_prompt(has_video=False) == text_image
    for alias in ("deep_thinking", "thinking", "reasoning"):
        deep = T.offline_system_prompt(alias, "video")
        assert deep.startswith("A conversation between User and Assistant specializing in video analysis.")
        assert deep.endswith("i.e., <thinking>reasoning process here</thinking><answer>answer here</answer>.")
    assert "provided text and/or images" in T.offline_system_prompt("thinking", "image")
    with pytest.raises(T.UnknownPromptTypeError, match="reasoning"):
        T.offline_system_prompt("ponder", "video")
    with pytest.raises(T.UnknownPromptTypeError, match="text_image"):
        T.offline_system_prompt("no_thinking", "audio")


def test_llama3_template_exact():
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "\nWhy is this funny?"}]}]
    got = T.render_chat(messages, T.LLAMA3, system_prompt="SYS")
    assert got == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nSYS<|eot_id|>"
                   "<|start_header_id|>user<|end_header_id|>\n\n<|video|>\nWhy is this funny?<|eot_id|>"
                   "<|start_header_id|>assistant<|end_header_id|>\n\n")
    turns = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
             {"role": "user", "content": [{"type": "image", "image": "x.png"}, {"type": "text", "text": "And?"}]}]
    assert T.render_chat(turns, T.LLAMA3, add_generation_prompt=False) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n<|image|>And?<|eot_id|>")


def test_realtime_layout_renders_like_the_training_stream():
    # spec moss-video-preview §5.4: empty first user turn, assistant turn left open (frames keep arriving)
    msgs = [{"role": "user", "content": ""}, {"role": "assistant", "content": "<|silence|><|image|><|silence|>"}]
    got = T.render_chat(msgs, T.LLAMA3, system_prompt="S", continue_final_message=True)
    assert got == ("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
                   "<|start_header_id|>user<|end_header_id|>\n\n<|eot_id|>"
                   "<|start_header_id|>assistant<|end_header_id|>\n\n<|silence|><|image|><|silence|>")


def test_chatml_template_exact():
    messages = [{"role": "system", "content": "SYS"},
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}},
                                             {"type": "text", "text": "What is this?"}]},
                {"role": "assistant", "content": "A cat."}, {"role": "user", "content": "Sure?"}]
    assert T.render_chat(messages, T.CHATML) == (
        "<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\n<|image|>What is this?<|im_end|>\n"
        "<|im_start|>assistant\nA cat.<|im_end|>\n<|im_start|>user\nSure?<|im_end|>\n<|im_start|>assistant\n")
    # an explicit system message wins over system_prompt=
    assert T.render_chat(messages[:1], T.CHATML, system_prompt="other", add_generation_prompt=False) == \
        "<|im_start|>system\nSYS<|im_end|>\n"


def test_template_errors():
    with pytest.raises(T.TemplateError, match="role"):
        T.render_chat([{"role": "tool", "content": "x"}], T.CHATML)
    with pytest.raises(T.TemplateError, match="audio"):
        T.render_chat([{"role": "user", "content": [{"type": "audio"}]}], T.CHATML)


def test_newline_prompt_convention_and_barge_in():
    assert T.query_content("\nDescribe.", 1, 1, family="video_preview") == "<|image|><|video|>\nDescribe."
    assert T.query_content("\nDescribe.", 0, 1, family="moss_vl") == "<|video|>Describe."
    assert T.barge_in_text("video_preview", "Now?") == (
        "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nNow?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert T.barge_in_text("moss_vl", "Now?") == "<|im_end|>\n<|im_start|>user\nNow?<|im_end|>\n<|im_start|>assistant\n"
    assert T.moss_realtime_frame_text(3.0) == \
        "<|vision_start|><|time_start|>3.0 seconds<|time_end|><|image|><|vision_end|>"


def test_video_preview_expansion():
    assert T.expand_video_placeholders("<|video|>Why is this video funny?", [3]) == \
        "<|image|><|image|><|image|>Why is this video funny?"
    got = T.expand_video_placeholders("<|image|>a<|video|>b<|video|>", [2, 1])
    assert got == "<|image|>a<|image|><|image|>b<|image|>"
    with pytest.raises(T.PlaceholderCountError, match="more placeholders"):
        T.expand_video_placeholders("<|video|><|video|>", [4])
    with pytest.raises(T.PlaceholderCountError, match="fewer placeholders"):
        T.expand_video_placeholders("<|video|>", [4, 4])
    with pytest.raises(T.PlaceholderCountError, match="no frames"):
        T.expand_video_placeholders("<|video|>", [0])


def test_moss_expansion_matches_spec_example():
    # spec moss-vl §6.2 example (two frames shown)
    assert T.expand_moss_media("<|video|>", [[0.0, 1.0]]) == (
        "<|vision_start|><|time_start|>0.0 seconds<|time_end|><|image_pad|>"
        "<|time_start|>1.0 seconds<|time_end|><|image_pad|><|vision_end|>")
    got = T.expand_moss_media("<|image|>\nA<|video|>B", [None, [0.5, 2.04, 10.0]])
    assert got == ("<|image_pad|>\nA<|vision_start|><|time_start|>0.5 seconds<|time_end|><|image_pad|>"
                   "<|time_start|>2.0 seconds<|time_end|><|image_pad|>"
                   "<|time_start|>10.0 seconds<|time_end|><|image_pad|><|vision_end|>B")
    assert " \n" not in got.split("<|vision_start|>")[1] and "\n" not in got.split("<|vision_start|>")[1]


def test_moss_expansion_errors():
    with pytest.raises(T.PlaceholderCountError, match="more placeholders"):
        T.expand_moss_media("<|image|><|image|>", [None])
    with pytest.raises(T.PlaceholderCountError, match="fewer placeholders"):
        T.expand_moss_media("<|video|>", [[0.0], None])
    with pytest.raises(T.PlaceholderCountError, match="text order"):
        T.expand_moss_media("<|video|><|image|>", [None, [0.0]])
    with pytest.raises(T.TimestampOrderError, match="backwards"):
        T.expand_moss_media("<|video|>", [[0.0, 2.0, 1.0]])
    with pytest.raises(T.TimestampOrderError, match=">= 0"):
        T.expand_moss_media("<|video|>", [[-1.0]])
    with pytest.raises(T.TimestampOrderError):
        T.moss_realtime_frame_text(float("nan"))
    assert issubclass(T.PlaceholderCountError, ValueError)
