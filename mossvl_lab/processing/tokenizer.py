"""Tokenizers: family special-token tables, tiny byte-level BPE tokenizers, checkpoint I/O
(streaming decode: `incremental_decode`).

Two families of special tokens (spec moss-video-preview §5.1, moss-vl §6.1):

* Llama-3 (`mllama`, `video_preview`): `<|begin_of_text|>` ... `<|image|>`. Real ids are Llama-3's
  (128000 ...; MOSS renames reserved tokens to `<|silence|>` 128011, `<|...|>` 128012, `<|video|>` 128255).
* ChatML (`moss_vl`): `<|endoftext|>`, `<|im_start|>`, ... Real ids are Qwen's (151643 ...).

Tiny tokenizers (`build_tiny_tokenizer`) keep ordinary byte-level BPE tokens in the low ids and put the
specials in the top 16 ids of the LM vocabulary, in table order (`llama_token_layout`, `chatml_token_layout`):

    Llama-3, top = V - 16:  top+0 <|begin_of_text|>  +1 <|end_of_text|>  +2 <|finetune_right_pad_id|>
                            +3 <|start_header_id|>  +4 <|end_header_id|>  +5 <|eot_id|>  +6 <|silence|>
                            +7 <|...|>  +8 <|video|>  +9..+15 <|reserved_special_token_0..6|>
                            V (the extra embedding row past the LM head): <|image|>
    ChatML,  top = V - 16:  top+0 <|endoftext|>  +1 <|im_start|>  +2 <|im_end|>  +3 <|vision_start|>
                            +4 <|vision_end|>  +5 <|image_pad|>  +6 <|video_pad|>  +7 <|time_start|>
                            +8 <|time_end|>  +9 <|silence|>  +10 <|response|>  +11 <|...|>
                            +12..+15 <|reserved_special_token_0..3|>

The ids a `ModelConfig` fixes (`cfg.tokens`) always win over the table.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models, pre_tokenizers, trainers

if TYPE_CHECKING:
    from .incremental_decode import IncrementalDecoder

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"


class ProcessingError(ValueError):
    """Base of every named processing error (tokenizers, templates, masks, processors)."""


class MissingSpecialTokensError(ProcessingError):
    """A tokenizer lacks special tokens its family needs (or they do not encode to one id each)."""

    def __init__(self, message: str, missing: list[str]):
        super().__init__(message)
        self.missing = missing


# ----------------------------------------------------------------------------- family tables

LLAMA3_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|start_header_id|>",
                   "<|end_header_id|>", "<|eot_id|>", "<|silence|>", "<|...|>", "<|video|>", "<|image|>")
CHATML_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                   "<|image_pad|>", "<|video_pad|>", "<|time_start|>", "<|time_end|>", "<|silence|>",
                   "<|response|>", "<|...|>")
FAMILY_SPECIALS = {"mllama": LLAMA3_SPECIALS, "video_preview": LLAMA3_SPECIALS, "moss_vl": CHATML_SPECIALS}

_LLAMA_BASE = ("<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|start_header_id|>",
               "<|end_header_id|>", "<|eot_id|>", "<|image|>")
_CHATML_BASE = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|time_start|>", "<|time_end|>")
# What `load_tokenizer` insists on. MOSS-Video-Preview's collator asserts <|video|>, <|silence|> and <|...|>
# for every checkpoint; MOSS-VL's offline checkpoints need no decision tokens, its realtime loop does.
REQUIRED_SPECIALS = {
    "mllama": _LLAMA_BASE,
    "video_preview": _LLAMA_BASE + ("<|video|>", "<|silence|>", "<|...|>"),
    "moss_vl": _CHATML_BASE,
}
REALTIME_SPECIALS = {"mllama": (), "video_preview": ("<|silence|>",), "moss_vl": ("<|silence|>", "<|response|>")}

# role of each special in the family: names used in tokenizer_config.json and by the processor
_ROLES = {
    "llama3": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<|finetune_right_pad_id|>",
               "image_token": "<|image|>"},
    "chatml": {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
               "image_token": "<|image_pad|>"},
}


def family_style(family: str) -> str:
    """'llama3' for mllama / video_preview, 'chatml' for moss_vl."""
    if family not in FAMILY_SPECIALS:
        raise ProcessingError(f"unknown family {family!r}; expected one of {sorted(FAMILY_SPECIALS)}")
    return "chatml" if family == "moss_vl" else "llama3"


def llama_token_layout(vocab_size: int) -> dict[str, int]:
    """Special token -> id for a Llama-3 vocabulary of `vocab_size` LM ids (<|image|> sits at vocab_size)."""
    if vocab_size == 128256:  # the real Llama-3.2-Vision / MOSS-Video-Preview ids (spec §5.1)
        return {"<|begin_of_text|>": 128000, "<|end_of_text|>": 128001, "<|finetune_right_pad_id|>": 128004,
                "<|start_header_id|>": 128006, "<|end_header_id|>": 128007, "<|eom_id|>": 128008,
                "<|eot_id|>": 128009, "<|silence|>": 128011, "<|...|>": 128012, "<|video|>": 128255,
                "<|image|>": 128256}
    top = _top(vocab_size)
    layout = {name: top + i for i, name in enumerate(LLAMA3_SPECIALS[:-1])}
    layout.update({f"<|reserved_special_token_{k}|>": top + 9 + k for k in range(7)})
    layout["<|image|>"] = vocab_size
    return layout


def chatml_token_layout(vocab_size: int) -> dict[str, int]:
    """Special token -> id for a ChatML (MOSS-VL) vocabulary; <|image_pad|> is an ordinary LM id.

    For the real vocabulary (151936) the Qwen/MOSS-VL ids of spec §3.1/§6.1 are used; <|time_start|> 151669,
    <|time_end|> 151670 and <|...|> 151673 are unpublished guesses next to <|silence|> 151671 (the value a
    native port hard-codes) and <|response|> 151672 (spec §6.1); read the real tokenizer.json for facts.
    """
    if vocab_size == 151936:
        return {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645, "<|vision_start|>": 151652,
                "<|vision_end|>": 151653, "<|image_pad|>": 151655, "<|video_pad|>": 151656,
                "<|time_start|>": 151669, "<|time_end|>": 151670, "<|silence|>": 151671, "<|response|>": 151672,
                "<|...|>": 151673}
    top = _top(vocab_size)
    layout = {name: top + i for i, name in enumerate(CHATML_SPECIALS)}
    layout.update({f"<|reserved_special_token_{k}|>": top + 12 + k for k in range(4)})
    return layout


def _top(vocab_size: int) -> int:
    if vocab_size < 256 + 16 + 16:
        raise ProcessingError(f"vocab_size={vocab_size} is too small for a byte-level tokenizer: it needs 256 byte "
                              f"tokens, some merges and 16 special ids at the top")
    return vocab_size - 16


def token_layout(cfg: Any) -> dict[str, int]:
    """The family layout for `cfg.text.vocab_size`, with the ids `cfg.tokens` fixes taking precedence."""
    style = family_style(cfg.family)
    vocab = cfg.text.vocab_size
    layout = llama_token_layout(vocab) if style == "llama3" else chatml_token_layout(vocab)
    t = cfg.tokens
    roles = _ROLES[style]
    fixed = {roles["bos_token"]: t.bos_token_id, roles["image_token"]: t.image_token_id,
             "<|silence|>": t.silence_token_id, "<|response|>": t.response_token_id, "<|...|>": t.ellipsis_token_id}
    if roles["pad_token"] != roles["bos_token"]:
        fixed[roles["pad_token"]] = t.pad_token_id
    fixed = {name: token_id for name, token_id in fixed.items() if token_id is not None}
    layout = {name: i for name, i in layout.items()  # a config id may take a reserved slot
              if not (name.startswith("<|reserved_special_token_") and i in fixed.values())}
    layout.update(fixed)
    by_id: dict[int, list[str]] = {}
    for name, token_id in layout.items():
        by_id.setdefault(token_id, []).append(name)
    clashes = {i: names for i, names in by_id.items() if len(names) > 1}
    if clashes:
        raise ProcessingError(f"cfg.tokens puts several special tokens on one id: {clashes}; give each its own id")
    unknown = [i for i in (*t.eos_token_ids, t.pad_token_id) if i not in by_id]
    if unknown:
        raise ProcessingError(f"cfg.tokens eos/pad id(s) {unknown} are not special tokens of the {style} layout "
                              f"{layout}")
    return layout


# ----------------------------------------------------------------------------- tiny tokenizers

_CORPUS = """\
The camera watches the kitchen. A person walks to the table, picks up a red cup and puts it down again.
In the next frame the cup is on the left side of the table, next to a small green plant and a blue book.
What is happening in the video? The man is cooking dinner; he cuts an onion, then he washes his hands.
Please describe the scene. There are two dogs playing in the park, and a child is running after a ball.
The woman opens the door and looks outside. It is raining, so she takes an umbrella before she leaves.
At 12.5 seconds a car turns right at the corner; at 14.0 seconds it stops because the light is red.
Is the screen showing a chart? Yes, the chart shows the number of visitors per day for one week.
I can see a white board with a drawing of a circuit: a battery, a resistor, a sensor and three wires.
Answer the question based on what you observe. If nothing relevant happens, stay silent and keep watching.
The video shows a street at night with bright lights, people walking, and a bus waiting at the stop.
Describe the image in detail. The photo shows a mountain lake in the morning; the water is calm and clear.
Currently, the individual components are being shown one by one on the desk, each with a short label.
We're no longer at that stage. Now the hand moves the sensor closer, and the screen displays a distance.
How many people are in the room? I count four people: two are sitting, one is standing, one is writing.
The user asks what changed. Compared with the earlier frames, the lamp is now on and the window is open.
user assistant system question answer frame frames image images video videos time seconds second minute
one two three four five six seven eight nine ten 0 1 2 3 4 5 6 7 8 9 0.0 1.0 2.0 3.0 10.0 100 2024 2025
"""


def default_corpus() -> str:
    """The built-in English text, every family system prompt and the synthetic benchmark's phrases
    (`mossvl_lab.data.synthetic.phrase_corpus`): what the tiny tokenizers learn merges from."""
    from ..data.synthetic import phrase_corpus
    from .templates import all_system_prompts  # local import: templates imports this module
    return _CORPUS + "\n".join(all_system_prompts()) + "\n" + phrase_corpus()


@functools.lru_cache(maxsize=16)
def _trained_bpe(corpus: str, target: int) -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    tok = BackendTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    trainer = trainers.BpeTrainer(vocab_size=target, min_frequency=2, show_progress=False, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus.split("\n"), trainer=trainer)
    data = json.loads(tok.to_str())
    vocab = tuple(sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1]))
    merges = tuple(tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in data["model"]["merges"])
    return vocab, merges


def build_tiny_tokenizer(cfg: Any, corpus: Iterable[str] | str | None = None) -> BackendTokenizer:
    """A deterministic byte-level BPE tokenizer whose special tokens sit at `token_layout(cfg)`.

    Ordinary tokens (256 bytes + merges learned on `corpus`, default `default_corpus()`) take ids 0.. below the
    lowest special id; ids the corpus cannot fill get unreachable `<unused_{id}>` entries; free special slots get
    `<|reserved_special_token_k|>`. Every text round-trips (byte fallback through the 256 byte tokens).
    """
    layout = token_layout(cfg)
    text = default_corpus() if corpus is None else corpus if isinstance(corpus, str) else "\n".join(corpus)
    first_special = min(layout.values())
    trained, merges = _trained_bpe(text, first_special)
    vocab = dict(trained)
    specials = {token_id: name for name, token_id in layout.items()}
    top = max(layout.values())
    reserved = 0
    for token_id in range(len(vocab), top + 1):
        if token_id in specials:
            vocab[specials[token_id]] = token_id
        elif token_id < first_special:
            vocab[f"<unused_{token_id}>"] = token_id
        else:
            while f"<|reserved_special_token_{reserved}|>" in layout:
                reserved += 1
            name = f"<|reserved_special_token_{reserved}|>"
            reserved += 1
            vocab[name] = token_id
            specials[token_id] = name
    added = [{"id": i, "content": specials[i], "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for i in sorted(specials)]
    data = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        # digits split one by one (as Qwen's tokenizer does): "12.0" in a question and in a frame's time text are
        # the same tokens, never " 12" here and "12" there
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": [list(m) for m in merges]},
    }
    return BackendTokenizer.from_str(json.dumps(data, ensure_ascii=False))


# ----------------------------------------------------------------------------- the wrapper and its files

class Tokenizer:
    """A `tokenizers.Tokenizer` (`backend`) plus the family's special-token ids and tokenizer_config.json."""

    def __init__(self, backend: BackendTokenizer, family: str, config: dict[str, Any] | None = None):
        self.backend = backend
        self.family = family
        self.style = family_style(family)
        roles = dict(_ROLES[self.style])
        self.config = dict(config or {})
        for role in ("bos_token", "eos_token", "pad_token"):
            value = self.config.get(role)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                roles[role] = value
        self.roles = roles
        self.special_ids = {name: backend.token_to_id(name) for name in FAMILY_SPECIALS[family]
                            if backend.token_to_id(name) is not None}
        self._added = {i: tok for i, tok in backend.get_added_tokens_decoder().items()}

    bos_token_id = property(lambda self: self.backend.token_to_id(self.roles["bos_token"]))
    eos_token_id = property(lambda self: self.backend.token_to_id(self.roles["eos_token"]))  # end of a chat turn
    pad_token_id = property(lambda self: self.backend.token_to_id(self.roles["pad_token"]))
    image_token_id = property(lambda self: self.backend.token_to_id(self.roles["image_token"]))  # one per frame

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(int(token_id))

    def is_special(self, token_id: int) -> bool:
        tok = self._added.get(int(token_id))
        return bool(tok is not None and tok.special)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.style == "llama3" and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids  # what HF's Llama-3 tokenizer does; ChatML adds nothing
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def require(self, names: Iterable[str], where: str = "this tokenizer") -> None:
        """Raise MissingSpecialTokensError naming every token of `names` that is absent or not a single id."""
        problems, missing = [], []
        for name in names:
            token_id = self.backend.token_to_id(name)
            if token_id is None:
                problems.append(f"{name} (absent)")
            elif self.backend.encode(name, add_special_tokens=False).ids != [token_id]:
                problems.append(f"{name} (id {token_id} exists but the text encodes to "
                                f"{self.backend.encode(name, add_special_tokens=False).ids})")
            else:
                continue
            missing.append(name)
        if missing:
            raise MissingSpecialTokensError(
                f"{where} lacks special token(s) the {self.family!r} family needs: {', '.join(problems)}. Fix: modify "
                f"tokenizer.json and tokenizer_config.json so each is an added token with \"special\": true mapping "
                f"to one id (MOSS-Video-Preview renames Llama-3 reserved tokens: <|silence|> 128011, <|...|> 128012, "
                f"<|video|> 128255; a tiny checkpoint can use build_tiny_tokenizer(cfg)).", missing)

    def incremental_decoder(self, skip_special_tokens: bool = False) -> "IncrementalDecoder":
        from .incremental_decode import IncrementalDecoder
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)


def load_tokenizer(path: str | os.PathLike, family: str, *, realtime: bool = False) -> Tokenizer:
    """Read tokenizer.json (+ tokenizer_config.json) from a checkpoint dir and check the family's specials."""
    root = Path(path)
    file = root / TOKENIZER_FILE if root.is_dir() else root
    if not file.is_file():
        raise FileNotFoundError(f"no {TOKENIZER_FILE} at {str(root)!r}; save one with save_tokenizer(tok, path)")
    config_file = file.parent / TOKENIZER_CONFIG_FILE
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    tok = Tokenizer(BackendTokenizer.from_file(str(file)), family, config)
    need = list(REQUIRED_SPECIALS[family]) + [n for n in REALTIME_SPECIALS[family] if realtime]
    tok.require(dict.fromkeys(need), where=f"the tokenizer at {str(file)!r}")
    return tok


def save_tokenizer(tok: Tokenizer | BackendTokenizer, path: str | os.PathLike, family: str | None = None) -> None:
    """Write tokenizer.json and an HF-style tokenizer_config.json (PreTrainedTokenizerFast can load both)."""
    if isinstance(tok, BackendTokenizer):
        if family is None:
            raise ProcessingError("save_tokenizer needs family= when given a bare tokenizers.Tokenizer")
        tok = Tokenizer(tok, family)
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    tok.backend.save(str(root / TOKENIZER_FILE))
    added = {str(i): {"content": t.content, "lstrip": t.lstrip, "rstrip": t.rstrip, "normalized": t.normalized,
                      "single_word": t.single_word, "special": t.special}
             for i, t in sorted(tok.backend.get_added_tokens_decoder().items())}
    config = {k: v for k, v in tok.config.items() if k not in {"added_tokens_decoder", "mossvl_lab"}}
    config.update({"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                   "bos_token": tok.roles["bos_token"], "eos_token": tok.roles["eos_token"],
                   "pad_token": tok.roles["pad_token"], "added_tokens_decoder": added,
                   "mossvl_lab": {"family": tok.family, "special_ids": tok.special_ids}})
    (root / TOKENIZER_CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def as_id_list(ids: Any) -> list[int] | list[list[int]]:
    """A tensor / array / nested sequence of ids as plain Python ints (1-D -> list, 2-D -> list of lists)."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, Sequence) and ids and isinstance(ids[0], Sequence):
        return [[int(i) for i in row] for row in ids]
    return [int(i) for i in ids]
