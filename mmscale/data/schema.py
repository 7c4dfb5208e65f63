"""The sample schema every data source converts to.

One WebDataset sample is a group of tar members sharing a key:

    <key>.json       UTF-8 JSON, see below
    <key>.img0.png   image bytes (PNG or JPEG; extension tells which), one member per image

and the JSON is

    {
      "id": "demo-scene-00000042",          # unique within the corpus, used in logs
      "source": "demo/scene",               # corpus/subset name, used for mixtures and stats
      "images": ["img0.png"],               # member names, in the order of the <image> placeholders
      "messages": [                         # chat turns, Hugging Face role/content style
        {"role": "user", "content": "<image>\\nHow many cats are there?"},
        {"role": "assistant", "content": "3"}
      ],
      "meta": {...}                         # optional, free-form (question types, boxes, ...)
    }

Rules: roles are "system", "user" or "assistant"; the number of IMAGE_PLACEHOLDER
occurrences over all messages equals len(images) (zero for text-only samples); loss is
taken on assistant turns only.
"""

from __future__ import annotations

from mmscale.errors import UserError

IMAGE_PLACEHOLDER = "<image>"
# Member mtime of every shard the project writes, so a shard's bytes (and sha256) depend only
# on its content; 2024-01-01, since 0 makes GNU tar warn about old dates.
TAR_MTIME = 1704067200
ROLES = ("system", "user", "assistant")


# Why a sample (or a whole shard) can be skipped; each is counted separately.
SKIP_REASONS = (
    "unreadable_shard",  # not a tar file, or unreadable from its first byte
    "truncated_shard",  # a tar that ends in the middle of a member
    "non_utf8",  # the JSON member is not UTF-8
    "bad_json",  # not JSON
    "schema",  # missing or wrong-typed fields, no assistant turn
    "placeholder_mismatch",  # <image> placeholders != listed images
    "missing_image",  # an image listed in the JSON is not in the tar
    "bad_image",  # image bytes that do not decode
    "too_long",  # longer than data.max_seq_len with its image tokens
)


class SampleError(UserError, ValueError):
    """A sample that violates the schema; the message names the sample, `reason` says why."""

    def __init__(self, message: str, reason: str = "schema"):
        super().__init__(message)
        assert reason in SKIP_REASONS, reason
        self.reason = reason


def validate_sample(meta: dict, where: str) -> None:
    """Raise SampleError naming `where` (shard and key) if `meta` breaks the schema."""
    if not isinstance(meta, dict):
        raise SampleError(f"{where}: the sample JSON must be an object, got {type(meta).__name__}")
    for field in ("id", "images", "messages"):
        if field not in meta:
            raise SampleError(f"{where}: missing field '{field}' in the sample JSON")
    if not isinstance(meta["images"], list) or not all(isinstance(name, str) for name in meta["images"]):
        raise SampleError(f"{where}: 'images' must be a list of member names")
    messages = meta["messages"]
    if not messages or not isinstance(messages, list):
        raise SampleError(f"{where}: 'messages' must be a non-empty list")
    placeholders = 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES or not isinstance(message.get("content"), str):
            raise SampleError(
                f"{where}: message {i} must have a role in {ROLES} and a string content, got {message!r}"
            )
        placeholders += message["content"].count(IMAGE_PLACEHOLDER)
    if not any(m["role"] == "assistant" for m in messages):
        raise SampleError(f"{where}: no assistant turn, so the sample carries no loss")
    if placeholders != len(meta["images"]):
        raise SampleError(
            f"{where}: {placeholders} '{IMAGE_PLACEHOLDER}' placeholders but {len(meta['images'])} images",
            "placeholder_mismatch",
        )
