"""Turning media and text into model inputs, per family.

    video.py       decode and sample frames (torchcodec, PyAV fallback); write test clips
    image.py       load any image as RGB; Mllama tiles; MOSS-VL smart_resize + patches
    tokenizer.py   special-token tables and tokenizers
    templates.py   chat templates and per-frame placeholders
    masks.py       cross-attention visibility masks

This package imports nothing itself: import the submodule you need
(`from mossvl_lab.processing import video`), so `import mossvl_lab` never loads a decoder.
"""
