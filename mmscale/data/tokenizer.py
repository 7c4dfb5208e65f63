"""Tokenizers: a small byte-level BPE trained offline, or any local Hugging Face folder.

`encode_conversation` turns chat messages into (input_ids, labels) with loss on the
assistant turns only, for any tokenizer whose chat template renders prefixes stably
(each conversation's rendering starts with the rendering of its first turns), which
holds for the Llama, Mistral, Qwen and Molmo templates as well as ours.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from mmscale.config.schema import Recipe
from mmscale.data.multicrop import IMAGE_MARKERS
from mmscale.data.schema import IMAGE_PLACEHOLDER, SampleError
from mmscale.errors import UserError

IGNORE_INDEX = -100  # label value that cross-entropy skips (PyTorch's default ignore_index)

BOS, END_OF_TURN, PAD = "<|bos|>", "<|end|>", "<|pad|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
SPECIAL_TOKENS = [BOS, END_OF_TURN, PAD, IMAGE_PLACEHOLDER, *ROLE_TOKENS]

# Message content is a string (the samples' form, "<image>\nquestion") or transformers' list of
# parts ({"type": "image"}, {"type": "text", "text": ...}), as processors' apply_chat_template
# takes it: an image part renders as the image token and a newline, so a prompt built from
# parts is the one training saw. `image_token` comes with the tokenizer's special tokens.
CONTENT_MACRO = (
    "{% macro content(message) %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ (image_token if image_token is defined else '<image>') + '\\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{% endmacro %}"
)

# The generation prompt ends with "<|assistant|>\n", and every turn ends with END_OF_TURN,
# which is also the EOS token, so generation stops at the end of the assistant turn.
CHAT_TEMPLATE = CONTENT_MACRO + (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + content(message) + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


# Templates a recipe can choose instead of the tokenizer's own (data.chat_template).
NAMED_TEMPLATES = {
    # LLaVA's "plain" (stage-1 alignment): the images of the user turns, then the answer and
    # EOS; the user's words and all role markers are left out.
    "plain": CONTENT_MACRO + (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{% if message['role'] == 'assistant' %}{{ content(message) + eos_token }}"
        "{% elif message['role'] == 'user' %}{{ image_token * content(message).count(image_token) }}"
        "{% endif %}"
        "{% endfor %}"
    ),
    # Llama 3's header/eot format; needs the Llama-3 special tokens in the vocabulary.
    "llama3": CONTENT_MACRO + (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + content(message) + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
}
TEMPLATE_TOKENS = {"plain": [], "llama3": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}


def train_tokenizer(texts: Iterable[str], out_dir: Path, vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` and save it as a Hugging Face tokenizer folder."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=END_OF_TURN,
        pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE_PLACEHOLDER},
        additional_special_tokens=[IMAGE_PLACEHOLDER, *ROLE_TOKENS],
    )
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(out_dir)
    return hf


def load_tokenizer(
    path: str | Path, chat_template: str | None = None, image_token: str = IMAGE_PLACEHOLDER,
    layout_tokens: tuple[str, ...] = (),
) -> PreTrainedTokenizerBase:
    """Load a local tokenizer folder and check it can serve a VLM (image token, chat template, pad).

    `chat_template` names one of NAMED_TEMPLATES to use instead of the folder's own.
    `image_token` is the vocabulary's token for an image, which the samples' `<image>`
    placeholders become (`<image>` for LLaVA's tokenizers, `<|image|>` for Llama 3.2 Vision's).
    `layout_tokens` (Molmo2's image markers) are added as special tokens where the folder lacks
    them, after its own ids: Molmo2's tokenizers have them, the demo's does not.
    """
    path = Path(path)
    if not (path / "tokenizer_config.json").is_file():
        raise UserError(
            f"tokenizer folder {path} has no tokenizer_config.json; point data.tokenizer at a local "
            f"Hugging Face tokenizer folder, or build the demo one with `mmscale shards demo --out DIR`"
        )
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tok.convert_tokens_to_ids(image_token) in (None, tok.unk_token_id):
        raise UserError(
            f"tokenizer {path} has no '{image_token}' token; set data.image_token to its image token, or add "
            f"'{image_token}' as a special token (tokenizer.add_special_tokens) and save the folder again"
        )
    tok.image_token = image_token
    missing = [t for t in layout_tokens if tok.convert_tokens_to_ids(t) in (None, tok.unk_token_id)]
    if missing:
        tok.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    if chat_template is not None:
        missing = [t for t in TEMPLATE_TOKENS[chat_template] if len(tok.encode(t, add_special_tokens=False)) != 1]
        if missing:
            raise UserError(
                f"data.chat_template={chat_template} needs the special tokens {missing}, which tokenizer "
                f"{path} lacks; use a tokenizer with that vocabulary or another template"
            )
        tok.chat_template = NAMED_TEMPLATES[chat_template]
    if not tok.chat_template:
        raise UserError(f"tokenizer {path} has no chat_template; set one in tokenizer_config.json or data.chat_template")
    if not tok.is_fast:
        raise UserError(f"tokenizer {path} is not a fast tokenizer (no tokenizer.json); label masking needs offsets")
    if tok.pad_token_id is None:
        if tok.eos_token is None:
            raise UserError(f"tokenizer {path} has neither a pad nor an eos token; add a pad token")
        tok.pad_token = tok.eos_token  # padding positions carry no loss, so any id will do
    return tok


def recipe_tokenizer(recipe: Recipe, path: str | Path | None = None) -> PreTrainedTokenizerBase:
    """`load_tokenizer` for `recipe` (data.tokenizer, or `path`), with the image layout tokens its model needs."""
    layout = IMAGE_MARKERS if recipe.model.is_molmo2 else ()
    return load_tokenizer(path or recipe.data.tokenizer, recipe.data.chat_template, recipe.data.image_token, layout)


def image_token_of(tok: PreTrainedTokenizerBase) -> str:
    """The token images take in `tok`'s vocabulary (set by `load_tokenizer`; `<image>` otherwise)."""
    return getattr(tok, "image_token", None) or IMAGE_PLACEHOLDER


def image_token_id(tok: PreTrainedTokenizerBase) -> int:
    return tok.convert_tokens_to_ids(image_token_of(tok))


def _assistant_spans(tok: PreTrainedTokenizerBase, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Render `messages` and return the text and the character spans of the assistant turns."""

    def render(msgs: list[dict], prompt: bool) -> str:
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=prompt, image_token=image_token_of(tok))

    text = render(messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(render(messages[:i], True)) if i else 0
        turn = render(messages[: i + 1], False)
        if not text.startswith(turn):
            raise UserError("the tokenizer's chat template does not render conversation prefixes stably")
        spans.append((start, len(turn)))
    return text, spans


def encode_conversation(
    tok: PreTrainedTokenizerBase,
    messages: list[dict],
    image_token_count: int | list[list[int]],
    max_len: int,
    where: str,
    truncate: bool = False,
) -> tuple[list[int], list[int], int]:
    """Token ids, labels, and how many of the images they keep, for one conversation.

    Each image placeholder is expanded to `image_token_count` copies of the image token id,
    which the model later overwrites with image embeddings (the LLaVA convention, which
    `transformers`' Llava and Mllama processors share); or, given a list, image i's
    placeholder becomes its tokens (Molmo2's layouts, whose length varies with the image).
    Labels are IGNORE_INDEX except on the assistant turns (including their end-of-turn
    token, so the model learns to stop).

    Longer than `max_len`: with `truncate`, the end is cut off, never inside an image's
    tokens (the cut moves before that image, which is then dropped); what remains must
    still carry a label. Otherwise, or if nothing labelled remains, it is a SampleError.
    """
    token = image_token_of(tok)
    if token != IMAGE_PLACEHOLDER:
        messages = [{**m, "content": m["content"].replace(IMAGE_PLACEHOLDER, token)} for m in messages]
    text, spans = _assistant_spans(tok, messages)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    image_id = tok.convert_tokens_to_ids(token)
    input_ids: list[int] = []
    labels: list[int] = []
    image_spans: list[tuple[int, int]] = []
    for token_id, (start, _) in zip(enc["input_ids"], enc["offset_mapping"]):
        if token_id == image_id:
            n = len(image_spans)
            if not isinstance(image_token_count, int) and n == len(image_token_count):
                raise SampleError(f"{where}: its text holds more image tokens ({token!r}) than it lists images",
                                  "placeholder_mismatch")
            expanded = [image_id] * image_token_count if isinstance(image_token_count, int) else image_token_count[n]
            image_spans.append((len(input_ids), len(input_ids) + len(expanded)))
            input_ids += expanded
            labels += [IGNORE_INDEX] * len(expanded)
            continue
        input_ids.append(token_id)
        labels.append(token_id if any(s <= start < e for s, e in spans) else IGNORE_INDEX)
    if len(input_ids) <= max_len:
        return input_ids, labels, len(image_spans)
    cut = max_len
    for start, end in image_spans:
        if start < cut < end:
            cut = start
    if truncate and any(label != IGNORE_INDEX for label in labels[1:cut]):
        return input_ids[:cut], labels[:cut], sum(end <= cut for _, end in image_spans)
    raise SampleError(
        f"{where}: {len(input_ids)} tokens (images expanded) exceed data.max_seq_len={max_len}"
        + (" and no labelled token is left before the cut" if truncate else "")
        + "; raise data.max_seq_len or shorten the sample",
        "too_long",
    )
