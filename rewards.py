"""Rewards for vsGRPO: the file to fork when you have a new reward idea.

A reward is a plain function

    def my_reward(completions: list[str], samples: list[dict]) -> list[float]

that returns one number per completion. `samples[i]` is the question completion i answers (see
data.py: "answer", "kind", "question_type", "prompt_mode", ...). Register it with @reward("name")
and pick it with `--rewards accuracy my_reward --reward-weights 1 0.5`. The total reward of a
completion is the weighted sum (vsGRPO section 3.3). Nothing here may raise on odd model output.
"""
import math
import re
import string
from typing import Callable

import numpy as np

RewardFn = Callable[[list[str], list[dict]], list[float]]
REWARDS: dict[str, RewardFn] = {}

# The paper trains its best model with the vanilla prompt and accuracy alone; the format
# reward only makes sense where the prompt asks for tags.
DEFAULT_REWARDS = {"vanilla": ["accuracy"], "think": ["accuracy", "format"],
                   "observe": ["accuracy", "format"]}


def reward(name: str):
    """Register a reward function under `name` (the name used by --rewards)."""
    def register(fn: RewardFn) -> RewardFn:
        REWARDS[name] = fn
        return fn
    return register


# ----------------------------------------------------------------------------- answers
ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def extract_answer(text: str, prompt_mode: str = "think") -> str:
    """The text of the last <answer>...</answer>; in vanilla mode the whole completion."""
    if prompt_mode == "vanilla":
        return text.strip()
    answers = ANSWER_TAG.findall(text)
    return answers[-1].strip() if answers else ""


def normalise_text(text: str) -> str:
    """Lower case, punctuation to spaces, runs of spaces to one: 'Left.' == ' left'."""
    text = text.lower().translate(str.maketrans(string.punctuation, " " * len(string.punctuation)))
    return " ".join(text.split())


def to_float(text: str) -> float | None:
    """The number `text` spells, or None. A trailing period is allowed ("3.")."""
    try:
        value = float(text.strip().rstrip("."))
    except (ValueError, OverflowError):
        return None
    return value if math.isfinite(value) else None


# VSI-Bench: np.linspace(0.50, 0.95, 10), a prediction passes threshold theta when its
# relative error |y_hat - y| / y is at most 1 - theta. Kept as the benchmark computes it so
# that boundary cases (error exactly 0.05, 0.5) fall on the same side.
MRA_THRESHOLDS = np.linspace(0.50, 0.95, 10)


def mean_relative_accuracy(pred: float, target: float) -> float:
    """VSI-Bench's Mean Relative Accuracy of one numeric prediction, in [0, 1]. A target of 0 has no
    relative error: we score an exact 0 as 1 and anything else as 0."""
    if target == 0:
        return float(pred == 0)
    relative_error = abs(pred - target) / abs(target)
    return float(np.mean(relative_error <= 1 - MRA_THRESHOLDS))


def first_word(text: str) -> str:
    """VSI-Bench's clean-up of a prediction: the text up to the first space, trailing periods stripped."""
    return text.split(" ")[0].rstrip(".").strip()


def answer_score(answer: str, sample: dict) -> float:
    """Accuracy of one extracted answer: MRA for numeric questions, exact match otherwise.

    A number is read from the answer's first word, as VSI-Bench reads it: the vanilla prompt
    allows "one or two words or a number", so "4 meters" scores as 4 here and on the benchmark,
    and "about 4" scores 0 in both. Training and scoring then reward the same answers.
    """
    if sample["kind"] == "numeric":
        pred = to_float(first_word(answer.strip()))
        return 0.0 if pred is None else mean_relative_accuracy(pred, float(sample["answer"]))
    return float(normalise_text(answer) == normalise_text(str(sample["answer"])))


# ----------------------------------------------------------------------------- rewards
@reward("accuracy")
def accuracy_reward(completions: list[str], samples: list[dict]) -> list[float]:
    """1 for a right word, MRA in [0, 1] for a number (vsGRPO's numeric reward, VSI-Bench's metric)."""
    return [answer_score(extract_answer(c, s["prompt_mode"]), s) for c, s in zip(completions, samples)]


def _tagged_block(tag: str) -> str:
    # Content may span lines (DOTALL) but may not open or close another tag, so a second
    # <answer> block or a nested <think> breaks the format.
    no_tag = r"(?:(?!</?(?:think|observe|answer)>).)*"
    return rf"<{tag}>{no_tag}</{tag}>"


FORMATS = {
    mode: re.compile(rf"\s*{_tagged_block(mode)}\s*{_tagged_block('answer')}\s*", re.DOTALL)
    for mode in ("think", "observe")
}


@reward("format")
def format_reward(completions: list[str], samples: list[dict]) -> list[float]:
    """1 if the completion is exactly <think>...</think><answer>...</answer> (or <observe>), else 0."""
    return [float(FORMATS[s["prompt_mode"]].fullmatch(c) is not None) for c, s in zip(completions, samples)]


def score_completions(completions: list[str], samples: list[dict], names: list[str],
                      weights: list[float]) -> dict[str, list[float]]:
    """Each named reward of each completion, and under "total" the weighted sum r_i that GRPO uses."""
    scores = {}
    for name in names:
        scores[name] = [float(x) for x in REWARDS[name](completions, samples)]
        if len(scores[name]) != len(completions):
            raise ValueError(f"reward {name!r} returned {len(scores[name])} values for {len(completions)} "
                             "completions")
    scores["total"] = [sum(w * scores[n][i] for n, w in zip(names, weights)) for i in range(len(completions))]
    return scores


# ----------------------------------------------------------------------------- VSI-Bench scoring
# The benchmark's tasks in the paper's column order: task -> question types (Rel. Dir. is three
# types whose scores are averaged into one).
BENCHMARK_TASKS = {
    "Count": ["object_counting"], "AbsDist": ["object_abs_distance"], "ObjSize": ["object_size_estimation"],
    "RoomSize": ["room_size_estimation"], "RelDist": ["object_rel_distance"],
    "RelDir": ["object_rel_direction_easy", "object_rel_direction_medium", "object_rel_direction_hard"],
    "Route": ["route_planning"], "Order": ["obj_appearance_order"],
}
BENCHMARK_TYPES = {t for types in BENCHMARK_TASKS.values() for t in types}


def clean_prediction(raw: str, prompt_mode: str = "vanilla") -> str:
    """VSI-Bench's clean-up of the raw output (in think / observe mode, of its <answer>)."""
    return first_word(raw if prompt_mode == "vanilla" else extract_answer(raw, prompt_mode))


def benchmark_score(prediction: str, sample: dict) -> float:
    """A cleaned prediction's score: MRA for numeric types, case-insensitive letter match otherwise."""
    if sample["kind"] == "numeric":
        return answer_score(prediction, sample)
    return float(prediction.lower() == str(sample["answer"]).lower())


def task_scores(predictions: list[dict]) -> dict[str, float]:
    """Mean score per task (Rel. Dir.: mean of its three types) and the unweighted mean of the tasks."""
    by_type: dict[str, list[float]] = {}
    for p in predictions:
        by_type.setdefault(p["question_type"], []).append(p["score"])
    scores = {task: float(np.mean([np.mean(by_type[t]) for t in types if t in by_type]))
              for task, types in BENCHMARK_TASKS.items() if any(t in by_type for t in types)}
    scores["Avg"] = float(np.mean(list(scores.values()))) if scores else 0.0
    return scores


def no_video_baseline(rows: list[dict]) -> dict[str, float]:
    """Per question type, the best score one fixed answer gets: what a model blind to the video can do."""
    best = {}
    for question_type in {r["question_type"] for r in rows}:
        typed = [r for r in rows if r["question_type"] == question_type]
        answers = {r["answer"] for r in typed}
        best[question_type] = max(np.mean([answer_score(a, r) for r in typed]) for a in answers)
    return best
