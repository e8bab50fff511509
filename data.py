"""From files on disk to Qwen-VL inputs: rows, videos, frames, patches, prompts.

transformers' Qwen-VL video processors need torchvision and Pillow, so their few steps are written out
here: uniform frame sampling, the "smart resize" rule, normalisation, the patch layout and the prompt."""
import glob
import json
import math
import os
import re
import sys
from collections import OrderedDict
from dataclasses import dataclass

import av
import numpy as np
import torch
import torch.nn.functional as F
from transformers.utils import cached_file

from rewards import to_float

# ----------------------------------------------------------------------------- prompts
# vsGRPO's training prompts, verbatim (appended to the question).
PROMPTS = {
    "think": "Please think step by step and enclose your thinking process in <think> </think> tags and then "
             "provide the short answer with one or two words or a number in <answer> </answer>.",
    "observe": "Please observe carefully and analyze what you see that helps you to solve the question in "
               "the video and enclose it in <observe> </observe> tag, and then provide the short answer with "
               "one or two words or a number in <answer> </answer>.",
    "vanilla": "Please provide the short answer with one or two words or a number.",
}
# VSI-Bench's numeric-answer question types, scored with Mean Relative Accuracy.
NUMERIC_TYPES = {"object_counting", "object_abs_distance", "object_size_estimation", "room_size_estimation"}

# Qwen2-VL's chat format, for tokenizers saved without a chat template (some Qwen2-VL
# repositories keep it only in chat_template.json, which AutoTokenizer does not read).
QWEN2VL_CHAT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                "<|vision_start|><|video_pad|><|vision_end|>{text}<|im_end|>\n<|im_start|>assistant\n")


class DataError(ValueError):
    """A row or a video that cannot be used; the message names the file."""


# ----------------------------------------------------------------------------- rows
def read_rows(path: str) -> list[dict]:
    """Rows of a JSON list or a JSONL file; a parse error names the line of the file."""
    try:
        with open(path, encoding="utf-8-sig") as f:  # skips a byte-order mark, as Windows editors write
            text = f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start}): rows must be JSON or JSONL (convert "
                        "parquet first)") from None
    # (lines before the chunk, chunk): a JSON list is one chunk, a JSONL file one per line
    is_list = text.lstrip().startswith("[")
    lines = [(i, line) for i, line in enumerate(text.splitlines()) if line.strip()]
    chunks = [(0, text)] if is_list else lines
    rows = []
    for lines_before, chunk in chunks:
        try:
            rows.append(json.loads(chunk))
        except json.JSONDecodeError as e:
            try:  # valid JSON after all: one object over several lines, not rows
                keys = ", ".join(list(json.loads(text))[:5])
            except json.JSONDecodeError:  # valid JSON over several lines is an object or a list
                raise DataError(f"{path} line {lines_before + e.lineno}: not valid JSON ({e.msg}, column "
                                f"{e.colno})") from None
            raise DataError(f"{path}: one JSON object (keys: {keys}), not rows: give a JSON list of rows, or "
                            "one row per line (JSONL)") from None
    return rows[0] if is_list else rows


def expand_paths(patterns: list[str]) -> list[str]:
    """Paths and globs to a sorted list of files; a pattern matching nothing, or a directory, is an error."""
    for pattern in patterns:
        if not glob.glob(pattern):
            raise DataError(f"no data file matches {pattern!r}")
    paths = [path for pattern in patterns for path in sorted(glob.glob(pattern))]
    directories = [path for path in paths if os.path.isdir(path)]
    if directories:
        raise DataError(f"{directories[0]} is a directory: give its files, for example "
                        f"'{directories[0].rstrip('/')}/*.json'")
    return paths


# Each field's accepted types; bool is excluded explicitly (in Python, True is an int).
KINDS = {str: "a string", (str, int, float): "a string or a number", list: "a list of strings"}


def row_field(row: dict, names: tuple, where: str, kind=str, required: bool = True):
    """The first of `names` the row sets, checked against `kind`; a missing or mistyped field names the row"""
    for name, value in ((name, row[name]) for name in names if row.get(name) is not None):
        if isinstance(value, bool) or not isinstance(value, kind) or (kind is list and not all(
                isinstance(v, str) for v in value)):
            raise DataError(f"{where}: field {name!r} must be {KINDS[kind]}, got {type(value).__name__}" +
                            ("" if isinstance(value, (dict, list)) else f" {value!r:.40}"))
        if required and isinstance(value, str) and not value.strip():
            raise DataError(f"{where}: field {name!r} is empty")
        # Tokenized, it would be the token: a second video placeholder, or the end of the user's turn.
        special = re.search(r"<\|\w+\|>", " ".join(value) if kind is list else str(value))
        if special:
            raise DataError(f"{where}: field {name!r} holds {special.group()}, a special token of Qwen2-VL's "
                            "chat format")
        return value
    if required:
        raise DataError(f"{where}: missing field {names[0]!r}" + (f" (also accepted: {', '.join(names[1:])})"
                                                                  if len(names) > 1 else ""))


def normalise_row(row: dict, where: str, video_root: str, prompt_mode: str) -> dict:
    """One row, in VSI-Bench's field names or the problem/solution/path style of open R1-V-like recipes, as
    sample dict the rest of the code uses."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    answer = str(row_field(row, ("ground_truth", "solution", "answer"), where, (str, int, float)))
    answer = answer.split("<answer>")[-1].split("</answer>")[0].strip()  # "solution" is often tagged
    if not answer:  # would teach the model to answer nothing
        raise DataError(f"{where}: the answer is empty: an empty completion would match it")
    video = row_field(row, ("path", "video"), where, required=False)
    if video is None:
        if row.get("scene_name") is None or row.get("dataset") is None:
            raise DataError(f"{where}: missing field 'path' (or 'video', or 'dataset' + 'scene_name')")
        # VSI-Bench's layout
        video = f"{row_field(row, ('dataset',), where)}/{row_field(row, ('scene_name',), where)}.mp4"
    question_type = row_field(row, ("question_type", "problem_type"), where, required=False) or ""
    # Numeric iff VSI-Bench scores the type with MRA; an untyped row is numeric if its answer is a number.
    number = to_float(answer)
    numeric = question_type in NUMERIC_TYPES or (not question_type and number is not None)
    if numeric and number is None:
        raise DataError(f"{where}: answer {answer!r} of numeric question type {question_type!r} is not a "
                        "number")
    # The id as given (a number stays a number), or the row's place.
    identifier = where if row.get("id") is None else row_field(row, ("id",), where, (str, int, float))
    options = row_field(row, ("options",), where, list, required=False) or []
    return {"id": identifier, "question": row_field(row, ("question", "problem"), where), "answer": answer,
            "question_type": question_type, "kind": "numeric" if numeric else "word", "options": options,
            "video": os.path.join(video_root, video), "prompt_mode": prompt_mode, "source": where}


def load_samples(patterns: list[str], video_root: str, prompt_mode: str,
                 errors: list | None = None) -> list[dict]:
    """Every row of every file, normalised. A bad row raises an error naming file, row and field,
    or, when `errors` is a list, is appended to it and left out."""
    samples = []
    for path in expand_paths(patterns):
        for i, row in enumerate(read_rows(path), start=1):
            try:
                samples.append(normalise_row(row, f"{path} row {i}", video_root, prompt_mode))
            except DataError as e:
                if errors is None:
                    raise
                errors.append(str(e))
    if not samples and not errors:
        raise DataError(f"no rows in {patterns}")
    return samples


def missing_videos(rows: list[dict], flag: str = "", root: str = "") -> dict[str, str]:
    """{video: its first row, and the problem} of the videos not on disk. Given the root's `flag`, none there
    at all is a wrong root, named as such."""
    missing = {r["video"]: f"{r['source']}: video not found: {r['video']}"
               for r in reversed(rows) if not os.path.isfile(r["video"])}
    videos = {r["video"] for r in rows}
    if flag and len(missing) == len(videos):
        raise DataError(f"{flag} {root}: none of the {len(videos)} videos the rows name is there (for "
                        f"example {rows[0]['video']})")
    return missing


# ----------------------------------------------------------------------------- the checkpoint's video format
@dataclass(frozen=True)
class VideoFormat:
    """How a checkpoint's vision tower takes video: where the Qwen-VL generations differ, as data."""
    family: str                        # config.json's model_type: qwen2_vl, qwen2_5_vl or qwen3_vl
    patch: int = 14                    # pixels per side of a patch
    temporal_patch: int = 2            # frames per patch: the tower embeds frames in pairs
    merge: int = 2                     # a merge x merge block of patches becomes one token
    mean: tuple = (0.48145466, 0.4578275, 0.40821073)  # CLIP's normalisation, as Qwen2-VL publishes it
    std: tuple = (0.26862954, 0.26130258, 0.27577711)


# Each family's published preprocessing (transformers' processors for it), for what a checkpoint leaves out.
FAMILIES = {"qwen2_vl": VideoFormat("qwen2_vl"), "qwen2_5_vl": VideoFormat("qwen2_5_vl"),
            "qwen3_vl": VideoFormat("qwen3_vl", patch=16, mean=(0.5,) * 3, std=(0.5,) * 3)}
SUPPORTED = "qwen2_vl (Qwen2-VL), qwen2_5_vl (Qwen2.5-VL) and qwen3_vl (Qwen3-VL)"


def checkpoint_json(model: str, name: str, required: bool = False) -> dict:
    """A JSON file of checkpoint `model` (a directory or a hub name); {} if it has none. Only a required one
    raises OSError when the hub cannot give it (not found, or no network)."""
    path = cached_file(model, name, _raise_exceptions_for_missing_entries=required)
    if path is None:
        return {}
    with open(path) as f:
        return json.load(f)


def video_format(model: str) -> VideoFormat:
    """The family of checkpoint `model` and its video format, read before any weights load: sizes from
    config.json (the model's own), mean and std from the processor config the checkpoint ships."""
    try:
        config = checkpoint_json(model, "config.json", required=True)
    except OSError as e:  # no checkpoint at that path, or no hub to give it
        raise DataError(f"--model {model}: {str(e).splitlines()[0]}") from None
    if not config:
        raise DataError(f"--model {model}: no config.json in {model}: not a checkpoint")
    family = config.get("model_type")
    if family in ("qwen3_5", "qwen3_5_moe"):
        raise DataError(f"--model {model} is a Qwen3.5 ({family}): three of every four of its text layers "
                        "are recurrent (Gated DeltaNet), so completions packed behind one prompt would see "
                        f"each other. vsGRPO trains {SUPPORTED}")
    if family not in FAMILIES:
        raise DataError(f"--model {model}: model_type {family!r} is not one vsGRPO trains: {SUPPORTED}")
    settings = {}
    for name in ("processor_config.json", "video_preprocessor_config.json", "preprocessor_config.json"):
        found = checkpoint_json(model, name)
        settings = found.get("video_processor", found)  # processor_config.json nests it
        if "image_mean" in settings:
            break
    vision = config.get("vision_config", {})
    published = FAMILIES[family]
    return VideoFormat(family, vision.get("patch_size", published.patch),
                       vision.get("temporal_patch_size", published.temporal_patch),
                       vision.get("spatial_merge_size", published.merge),
                       tuple(settings.get("image_mean", published.mean)),
                       tuple(settings.get("image_std", published.std)))


# ----------------------------------------------------------------------------- video
def exists(path: str) -> None:
    if not os.path.isfile(path):
        raise DataError(f"video not found: {path}")


def read_frames(path: str, num_frames: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Decode `num_frames` frames spread uniformly in time over the whole video: (frames [T, H, W, 3] uint8,
    their times [T] in seconds from the first frame, the video's length in seconds). By time, not frame
    number, so variable-frame-rate video is sampled evenly too; a short video repeats frames."""
    exists(path)
    try:
        with av.open(path) as container:
            # Demuxing reads every frame's timestamp without decoding; then decode once, keeping the chosen.
            times = np.array(sorted(p.pts for p in container.demux(video=0) if p.pts is not None))
            instants = np.linspace(times[0], times[-1], num_frames) if len(times) else []
            wanted = [int(times[np.abs(times - t).argmin()]) for t in instants]  # the nearest frame to each
            container.seek(0)
            decoded = {f.pts: f.to_ndarray(format="rgb24") for f in container.decode(video=0)
                       if f.pts in wanted}
            seconds = float(container.streams.video[0].time_base)
    except (av.FFmpegError, IndexError, ValueError) as e:
        raise DataError(f"cannot decode video {path}: {e}") from None
    lost = set(wanted) - set(decoded)
    if not wanted or lost:
        why = f"{len(lost)} of the {len(set(wanted))} frames chosen did not decode" if wanted else "no frames"
        raise DataError(f"cannot decode video {path}: {why} (truncated or damaged file?)")
    # A video of n frames lasts n frame intervals: the span from its first frame to its last, and one more.
    length = (times[-1] - times[0]) * seconds * len(times) / max(len(times) - 1, 1)
    return np.stack([decoded[t] for t in wanted]), (np.array(wanted) - times[0]) * seconds, float(length)


def smart_resize(height: int, width: int, max_pixels: int, factor: int = 28) -> tuple[int, int]:
    """Qwen2-VL's rule: sides multiples of `factor` (a merged block of patches: 28 = 2 x 14 pixels), area at
    most max_pixels and at least four blocks (Qwen2-VL's 56*56), aspect kept."""
    if max(height, width) / min(height, width) > 200:
        raise DataError(f"aspect ratio {height}x{width} is beyond Qwen2-VL's limit of 200")
    min_pixels = (2 * factor) ** 2
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        scale = math.sqrt(height * width / max_pixels)
        h, w = (max(factor, math.floor(side / scale / factor) * factor) for side in (height, width))
    elif h * w < min_pixels:
        scale = math.sqrt(min_pixels / (height * width))
        h, w = (math.ceil(side * scale / factor) * factor for side in (height, width))
    return h, w


def video_patches(frames: np.ndarray, max_pixels: int, fmt: VideoFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """Frames [T, H, W, 3] uint8 to (pixel_values_videos [t*h*w, 3*2*p*p], video_grid_thw [3]), p a patch."""
    video = torch.from_numpy(frames).permute(0, 3, 1, 2).float()  # [T, 3, H, W]
    height, width = smart_resize(video.shape[2], video.shape[3], max_pixels, fmt.patch * fmt.merge)
    # Bicubic with antialiasing, as the reference processors (torchvision) resize.
    video = F.interpolate(video, size=(height, width), mode="bicubic", antialias=True).clamp(0, 255)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (fmt.mean, fmt.std))
    return patchify((video / 255 - mean) / std, fmt)


def patchify(video: torch.Tensor, fmt: VideoFormat) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, 3, H, W] (H, W multiples of p*m) to ([t*h*w, 3*2*p*p], [t, h, w] in patches), p = fmt.patch and m =
    fmt.merge. t = ceil(T / 2): the tower embeds frames in pairs (an odd last frame is repeated). Each m x m
    block of patches that the merger fuses into one token is contiguous."""
    p, m, pair = fmt.patch, fmt.merge, fmt.temporal_patch
    if len(video) % pair:
        video = torch.cat([video, video[-1:].repeat(pair - len(video) % pair, 1, 1, 1)])
    t, h, w = len(video) // pair, video.shape[2] // p, video.shape[3] // p
    patches = video.reshape(t, pair, 3, h // m, m, p, w // m, m, p)
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # [t, h/m, w/m, m, m, 3, pair, p, p]
    return patches.reshape(t * h * w, 3 * pair * p * p), torch.tensor([t, h, w])


@dataclass
class Video:
    """A decoded video as a model of `format` takes it."""
    pixels: torch.Tensor       # [t*h*w, 3*2*p*p]: pixel_values_videos
    grid: torch.Tensor         # [3]: t, h, w in patches (video_grid_thw)
    patch_times: list[float]   # [t]: seconds from the start to each pair of frames (the mean of its two)
    seconds_per_patch: float   # seconds a pair of frames stands for: 2 / the sampled frames per second
    format: VideoFormat


DECODED: OrderedDict = OrderedDict()  # decoded videos, least recently used first
DECODED_BYTES = 2**30  # 1 GiB a process: ~55 videos of 16 frames of 128*28*28 pixels, ~7,000 of the demo's


def load_video(path: str, num_frames: int, max_pixels: int, fmt: VideoFormat) -> Video:
    """A video as a model of format `fmt` takes it. Decoded videos are kept (questions share scenes), under
    the file's size and time, so that a file changed on disk is read again."""
    exists(path)
    key = (path, os.path.getsize(path), os.path.getmtime(path), num_frames, max_pixels, fmt)
    if key not in DECODED:
        frames, times, length = read_frames(path, num_frames)
        pixels, grid = video_patches(frames, max_pixels, fmt)
        padded = int(grid[0]) * fmt.temporal_patch  # patchify repeats the last frame up to whole pairs
        times = np.append(times, [times[-1]] * (padded - len(times)))
        patch_times = times.reshape(-1, fmt.temporal_patch)[:, [0, -1]].mean(1).tolist()
        DECODED[key] = Video(pixels, grid, patch_times, fmt.temporal_patch * length / len(frames), fmt)
        while sum(video.pixels.nbytes for video in DECODED.values()) > DECODED_BYTES:
            DECODED.popitem(last=False)
    DECODED.move_to_end(key)
    return DECODED[key]


def load_batch(samples: list[dict], indices: list[int], args, rng: np.random.Generator,
               decoded: dict[str, bool], fmt: VideoFormat) -> tuple[list, list, list]:
    """Decode the videos of `indices` in format `fmt`: (rows, videos, failures this step). `decoded` records
    every video the run has tried, True if it decoded, so a bad one is never drawn twice: its row is replaced
    by a random one whose video decoded before (early in a run, by any not known bad). After 10 failures per
    row the batch comes back short, and the training loop stops the run, saved."""
    loaded = []
    videos = []
    failures = []
    candidates = list(indices)
    while len(loaded) < len(indices) and len(failures) < 10 * len(indices):
        pool = candidates or [i for i, s in enumerate(samples) if decoded.get(s["video"])]
        if not pool:  # early in a run, when no video has decoded yet: any not known to be bad
            pool = [i for i, s in enumerate(samples) if decoded.get(s["video"]) is not False]
        if not pool:
            break  # every video has failed
        sample = samples[candidates.pop(0) if candidates else int(rng.choice(pool))]
        if decoded.get(sample["video"]) is False:
            continue  # drawn by the data order; a row known to be good takes its place
        try:
            videos.append(load_video(sample["video"], args.num_frames, args.max_pixels, fmt))
            loaded.append(sample)
            decoded[sample["video"]] = True
        except DataError as e:
            decoded[sample["video"]] = False  # also a file damaged after it was first read
            failures.append(f"{sample['source']}: {e}")
            print(f"warning: skipped {failures[-1]}; its video is not drawn again", file=sys.stderr)
    return loaded, videos, failures


def batch_indices(step: int, rank: int, world: int, batch_size: int, num_samples: int,
                  seed: int) -> list[int]:
    """The rows process `rank` trains on at `step`: a fresh seeded shuffle of the data every epoch."""
    positions = [(step * world + rank) * batch_size + j for j in range(batch_size)]
    order = {epoch: np.random.default_rng([seed, epoch]).permutation(num_samples)
             for epoch in {p // num_samples for p in positions}}
    return [int(order[p // num_samples][p % num_samples]) for p in positions]


# ----------------------------------------------------------------------------- prompt
def question_text(sample: dict) -> str:
    """The question, its options one per line if it has any, then the mode's instruction."""
    lines = [sample["question"]] + (["Options:"] + sample["options"] if sample["options"] else [])
    return "\n".join(lines + [PROMPTS[sample["prompt_mode"]]])


VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"  # the one video of a chat template


def prompt_ids(tokenizer, text: str, video: Video, video_token_id: int) -> list[int]:
    """Token ids of the chat prompt, its video placeholder expanded to the video's t*h*w/4 tokens. Nothing is
    ever truncated: cutting through the video tokens would leave the tower's features without places."""
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": text}]}]
    chat = QWEN2VL_CHAT.format(text=text)  # a checkpoint without a template: Qwen2-VL's, written out
    if tokenizer.chat_template:
        chat = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if chat.count(VIDEO) != 1 or chat.count("<|video_pad|>") != 1:
        raise DataError(f"the chat prompt must hold exactly one video, {VIDEO}; found "
                        f"{chat.count('<|video_pad|>')} video placeholders")
    blocks = 1
    if video.format.family == "qwen3_vl":
        # Qwen3-VL: each pair of frames is a block of its own, after its time in words, "<2.3 seconds>": the
        # mean time of its two frames, one decimal (transformers' Qwen3VLProcessor).
        chat = chat.replace(VIDEO, "".join(f"<{time:.1f} seconds>{VIDEO}" for time in video.patch_times))
        blocks = len(video.patch_times)
    tokens = int(video.grid.prod()) // video.format.merge**2 // blocks  # video tokens per block
    ids = tokenizer(chat, add_special_tokens=False)["input_ids"]
    return [i for token in ids for i in ([token] * tokens if token == video_token_id else [token])]


def benchmark_prompt(sample: dict, prompt_mode: str) -> str:
    """VSI-Bench's prompt: pre-prompt, question, options one per line, post-prompt. vanilla is the benchmark's
    own protocol; think / observe swap in the training instruction (the paper's T and O columns)."""
    lines = ["These are frames of a video.", sample["question"]]
    if sample["question_type"] in NUMERIC_TYPES:
        post = "Please answer the question using a single word or phrase."
    else:
        lines += ["Options:"] + sample["options"]
        post = "Answer with the option's letter from the given choices directly."
    return "\n".join(lines + [post if prompt_mode == "vanilla" else PROMPTS[prompt_mode]])
