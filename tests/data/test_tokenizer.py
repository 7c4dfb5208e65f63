import copy

import pytest

from mmscale.data.schema import SampleError
from mmscale.data.tokenizer import IGNORE_INDEX, encode_conversation, load_tokenizer, train_tokenizer
from mmscale.errors import UserError

CONVERSATION = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "<image>\nHow many cats are there?"},
    {"role": "assistant", "content": "3"},
    {"role": "user", "content": "Is the cat left of the dog?"},
    {"role": "assistant", "content": "Yes"},
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    texts = [m["content"] for m in CONVERSATION] * 50 + ["a red apple", "a hamburger"] * 50
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer(texts, out, vocab_size=400)
    return load_tokenizer(out)


def test_tokenizer_folder_has_image_token_and_chat_template(tokenizer):
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    assert tokenizer.encode("<image>", add_special_tokens=False) == [image_id]
    prompt = tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|assistant|>\n")
    assert tokenizer.decode(tokenizer.encode("a hamburger", add_special_tokens=False)) == "a hamburger"


def test_only_assistant_turns_carry_loss(tokenizer):
    ids, labels, kept = encode_conversation(tokenizer, CONVERSATION, image_token_count=4, max_len=200, where="t")
    assert kept == 1
    assert len(ids) == len(labels)
    labelled = [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert all(label in (IGNORE_INDEX, i) for i, label in zip(ids, labels))
    # Exactly the two answers, each followed by its end-of-turn token (and the newline after it).
    assert tokenizer.decode(labelled) == "3<|end|>\nYes<|end|>\n"
    for masked in ("Answer briefly.", "How many cats", "Is the cat left", "<|assistant|>"):
        unlabelled = tokenizer.decode([i for i, label in zip(ids, labels) if label == IGNORE_INDEX])
        assert masked in unlabelled


def test_image_placeholder_expands_to_image_token_count(tokenizer):
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    ids, labels, _ = encode_conversation(tokenizer, CONVERSATION, image_token_count=7, max_len=200, where="t")
    positions = [p for p, i in enumerate(ids) if i == image_id]
    assert len(positions) == 7
    assert positions == list(range(positions[0], positions[0] + 7))  # one contiguous run
    assert all(labels[p] == IGNORE_INDEX for p in positions)
    two = [dict(CONVERSATION[1], content="<image><image>\nCompare.")] + CONVERSATION[2:3]
    ids, _, _ = encode_conversation(tokenizer, two, image_token_count=5, max_len=200, where="t")
    assert ids.count(image_id) == 10


def test_too_long_sample_names_the_sample_and_the_key(tokenizer):
    with pytest.raises(SampleError, match=r"shard-7 key-3: .* exceed data.max_seq_len=20") as err:
        encode_conversation(tokenizer, CONVERSATION, image_token_count=16, max_len=20, where="shard-7 key-3")
    assert err.value.reason == "too_long"


@pytest.mark.parametrize("image_tokens", [3, 6])
def test_truncation_cuts_before_an_image_it_would_split(tokenizer, image_tokens):
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    two_turns = [
        {"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hi"},
        {"role": "user", "content": "<image><image>\nCompare."}, {"role": "assistant", "content": "Same"},
    ]
    full, full_labels, kept = encode_conversation(tokenizer, two_turns, image_tokens, 10_000, "t")
    first_image = full.index(image_id)
    assert kept == 2
    for cut in range(first_image + 1, first_image + 2 * image_tokens + 1):
        ids, labels, kept = encode_conversation(tokenizer, two_turns, image_tokens, cut, "t", truncate=True)
        whole_images = (cut - first_image) // image_tokens
        assert kept == whole_images and ids.count(image_id) == kept * image_tokens
        assert ids == full[: first_image + kept * image_tokens] and labels == full_labels[: len(ids)]
    # Cut so early that no assistant token is left: still too long.
    with pytest.raises(SampleError, match="no labelled token is left"):
        encode_conversation(tokenizer, two_turns, image_tokens, 4, "t", truncate=True)


def test_tokenizer_without_pad_token_pads_with_eos(tmp_path, tokenizer):
    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    no_pad.save_pretrained(tmp_path / "no-pad")
    loaded = load_tokenizer(tmp_path / "no-pad")
    assert loaded.pad_token_id == loaded.eos_token_id == tokenizer.convert_tokens_to_ids("<|end|>")


def test_missing_or_unfit_tokenizer_folder(tmp_path, tokenizer):
    with pytest.raises(UserError, match="no tokenizer_config.json"):
        load_tokenizer(tmp_path / "missing")
    no_template = copy.deepcopy(tokenizer)
    no_template.chat_template = None
    no_template.save_pretrained(tmp_path / "no-template")
    with pytest.raises(UserError, match="no chat_template"):
        load_tokenizer(tmp_path / "no-template")


def _labelled_text(tok, messages):
    ids, labels, _ = encode_conversation(tok, messages, image_token_count=2, max_len=500, where="t")
    return tok.decode([i for i, label in zip(ids, labels) if label != IGNORE_INDEX]), tok.decode(ids)


def test_plain_template_keeps_only_images_and_answers(tokenizer, tmp_path):
    path = tmp_path / "tok"
    tokenizer.save_pretrained(path)
    plain = load_tokenizer(path, "plain")
    labelled, text = _labelled_text(plain, CONVERSATION)
    assert text == "<|bos|><image><image>3<|end|>Yes<|end|>"
    assert labelled == "3<|end|>Yes<|end|>"


def test_llama3_template_needs_its_tokens_and_masks_headers(tokenizer, tmp_path):
    with pytest.raises(UserError, match=r"needs the special tokens \['<\|start_header_id\|>'"):
        tokenizer.save_pretrained(tmp_path / "plain-vocab")
        load_tokenizer(tmp_path / "plain-vocab", "llama3")
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    tok.save_pretrained(tmp_path / "llama3-vocab")
    llama3 = load_tokenizer(tmp_path / "llama3-vocab", "llama3")
    labelled, text = _labelled_text(llama3, CONVERSATION[1:3])
    assert text.startswith("<|bos|><|start_header_id|>user<|end_header_id|>\n\n<image><image>\nHow many")
    assert labelled == "3<|eot_id|>"


def test_a_vocabulary_with_another_image_token_takes_the_placeholders(tokenizer, tmp_path):
    """Llama 3.2 Vision's tokenizer calls its image token <|image|>; samples still say <image>."""
    with pytest.raises(UserError, match=r"has no '<\|image\|>' token; set data.image_token"):
        tokenizer.save_pretrained(tmp_path / "plain-vocab")
        load_tokenizer(tmp_path / "plain-vocab", image_token="<|image|>")
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<|image|>"]})
    tok.save_pretrained(tmp_path / "mllama-vocab")
    for template in (None, "plain"):
        mllama = load_tokenizer(tmp_path / "mllama-vocab", template, image_token="<|image|>")
        ids, labels, kept = encode_conversation(mllama, CONVERSATION, image_token_count=1, max_len=200, where="t")
        assert kept == 1 and ids.count(mllama.convert_tokens_to_ids("<|image|>")) == 1
        assert mllama.convert_tokens_to_ids("<image>") not in ids
        labelled, _ = _labelled_text(mllama, CONVERSATION)
        assert labelled.startswith("3<|end|>")


def _as_parts(messages: list[dict]) -> list[dict]:
    """transformers' list-of-parts form of string-content messages: an image part for each leading
    "<image>\\n", then the text."""
    out = []
    for message in messages:
        text, parts = message["content"], []
        while text.startswith("<image>\n"):
            parts.append({"type": "image"})
            text = text.removeprefix("<image>\n")
        out.append({"role": message["role"], "content": [*parts, {"type": "text", "text": text}]})
    return out


@pytest.mark.parametrize("template", [None, "plain", "llama3"])
def test_templates_render_list_of_parts_content_as_the_string_form(tokenizer, tmp_path, template):
    """Processors' apply_chat_template passes content as parts ({"type": "image"}, {"type": "text"}):
    every template mmscale writes renders them as the samples' string form, "<image>\\nquestion",
    so a prompt built from parts is the one training saw."""
    tok = copy.deepcopy(tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    tok.save_pretrained(tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok", template)
    for messages in (CONVERSATION, CONVERSATION[1:2]):
        for prompt in (False, True):
            kwargs = {"tokenize": False, "add_generation_prompt": prompt, "image_token": "<image>"}
            assert tok.apply_chat_template(_as_parts(messages), **kwargs) == tok.apply_chat_template(messages, **kwargs)
