"""vsGRPO's specification as tests: offline, CPU, a tiny random Qwen2-VL written to disk
(vsgrpo.build_random_model) and loaded through from_pretrained, as a real checkpoint is.

Expected values are computed by hand or by an independent formula inside each test.
"""
import dataclasses
import fcntl
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings

import av
import numpy as np
import pytest
import torch
from transformers import AutoConfig, Qwen2VLForConditionalGeneration

import data
import rewards
import vsgrpo

HERE = os.path.dirname(os.path.abspath(__file__))
QWEN2 = data.FAMILIES["qwen2_vl"]                                  # Qwen2-VL's video format, the paper's model


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    """A small synthetic dataset and a tiny checkpoint whose vocabulary covers it."""
    root = str(tmp_path_factory.mktemp("synthetic"))
    path = vsgrpo.write_synthetic_dataset(root, 12, seed=0)
    rows = [json.loads(line) for line in open(path)]
    texts = ([r["question"] + " " + r["ground_truth"] for r in rows] + list(data.PROMPTS.values()) +
             ["system you are a helpful assistant user", "<seconds> 0 1 2 3 4 5 6 7 8 9 ."])
    models = {family: os.path.join(root, f"tiny-{family}") for family in data.FAMILIES}  # one of each family
    for family, model_dir in models.items():
        vsgrpo.build_random_model(model_dir, texts, family=family)
    return {"root": root, "data": path, "videos": os.path.join(root, "videos"), "model": models["qwen2_vl"],
            "models": models, "rows": rows}


def family_flags(synthetic, family: str) -> list[str]:
    """The tiny model of `family`, its frames four tokens (56x56 pixels; Qwen3-VL's patches make it 64x64)."""
    fmt = data.FAMILIES[family]
    return ["--model", synthetic["models"][family], "--max-pixels", str((2 * fmt.patch * fmt.merge) ** 2)]


def processes_marked(marker: str) -> list[int]:
    """The live processes whose environment holds `marker`: a launcher's workers too, which it starts in
    sessions of their own (a hung worker outlives a launcher killed with its session)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(pid))
        except OSError:  # ended meanwhile
            pass
    return found


def make_accelerator():
    return vsgrpo.Accelerator(cpu=True)


def run_processes(command: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """Run a command (a launcher and its workers); on timeout, kill them all. None may be left after it."""
    marker = f"VSGRPO_TEST_RUN={os.getpid()}-{time.time_ns()}"
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", VSGRPO_TEST_RUN=marker.split("=")[1])
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in processes_marked(marker):
            os.kill(pid, signal.SIGKILL)
        pytest.fail(f"timed out after {timeout} s: {' '.join(command)}\n{process.communicate()[1][-3000:]}")
    assert processes_marked(marker) == [], "processes left behind"
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


LAUNCH_TWO = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]


def make_args(synthetic, *extra) -> object:
    return vsgrpo.parse_args(["--model", synthetic["model"], "--data", synthetic["data"],
                              "--video-root", synthetic["videos"], "--num-frames", "4", "--max-pixels", str(56 * 56),
                              "--max-completion-length", "6", *extra])


def write_gray_video(path: str, values: list[int], pts: list[int] | None = None, size: int = 32) -> None:
    """Frames of one flat gray level each; `pts` in units of 1/100 s (default: 25 fps)."""
    from fractions import Fraction
    with av.open(path, "w") as container:
        stream = container.add_stream("mpeg4", rate=25)
        stream.width = stream.height = size
        stream.pix_fmt, stream.codec_context.time_base = "yuv420p", Fraction(1, 100)
        stream.options = {"qscale": "1"}
        for i, value in enumerate(values):
            frame = av.VideoFrame.from_ndarray(np.full((size, size, 3), value, np.uint8), format="rgb24")
            frame.pts, frame.time_base = (pts[i] if pts else 4 * i), Fraction(1, 100)
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


# ----------------------------------------------------------------------------- rewards
def test_extract_answer_takes_the_last_answer_tag():
    assert rewards.extract_answer("<think>maybe <answer>1</answer>?</think><answer> 2 </answer>") == "2"
    assert rewards.extract_answer("<answer>\nleft\n</answer>") == "left"


def test_extract_answer_without_a_tag_is_empty_outside_vanilla_and_everything_in_vanilla():
    assert rewards.extract_answer("3 chairs", "think") == ""
    assert rewards.extract_answer("  3 chairs\n", "vanilla") == "3 chairs"


def fmt(text, mode="think"):
    return rewards.format_reward([text], [{"prompt_mode": mode}])[0]


def test_format_reward_accepts_multiline_reasoning_and_spaces_between_tags():
    assert fmt("<think>I see two chairs.\nOne more on the left.</think>\n<answer>3</answer>") == 1.0
    assert fmt(" <observe>a red square</observe> <answer>left</answer> \n", "observe") == 1.0


@pytest.mark.parametrize("text", [
    "<answer>3</answer>",                                         # no reasoning block
    "<think>two chairs</think>",                                  # no answer
    "<think>a</think><answer>3</answer><answer>4</answer>",       # an extra answer
    "<think>a<think>b</think></think><answer>3</answer>",         # nested tags
    "<think>a</think>b</think><answer>3</answer>",                # a stray closing tag
    "so <think>a</think><answer>3</answer>",                      # text before the tags
    "<answer>3</answer><think>a</think>",                         # wrong order
    "<observe>a</observe><answer>3</answer>",                     # the other mode's tag
])
def test_format_reward_rejects_anything_but_the_exact_structure(text):
    assert fmt(text) == 0.0


def test_mean_relative_accuracy_at_the_benchmarks_own_boundaries():
    # relative error 0.5 equals 1 - 0.50: only the first threshold passes (<=), 1 of 10
    assert rewards.mean_relative_accuracy(15.0, 10.0) == pytest.approx(0.1)
    # relative error 0.05: 1 - 0.95 is 0.0500000000000000444 in floats, so all 10 pass, as in VSI-Bench
    assert rewards.mean_relative_accuracy(10.5, 10.0) == pytest.approx(1.0)
    assert rewards.mean_relative_accuracy(10.0, 10.0) == 1.0
    assert rewards.mean_relative_accuracy(16.0, 10.0) == 0.0


@pytest.mark.parametrize("k", range(10))
def test_mean_relative_accuracy_around_each_threshold(k):
    theta = 0.50 + 0.05 * k          # threshold k; errors just inside pass k + 1 thresholds
    inside, outside = 100 * (1 + (1 - theta) - 1e-6), 100 * (1 + (1 - theta) + 1e-6)
    assert rewards.mean_relative_accuracy(inside, 100.0) == pytest.approx((k + 1) / 10)
    assert rewards.mean_relative_accuracy(outside, 100.0) == pytest.approx(k / 10)


def test_mean_relative_accuracy_of_a_zero_target_is_exact_match():
    assert rewards.mean_relative_accuracy(0.0, 0.0) == 1.0
    assert rewards.mean_relative_accuracy(0.1, 0.0) == 0.0


def test_mean_relative_accuracy_of_a_negative_target_is_relative_to_its_size():
    assert rewards.mean_relative_accuracy(-15.0, -10.0) == pytest.approx(0.1)  # error 5 / 10, as for +15 and +10
    assert rewards.mean_relative_accuracy(10.0, -10.0) == 0.0                  # error 20 / 10


def accuracy(completion, answer, kind="numeric", mode="vanilla"):
    return rewards.accuracy_reward([completion], [{"answer": answer, "kind": kind, "prompt_mode": mode}])[0]


def test_accuracy_scores_numbers_with_mra_and_unparseable_numbers_with_zero():
    assert accuracy("<think>x</think><answer>12</answer>", "10", mode="think") == pytest.approx(0.6)  # error .2
    assert accuracy("3.", "3") == 1.0
    assert accuracy("three", "3") == 0.0
    assert accuracy("nan", "3") == 0.0


def test_numeric_accuracy_reads_the_first_word_as_the_benchmark_does():
    # VSI-Bench keeps the text up to the first space and strips trailing periods, then parses a float.
    assert accuracy("4 meters", "4") == 1.0 and accuracy("4. metres", "4") == 1.0
    assert accuracy("<answer>2.5 m</answer>", "2.5", mode="think") == 1.0
    assert accuracy("about 4 meters", "4") == 0.0                    # the benchmark scores this 0 too
    for text in ("4 meters", "4. metres", "about 4", "12 chairs"):
        assert accuracy(text, "4") == rewards.benchmark_score(rewards.clean_prediction(text), {"kind": "numeric",
                                                                                             "answer": "4"})


def test_accuracy_of_words_ignores_case_surrounding_space_and_punctuation():
    assert accuracy(" Left. ", "left", kind="word") == 1.0
    assert accuracy("tv-stand", "TV stand", kind="word") == 1.0
    assert accuracy("top  left", "top left", kind="word") == 1.0
    assert accuracy("right", "left", kind="word") == 0.0


def test_no_completion_crashes_scoring():
    odd = ["", "<answer>", "</answer><answer>", "9" * 5000, "<answer>1e999</answer>", "\x00\u2603", "<think>" * 1000]
    for mode in ("think", "observe", "vanilla"):
        for kind, answer in (("numeric", "4"), ("word", "left")):
            samples = [{"answer": answer, "kind": kind, "prompt_mode": mode}] * len(odd)
            for name in ("accuracy",) + (() if mode == "vanilla" else ("format",)):
                scores = rewards.REWARDS[name](odd, samples)
                assert len(scores) == len(odd) and all(0.0 <= s <= 1.0 for s in scores)


def test_total_reward_is_the_weighted_sum_and_a_miscounting_reward_is_named():
    samples = [{"answer": "left", "kind": "word", "prompt_mode": "think"}] * 2
    completions = ["<think>a</think><answer>left</answer>", "<answer>right</answer>"]
    scores = rewards.score_completions(completions, samples, ["accuracy", "format"], [1.0, 0.5])
    assert scores == {"accuracy": [1.0, 0.0], "format": [1.0, 0.0], "total": [1.5, 0.0]}
    rewards.reward("bools")(lambda completions, samples: [c.endswith("</answer>") for c in completions[:1]] + [0])
    scores = rewards.score_completions(completions, samples, ["bools"], [1.0])["bools"]
    assert scores == [1.0, 0.0] and all(type(x) is float for x in scores)        # torch makes floats of them, not bools
    rewards.reward("short_by_one")(lambda completions, samples: [0.0] * (len(completions) - 1))
    with pytest.raises(ValueError, match="reward 'short_by_one' returned 1 values for 2 completions"):
        rewards.score_completions(completions, samples, ["short_by_one"], [1.0])


# ----------------------------------------------------------------------------- advantages and loss
def test_group_advantages_by_hand():
    rewards_ = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    std = math.sqrt(4 * 0.5 ** 2 / 3)                          # sample std of [1, 0, 0, 1]
    a = 0.5 / (std + 1e-4)
    expected = [a, -a, -a, a] + [0.0] * 4                      # an all-equal group gets zero
    assert vsgrpo.group_advantages(rewards_, 4).tolist() == pytest.approx(expected)


def test_a_group_of_equal_rewards_gets_advantage_exactly_zero_and_is_counted():
    rewards_ = torch.tensor([0.7] * 14 + [0.7] * 13 + [0.8])     # 0.7 has no exact float32: std is ~1e-7, not 0
    assert rewards_[:14].std() > 0
    advantages = vsgrpo.group_advantages(rewards_, 14)
    assert advantages[:14].tolist() == [0.0] * 14 and advantages[14:].abs().min() > 0.1
    assert vsgrpo.equal_reward_groups(rewards_, 14).tolist() == [True, False]


def random_loss_inputs(n=3, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(n, c, generator=g) * 3
    old = logps + 0.4 * (torch.rand(n, c, generator=g) - 0.5)
    ref = logps + 0.4 * (torch.rand(n, c, generator=g) - 0.5)
    return logps, old, ref, torch.tensor([1.5, -0.7, 0.3]), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])


def test_loss_equals_eq1_written_token_by_token():
    logps, old, ref, adv, mask = random_loss_inputs()
    eps, beta = 0.2, 0.05
    token_loss, _, _ = vsgrpo.grpo_token_loss(logps, old, ref, adv, mask, eps, beta)
    loss = vsgrpo.aggregate_loss(token_loss, mask.float(), "sequence", 3, int(mask.sum()))
    logps, old, ref, adv = logps.tolist(), old.tolist(), ref.tolist(), adv.tolist()  # plain floats, by hand
    objective = 0.0
    for i in range(3):
        per_token = []
        for t in range(5):
            if mask[i, t]:
                rho = math.exp(logps[i][t] - old[i][t])
                surrogate = min(rho * adv[i], min(max(rho, 1 - eps), 1 + eps) * adv[i])
                r = math.exp(ref[i][t] - logps[i][t])
                per_token.append(surrogate - beta * (r - math.log(r) - 1))
        objective += sum(per_token) / len(per_token) / 3
    assert loss.item() == pytest.approx(-objective, rel=1e-5)


def test_token_aggregation_weighs_every_token_the_same():
    logps, old, ref, adv, mask = random_loss_inputs()
    token_loss, _, _ = vsgrpo.grpo_token_loss(logps, old, ref, adv, mask, 0.2, 0.05)
    loss = vsgrpo.aggregate_loss(token_loss, mask.float(), "token", 3, 9)
    assert loss.item() == pytest.approx(token_loss[mask.bool()].sum().item() / 9, rel=1e-6)


def test_at_ratio_one_without_kl_the_gradient_is_minus_a_times_grad_log_p():
    _, _, _, adv, mask = random_loss_inputs()
    logps = (-torch.rand(3, 5)).requires_grad_()
    token_loss, _, _ = vsgrpo.grpo_token_loss(logps, logps.detach(), None, adv, mask, 0.2, 0.0)
    vsgrpo.aggregate_loss(token_loss, mask.float(), "sequence", 3, 9).backward()
    lengths = mask.sum(1, keepdim=True)
    expected = -adv[:, None] / (3 * lengths) * mask          # d(-J)/d log p_it = -A_i / (G |o_i|)
    assert torch.allclose(logps.grad, expected, atol=1e-7)


def test_tokens_clipped_in_the_direction_of_the_advantage_carry_no_gradient():
    old = torch.zeros(4, 1)
    # ratio 1.5 > 1 + eps with A > 0, and 0.5 < 1 - eps with A < 0: clipped, no gradient;
    # the same ratios against the advantage: the min keeps the unclipped term, gradient flows.
    logps = torch.log(torch.tensor([[1.5], [0.5], [1.5], [0.5]])).requires_grad_()
    adv = torch.tensor([1.0, -1.0, -1.0, 1.0])
    token_loss, _, clipped = vsgrpo.grpo_token_loss(logps, old, None, adv, torch.ones(4, 1), 0.2, 0.0)
    token_loss.sum().backward()
    assert logps.grad[:2].abs().sum() == 0
    assert logps.grad[2:].abs().min() > 0
    assert clipped.squeeze(1).tolist() == [True, True, False, False]


def test_the_ratio_is_clipped_at_exactly_one_minus_and_one_plus_eps():
    # Ratios just past and just inside each bound (eps 0.2), each with the advantage whose sign lets the clip bite.
    ratios, adv = torch.tensor([[1.25], [1.15], [0.75], [0.85]]), torch.tensor([1.0, 1.0, -1.0, -1.0])
    token_loss, _, clipped = vsgrpo.grpo_token_loss(ratios.log(), torch.zeros(4, 1), None, adv, torch.ones(4, 1),
                                                    0.2, 0.0)
    # By hand: -min(rho A, clip(rho, 0.8, 1.2) A) = -1.2, -1.15, 0.8, 0.85.
    assert token_loss.squeeze(1).tolist() == pytest.approx([-1.2, -1.15, 0.8, 0.85], abs=1e-6)
    assert clipped.squeeze(1).tolist() == [True, False, True, False]


def test_masked_tokens_carry_no_gradient():
    logps, old, ref, adv, mask = random_loss_inputs()
    logps.requires_grad_()
    token_loss, _, _ = vsgrpo.grpo_token_loss(logps, old, ref, adv, mask, 0.2, 0.1)
    vsgrpo.aggregate_loss(token_loss, mask.float(), "sequence", 3, 9).backward()
    assert logps.grad[mask == 0].abs().sum() == 0
    assert logps.grad[mask == 1].abs().min() > 0


def test_a_non_finite_value_at_a_padded_position_cannot_reach_the_loss_or_the_gradient():
    logps, old, ref, adv, mask = random_loss_inputs()
    poisoned = logps.clone()
    poisoned[mask == 0] = old[mask == 0] + 100.0                  # exp(100) overflows float32
    poisoned[0, 4], logps = float("nan"), logps.requires_grad_()
    poisoned.requires_grad_()
    losses = []
    for x in (logps, poisoned):
        token_loss, _, _ = vsgrpo.grpo_token_loss(x, old, ref, adv, mask, 0.2, 0.1)
        losses.append(vsgrpo.aggregate_loss(token_loss, mask, "sequence", 3, 9))
        losses[-1].backward()
    assert torch.isfinite(losses[1]) and losses[1].item() == losses[0].item()
    assert torch.equal(poisoned.grad, logps.grad)


def test_kl_is_zero_when_policy_equals_reference_and_positive_otherwise():
    logps, old, ref, adv, _ = random_loss_inputs()
    _, kl, _ = vsgrpo.grpo_token_loss(logps, old, logps.clone(), adv, torch.ones(3, 5), 0.2, 0.1)
    assert kl.abs().max() == 0
    _, kl, _ = vsgrpo.grpo_token_loss(logps, old, ref, adv, torch.ones(3, 5), 0.2, 0.1)
    assert (kl > 0).all()


def test_completion_mask_keeps_the_first_eos_even_when_pad_is_eos():
    eos = 7
    ids = torch.tensor([[3, 4, eos, eos, eos], [3, eos, 5, 6, eos], [3, 4, 5, 6, 2]])
    mask, truncated = vsgrpo.completion_mask(ids, [eos])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert truncated.tolist() == [False, False, True]                # only the last never ends


def test_the_tokenizers_eos_ends_a_completion_also_where_the_generation_config_names_others_or_none(synthetic):
    args, model, tokenizer = load_tiny(synthetic)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.eos_token_id = None
    assert vsgrpo.eos_token_ids(model, tokenizer) == [eos]
    model.generation_config.eos_token_id = [3, 1]                   # as Qwen2-VL-Instruct's lists two
    assert vsgrpo.eos_token_ids(model, tokenizer) == sorted({1, 3, eos})


def test_completions_are_decoded_up_to_their_first_eos_without_it(synthetic):
    tokenizer = vsgrpo.AutoTokenizer.from_pretrained(synthetic["model"])
    left, right, eos = (tokenizer.convert_tokens_to_ids(t) for t in ("left", "right", "<|im_end|>"))
    ids = torch.tensor([[left, eos, right], [left, right, left]])
    completions = vsgrpo.decode(tokenizer, ids, vsgrpo.completion_mask(ids, [eos])[0])
    assert completions == ["left", "left right left"]                 # a reward reads "left", not "left <|im_end|>"


def test_step_metrics_by_hand():
    eos = 9
    ids = torch.tensor([[1, 2, eos, 0], [1, 2, 3, 4], [eos, 0, 0, 0], [1, 2, 3, eos]])
    reward = torch.tensor([1.0, 0.0, 0.5, 0.5])               # groups of G=2: [1, 0] and [0.5, 0.5]
    prompts = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])  # two questions, prompts of 3 and 5 tokens
    batch = vsgrpo.Batch([{}, {}], prompts, prompts, torch.zeros(3, 2, 5), torch.zeros(2), [], torch.zeros(2, 3))
    ro = vsgrpo.Rollout(batch, ids, *vsgrpo.completion_mask(ids, [eos]), ["x"] * 4,
                        {"accuracy": reward, "total": reward}, torch.zeros(4), None, None)
    args = vsgrpo.argparse.Namespace(num_generations=2, rewards=["accuracy"], num_iterations=2,
                                     straightforward=False, micro_batch_size=2)
    vsgrpo.PHASES.clear()
    vsgrpo.PHASES.update(generation=2.0, optimisation=4.0)
    m = vsgrpo.step_metrics(ro, args, {"loss": 0.5}, 1, 1e-5)
    assert m["truncated_fraction"] == 0.25                     # only row 2 never ends
    assert (m["completion_length"], m["completion_length_max"]) == ((3 + 4 + 1 + 4) / 4, 4)
    assert m["zero_std_fraction"] == 0.5 and m["reward"] == 0.5
    assert m["reward_std"] == pytest.approx(math.sqrt(0.5) / 2)  # within each group: [1, 0] and [0.5, 0.5], averaged
    assert m["generated_tokens_per_s"] == pytest.approx(12 / 2.0) and m["seconds_generation"] == 2.0
    # Each pi_theta pass runs each prompt once (3 + 5 tokens) and 4 completions padded to 4; mu = 2 passes in 4 s.
    assert m["policy_tokens_per_s"] == pytest.approx(2 * (3 + 5 + 4 * 4) / 4.0)
    args.micro_batch_size = 1                                  # each question in 2 forwards: its prompt twice
    assert vsgrpo.step_metrics(ro, args, {}, 0, 1e-5)["policy_tokens_per_s"] == pytest.approx(2 * (2 * 8 + 16) / 4)
    args.straightforward = True                                # each completion behind its own padded prompt of 5
    assert vsgrpo.step_metrics(ro, args, {}, 0, 1e-5)["policy_tokens_per_s"] == pytest.approx(2 * 4 * (5 + 4) / 4)


# ----------------------------------------------------------------------------- video
def test_frames_are_sampled_uniformly_from_first_to_last(tmp_path):
    path = str(tmp_path / "ten.mp4")
    write_gray_video(path, [20 * i + 20 for i in range(10)])
    frames = data.read_frames(path, 4)[0]
    assert frames.shape == (4, 32, 32, 3)
    levels = frames.reshape(4, -1).mean(1)
    assert np.abs(levels - [20, 80, 140, 200]).max() < 6      # frames 0, 3, 6, 9


def test_a_short_video_repeats_frames(tmp_path):
    path = str(tmp_path / "three.mp4")
    write_gray_video(path, [40, 120, 200])
    levels = data.read_frames(path, 5)[0].reshape(5, -1).mean(1)
    # instants 0, 2, 4, 6, 8 (x 1/100 s) over frames at 0, 4, 8: nearest 0, 0 (tie: first), 4, 4, 8
    assert np.abs(levels - [40, 40, 120, 120, 200]).max() < 6


def test_variable_frame_rate_is_sampled_by_time_not_frame_number(tmp_path):
    path = str(tmp_path / "vfr.mp4")
    # six quick frames in the first 0.05 s, then one every second up to 3 s
    write_gray_video(path, [10, 20, 30, 40, 50, 60, 100, 160, 220], pts=[0, 1, 2, 3, 4, 5, 100, 200, 300])
    levels = data.read_frames(path, 4)[0].reshape(4, -1).mean(1)
    # instants 0, 1, 2, 3 s: frames 0, 100, 200, 300; by frame number it would be 0, 3, 5, 8
    assert np.abs(levels - [10, 100, 160, 220]).max() < 6


def test_missing_and_undecodable_videos_raise_an_error_naming_the_path(tmp_path):
    with pytest.raises(data.DataError, match="nowhere.mp4"):
        data.read_frames(str(tmp_path / "nowhere.mp4"), 4)
    good = str(tmp_path / "good.mp4")
    write_gray_video(good, [50] * 20, size=64)
    broken = str(tmp_path / "broken.mp4")
    open(broken, "wb").write(open(good, "rb").read()[:600])
    with pytest.raises(data.DataError, match="broken.mp4"):
        data.read_frames(broken, 4)


def test_decoded_videos_are_kept_up_to_a_byte_budget_dropping_the_least_recently_used(tmp_path, monkeypatch):
    paths = [str(tmp_path / f"{name}.mp4") for name in "abcd"]
    for level, path in zip((40, 80, 120, 160), paths):
        write_gray_video(path, [level] * 2)
    size = 1 * 4 * 4 * 3 * 2 * 14 * 14 * 4  # one video's pixels: t*h*w patches of 3*2*14*14 float32 values
    monkeypatch.setattr(data, "DECODED", type(data.DECODED)())
    monkeypatch.setattr(data, "DECODED_BYTES", 2.5 * size)  # room for two
    for path in paths[:3] + paths[1:2] + paths[3:]:  # a, b, c (a dropped), b again, d (c dropped: b was used later)
        data.load_video(path, 2, 56 * 56, QWEN2)
    assert [key[0] for key in data.DECODED] == [paths[1], paths[3]]


def test_a_video_whose_chosen_frames_do_not_decode_is_a_data_error_saying_how_many(tmp_path):
    # H.264 whose keyframe holds the next frame's data instead: the container lists all 20 frames, and the
    # decoder, with no frame to predict from, drops every one of them without raising.
    vsgrpo.write_video(str(tmp_path / "good.mp4"), np.random.default_rng(0).integers(0, 255, (20, 64, 64, 3), np.uint8))
    with av.open(str(tmp_path / "good.mp4")) as good, av.open(str(tmp_path / "damaged.mp4"), "w") as damaged:
        packets = [p for p in good.demux(video=0) if p.dts is not None]
        stream = damaged.add_stream_from_template(good.streams.video[0])
        for i, packet in enumerate(packets):
            copy = av.Packet(bytes(packets[1] if i == 0 else packet))
            copy.pts, copy.dts, copy.time_base, copy.is_keyframe, copy.stream = \
                packet.pts, packet.dts, packet.time_base, packet.is_keyframe, stream
            damaged.mux(copy)
    with pytest.raises(data.DataError, match=r"damaged.mp4: 4 of the 4 frames chosen did not decode"):
        data.read_frames(str(tmp_path / "damaged.mp4"), 4)


def test_a_decoded_video_is_reused_until_its_file_changes(tmp_path):
    path = str(tmp_path / "gray.mp4")
    write_gray_video(path, [40] * 4)
    first = data.load_video(path, 2, 56 * 56, QWEN2)
    assert data.load_video(path, 2, 56 * 56, QWEN2) is first                 # cached
    assert first.grid.tolist() == [1, 4, 4] and data.load_video(path, 4, 56 * 56, QWEN2).grid.tolist() == [2, 4, 4]
    size = os.path.getsize(path)
    write_gray_video(path, [200] * 4)                                        # the file changes on disk,
    assert os.path.getsize(path) == size                                     # but not its size
    again = data.load_video(path, 2, 56 * 56, QWEN2).pixels
    assert again is not first.pixels and again.mean() > first.pixels.mean()


def test_smart_resize_by_hand():
    # 480x640 over budget 100352: scale = sqrt(480*640/100352) = 1.7496; floor(274.3/28)=9, floor(365.8/28)=13
    assert data.smart_resize(480, 640, 128 * 28 * 28) == (9 * 28, 13 * 28)
    # 20x30 under 3136: scale = sqrt(3136/600) = 2.2862; ceil(45.7/28)=2, ceil(68.6/28)=3
    assert data.smart_resize(20, 30, 128 * 28 * 28) == (56, 84)
    # in budget: rounded to multiples of 28
    assert data.smart_resize(100, 200, 128 * 28 * 28) == (112, 196)
    # rounds to 448x448, exactly the budget: kept (a rescale by sqrt(450*446/200704) would floor 446 to 420)
    assert data.smart_resize(450, 446, 448 * 448) == (448, 448)


def test_pixels_are_normalised_with_qwen2_vls_published_mean_and_std():
    # image_mean and image_std of Qwen2-VL-2B-Instruct's preprocessor_config.json (OpenAI CLIP's), typed from it.
    mean, std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
    colour = (200, 100, 30)
    patches, _ = data.video_patches(np.full((2, 56, 56, 3), colour, np.uint8), 56 * 56, QWEN2)  # one colour
    channels = patches.view(len(patches), 3, -1)                       # [t*h*w, 3, 2*14*14], channel first
    for c, value in enumerate(colour):
        assert torch.allclose(channels[:, c], torch.tensor((value / 255 - mean[c]) / std[c]), atol=1e-5)


def test_frames_are_resized_bicubically_as_the_reference_processor_does():
    # A step from 50 to 200, halved: a bicubic kernel overshoots on both sides of the edge (by 1.76 here), a
    # bilinear one, which the pretrained tower never saw, stays within [50, 200].
    frames = np.full((2, 112, 112, 3), 50, np.uint8)
    frames[:, :, 56:] = 200
    patches, _ = data.video_patches(frames, 56 * 56, QWEN2)           # 112x112 -> 56x56
    mean, std = torch.tensor(QWEN2.mean).view(1, 3, 1), torch.tensor(QWEN2.std).view(1, 3, 1)
    values = (patches.view(len(patches), 3, -1) * std + mean) * 255
    assert values.min() < 49 and values.max() > 201
    frames[:, :, :56], frames[:, :, 56:] = 0, 255  # the reference resizes 8-bit images: overshoot stops at 0 and 255
    patches, _ = data.video_patches(frames, 56 * 56, QWEN2)
    values = (patches.view(len(patches), 3, -1) * std + mean) * 255
    assert values.min() > -1e-3 and values.max() < 255 + 1e-3


def test_the_training_prompt_is_the_question_its_options_one_per_line_and_the_instruction():
    sample = {"question": "Which is closer?", "options": ["A. chair", "B. table"], "prompt_mode": "think"}
    assert data.question_text(sample) == "Which is closer?\nOptions:\nA. chair\nB. table\n" + data.PROMPTS["think"]
    assert data.question_text({**sample, "options": []}) == "Which is closer?\n" + data.PROMPTS["think"]


def test_patch_layout_groups_each_merged_2x2_block_contiguously():
    video = torch.randn(3, 3, 56, 84)                          # T=3 (odd), 4x6 patches of 14x14
    patches, thw = data.patchify(video, QWEN2)
    assert thw.tolist() == [2, 4, 6] and patches.shape == (2 * 4 * 6, 3 * 2 * 14 * 14)
    padded = torch.cat([video, video[-1:]])                    # the last frame repeated
    row = 0
    for t in range(2):
        for by in range(2):
            for bx in range(3):
                for my in range(2):
                    for mx in range(2):
                        y, x = (2 * by + my) * 14, (2 * bx + mx) * 14
                        block = padded[2 * t:2 * t + 2, :, y:y + 14, x:x + 14]   # [2, 3, 14, 14]
                        assert torch.equal(patches[row], block.permute(1, 0, 2, 3).flatten())
                        row += 1


def a_video(t: int, h: int, w: int, fmt=QWEN2, seconds_per_patch: float = 1.0) -> data.Video:
    """A Video of t x h x w patches, pairs of frames a second apart, as load_video would return it."""
    pixels = torch.zeros(t * h * w, 3 * 2 * fmt.patch**2)
    return data.Video(pixels, torch.tensor([t, h, w]), [float(i) for i in range(t)], seconds_per_patch, fmt)


def test_video_token_count_is_t_h_w_over_4(synthetic):
    tokenizer = vsgrpo.AutoTokenizer.from_pretrained(synthetic["model"])
    video = data.load_video(os.path.join(synthetic["videos"], "synthetic", "train_00000.mp4"), 5, 112 * 112, QWEN2)
    assert video.grid.tolist() == [3, 8, 8] and video.pixels.shape == (3 * 8 * 8, 1176)
    video_id = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    ids = data.prompt_ids(tokenizer, "How many chairs?", video, video_id)
    assert ids.count(video_id) == 3 * 8 * 8 // 4
    run = ids[ids.index(video_id) - 1: ids.index(video_id) + 3 * 8 * 8 // 4 + 1]
    assert tokenizer.convert_ids_to_tokens([run[0], run[-1]]) == ["<|vision_start|>", "<|vision_end|>"]


QWEN2VL_TEMPLATE = (
    "{% set video_count = namespace(value=0) %}{% for message in messages %}{% if loop.first and message['role'] "
    "!= 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>"
    "{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'video' %}<|vision_start|><|video_pad|>"
    "<|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_prompt_from_the_chat_template_equals_the_built_in_qwen2vl_format(synthetic):
    tokenizer = vsgrpo.AutoTokenizer.from_pretrained(synthetic["model"])
    assert not tokenizer.chat_template
    video_id, video = tokenizer.convert_tokens_to_ids("<|video_pad|>"), a_video(2, 4, 4)
    built_in = data.prompt_ids(tokenizer, "Is the lamp left?", video, video_id)
    tokenizer.chat_template = QWEN2VL_TEMPLATE
    assert data.prompt_ids(tokenizer, "Is the lamp left?", video, video_id) == built_in


# ----------------------------------------------------------------------------- model: LoRA and log-probs
def load_tiny(synthetic, lora_rank=4, family="qwen2_vl"):
    args = make_args(synthetic, "--lora-rank", str(lora_rank), "--lora-alpha", "8", *family_flags(synthetic, family))
    model, tokenizer = vsgrpo.load_model(args, torch.device("cpu"))
    return args, model.eval(), tokenizer


def batch_of(synthetic, rows, args, tokenizer, model):
    samples = data.load_samples([synthetic["data"]], synthetic["videos"], args.prompt_mode)
    picked = [samples[i] for i in rows]
    videos = [data.load_video(s["video"], args.num_frames, args.max_pixels, data.video_format(args.model))
              for s in picked]
    return vsgrpo.collate(picked, [data.question_text(s) for s in picked], videos, tokenizer, model.config, "cpu")


def logits_of(model, batch):
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.positions,
                 mm_token_type_ids=(2 * (batch.input_ids == model.config.video_token_id)).int(),
                 pixel_values_videos=torch.cat(batch.pixel_values), video_grid_thw=batch.video_grid_thw).logits


def test_lora_at_initialisation_and_switched_off_equals_the_base_model(synthetic):
    args, base, tokenizer = load_tiny(synthetic, lora_rank=0)
    _, lora, _ = load_tiny(synthetic, lora_rank=4)
    batch = batch_of(synthetic, [0, 1], args, tokenizer, base)
    with torch.no_grad():
        expected = logits_of(base, batch)
        assert torch.equal(logits_of(lora, batch), expected)             # B = 0: no change at all
        for layer in lora.modules():
            if isinstance(layer, vsgrpo.LoRALinear):
                layer.lora_B.normal_()
        assert not torch.allclose(logits_of(lora, batch), expected, atol=1e-3)
        with vsgrpo.lora_disabled(lora):
            assert torch.equal(logits_of(lora, batch), expected)


def test_lora_wraps_every_attention_and_mlp_projection_of_the_language_model_only(synthetic):
    _, lora, _ = load_tiny(synthetic)
    wrapped = {n for n, m in lora.named_modules() if isinstance(m, vsgrpo.LoRALinear)}
    assert len(wrapped) == 2 * 7 and all(".language_model.layers." in n for n in wrapped)
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}" for n in wrapped for ab in "AB"}


def test_full_fine_tuning_trains_the_language_model_and_an_untied_output_head_never_the_tower(synthetic, tmp_path):
    # Qwen2-VL-7B's output head is a matrix of its own (2B's is the input embedding): it must train too.
    config = AutoConfig.from_pretrained(synthetic["model"])
    config.tie_word_embeddings = False
    torch.manual_seed(0)
    Qwen2VLForConditionalGeneration(config).save_pretrained(tmp_path)
    vsgrpo.AutoTokenizer.from_pretrained(synthetic["model"]).save_pretrained(tmp_path)
    model, _ = vsgrpo.load_model(make_args(synthetic, "--model", str(tmp_path), "--lora-rank", "0"), torch.device("cpu"))
    assert model.lm_head.weight is not model.model.language_model.embed_tokens.weight
    language_model = {n for n, _ in model.named_parameters() if n.startswith("model.language_model.")}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == language_model | {"lm_head.weight"}


def test_lora_over_bf16_weights_trains_float32_adapters_that_take_every_small_step():
    # On a GPU the frozen weights are bf16. An AdamW step of lr moves each entry by about lr (1e-5), far
    # below bf16's resolution at lora_A's scale (|a| ~ 0.1, a step of 2^-8 * 0.1 ~ 4e-4): most would round away.
    torch.manual_seed(0)
    layer = vsgrpo.LoRALinear(torch.nn.Linear(32, 16).to(torch.bfloat16), rank=4, alpha=8)
    optimizer = torch.optim.AdamW([layer.lora_A, layer.lora_B], lr=1e-5, weight_decay=0.0)
    start = layer.lora_A.detach().clone()
    for _ in range(2):  # B = 0 at first, so A's gradient is 0 until B has taken one step
        x = torch.randn(8, 32).to(torch.bfloat16)
        out = layer(x)
        assert out.dtype == torch.bfloat16                                 # the model's activations stay bf16
        out.float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    assert (layer.lora_A != start).all() and (layer.lora_B != 0).all()
    # Merged in float32 and rounded once into the weight's own dtype, as a plain Qwen2-VL stores it.
    merged = vsgrpo.merged_state_dict(torch.nn.Sequential(layer))["0.weight"]
    expected = (layer.weight.float() + 2 * layer.lora_B @ layer.lora_A).to(torch.bfloat16)
    assert merged.dtype == torch.bfloat16 and torch.equal(merged, expected)


def test_full_fine_tuning_copies_the_model_for_pi_ref_only_when_the_kl_term_needs_it(synthetic):
    args, model, _ = load_tiny(synthetic, lora_rank=0)
    assert vsgrpo.reference_model(model, vsgrpo.argparse.Namespace(lora_rank=0, beta=0.0)) is None  # no 2nd model
    frozen = vsgrpo.reference_model(model, vsgrpo.argparse.Namespace(lora_rank=0, beta=1e-4))
    assert frozen is not model and not any(p.requires_grad for p in frozen.parameters())
    assert vsgrpo.reference_model(model, vsgrpo.argparse.Namespace(lora_rank=4, beta=1e-4)) is None  # adapters off


@pytest.mark.parametrize("family", list(data.FAMILIES))
def test_merged_checkpoint_gives_the_adapter_models_logits(synthetic, tmp_path, family):
    args, lora, tokenizer = load_tiny(synthetic, family=family)
    torch.manual_seed(1)
    for layer in lora.modules():
        if isinstance(layer, vsgrpo.LoRALinear):
            layer.lora_B.data.normal_(std=0.1)
    lora.save_pretrained(str(tmp_path / "merged"), state_dict=vsgrpo.merged_state_dict(lora))
    tokenizer.save_pretrained(str(tmp_path / "merged"))
    merged = vsgrpo.AutoModelForImageTextToText.from_pretrained(str(tmp_path / "merged")).eval()
    assert merged.config.model_type == family
    assert not any(isinstance(m, vsgrpo.LoRALinear) for m in merged.modules())
    batch = batch_of(synthetic, [0, 1], args, tokenizer, lora)
    with torch.no_grad():
        assert torch.allclose(logits_of(merged, batch), logits_of(lora, batch), atol=1e-5)


def test_sampling_and_training_log_probs_agree_on_a_left_padded_batch(synthetic):
    args, model, tokenizer = load_tiny(synthetic)
    # A checkpoint's own sampling defaults (Qwen2-VL ships these) must not leak into sampling.
    model.generation_config.update(top_k=1, top_p=0.001, temperature=0.01, repetition_penalty=1.5)
    args.temperature, args.num_generations = 0.7, 3
    batch = batch_of(synthetic, [0, 1], args, tokenizer, model)        # two videos, two questions
    assert batch.attention_mask[:, 0].tolist().count(0) == 1          # one prompt is left-padded
    config = vsgrpo.generation_config(model, tokenizer, args.max_completion_length, args.num_generations,
                                      args.temperature)
    config.update(output_scores=True, return_dict_in_generate=True)
    torch.manual_seed(0)
    out = model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         mm_token_type_ids=(2 * (batch.input_ids == model.config.video_token_id)).int(),
                         pixel_values_videos=torch.cat(batch.pixel_values), video_grid_thw=batch.video_grid_thw,
                         generation_config=config)
    completion_ids = out.sequences[:, batch.input_ids.shape[1]:]
    sampled = torch.stack(out.scores, 1).log_softmax(-1).gather(-1, completion_ids[..., None]).squeeze(-1)
    mask, _ = vsgrpo.completion_mask(completion_ids, vsgrpo.eos_token_ids(model, tokenizer))
    with torch.no_grad():
        trained = vsgrpo.completion_logps(model, batch, completion_ids, mask, torch.arange(6), args)
    assert mask.sum() > 6
    assert ((trained - sampled).abs() * mask).max() < 1e-5


@pytest.mark.parametrize("family", list(data.FAMILIES))
def test_sampling_from_one_prefilled_prompt_gives_each_step_the_distribution_of_sampling_from_the_whole(
        synthetic, tmp_path, family):
    # G copies continue one prefilled prompt, each with the rotary offset of its question: the questions' videos
    # differ in shape, so their offsets differ too (and one prompt is left-padded). Every step's next-token
    # log-probs must be the plain generate()'s: equal samples alone would pass a small error, such as an offset
    # left from an earlier call.
    args, model, tokenizer = load_tiny(synthetic, family=family)
    args.num_frames = 8  # 4 x 2 x 2 merged cells: the text after the video sits where transformers' own rule differs
    vsgrpo.write_video(str(tmp_path / "wide.mp4"), np.random.default_rng(0).integers(0, 255, (4, 56, 112, 3), np.uint8))
    samples = data.load_samples([synthetic["data"]], synthetic["videos"], args.prompt_mode)[:2]
    samples[1] = dict(samples[1], video=str(tmp_path / "wide.mp4"))
    videos = [data.load_video(s["video"], args.num_frames, args.max_pixels, data.FAMILIES[family]) for s in samples]
    batch = vsgrpo.collate(samples, [data.question_text(s) for s in samples], videos, tokenizer, model.config, "cpu")
    assert batch.video_grid_thw[0].tolist() != batch.video_grid_thw[1].tolist()
    config = vsgrpo.generation_config(model, tokenizer, 6, 3, 1.0)
    steps = []
    model.lm_head.register_forward_hook(lambda module, inputs, out: steps.append(out[:, -1].log_softmax(-1)))
    runs = []
    # Prefilled first, as in training, on a model that has made no call yet; None: plain generate() over each prompt.
    for features in (vsgrpo.encode_videos(model, batch), None):
        batch.video_features, steps[:] = features, []
        torch.manual_seed(0)
        runs.append((vsgrpo.generate(model, batch, config), steps[-6:]))  # the last 6 calls: one per new token
    (shared_ids, shared), (plain_ids, plain) = runs
    assert torch.equal(plain_ids, shared_ids) and plain_ids.shape == (6, 6)
    assert all(a.shape == (6, model.config.text_config.vocab_size) for a in plain + shared)
    assert max((a - b).abs().max() for a, b in zip(plain, shared)) < 1e-5


def test_reference_log_probs_see_the_video(synthetic):
    args, model, tokenizer = load_tiny(synthetic)
    args.num_generations = 1
    batch = batch_of(synthetic, [0], args, tokenizer, model)
    ids, rows = torch.tensor([[5, 6, 7]]), torch.tensor([0])
    blank = dataclasses.replace(batch, pixel_values=[torch.zeros_like(batch.pixel_values[0])])
    with torch.no_grad(), vsgrpo.lora_disabled(model):
        seen = vsgrpo.completion_logps(model, batch, ids, torch.ones_like(ids), rows, args)
        blind = vsgrpo.completion_logps(model, blank, ids, torch.ones_like(ids), rows, args)
    assert (seen - blind).abs().max() > 1e-4



def test_video_and_image_placeholders_are_never_sampled_and_have_no_log_prob(synthetic):
    # A sampled placeholder would break the next forward: sampling suppresses both, and the log-probs mask
    # both, so that sampling and training see one distribution.
    args, model, tokenizer = load_tiny(synthetic)
    placeholders, vocab = [model.config.video_token_id, model.config.image_token_id], model.config.text_config.vocab_size
    assert sorted(vsgrpo.generation_config(model, tokenizer, 6, 3, 1.0).suppress_tokens) == sorted(placeholders)
    logits = torch.zeros(1, 3, vocab).index_fill(-1, torch.tensor(placeholders), 100.0)  # all but sure of them
    logps = vsgrpo.token_logps(logits, torch.tensor([placeholders + [5]]), model, args)
    assert logps[0, :2].tolist() == [-math.inf] * 2 and logps[0, 2].item() == pytest.approx(-math.log(vocab - 2))


@rewards.reward("is_numeric_question")
def is_numeric_question(completions: list[str], samples: list[dict]) -> list[float]:
    return [float(s["kind"] == "numeric") for s in samples]


def test_each_completion_is_scored_against_its_own_question(synthetic):
    args, model, tokenizer = load_tiny(synthetic)
    args.rewards, args.reward_weights, args.num_generations = ["is_numeric_question"], [1.0], 3
    batch = batch_of(synthetic, [0, 1], args, tokenizer, model)         # a counting question, then a left/right one
    ro = vsgrpo.rollout(model, None, batch, args, tokenizer)
    assert ro.rewards["total"].tolist() == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]  # completions 0-2 answer question 0


@rewards.reward("length")
def length_reward(completions: list[str], samples: list[dict]) -> list[float]:
    return [len(c) / 10 for c in completions]                    # varied rewards: advantages that are not 0


def perturbed(model, reference=None):
    """The policy moved away from its reference, so that KL terms and ratios are not trivially 0 or 1."""
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.data.add_(torch.randn_like(p), alpha=0.1 if name.endswith("lora_B") else 0.01)
    return model


# micro-batches of 2: a question's 3 completions in two forwards; of 6: both questions, left-padded, in one.
@pytest.mark.parametrize("family, lora_rank, mu, checkpointing, micro", [
    ("qwen2_vl", 4, 1, False, 2), ("qwen2_vl", 4, 2, True, 6), ("qwen2_vl", 0, 2, False, 6), ("qwen2_vl", 0, 1, True, 2),
    ("qwen2_5_vl", 4, 2, True, 6), ("qwen2_5_vl", 0, 1, False, 2), ("qwen3_vl", 4, 2, True, 6), ("qwen3_vl", 0, 1, False, 2)])
def test_the_shared_prompt_gives_the_straightforward_paths_samples_log_probs_loss_and_gradients(
        synthetic, family, lora_rank, mu, checkpointing, micro):
    results = []
    for straightforward in (True, False):
        args = make_args(synthetic, *family_flags(synthetic, family), "--num-frames", "8",
                         "--lora-rank", str(lora_rank), "--lora-alpha", "8", "-G", "3", "--rewards",
                         "length", "--num-iterations", str(mu), "--micro-batch-size", str(micro), "--beta", "0.1",
                         *["--gradient-checkpointing"] * checkpointing, *["--straightforward"] * straightforward)
        torch.manual_seed(0)
        model, tokenizer = vsgrpo.load_model(args, torch.device("cpu"))
        reference = vsgrpo.reference_model(model, args)                 # a frozen copy under full fine-tuning
        perturbed(model)
        batch = batch_of(synthetic, [0, 1], args, tokenizer, model)     # two videos, one prompt left-padded
        torch.manual_seed(0)
        ro = vsgrpo.rollout(model, reference, batch, args, tokenizer)
        before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
        stats = vsgrpo.optimise(model, model, optimizer, make_accelerator(), ro, args)
        steps = [b - p.detach() for b, p in zip(before, (p for p in model.parameters() if p.requires_grad))]
        results.append((ro, stats, steps))
    (plain, plain_stats, plain_steps), (shared, shared_stats, shared_steps) = results
    mask = plain.completion_mask
    assert torch.equal(plain.completion_ids, shared.completion_ids) and mask.sum() > 6
    for name in ("ref_logps",) + ("old_logps",) * (mu > 1):
        assert (torch.where(mask.bool(), getattr(plain, name) - getattr(shared, name), 0).abs().max() < 1e-5), name
    assert plain.advantages.abs().max() > 0.1 and plain_stats["kl"] > 0
    assert plain_stats["loss"] == pytest.approx(shared_stats["loss"], abs=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(plain_steps, shared_steps))
    assert max(step.abs().max() for step in shared_steps) > 1e-3            # it did learn something


def one_step(synthetic, *flags, lr=1.0):
    """One rollout of two questions (G = 3) and one optimisation step by SGD: (ids, stats, update)."""
    args = make_args(synthetic, "--lora-rank", "4", "--lora-alpha", "8", "-G", "3", "--rewards", "length",
                     "--beta", "0.1", *flags)
    torch.manual_seed(0)
    model, tokenizer = vsgrpo.load_model(args, torch.device("cpu"))
    perturbed(model)
    batch = batch_of(synthetic, [0, 1], args, tokenizer, model)
    torch.manual_seed(0)
    ro = vsgrpo.rollout(model, None, batch, args, tokenizer)
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    stats = vsgrpo.optimise(model, model, optimizer, make_accelerator(), ro, args)
    assert all(p.grad is None for p in model.parameters())             # nothing carried into the next step
    return ro.completion_ids, stats, [b - p.detach() for b, p in zip(before, (p for p in model.parameters()
                                                                             if p.requires_grad))]


@pytest.mark.parametrize("aggregation", ["sequence", "token"])
def test_a_step_split_into_micro_batches_takes_the_same_step_as_one_forward_over_it(synthetic, aggregation):
    # Each micro-batch adds its exact share of the step's loss: one completion per forward, one question per forward
    # (4 is rounded down to whole questions, 3), and all six in one must give the same loss and the same update.
    ids_6, stats_6, steps_6 = one_step(synthetic, "--micro-batch-size", "6", "--loss-aggregation", aggregation)
    assert stats_6["loss"] != 0 and max(step.abs().max() for step in steps_6) > 1e-3
    for micro in ("1", "4"):
        ids, stats, steps = one_step(synthetic, "--micro-batch-size", micro, "--loss-aggregation", aggregation)
        assert torch.equal(ids, ids_6)
        assert stats["loss"] == pytest.approx(stats_6["loss"], abs=1e-6)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(steps, steps_6))


def test_mu_passes_log_the_mean_of_their_loss_and_kl(synthetic):
    # At a learning rate of 0 the policy never moves, so each of mu = 2 passes sees what one pass sees: their
    # mean must equal one pass's figure (a sum would double it).
    _, one, _ = one_step(synthetic, lr=0.0)
    _, two, _ = one_step(synthetic, "--num-iterations", "2", lr=0.0)
    assert one["kl"] > 0 and two["kl"] == pytest.approx(one["kl"], rel=1e-5)
    assert one["loss"] != 0 and two["loss"] == pytest.approx(one["loss"], abs=1e-6)
    # The first pass never clips (pi_old is pi_theta), so over 2 passes the mean clip fraction is at most 1/2.
    _, moving, _ = one_step(synthetic, "--num-iterations", "2", "--clip-eps", "0.01")
    assert 0 < moving["clip_fraction"] <= 0.5


def test_the_gradient_is_clipped_to_max_grad_norm_and_its_norm_before_clipping_is_logged(synthetic):
    _, free, free_step = one_step(synthetic, "--max-grad-norm", "1e9")
    norm = math.sqrt(sum(float(step.double().pow(2).sum()) for step in free_step))  # SGD at lr 1: step = gradient
    assert free["grad_norm"] == pytest.approx(norm, rel=1e-4) and norm > 1e-2
    _, clipped, clipped_step = one_step(synthetic, "--max-grad-norm", str(norm / 10))
    assert clipped["grad_norm"] == pytest.approx(norm, rel=1e-4)
    scale = norm / 10 / (norm + 1e-6)                                   # torch's clip_grad_norm_, as documented
    assert all(torch.allclose(c, f * scale, rtol=1e-4, atol=1e-7) for c, f in zip(clipped_step, free_step))


def test_packed_log_probs_equal_separate_sequences_next_to_an_early_eos_and_a_mutation_breaks_them(
        synthetic, monkeypatch):
    args, model, tokenizer = load_tiny(synthetic)
    perturbed(model)
    args.num_generations = 2
    batch = batch_of(synthetic, [0, 1], args, tokenizer, model)
    shared = dataclasses.replace(batch, video_features=vsgrpo.encode_videos(model, batch))
    eos, pad, word = tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.convert_tokens_to_ids("how")
    ids = torch.tensor([[word, 7, eos, pad, pad, pad], [word] * 6, [9, eos, pad, pad, pad, pad], [8, word] * 3])
    mask, truncated = vsgrpo.completion_mask(ids, [eos])
    assert truncated.tolist() == [False, True, False, True]            # early EOS then padding, next to full length

    def largest_difference() -> float:
        with torch.no_grad():
            return max(torch.where(mask[rows].bool(), vsgrpo.completion_logps(model, shared, ids, mask, rows, args) -
                                   vsgrpo.completion_logps(model, batch, ids, mask, rows, args), 0).abs().max().item()
                       for rows in (torch.tensor([0, 1]), torch.tensor([2, 3])))
    assert largest_difference() < 1e-5
    packed_inputs = vsgrpo.packed_inputs
    for mutation in ("position", "mask"):
        def mutated(*a):
            inputs = packed_inputs(*a)
            if mutation == "position":                                     # the last completion one position on
                inputs["position_ids"][..., -6:] += 1
            else:                                                          # the last completion sees the one before
                inputs["attention_mask"][..., -6:, -12:-6] = 0
            return inputs
        monkeypatch.setattr(vsgrpo, "packed_inputs", mutated)
        assert largest_difference() > 1e-4, mutation


# ----------------------------------------------------------------------------- 3-D positions
def tiny_config(synthetic):
    return AutoConfig.from_pretrained(synthetic["model"])


def test_text_after_a_video_of_more_frames_than_rows_and_columns_resumes_after_its_last_frame(synthetic):
    # 12 frames of 56x56: 6 x 4 x 4 patches, 6 x 2 x 2 merged cells. The video starts at 2 and its last frame
    # sits at 2 + 5, so "c" is at 8. transformers 5.25 puts it at 2 + max(2, 2) = 4, among the frames.
    config = tiny_config(synthetic)
    a, b, c, V = 5, 6, 7, config.video_token_id
    ids = torch.tensor([[a, b] + [V] * 24 + [c]])
    positions, next_position = vsgrpo.rope_positions(config, ids, torch.ones_like(ids), [a_video(6, 4, 4)])
    assert positions[0, 0].tolist() == [0, 1] + [2] * 4 + [3] * 4 + [4] * 4 + [5] * 4 + [6] * 4 + [7] * 4 + [8]
    assert positions[1, 0].tolist() == [0, 1] + [2, 2, 3, 3] * 6 + [8]
    assert positions[2, 0].tolist() == [0, 1] + [2, 3, 2, 3] * 6 + [8]
    assert next_position.tolist() == [9]


def test_text_after_a_video_wider_than_its_frames_resumes_after_its_last_column(synthetic):
    # 4 frames of 56x112: 2 x 4 x 8 patches, 2 x 2 x 4 cells; the last column is at 2 + 3, so "c" is at 6.
    config = tiny_config(synthetic)
    a, b, c, V = 5, 6, 7, config.video_token_id
    ids = torch.tensor([[a, b] + [V] * 16 + [c, a]])
    positions, next_position = vsgrpo.rope_positions(config, ids, torch.ones_like(ids), [a_video(2, 4, 8)])
    assert positions[0, 0].tolist() == [0, 1] + [2] * 8 + [3] * 8 + [6, 7]
    assert positions[1, 0].tolist() == [0, 1] + [2, 2, 2, 2, 3, 3, 3, 3] * 2 + [6, 7]
    assert positions[2, 0].tolist() == [0, 1] + [2, 3, 4, 5] * 4 + [6, 7]
    assert next_position.tolist() == [8]


def test_a_left_padded_prompt_takes_the_positions_it_has_alone_and_its_padding_zero(synthetic):
    config = tiny_config(synthetic)
    a, c, V, pad = 5, 7, config.video_token_id, 0
    ids = torch.tensor([[a, a, a] + [V] * 4 + [c], [pad, pad, a] + [V] * 4 + [c]])
    mask = torch.tensor([[1] * 8, [0, 0] + [1] * 6])
    positions, next_position = vsgrpo.rope_positions(config, ids, mask, [a_video(1, 4, 4), a_video(4, 2, 2)])
    # one frame of 2 x 2 cells from 3, then c at 5; after two pads, four frames of one cell from 1, then c at 5
    assert positions[:, 0].tolist() == [[0, 1, 2, 3, 3, 3, 3, 5], [0, 1, 2, 3, 3, 4, 4, 5], [0, 1, 2, 3, 4, 3, 4, 5]]
    assert positions[:, 1].tolist() == [[0, 0, 0, 1, 2, 3, 4, 5], [0, 0, 0, 1, 1, 1, 1, 5], [0, 0, 0, 1, 1, 1, 1, 5]]
    assert next_position.tolist() == [6, 6]


def eight_frame_batch(synthetic):
    """A tiny model and two questions whose videos have 4 x 2 x 2 merged cells: more frames than rows or
    columns, where transformers' own positions for the text after the video differ from the authors'."""
    args, model, tokenizer = load_tiny(synthetic)
    perturbed(model)
    args.num_frames, args.num_generations = 8, 2
    batch = batch_of(synthetic, [0, 1], args, tokenizer, model)
    assert batch.video_grid_thw.tolist() == [[4, 4, 4]] * 2
    return args, model, tokenizer, batch


def test_both_paths_give_the_log_probs_of_plain_forwards_at_the_authors_positions_where_transformers_differs(
        synthetic):
    args, model, tokenizer, batch = eight_frame_batch(synthetic)
    eos, word = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("how")
    ids = torch.tensor([[word, 7, eos, 0], [word] * 4, [9, word, 8, 7], [8, eos, 0, 0]])
    mask, _ = vsgrpo.completion_mask(ids, [eos])
    rows = torch.arange(4)
    with torch.no_grad():
        straightforward = vsgrpo.completion_logps(model, batch, ids, mask, rows, args)
        shared = vsgrpo.completion_logps(model, dataclasses.replace(batch, video_features=vsgrpo.encode_videos(
            model, batch)), ids, mask, rows, args)
        plain, theirs = [], []
        for i in range(4):  # each completion after its own prompt, as a plain implementation runs it
            q = i // 2
            full = torch.cat([batch.input_ids[q], ids[i]])[None]                    # [1, P + C]
            full_mask = torch.cat([batch.attention_mask[q], mask[i]])[None]
            video = data.load_video(batch.samples[q]["video"], 8, args.max_pixels, QWEN2)
            positions, _ = vsgrpo.rope_positions(model.config, full, full_mask, [video])
            inputs = dict(input_ids=full, attention_mask=full_mask, pixel_values_videos=batch.pixel_values[q],
                          video_grid_thw=batch.video_grid_thw[q:q + 1], mm_token_type_ids=vsgrpo.video_token_types(
                              full, model))
            for positions_given, out in ((positions, plain), (None, theirs)):    # None: transformers' own
                logits = model(**inputs, position_ids=positions_given).logits[:, -5:-1]
                out.append(vsgrpo.token_logps(logits, ids[i:i + 1], model, args)[0])
    plain, theirs = torch.stack(plain), torch.stack(theirs)
    real = mask.bool()
    assert (straightforward - plain)[real].abs().max() < 1e-5 and (shared - plain)[real].abs().max() < 1e-5
    assert (theirs - plain)[real].abs().max() > 1e-3                      # the control: their positions differ


def test_greedy_evaluation_decodes_what_a_token_by_token_greedy_loop_at_the_authors_positions_does(synthetic):
    # Each step's logits, not only its tokens: the tiny model's argmax can survive a wrong position.
    args, model, tokenizer, batch = eight_frame_batch(synthetic)
    batch.video_features = vsgrpo.encode_videos(model, batch)
    config = vsgrpo.generation_config(model, tokenizer, 6)                  # greedy, as evaluation decodes
    steps = []
    model.lm_head.register_forward_hook(lambda module, inputs, out: steps.append(out[:, -1].clone()))
    decoded = vsgrpo.generate(model, batch, config)                          # [2, 6]
    generated, steps[:] = steps[-6:], []                                     # one call per new token
    banned = vsgrpo.banned_token_ids(model)
    ids = batch.input_ids
    with torch.no_grad():
        for k in range(6):                                                   # no cache: the whole sequence again
            after = batch.next_position[:, None] + torch.arange(k)            # [2, k]
            positions = torch.cat([batch.positions, after.expand(3, -1, -1)], 2)
            mask = torch.cat([batch.attention_mask, torch.ones(2, k, dtype=torch.long)], 1)
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                           pixel_values_videos=torch.cat(batch.pixel_values), video_grid_thw=batch.video_grid_thw,
                           mm_token_type_ids=vsgrpo.video_token_types(ids, model)).logits[:, -1]
            logits[:, banned] = -math.inf
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], 1)
    looped = ids[:, batch.input_ids.shape[1]:]
    ended, _ = vsgrpo.completion_mask(looped, config.eos_token_id)
    assert ended.sum() > 2 and torch.equal(decoded[ended.bool()], looped[ended.bool()])
    assert max((a - b).abs().max() for a, b in zip(generated, steps)) < 1e-4


# ----------------------------------------------------------------------------- model families
@pytest.mark.parametrize("family", list(data.FAMILIES))
def test_a_forward_from_the_videos_features_gives_the_logits_their_pixels_give(synthetic, family):
    # Qwen3-VL's tower also returns DeepStack features, which its first layers add at the video tokens: the
    # features encoded once per step must carry them (without them, logits moved by up to 0.5).
    args, model, tokenizer = load_tiny(synthetic, family=family)
    args.num_frames = 8
    batch = batch_of(synthetic, [0, 1], args, tokenizer, model)
    features = vsgrpo.encode_videos(model, batch)
    assert len(features[0]) == (2 if family == "qwen3_vl" else 1)           # the tiny Qwen3-VL has one layer
    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.positions,
                  mm_token_type_ids=vsgrpo.video_token_types(batch.input_ids, model))
    with torch.no_grad():
        from_pixels = model(**inputs, **vsgrpo.video_inputs(batch, [0, 1])).logits
        encoded = dataclasses.replace(batch, video_features=features)
        from_features = model(**inputs, **vsgrpo.video_inputs(encoded, [0, 1])).logits
        assert (from_pixels - from_features).abs().max() < 1e-5
        if family == "qwen3_vl":                                           # the control: DeepStack's zeroed
            zeroed = [[f[0]] + [torch.zeros_like(d) for d in f[1:]] for f in features]
            without = model(**inputs, **vsgrpo.video_inputs(dataclasses.replace(batch, video_features=zeroed),
                                                            [0, 1])).logits
            assert (from_pixels - without).abs().max() > 1e-3


def test_qwen2_5_vl_places_pairs_of_frames_by_time_keeping_the_fraction_until_the_product(synthetic, tmp_path):
    # 6 frames a second apart last 6 s; 16 frames sampled from them make pairs of 2 x 6 / 16 = 0.75 s, and at
    # the released tokens_per_second, 2, pair k sits at int(1.5 k) after the video's start. Rounding 0.75 or
    # 1.5 first would put the pairs at 0 or at k.
    path = str(tmp_path / "six_seconds.mp4")
    write_gray_video(path, [40 * i for i in range(6)], pts=[100 * i for i in range(6)])
    model = synthetic["models"]["qwen2_5_vl"]
    config = AutoConfig.from_pretrained(model)
    video = data.load_video(path, 16, 56 * 56, data.video_format(model))
    assert video.grid.tolist() == [8, 4, 4] and video.seconds_per_patch == pytest.approx(0.75)
    assert config.vision_config.tokens_per_second == 2
    a, c, V = 5, 7, config.video_token_id
    ids = torch.tensor([[a, a] + [V] * 32 + [c]])
    positions, next_position = vsgrpo.rope_positions(config, ids, torch.ones_like(ids), [video])
    assert positions[0, 0].tolist() == [0, 1] + [2 + t for t in (0, 1, 3, 4, 6, 7, 9, 10) for _ in range(4)] + [13]
    assert positions[1, 0].tolist() == [0, 1] + [2, 2, 3, 3] * 8 + [13]
    assert positions[2, 0].tolist() == [0, 1] + [2, 3, 2, 3] * 8 + [13] and next_position.tolist() == [14]


def test_qwen3_vl_prompts_name_each_pair_of_frames_by_its_time_and_place_each_pair_as_a_block(synthetic, tmp_path):
    # 6 frames at 0, 1, ..., 5 s; 4 sampled at 0, 1.67, 3.33, 5 s are the nearest ones, at 0, 2, 3 and 5 s: the
    # pairs' times are 1.0 and 4.0 s. Each pair is a block of 2 x 2 tokens at t = 0, after its time in words.
    path = str(tmp_path / "six_seconds.mp4")
    write_gray_video(path, [40 * i for i in range(6)], pts=[100 * i for i in range(6)], size=64)
    model = synthetic["models"]["qwen3_vl"]
    config = AutoConfig.from_pretrained(model)
    tokenizer = vsgrpo.AutoTokenizer.from_pretrained(model)
    video = data.load_video(path, 4, 64 * 64, data.video_format(model))
    assert video.grid.tolist() == [2, 4, 4] and video.patch_times == [1.0, 4.0]
    ids = data.prompt_ids(tokenizer, "How many chairs?", video, config.video_token_id)
    starts = [i for i, token in enumerate(ids) if token == config.vision_start_token_id]
    assert len(starts) == 2 and ids.count(config.video_token_id) == 2 * 4
    positions, _ = vsgrpo.rope_positions(config, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long),
                                         [video])
    for start, seconds in zip(starts, ("1", "4")):
        assert tokenizer.convert_ids_to_tokens(ids[start - 6:start]) == ["<", seconds, ".", "0", "seconds", ">"]
        assert ids[start + 1:start + 6] == [config.video_token_id] * 4 + [config.vision_end_token_id]
        s = int(positions[0, 0, start]) + 1                               # after its <|vision_start|>
        assert positions[:, 0, start + 1:start + 6].tolist() == [[s, s, s, s, s + 2], [s, s, s + 1, s + 1, s + 2],
                                                     [s, s + 1, s, s + 1, s + 2]]


def test_sizes_come_from_config_json_and_mean_and_std_from_the_processor_config_shipped(synthetic, tmp_path):
    assert data.video_format(synthetic["models"]["qwen3_vl"]) == data.VideoFormat(
        "qwen3_vl", 16, 2, 2, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))                # none shipped: the published
    shutil.copytree(synthetic["models"]["qwen2_5_vl"], tmp_path / "model")
    (tmp_path / "model" / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.1, 0.2, 0.3],
                                                                            "image_std": [0.4, 0.5, 0.6]}))
    assert data.video_format(str(tmp_path / "model")) == data.VideoFormat(
        "qwen2_5_vl", 14, 2, 2, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6))


@pytest.mark.parametrize("model_type, message", [
    ("qwen3_5", " is a Qwen3.5 (qwen3_5): three of every four of its text layers are recurrent (Gated DeltaNet)"),
    ("llava", ": model_type 'llava' is not one vsGRPO trains: qwen2_vl (Qwen2-VL), qwen2_5_vl (Qwen2.5-VL) and "
              "qwen3_vl (Qwen3-VL)")])
def test_a_checkpoint_of_another_family_is_refused_in_one_line_before_weights_load(synthetic, tmp_path, model_type,
                                                                                   message):
    os.makedirs(tmp_path / "model")
    (tmp_path / "model" / "config.json").write_text(json.dumps({"model_type": model_type}))  # and no weights
    done = subprocess.run([sys.executable, os.path.join(HERE, "vsgrpo.py"), *training_flags(
        synthetic, tmp_path / "run", reward="accuracy"), "--model", str(tmp_path / "model")], capture_output=True,
        text=True)
    assert done.returncode == 1 and done.stdout == ""
    [line] = done.stderr.splitlines()
    assert line.startswith(f"error: --model {tmp_path / 'model'}{message}")
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_a_run_of_each_family_trains_resumes_and_is_evaluated(synthetic, tmp_path, family):
    flags = training_flags(synthetic, tmp_path / "run", "--save-every", "1", "--num-frames", "8",
                           *family_flags(synthetic, family))
    vsgrpo.main(flags + ["--max-steps", "2"])
    vsgrpo.main(flags + ["--max-steps", "3", "--resume"])
    assert [json.loads(line)["step"] for line in open(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3]
    rows = write_benchmark_rows(synthetic, tmp_path / "bench.jsonl")
    metrics = vsgrpo.main(eval_flags(synthetic, tmp_path / "bench.jsonl", tmp_path / "eval") + [
        "--model", str(tmp_path / "run" / "checkpoint-000003"), "--max-pixels", family_flags(synthetic, family)[-1]])
    assert metrics["evaluated"] == len(rows) - 2 and metrics["settings"]["model"].endswith("checkpoint-000003")


# ----------------------------------------------------------------------------- data and flags
def test_rows_load_from_json_lists_and_jsonl_in_either_field_style(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"id": 1, "question": "How many?", "ground_truth": "3",
                                                  "question_type": "object_counting", "dataset": "scannet",
                                                  "scene_name": "scene0001_00"}]))
    (tmp_path / "b.jsonl").write_text(json.dumps({"problem": "Left or right?", "solution": "<answer> left </answer>",
                                                  "path": "clips/x.mp4"}) + "\n\n" +
                                      json.dumps({"problem": "How far?", "solution": "2.5", "video": "clips/y.mp4"}))
    samples = data.load_samples([str(tmp_path / "*.json*")], "/videos", "think")
    assert [(s["question"], s["answer"], s["kind"], s["video"]) for s in samples] == [
        ("How many?", "3", "numeric", "/videos/scannet/scene0001_00.mp4"),
        ("Left or right?", "left", "word", "/videos/clips/x.mp4"),
        ("How far?", "2.5", "numeric", "/videos/clips/y.mp4")]               # untyped: numeric by its answer
    for name in ("a.json", "b.jsonl"):  # as Windows editors save UTF-8: with a byte-order mark first (and a blank line)
        (tmp_path / name).write_bytes(b"\xef\xbb\xbf\n" + (tmp_path / name).read_bytes())
    assert data.load_samples([str(tmp_path / "*.json*")], "/videos", "think") == samples


@pytest.mark.parametrize("field, value", [("question", "How many <|video_pad|> are there?"),
                                          ("options", ["A. two", "B. three<|im_end|>"])])
def test_a_question_holding_a_special_token_of_the_chat_format_names_the_row(tmp_path, field, value):
    # Tokenized, <|video_pad|> would be a second video placeholder, and <|im_end|> would end the user's turn.
    (tmp_path / "rows.jsonl").write_text(json.dumps(ROW) + "\n" + json.dumps(dict(ROW, **{field: value})) + "\n")
    token = re.search(r"<\|\w+\|>", str(value)).group()
    with pytest.raises(data.DataError, match=f"rows.jsonl row 2: field '{field}' holds {re.escape(token)}, a special "):
        data.load_samples([str(tmp_path / "rows.jsonl")], ".", "vanilla")


def test_a_prompt_must_hold_exactly_one_video_placeholder(synthetic):
    tokenizer = vsgrpo.AutoTokenizer.from_pretrained(synthetic["model"])
    video_id = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    with pytest.raises(data.DataError, match="exactly one video, .*; found 2 video placeholders"):
        data.prompt_ids(tokenizer, "Is the <|video_pad|> left?", a_video(2, 4, 4), video_id)


@pytest.mark.parametrize("answer", ["three", "nan", "inf"])      # float() reads the last two, MRA cannot score them
def test_a_numeric_question_with_a_non_numeric_answer_names_the_row(tmp_path, answer):
    rows = [{"question": "How many?", "ground_truth": answer, "question_type": "object_counting", "path": "a.mp4"}]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    with pytest.raises(data.DataError, match=f"rows\\.json row 1: answer '{answer}' of numeric question type"):
        data.load_samples([str(tmp_path / "rows.json")], ".", "vanilla")


def test_a_row_missing_a_field_names_the_file_the_row_and_the_field(tmp_path):
    rows = [{"question": "q", "ground_truth": "1", "path": "a.mp4"}, {"question": "q", "path": "b.mp4"}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(data.DataError, match=r"rows\.jsonl row 2: missing field 'ground_truth'"):
        data.load_samples([str(tmp_path / "rows.jsonl")], ".", "vanilla")
    (tmp_path / "rows.jsonl").write_text(json.dumps(rows[0]) + "\n" + json.dumps({"question": "q", "ground_truth": "1"}))
    with pytest.raises(data.DataError, match=r"row 2: missing field 'path' \(or 'video', or 'dataset' \+ 'scene_name'\)"):
        data.load_samples([str(tmp_path / "rows.jsonl")], ".", "vanilla")
    (tmp_path / "rows.jsonl").write_text(json.dumps(rows[0]) + "\n" + json.dumps(["q", "1", "b.mp4"]))
    with pytest.raises(data.DataError, match=r"rows\.jsonl row 2: a row must be a JSON object, got list"):
        data.load_samples([str(tmp_path / "rows.jsonl")], ".", "vanilla")


ROW = {"id": 7, "question": "How many?", "ground_truth": "3", "question_type": "object_counting", "path": "a.mp4"}


@pytest.mark.parametrize("change, message", [
    ({"path": 12}, "field 'path' must be a string, got int 12"),
    ({"question": {"text": "How many?"}}, "field 'question' must be a string, got dict"),
    ({"ground_truth": True, "question_type": "object_rel_direction"},
     "field 'ground_truth' must be a string or a number, got bool True"),
    ({"options": "ABCD"}, "field 'options' must be a list of strings, got str 'ABCD'"),
    ({"options": ["A. chair", 2]}, "field 'options' must be a list of strings, got list"),
    ({"question_type": ["object_counting"]}, "field 'question_type' must be a string, got list"),
    ({"question": "  "}, "field 'question' is empty"),
    ({"ground_truth": "", "question_type": "object_rel_direction"}, "field 'ground_truth' is empty"),
    ({"ground_truth": "<answer> </answer>", "question_type": "object_rel_direction"},
     "the answer is empty: an empty completion would match it"),
])
def test_a_mistyped_or_empty_field_names_the_file_the_row_and_the_field(tmp_path, change, message):
    (tmp_path / "rows.jsonl").write_text(json.dumps(ROW) + "\n" + json.dumps(dict(ROW, **change)) + "\n")
    with pytest.raises(data.DataError) as error:
        data.load_samples([str(tmp_path / "rows.jsonl")], ".", "vanilla")
    assert str(error.value) == f"{tmp_path / 'rows.jsonl'} row 2: {message}"


def test_a_truncated_jsonl_line_is_reported_at_its_line_in_the_file(tmp_path):
    text = json.dumps(ROW) + "\n\n" + json.dumps(ROW) + "\n" + json.dumps(ROW)[:21] + "\n"
    (tmp_path / "rows.jsonl").write_text(text)                      # line 2 is blank, line 4 is cut short
    with pytest.raises(data.DataError, match=r"rows\.jsonl line 4: not valid JSON \(.* column 22"):
        data.read_rows(str(tmp_path / "rows.jsonl"))
    (tmp_path / "rows.json").write_text("[\n" + json.dumps(ROW) + ",\n" + json.dumps(ROW).replace('"3"', "three") +
                                        "\n]\n")                  # a JSON list whose line 3 has an unquoted answer
    with pytest.raises(data.DataError, match=r"rows\.json line 3: not valid JSON"):
        data.read_rows(str(tmp_path / "rows.json"))


def test_a_file_that_is_not_text_is_named_not_a_unicode_traceback(tmp_path):
    # VSI-Bench ships as parquet: passed as it is downloaded, it raised a UnicodeDecodeError naming no file.
    (tmp_path / "test-00000-of-00001.parquet").write_bytes(b"PAR1\x15\x04\x15\xff" + bytes(range(256)))
    with pytest.raises(data.DataError, match=r"test-00000-of-00001\.parquet: not UTF-8 text \(byte 7\): .*parquet"):
        data.read_rows(str(tmp_path / "test-00000-of-00001.parquet"))


def test_a_json_object_over_several_lines_is_named_as_such_not_as_invalid_json(tmp_path):
    (tmp_path / "rows.json").write_text(json.dumps({"questions": [ROW], "version": 1}, indent=2))
    with pytest.raises(data.DataError) as error:  # before, "line 1: not valid JSON" of a valid JSON file
        data.read_rows(str(tmp_path / "rows.json"))
    assert str(error.value) == (f"{tmp_path / 'rows.json'}: one JSON object (keys: questions, version), not rows: "
                                "give a JSON list of rows, or one row per line (JSONL)")


def test_ids_stay_as_the_row_gave_them(tmp_path):
    (tmp_path / "rows.json").write_text(json.dumps([ROW, dict(ROW, id="scene7-q2"), {k: v for k, v in ROW.items()
                                                                                   if k != "id"}]))
    samples = data.load_samples([str(tmp_path / "rows.json")], ".", "vanilla")
    assert [s["id"] for s in samples] == [7, "scene7-q2", f"{tmp_path / 'rows.json'} row 3"]


@pytest.mark.parametrize("flags, message", [
    (["-G", "1"], "--num-generations must be at least 2"),
    (["--rewards", "nonsense"], "invalid choice: 'nonsense'"),
    (["--num-frames", "0"], "--num-frames must be at least 1"),
    (["--rewards", "accuracy", "format"], "the format reward needs --prompt-mode think or observe"),
    (["--reward-weights", "1", "2"], "--reward-weights has 2 values for 1 rewards"),
    (["--reward-weights", "nan"], "--reward-weights must be finite numbers"),
    (["--max-completion-length", "0"], "--max-completion-length must be at least 1, got 0"),
    (["--learning-rate", "-1"], "--learning-rate must be positive, got -1.0"),
    (["--temperature", "nan"], "--temperature must be positive, got nan"),
    (["--max-pixels", "0"], "--max-pixels must be at least 784 (one 28x28 patch), got 0"),
    (["--eval-batch-size", "0"], "--eval-batch-size must be at least 1, got 0"),
    (["--save-every", "-1"], "--save-every must be at least 0, got -1"),
    (["--max-steps", "-3"], "--max-steps must be at least 0, got -3"),
    (["--lora-rank", "-4"], "--lora-rank must be at least 0, got -4"),
    (["--clip-eps", "1.5"], "--clip-eps must be at most 1, got 1.5"),
    (["--report-to", "no-such-tracker"], "--report-to no-such-tracker: not installed"),  # not an installed one
    (["--max-bad-video-fraction", "2"], "--max-bad-video-fraction must be at most 1, got 2.0"),
    (["--seed", "-1"], "--seed must be at least 0, got -1"),
    (["--benchmark", "3b"], "--benchmark 3b: qwen2_vl comes in tiny, small, 2b, 7b"),  # 3b is Qwen2.5-VL's
])
def test_bad_flags_stop_with_a_clear_message_before_any_model_is_loaded(synthetic, capsys, flags, message):
    with pytest.raises(SystemExit) as stop:
        vsgrpo.parse_args(["--model", "/nonexistent/model", "--data", synthetic["data"], *flags])
    assert stop.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("prefix", [["--learning", "5e-4"], ["--num-gen", "4"], ["--max-completion", "8"]])
def test_a_prefix_of_a_flag_is_an_error_as_a_misspelt_flag_is(synthetic, capsys, prefix):
    with pytest.raises(SystemExit) as stop:                       # argparse took them for --learning-rate and -G
        vsgrpo.parse_args(["--data", synthetic["data"], *prefix])
    assert stop.value.code == 2 and f"unrecognized arguments: {' '.join(prefix)}" in capsys.readouterr().err


def test_an_output_dir_that_cannot_be_a_directory_is_a_flag_error(synthetic, tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    for out, message in ((tmp_path / "a_file", "is a file, not a directory"),
                         (tmp_path / "a_file" / "run", "is a file, not a directory")):
        with pytest.raises(SystemExit):
            vsgrpo.parse_args(["--data", synthetic["data"], "--output-dir", str(out)])
        assert f"--output-dir {out}: {tmp_path / 'a_file'} {message}" in capsys.readouterr().err


def test_a_model_neither_on_disk_nor_reachable_is_one_line_before_any_work(synthetic, tmp_path):
    done = subprocess.run([sys.executable, os.path.join(HERE, "vsgrpo.py"), "--model", "Qwen/Qwen2-VL-2B-Instruct",
                           "--data", synthetic["data"], "--video-root", synthetic["videos"], "--output-dir",
                           str(tmp_path)], capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip().splitlines()[-1:] == [
        "error: --model Qwen/Qwen2-VL-2B-Instruct: We couldn't connect to 'https://huggingface.co' to load the "
        "files, and couldn't find them in the cached files."]
    assert os.listdir(tmp_path) == []                                   # nothing written


def test_a_model_directory_without_a_checkpoint_is_one_line_naming_the_flag(synthetic, tmp_path):
    vsgrpo.main(training_flags(synthetic, tmp_path / "run", "--max-steps", "1", "--save-every", "1"))
    os.makedirs(tmp_path / "config_only")
    shutil.copy(os.path.join(synthetic["model"], "config.json"), tmp_path / "config_only")
    for directory in (tmp_path / "run", tmp_path / "empty", tmp_path / "config_only"):  # a run's directory too
        os.makedirs(directory, exist_ok=True)
        with pytest.raises(SystemExit) as stopped:
            vsgrpo.main(eval_flags(synthetic, synthetic["data"], tmp_path / "eval") + ["--model", str(directory)])
        problem = f"no config.json in {directory}: not a checkpoint"
        if directory.name == "config_only":
            problem = f"Error no file named model.safetensors, or pytorch_model.bin, found in directory {directory}."
        assert str(stopped.value) == f"error: --model {directory}: {problem}"


def test_accelerates_fp16_mixed_precision_stops_before_any_work_and_bf16_trains(synthetic, tmp_path):
    # On a GPU, fp16's loss scaler backs off only in optimizer.step(), which the non-finite guard skips:
    # the run would stop after 3 "non-finite" steps. The launcher passes its flag in this variable.
    flags = training_flags(synthetic, tmp_path / "fp16", "--max-steps", "1", "--save-every", "0", reward="accuracy")
    done = subprocess.run([sys.executable, os.path.join(HERE, "vsgrpo.py"), *flags], capture_output=True, text=True,
                          env=dict(os.environ, ACCELERATE_MIXED_PRECISION="fp16"))
    assert done.returncode == 1 and "--mixed_precision fp16" in done.stderr.strip().splitlines()[-1]
    assert not os.path.exists(tmp_path / "fp16")                        # nothing written
    flags = training_flags(synthetic, tmp_path / "bf16", "--max-steps", "1", "--save-every", "0", reward="accuracy")
    done = subprocess.run([sys.executable, os.path.join(HERE, "vsgrpo.py"), *flags], capture_output=True, text=True,
                          env=dict(os.environ, ACCELERATE_MIXED_PRECISION="bf16"))
    assert done.returncode == 0 and json.loads(open(tmp_path / "bf16" / "metrics.jsonl").read())["step"] == 1

def test_a_missing_video_is_named_at_the_first_row_that_uses_it(tmp_path):
    (tmp_path / "rows.jsonl").write_text(json.dumps(dict(ROW, path="gone.mp4")) + "\n" +
                                         json.dumps(dict(ROW, path="gone.mp4")) + "\n")
    samples = data.load_samples([str(tmp_path / "rows.jsonl")], str(tmp_path), "vanilla")
    assert data.missing_videos(samples) == {
        str(tmp_path / "gone.mp4"): f"{tmp_path / 'rows.jsonl'} row 1: video not found: {tmp_path / 'gone.mp4'}"}


def test_a_data_path_that_does_not_exist_is_a_flag_error(capsys):
    with pytest.raises(SystemExit):
        vsgrpo.parse_args(["--data", "/nonexistent/vsi100k/*.json"])
    assert "no data file matches '/nonexistent/vsi100k/*.json'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        vsgrpo.parse_args(["--eval-only", "--eval-data", "/nonexistent/vsibench.jsonl"])
    assert "no data file matches '/nonexistent/vsibench.jsonl'" in capsys.readouterr().err


def test_a_data_directory_is_a_flag_error_that_suggests_its_files(tmp_path, capsys):
    (tmp_path / "vsi100k").mkdir()                                  # it raised IsADirectoryError after the flags
    with pytest.raises(SystemExit):
        vsgrpo.parse_args(["--data", str(tmp_path / "vsi100k")])
    assert f"{tmp_path / 'vsi100k'} is a directory: give its files, for example '{tmp_path / 'vsi100k'}/*.json'" in \
        capsys.readouterr().err


def test_a_bad_video_is_reported_remembered_and_replaced_by_a_row_known_to_be_good(synthetic, capsys):
    args = make_args(synthetic)
    samples = data.load_samples([synthetic["data"]], synthetic["videos"], "vanilla")
    samples[1] = dict(samples[1], video="/missing/one.mp4")
    decoded = {}
    loaded, videos, failures = data.load_batch(samples, [0, 1, 2, 3], args, np.random.default_rng(0), decoded, QWEN2)
    assert len(loaded) == len(videos) == 4 and len(failures) == 1
    assert [video for video, ok in decoded.items() if not ok] == ["/missing/one.mp4"]
    assert samples[1] not in loaded and loaded[3]["video"] in {samples[i]["video"] for i in (0, 2, 3)}
    assert "/missing/one.mp4" in capsys.readouterr().err
    loaded, _, failures = data.load_batch(samples, [1, 5], args, np.random.default_rng(0), decoded, QWEN2)
    assert failures == [] and samples[1] not in loaded            # known bad: skipped without another try
    assert capsys.readouterr().err == ""


def test_a_batch_that_cannot_be_filled_comes_back_short_instead_of_raising(synthetic):
    args = make_args(synthetic)
    samples = [dict(s, video=f"/missing/{i}.mp4") for i, s in enumerate(data.load_samples(
        [synthetic["data"]], synthetic["videos"], "vanilla"))]
    decoded = {}
    loaded, _, failures = data.load_batch(samples, [0, 1], args, np.random.default_rng(0), decoded, QWEN2)
    assert loaded == [] and len(failures) == 12 and list(decoded.values()) == [False] * 12     # every video tried once, then given up


def test_each_process_takes_different_questions_and_an_epoch_covers_all_once():
    seen = [i for step in range(3) for rank in range(2) for i in data.batch_indices(step, rank, 2, 2, 12, 0)]
    assert sorted(seen) == list(range(12))
    assert data.batch_indices(3, 0, 2, 2, 12, 0) != data.batch_indices(0, 0, 2, 2, 12, 0)  # reshuffled


# ----------------------------------------------------------------------------- end to end
# A reward that favours one simple behaviour (writing digits), registered the way a fork adds one.
@rewards.reward("digits")
def digit_share(completions: list[str], samples: list[dict]) -> list[float]:
    return [sum(w.isdigit() for w in c.split()) / max(1, len(c.split())) for c in completions]


def training_flags(synthetic, out_dir, *extra, reward="digits"):
    """A small run's flags; a run in a process of its own takes a built-in reward (the test's are not there)."""
    return ["--model", synthetic["model"], "--data", synthetic["data"], "--video-root", synthetic["videos"],
            "--output-dir", str(out_dir), "-G", "4", "--batch-size", "2", "--num-frames", "4",
            "--max-pixels", str(56 * 56), "--max-completion-length", "6", "--rewards", reward,
            "--lora-rank", "4", "--learning-rate", "1e-2", "--log-completions-every", "2", *extra]


def test_training_end_to_end_in_one_process(synthetic, tmp_path, capsys):
    write_benchmark_rows(synthetic, tmp_path / "held_out.jsonl")
    vsgrpo.transformers_logging.enable_progress_bar()                  # as in a new process (the demo turns it off)
    policy = vsgrpo.main(training_flags(synthetic, tmp_path, "--max-steps", "3", "--save-every", "2",
                                        "--eval-data", str(tmp_path / "held_out.jsonl"), "--eval-video-root",
                                        synthetic["videos"], "--eval-every", "3", "--eval-limit", "4"))
    metrics = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    assert "eval_avg" not in metrics[1] and 0 <= metrics[2]["eval_avg"] <= 1
    args = vsgrpo.parse_args(training_flags(synthetic, tmp_path, "--eval-data", str(tmp_path / "held_out.jsonl"),
                                            "--eval-video-root", synthetic["videos"]))
    held_out = data.load_samples(args.eval_data, args.eval_video_root, "vanilla")[:4]     # the step's own evaluation,
    again, _ = vsgrpo.evaluate(policy, vsgrpo.AutoTokenizer.from_pretrained(synthetic["model"]), held_out, args,
                               make_accelerator())                                   # of the final weights, again
    assert metrics[2]["eval_avg"] == rewards.task_scores(again)["Avg"]
    for key in ("loss", "reward", "reward_std", "reward_digits", "zero_std_fraction", "kl", "clip_fraction",
                "completion_length", "completion_length_max", "truncated_fraction", "learning_rate",
                "seconds_generation", "seconds_scoring", "seconds_logprob_passes", "seconds_optimisation",
                "seconds_vision", "generated_tokens_per_s", "policy_tokens_per_s", "peak_memory_gb"):
        assert all(math.isfinite(m[key]) for m in metrics), key
    out, err = capsys.readouterr()
    assert out.count("\n--- ") == 1 and "A=" in out             # completions printed at step 2 alone
    assert "Writing model shards" not in err                    # a 0/1 -> 1/1 bar per save: noise in a job's log
    saved = [line.split(" (")[0] for line in out.splitlines() if line.startswith("saved ")]  # a save can take minutes
    assert saved == [f"saved {tmp_path / 'checkpoint-000002'}", f"saved {tmp_path / 'checkpoint-000003'}"]
    base = Qwen2VLForConditionalGeneration.from_pretrained(synthetic["model"]).state_dict()
    trained = policy.state_dict()
    assert any(v.abs().sum() > 0 for k, v in trained.items() if k.endswith("lora_B"))
    assert all(torch.equal(trained[k], v) for k, v in base.items())        # base weights untouched
    for step in ("000002", "000003"):
        merged = Qwen2VLForConditionalGeneration.from_pretrained(str(tmp_path / f"checkpoint-{step}"))
        assert os.path.exists(tmp_path / f"checkpoint-{step}" / "tokenizer.json")
    q_proj = "model.language_model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[q_proj], base[q_proj])


def test_no_deprecation_warning_points_at_our_own_code(synthetic, tmp_path):
    # transformers 5.24 renamed generate's past_key_values to cache: every run warned from vsgrpo.py.
    write_benchmark_rows(synthetic, tmp_path / "held_out.jsonl")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vsgrpo.main(training_flags(synthetic, tmp_path / "run", "--max-steps", "2", "--gradient-checkpointing",
                                   "--eval-data", str(tmp_path / "held_out.jsonl"), "--eval-video-root",
                                   synthetic["videos"], "--eval-every", "2", "--eval-limit", "2"))
    ours = [f"{w.filename}:{w.lineno}: {w.category.__name__}: {w.message}" for w in caught
            if os.path.basename(w.filename) in ("vsgrpo.py", "data.py", "rewards.py")]
    assert ours == []


def test_gradient_checkpointing_changes_no_step_of_a_run(synthetic, tmp_path):
    # optimise() leaves the policy in training mode, in which checkpointed layers keep no cache: each rollout
    # must sample in eval mode, or step 2 has no prefilled prompt to continue.
    runs = []
    for name, flags in (("plain", []), ("checkpointed", ["--gradient-checkpointing"])):
        vsgrpo.main(training_flags(synthetic, tmp_path / name, "--max-steps", "2", "--save-every", "0", *flags))
        runs.append([json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")])
    for plain, checkpointed in zip(*runs):
        for key in ("loss", "reward", "kl", "grad_norm", "completion_length"):
            assert checkpointed[key] == pytest.approx(plain[key], rel=1e-5, abs=1e-8), key
    assert len(runs[1]) == 2


def test_decoding_the_next_steps_videos_in_the_background_changes_no_step_and_no_skip(synthetic, tmp_path,
                                                                                       monkeypatch, capsys):
    videos = copy_dataset(synthetic, tmp_path)
    open(os.path.join(videos, "synthetic", "train_00005.mp4"), "r+b").truncate(1500)        # undecodable
    flags = lambda out: [*training_flags(synthetic, out, "--max-steps", "6", "--save-every", "6", "--batch-size",
                                         "3", "--log-completions-every", "0"), "--video-root", videos]
    runs = {}
    for prefetch in (True, False):
        monkeypatch.setattr(vsgrpo, "PREFETCH", prefetch)
        data.DECODED.clear()
        runs[prefetch] = (vsgrpo.main(flags(tmp_path / str(prefetch))),
                          [comparable(json.loads(line)) for line in open(tmp_path / str(prefetch) / "metrics.jsonl")])
        skipped = [line for line in capsys.readouterr().err.splitlines() if "skipped" in line]
        assert len(skipped) == 1 and "train_00005.mp4" in skipped[0]                   # once, either way
    (ahead, ahead_log), (in_turn, in_turn_log) = runs[True], runs[False]
    assert ahead_log == in_turn_log and sum(m["bad_videos"] for m in ahead_log) == 1
    for (name, a), (_, b) in zip(ahead.named_parameters(), in_turn.named_parameters()):
        assert torch.equal(a, b), name


def test_data_smaller_than_one_batch_still_trains_one_step(synthetic, tmp_path):
    vsgrpo.main(training_flags(synthetic, tmp_path, "--batch-size", "16", "-G", "2", "--save-every", "0"))  # 12 rows
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [1]


def test_training_raises_the_reward_it_is_given(synthetic, tmp_path):
    flags = training_flags(synthetic, tmp_path, "--max-steps", "16", "-G", "8", "--lora-rank", "0",
                           "--log-completions-every", "0", "--save-every", "100")
    vsgrpo.main(flags)
    reward = [json.loads(line)["reward"] for line in open(tmp_path / "metrics.jsonl")]
    first, last = np.mean(reward[:4]), np.mean(reward[-4:])
    assert last > first + 0.15, reward


LAUNCHED = """
import os, sys, torch
sys.path.insert(0, {here!r})
import rewards, vsgrpo
rewards.reward("digits")(lambda completions, samples: [c.count(" ") / 10 for c in completions])
policy = vsgrpo.main(sys.argv[1:])
torch.save({{k: v for k, v in policy.state_dict().items() if "lora_" in k}},
           os.path.join(sys.argv[sys.argv.index("--output-dir") + 1], f"rank{{os.environ['RANK']}}.pt"))
"""


def test_two_processes_under_accelerate_launch_end_with_identical_weights(synthetic, tmp_path):
    script = tmp_path / "launched.py"
    script.write_text(LAUNCHED.format(here=HERE))
    done = run_processes([*LAUNCH_TWO, str(script),
                          *training_flags(synthetic, tmp_path / "run", "--max-steps", "2", "--save-every", "100")])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("2 process(es)") == 1                       # said once, by the process that keeps the books
    rank0, rank1 = (torch.load(tmp_path / "run" / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert rank0.keys() == rank1.keys() and any(v.abs().sum() > 0 for k, v in rank0.items() if "lora_B" in k)
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    assert len(open(tmp_path / "run" / "metrics.jsonl").readlines()) == 2




RECORDED = """
import os, sys, torch
sys.path.insert(0, {here!r})
import vsgrpo
rollout = vsgrpo.rollout
def recorded(*args, **kwargs):  # keeps what this process sampled
    ro = rollout(*args, **kwargs)
    torch.save(ro.completion_ids, os.path.join({out!r}, f"completions-rank{{os.environ['RANK']}}.pt"))
    return ro
vsgrpo.rollout = recorded
vsgrpo.main(sys.argv[1:])
"""


def test_processes_given_the_same_question_sample_their_own_answers_and_a_bad_video_counts_once(synthetic, tmp_path):
    # Four rows of one question, each with its own copy of one video. The row process 0 takes first cannot be decoded:
    # it trains on another copy instead, so both processes see the same prompt and video.
    (tmp_path / "videos" / "synthetic").mkdir(parents=True)
    row = synthetic["rows"][0]
    with open(tmp_path / "same.jsonl", "w") as f:
        for i in range(4):
            shutil.copy(os.path.join(synthetic["videos"], "synthetic", f"{row['scene_name']}.mp4"),
                        tmp_path / "videos" / "synthetic" / f"copy{i}.mp4")
            f.write(json.dumps(dict(row, id=f"copy{i}", scene_name=f"copy{i}")) + "\n")
    first = data.batch_indices(0, 0, 2, 1, 4, 0)[0]
    open(tmp_path / "videos" / "synthetic" / f"copy{first}.mp4", "r+b").truncate(1500)
    script = tmp_path / "recorded.py"
    script.write_text(RECORDED.format(here=HERE, out=str(tmp_path)))
    done = run_processes([*LAUNCH_TWO, str(script), *training_flags(
        synthetic, tmp_path / "run", "--max-steps", "1", "--batch-size", "1", "--save-every", "0", reward="accuracy"),
        "--data", str(tmp_path / "same.jsonl"), "--video-root", str(tmp_path / "videos")])
    assert done.returncode == 0, done.stderr[-3000:]
    sampled = [torch.load(tmp_path / f"completions-rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert not torch.equal(*sampled)                                 # with one seed for both, they were identical
    [metrics] = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert metrics["bad_videos"] == 1                                           # summed over processes


COMBINED = """
import json, sys
sys.path.insert(0, {here!r})
import vsgrpo
accelerator = vsgrpo.Accelerator(cpu=True)
r = accelerator.process_index
metrics = {{"reward": r / 2, "bad_videos": float(r), "video_encodings": 1.0 + r, "completion_length_max": 3.0 + r,
           "peak_memory_gb": 2.0 - r, "learning_rate": 1e-5}}
with open(f"{{sys.argv[1]}}{{r}}.json", "w") as f:
    json.dump(vsgrpo.average_over_processes(accelerator, metrics), f)
accelerator.end_training()
"""


def test_metrics_combine_over_processes_counts_adding_up_maxima_and_peaks_taking_the_max_the_rest_averaging(tmp_path):
    script = tmp_path / "combined.py"
    script.write_text(COMBINED.format(here=HERE))
    done = run_processes([*LAUNCH_TWO, str(script), str(tmp_path / "rank")])
    assert done.returncode == 0, done.stderr[-3000:]
    # Logged as given: in float32, 1e-5 was logged as 9.999999747378752e-06.
    expected = {"reward": 0.25, "bad_videos": 1, "video_encodings": 3, "completion_length_max": 4, "peak_memory_gb": 2,
                "learning_rate": 1e-5}
    assert [json.load(open(tmp_path / f"rank{r}.json")) for r in (0, 1)] == [expected, expected]

TOKEN_WEIGHTS = """
import sys, torch
sys.path.insert(0, {here!r})
import data, vsgrpo
model_dir, data_path, videos, out = sys.argv[1:]
accelerator = vsgrpo.Accelerator(cpu=True)
rank = accelerator.process_index
args = vsgrpo.parse_args(["--model", model_dir, "--data", data_path, "--num-frames", "4", "--max-pixels", "3136",
                          "-G", "2", "--lora-rank", "4", "--beta", "0", "--loss-aggregation", "token",
                          "--max-grad-norm", "1e9", "--micro-batch-size", "1"])
torch.manual_seed(0)
model, tokenizer = vsgrpo.load_model(args, accelerator.device)
optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
wrapped, optimizer = accelerator.prepare(model, optimizer)
sample = data.load_samples([data_path], videos, "vanilla")[rank]
video = data.load_video(sample["video"], 4, 3136, data.FAMILIES["qwen2_vl"])
batch = vsgrpo.collate([sample], [data.question_text(sample)], [video], tokenizer, model.config, "cpu")
ids = torch.tensor({ids!r}[rank])
mask, truncated = vsgrpo.completion_mask(ids, [tokenizer.eos_token_id])
ro = vsgrpo.Rollout(batch, ids, mask, truncated, [], {{}}, torch.tensor([1.0, -1.0]), None, None)
before = {{n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}}
vsgrpo.optimise(wrapped, model, optimizer, accelerator, ro, args)
torch.save({{n: before[n] - p.detach() for n, p in model.named_parameters() if p.requires_grad}}, out + str(rank))
accelerator.end_training()
"""


def test_token_aggregation_weighs_every_token_of_the_step_the_same_across_processes(synthetic, tmp_path):
    # Rank 0's two completions have 2 and 1 real tokens, rank 1's have 6 and 5: 14 in the step.
    _, model, tokenizer = load_tiny(synthetic)
    eos, word = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("how")
    ids = [[[word, eos] + [eos] * 4, [eos] * 6], [[word] * 6, [word] * 4 + [eos] * 2]]
    script = tmp_path / "token_weights.py"
    script.write_text(TOKEN_WEIGHTS.format(here=HERE, ids=ids))
    done = run_processes([*LAUNCH_TWO, str(script), synthetic["model"], synthetic["data"], synthetic["videos"],
                          str(tmp_path / "step")])
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [torch.load(tmp_path / f"step{r}", weights_only=True) for r in (0, 1)]
    # By hand, in one process: -(1/14) * sum over all 14 tokens of A_i * grad log pi (ratio 1, beta 0).
    args = make_args(synthetic, "--lora-rank", "4", "-G", "2")
    torch.manual_seed(0)
    model, tokenizer = vsgrpo.load_model(args, torch.device("cpu"))
    total = 0
    for rank in (0, 1):
        batch = batch_of(synthetic, [rank], args, tokenizer, model)
        completion_ids = torch.tensor(ids[rank])
        mask, _ = vsgrpo.completion_mask(completion_ids, [eos])
        logps = vsgrpo.completion_logps(model, batch, completion_ids, mask, torch.arange(2), args)
        total = total + (torch.where(mask.bool(), logps, 0.0).sum(1) * torch.tensor([1.0, -1.0])).sum()
    assert int(sum(vsgrpo.completion_mask(torch.tensor(i), [eos])[0].sum() for i in ids)) == 14
    (-total / 14).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(steps[0][name], p.grad, atol=1e-6), name
            assert torch.equal(steps[0][name], steps[1][name])
    assert any(p.grad.abs().max() > 1e-4 for p in model.parameters() if p.requires_grad)


def test_questions_about_the_same_video_share_one_encoding(synthetic):
    args, model, tokenizer = load_tiny(synthetic)
    batch = batch_of(synthetic, [0, 0, 1, 0], args, tokenizer, model)  # questions 0, 1 and 3: one video
    encoded = vsgrpo.count_video_encodings([model])
    features = vsgrpo.encode_videos(model, batch)
    assert encoded["videos"] == 2 and features[0] is features[1] is features[3]
    with torch.no_grad():
        for i in (0, 2):                                                # each equals encoding it alone
            alone = model.model.get_video_features(batch.pixel_values[i], batch.video_grid_thw[i:i + 1])
            assert torch.allclose(features[i][0], alone.pooler_output[0], atol=1e-6) and len(features[i]) == 1


def test_reuse_refuses_a_trainable_vision_tower(synthetic):
    args, model, tokenizer = load_tiny(synthetic)
    batch = batch_of(synthetic, [0], args, tokenizer, model)
    assert len(vsgrpo.encode_videos(model, batch)) == 1
    model.model.visual.requires_grad_(True)             # a fork that trains the tower: features go stale
    with pytest.raises(RuntimeError, match="--straightforward"):
        vsgrpo.encode_videos(model, batch)


def test_a_step_encodes_each_video_once_and_trains_as_the_straightforward_path(synthetic, tmp_path):
    logs = {}
    for name, extra in (("reuse", []), ("plain", ["--straightforward"])):
        vsgrpo.main(training_flags(synthetic, tmp_path / name, "--max-steps", "2", "--save-every", "0",
                                   "--log-completions-every", "0", *extra))
        logs[name] = [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]
        assert not os.path.exists(tmp_path / name / "checkpoint-000002")                   # --save-every 0
    # B = 2 questions, G = 4: generation 2 videos, then the reference and policy passes 8 copies each
    assert [m["video_encodings"] for m in logs["reuse"]] == [2, 2]
    assert [m["video_encodings"] for m in logs["plain"]] == [2 + 8 + 8] * 2
    for reuse, plain in zip(logs["reuse"], logs["plain"]):
        assert reuse["reward"] == plain["reward"] and reuse["completion_length"] == plain["completion_length"]
        assert reuse["loss"] == pytest.approx(plain["loss"], abs=1e-5)
        assert reuse["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-5) and reuse["grad_norm"] > 0
    assert logs["reuse"][1]["kl"] == pytest.approx(logs["plain"][1]["kl"], rel=1e-5) and logs["reuse"][1]["kl"] > 0


def test_benchmark_under_accelerate_launch_times_both_paths_on_the_same_steps(tmp_path):
    done = run_processes([*LAUNCH_TWO, os.path.join(HERE, "vsgrpo.py"), "--benchmark", "tiny", "--output-dir",
                          str(tmp_path), "--max-steps", "3", "-G", "4", "--num-frames", "4", "--max-pixels",
                          str(56 * 56), "--max-completion-length", "4", "--batch-size", "1"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.load(open(tmp_path / "benchmark.json"))["results"]
    # 2 processes x 1 question: the default path encodes each video once; the straightforward path encodes
    # it in generation and in the reference and policy passes' G = 4 copies each; summed over the processes.
    assert results["default"]["video_encodings"] == 2 and results["straightforward"]["video_encodings"] == 2 * (1 + 4 + 4)
    for path in results.values():
        assert path["step_seconds"] > 0 and path["peak_memory_gb"] > 0
        assert path["generated_tokens_per_s"] > 0 and path["policy_tokens_per_s"] > 0
        # 2 processes x 1 question a step: 117,000 / 2 steps of step_seconds, on 2 devices
        assert path["questions_per_s"] == pytest.approx(2 / path["step_seconds"])
        assert path["epoch_device_hours"] == pytest.approx(117_000 / 2 * path["step_seconds"] * 2 / 3600)
        assert "policy_mfu" not in path                                     # a CPU has no listed bf16 peak
    assert len(os.listdir(tmp_path / "videos" / "synthetic")) == 2 * 3                  # a new video every step
    assert "| video encodings | 18 | 2 |" in done.stdout and "steps per second, default / straightforward" in done.stdout


def test_each_benchmark_path_decodes_its_videos_as_a_run_of_its_own_would(tmp_path, monkeypatch):
    # The default path ran second and took every video from the straightforward path's cache: its steps were
    # timed without decoding.
    decodes, read_frames = [], data.read_frames
    monkeypatch.setattr(data, "read_frames", lambda path, num_frames: decodes.append(path) or read_frames(path, num_frames))
    results = vsgrpo.main(["--benchmark", "tiny", "--output-dir", str(tmp_path), "--max-steps", "3", "-G", "2",
                           "--num-frames", "2", "--max-pixels", str(56 * 56), "--max-completion-length", "2",
                           "--batch-size", "1"])
    videos = sorted(str(tmp_path / "videos" / "synthetic" / name) for name in os.listdir(tmp_path / "videos" / "synthetic"))
    assert len(videos) == 3 and sorted(decodes) == sorted(videos * 2)
    for path in ("straightforward", "default"):  # each figure is the mean of steps 2 and 3: step 1 warms up
        logged = [json.loads(line) for line in open(tmp_path / path / "metrics.jsonl")][1:]
        assert results[path]["seconds_generation"] == pytest.approx(np.mean([m["seconds_generation"] for m in logged]))


def test_a_path_that_runs_out_of_memory_is_reported_as_such_and_the_other_is_still_measured(
        tmp_path, monkeypatch, capsys):
    optimise = vsgrpo.optimise

    def out_of_memory_when_straightforward(model, policy, optimizer, accelerator, ro, args):
        if args.straightforward:  # as 7B's straightforward path did on an H200, in its first optimisation
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.32 GiB.\nmore")
        return optimise(model, policy, optimizer, accelerator, ro, args)
    monkeypatch.setattr(vsgrpo, "optimise", out_of_memory_when_straightforward)
    results = vsgrpo.main(["--benchmark", "tiny", "--output-dir", str(tmp_path), "--max-steps", "2", "-G", "2",
                           "--num-frames", "2", "--max-pixels", str(56 * 56), "--max-completion-length", "2",
                           "--batch-size", "1"])
    assert results["straightforward"] == {"out_of_memory": "CUDA out of memory. Tried to allocate 2.32 GiB."}
    assert results["default"]["step_seconds"] > 0
    assert json.load(open(tmp_path / "benchmark.json"))["results"] == results
    out = capsys.readouterr().out
    assert "| out of memory | CUDA out of memory. Tried to allocate 2.32 GiB. | - |" in out
    assert f"| questions per s | - | {results['default']['questions_per_s']:.4g} |" in out
    assert "model-FLOPs utilisation: not computed" in out


def test_model_flops_utilisation_is_6_n_tokens_per_second_over_the_devices_bf16_peak(
        synthetic, tmp_path, monkeypatch):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(
        {"step": s, "seconds_optimisation": 2.0, "policy_tokens_per_s": tokens, "peak_memory_gb": 1.0}) + "\n"
        for s, tokens in ((1, 1.0), (2, 3e9), (3, 5e9))))                 # step 1 warms up: not counted
    _, policy, _ = load_tiny(synthetic, lora_rank=4)
    _, base, _ = load_tiny(synthetic, lora_rank=0)
    parameters = sum(p.numel() for p in base.model.language_model.parameters())  # the adapters not counted
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    run = vsgrpo.argparse.Namespace(output_dir=str(tmp_path), batch_size=16)
    figures = vsgrpo.path_figures(run, policy, 1)
    assert figures["policy_mfu"] == pytest.approx(6 * parameters * 4e9 / 989e12)
    assert figures["questions_per_s"] == pytest.approx(16 / 2.0)


@pytest.mark.parametrize("family, size, billions", [  # the model cards' parameter counts, to 0.01B
    ("qwen2_vl", "2b", 2.21), ("qwen2_vl", "7b", 8.29), ("qwen2_5_vl", "3b", 3.75), ("qwen2_5_vl", "7b", 8.29),
    ("qwen3_vl", "2b", 2.13), ("qwen3_vl", "4b", 4.44), ("qwen3_vl", "8b", 8.77)])
def test_the_full_size_shapes_have_their_checkpoints_published_parameter_counts(family, size, billions):
    tokenizer = vsgrpo.word_level_tokenizer(["a b"])
    with torch.device("meta"):
        model = vsgrpo.AutoModelForImageTextToText.from_config(vsgrpo.model_config(family, size, tokenizer))
    assert model.config.model_type == family
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == billions


# ----------------------------------------------------------------------------- VSI-Bench evaluation
def test_benchmark_clean_up_takes_the_first_word_without_trailing_periods():
    assert rewards.clean_prediction("B. chair") == "B"
    assert rewards.clean_prediction("B.") == "B"
    assert rewards.clean_prediction("3.5 meters") == "3.5"
    # Up to the first space, as the benchmark splits: not at a newline, and nothing before a leading space.
    assert rewards.clean_prediction("3\nmeters") == "3\nmeters" and rewards.clean_prediction(" 3") == ""
    assert rewards.clean_prediction("<think>it is B</think><answer>C. sofa</answer>", "think") == "C"


@pytest.mark.parametrize("raw, expected", [("B.", 1.0), ("b", 1.0), ("B. chair", 1.0), ("C", 0.0), ("chair", 0.0)])
def test_multiple_choice_is_a_case_insensitive_letter_match(raw, expected):
    sample = {"kind": "word", "answer": "B"}
    assert rewards.benchmark_score(rewards.clean_prediction(raw), sample) == expected


def test_numeric_benchmark_answers_score_mra_and_unparseable_ones_zero():
    sample = {"kind": "numeric", "answer": "10"}
    assert rewards.benchmark_score(rewards.clean_prediction("15. metres"), sample) == pytest.approx(0.1)
    assert rewards.benchmark_score(rewards.clean_prediction("10.5"), sample) == pytest.approx(1.0)
    assert rewards.benchmark_score(rewards.clean_prediction("ten"), sample) == 0.0


def test_task_scores_average_rel_direction_types_then_tasks_unweighted():
    rows = [("object_counting", 1.0), ("object_counting", 0.0), ("object_counting", 0.5),
            ("object_rel_direction_easy", 1.0), ("object_rel_direction_easy", 1.0),
            ("object_rel_direction_medium", 0.0), ("object_rel_direction_hard", 1.0)]
    scores = rewards.task_scores([{"question_type": t, "score": s} for t, s in rows])
    assert scores["Count"] == pytest.approx(0.5)
    assert scores["RelDir"] == pytest.approx((1.0 + 0.0 + 1.0) / 3)     # not 3/4 pooled
    assert scores["Avg"] == pytest.approx((0.5 + 2 / 3) / 2)
    # A task counts once any of its types has questions (--eval-limit can leave out the others).
    assert rewards.task_scores([{"question_type": "object_rel_direction_hard", "score": 1.0}]) == \
        {"RelDir": 1.0, "Avg": 1.0}


def write_benchmark_rows(synthetic, path, answers: dict | None = None) -> list[dict]:
    """23 rows in VSI-Bench's format: all ten question types over the synthetic videos, and two bad rows.

    `answers` overrides ground truths by id.
    """
    rng = np.random.default_rng(0)
    rows = []
    for i, question_type in enumerate(sorted(rewards.BENCHMARK_TYPES) * 2 + ["object_counting"]):
        row = {"id": i, "dataset": "synthetic", "scene_name": f"train_{i % 12:05d}", "question_type": question_type,
               "question": f"How many chairs are there? ({question_type})"}
        if question_type in data.NUMERIC_TYPES:
            row.update(ground_truth=str(int(rng.integers(1, 9))), options=None)
        else:
            row.update(ground_truth=str(rng.choice(list("ABCD"))),
                       options=["A. chair", "B. table", "C. sofa", "D. lamp"])
        rows.append(row)
    for row in rows:
        row["ground_truth"] = (answers or {}).get(row["id"], row["ground_truth"])
    rows.append(dict(rows[0], id=100, question_type="object_colour"))              # unknown type
    rows.append(dict(rows[0], id=101, scene_name="no_such_scene"))                  # missing video
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return rows


def eval_flags(synthetic, rows_path, out_dir):
    return ["--eval-only", "--model", synthetic["model"], "--eval-data", str(rows_path), "--eval-video-root",
            synthetic["videos"], "--output-dir", str(out_dir), "--eval-num-frames", "4", "--max-pixels", str(56 * 56),
            "--eval-batch-size", "5"]


def test_evaluation_metrics_are_reproduced_from_its_predictions(synthetic, tmp_path, capsys):
    write_benchmark_rows(synthetic, tmp_path / "vsibench.jsonl")
    vsgrpo.main(eval_flags(synthetic, tmp_path / "vsibench.jsonl", tmp_path / "first"))
    # A random model is never right; make every third answer its own (greedy, so repeatable) upper-cased
    # prediction, so that the scores mix hits and misses.
    first = [json.loads(line) for line in open(tmp_path / "first" / "predictions.jsonl")]
    answers = {p["id"]: p["prediction"].upper() for p in first[::3]
               if p["prediction"] and p["question_type"] not in data.NUMERIC_TYPES}
    rows = write_benchmark_rows(synthetic, tmp_path / "vsibench.jsonl", answers)
    capsys.readouterr()
    metrics = vsgrpo.main(eval_flags(synthetic, tmp_path / "vsibench.jsonl", tmp_path / "eval"))
    predictions = [json.loads(line) for line in open(tmp_path / "eval" / "predictions.jsonl")]
    assert 0 < sum(p["score"] for p in predictions) < len(predictions)
    assert len(predictions) == len(rows) - 2 == metrics["evaluated"]
    assert sorted(item["id"] for item in metrics["not_evaluated"]) == [100, 101]
    assert [p["id"] for p in predictions] == [r["id"] for r in rows[:-2]]      # integers, as VSI-Bench's are
    tokenizer = vsgrpo.AutoTokenizer.from_pretrained(synthetic["model"])  # the benchmark decodes 16 new tokens
    assert max(len(tokenizer(p["raw_output"], add_special_tokens=False)["input_ids"]) for p in predictions) == 16
    by_type = {}
    for p in predictions:
        cleaned = p["raw_output"].split(" ")[0].rstrip(".").strip()         # the benchmark's clean-up, again
        if p["question_type"] in data.NUMERIC_TYPES:
            try:
                error = abs(float(cleaned) - float(p["ground_truth"])) / float(p["ground_truth"])
                score = sum(error <= 1 - theta for theta in np.linspace(0.5, 0.95, 10)) / 10
            except (ValueError, ZeroDivisionError):
                score = 0.0
        else:
            score = float(cleaned.lower() == p["ground_truth"].lower())
        assert p["score"] == pytest.approx(score)
        by_type.setdefault(p["question_type"], []).append(score)
    mean = lambda values: sum(values) / len(values)
    tasks = {task: mean([mean(by_type[t]) for t in types]) for task, types in rewards.BENCHMARK_TASKS.items()}
    assert metrics["scores"] == pytest.approx({**tasks, "Avg": mean(list(tasks.values()))})
    assert metrics["questions"]["Count"] == 3 and metrics["questions"]["RelDir"] == 6
    assert json.load(open(tmp_path / "eval" / "metrics.json"))["scores"] == pytest.approx(metrics["scores"])
    assert metrics["settings"] == {"model": synthetic["model"], "prompt": "vanilla", "num_frames": 4,
                                   "max_pixels": 56 * 56}                    # --eval-num-frames, not --num-frames
    table = capsys.readouterr().out
    assert "Avg |    Count |  AbsDist |  ObjSize | RoomSize |  RelDist |   RelDir |    Route |    Order" in table


def test_evaluation_with_the_think_prompt_decodes_the_training_length_and_scores_only_the_answer_tag(synthetic,
                                                                                                    tmp_path):
    write_benchmark_rows(synthetic, tmp_path / "vsibench.jsonl")
    vsgrpo.main(eval_flags(synthetic, tmp_path / "vsibench.jsonl", tmp_path / "eval") +
                ["--eval-prompt", "think", "--max-completion-length", "24"])
    predictions = [json.loads(line) for line in open(tmp_path / "eval" / "predictions.jsonl")]
    tokenizer = vsgrpo.AutoTokenizer.from_pretrained(synthetic["model"])   # 16 new tokens would cut off the thinking
    assert max(len(tokenizer(p["raw_output"], add_special_tokens=False)["input_ids"]) for p in predictions) == 24
    assert all(p["prompt"].endswith(data.PROMPTS["think"]) for p in predictions)
    assert all(p["prediction"] == "" and p["score"] == 0 for p in predictions if "<answer>" not in p["raw_output"])


def test_evaluation_with_no_video_where_the_rows_point_stops_before_loading_the_model(synthetic, tmp_path,
                                                                                       monkeypatch):
    write_benchmark_rows(synthetic, tmp_path / "vsibench.jsonl")
    flags = eval_flags(synthetic, tmp_path / "vsibench.jsonl", tmp_path / "eval")
    flags[flags.index("--eval-video-root") + 1] = str(tmp_path / "videos")          # a wrong root
    monkeypatch.setattr(vsgrpo, "load_model", None)                  # before, it loaded and "evaluated" 0 of 23
    with pytest.raises(SystemExit, match=f"--eval-video-root {tmp_path / 'videos'}: none of the 13 videos the rows "
                                         f"name is there \\(for example {tmp_path / 'videos' / 'synthetic'}"):
        vsgrpo.main(flags)
    assert not os.path.exists(tmp_path / "eval" / "predictions.jsonl")


def test_evaluation_of_rows_of_no_vsi_bench_type_stops_before_loading_the_model(synthetic, tmp_path):
    # Types of the demo's own data: it loaded the model, answered nothing and printed an Avg of 0.0 over no task.
    rows = [r for r in synthetic["rows"] if r["question_type"] != "object_counting"]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SystemExit, match="--eval-data: none of the 8 rows is of a question type VSI-Bench scores "
                                         r"\(found: object_colour, object_rel_direction\)"):
        vsgrpo.main(eval_flags(synthetic, tmp_path / "rows.jsonl", tmp_path / "eval") + ["--model", "/no/such/model"])


def test_a_partial_evaluation_says_how_many_tasks_its_average_covers(synthetic, tmp_path, capsys):
    rows = write_benchmark_rows(synthetic, tmp_path / "all.jsonl")
    with open(tmp_path / "two_tasks.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows if r["question_type"] in ("object_counting", "route_planning"))
    metrics = vsgrpo.main(eval_flags(synthetic, tmp_path / "two_tasks.jsonl", tmp_path / "eval"))
    assert set(metrics["scores"]) == {"Count", "Route", "Avg"} and metrics["tasks_in_avg"] == 2
    assert json.load(open(tmp_path / "eval" / "metrics.json"))["tasks_in_avg"] == 2
    out = capsys.readouterr().out
    assert "Avg(2/8) |    Count |" in out and "Avg covers 2 of VSI-Bench's 8 tasks" in out


def test_evaluation_names_at_most_ten_unscored_rows_and_metrics_json_lists_them_all(synthetic, tmp_path, capsys):
    # With one of VSI-Bench's three video zips not unzipped, about 1,700 rows go unscored: one line each
    # scrolled the table away.
    rows = write_benchmark_rows(synthetic, tmp_path / "vsibench.jsonl")
    rows += [dict(rows[0], id=200 + i, scene_name=f"missing_{i}") for i in range(11)]
    with open(tmp_path / "vsibench.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    metrics = vsgrpo.main(eval_flags(synthetic, tmp_path / "vsibench.jsonl", tmp_path / "eval"))
    err = capsys.readouterr().err
    assert len(metrics["not_evaluated"]) == 13 and err.count("  not evaluated: ") == 10
    assert f"and 3 more: {tmp_path / 'eval' / 'metrics.json'} lists every row not evaluated" in err


def test_evaluation_decodes_videos_a_batch_at_a_time_and_shows_progress(synthetic, tmp_path, monkeypatch, capsys):
    rows = write_benchmark_rows(synthetic, tmp_path / "vsibench.jsonl")
    loaded, at_generate = [], []
    load_video, generate = vsgrpo.load_video, vsgrpo.generate
    monkeypatch.setattr(vsgrpo, "load_video", lambda *a: loaded.append(1) or load_video(*a))
    monkeypatch.setattr(vsgrpo, "generate", lambda *a: at_generate.append(len(loaded)) or generate(*a))
    vsgrpo.main(eval_flags(synthetic, tmp_path / "vsibench.jsonl", tmp_path / "eval") + ["--eval-batch-size", "4"])
    # 23 rows, batches of 4. Each batch is decoded just before it is answered, never the whole file
    # first: 4, 8, ... 20 videos; the last batch (rows 20-22) decodes row 20 and tries the missing
    # video of row 22, while row 21's unknown type is refused before any decoding.
    assert len(rows) == 23 and at_generate == [4, 8, 12, 16, 20, 22]
    assert "evaluated 23 of this process's 23 questions" in capsys.readouterr().out

def test_evaluation_progress_counts_the_questions_answered_and_never_shows_zero(synthetic, tmp_path, monkeypatch):
    write_benchmark_rows(synthetic, tmp_path / "vsibench.jsonl")                  # 23 rows
    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    vsgrpo.main(eval_flags(synthetic, tmp_path / "vsibench.jsonl", tmp_path / "eval") + ["--eval-batch-size", "8"])
    assert re.findall(r"evaluated (\d+) of this process's 23", terminal.getvalue()) == ["8", "16", "23"]


def test_evaluation_prompts_follow_the_protocol_character_for_character(synthetic, tmp_path):
    write_benchmark_rows(synthetic, tmp_path / "vsibench.jsonl")
    vsgrpo.main(eval_flags(synthetic, tmp_path / "vsibench.jsonl", tmp_path / "eval"))
    prompts = {p["question_type"]: p["prompt"] for p in map(json.loads, open(tmp_path / "eval" / "predictions.jsonl"))}
    assert prompts["object_counting"] == ("These are frames of a video.\nHow many chairs are there? (object_counting)\n"
                                          "Please answer the question using a single word or phrase.")
    assert prompts["route_planning"] == ("These are frames of a video.\nHow many chairs are there? (route_planning)\n"
                                         "Options:\nA. chair\nB. table\nC. sofa\nD. lamp\n"
                                         "Answer with the option's letter from the given choices directly.")


def test_evaluation_with_two_processes_equals_one_process(synthetic, tmp_path):
    write_benchmark_rows(synthetic, tmp_path / "vsibench.jsonl")               # 23 rows: odd, for 2 processes
    # Both runs in the same numeric setting (one thread, one question per batch), so any
    # difference can only come from sharding and gathering: a row dropped, doubled or misplaced.
    flags = lambda out: [os.path.join(HERE, "vsgrpo.py"), *eval_flags(synthetic, tmp_path / "vsibench.jsonl", out),
                         "--eval-batch-size", "1"]
    for command in ([sys.executable, *flags(tmp_path / "one")], [*LAUNCH_TWO, *flags(tmp_path / "two")]):
        done = run_processes(command)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stderr.count("Loading weights: 100%") == 1                  # one bar, not one per process
    one, two = (json.load(open(tmp_path / d / "metrics.json")) for d in ("one", "two"))
    assert one["scores"] == two["scores"] and one["not_evaluated"] == two["not_evaluated"]
    assert open(tmp_path / "one" / "predictions.jsonl").read() == open(tmp_path / "two" / "predictions.jsonl").read()
    assert one["evaluated"] == 21


# ----------------------------------------------------------------------------- the README is true
def test_help_shows_every_flag_with_its_default(capsys):
    with pytest.raises(SystemExit):
        vsgrpo.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())            # argparse wraps lines
    for action in vsgrpo.build_parser()._actions:
        if action.dest != "help" and action.nargs != 0 and action.default is not None:  # a switch is off unless given
            assert f"{action.option_strings[-1]}" in text and f"(default: {action.default})" in text, action.dest
    # Flags without a default value (--data, --resume, ...) show none, or say it in words, once.
    assert "(default: None)" not in text and "(default: False)" not in text and text.count("default: all 1") == 1


def test_readme_test_command_is_the_one_ci_runs_after_the_readmes_own_set_up():
    readme = open(os.path.join(HERE, "README.md")).read()
    ci = open(os.path.join(HERE, ".ci", "run")).read()
    command = "python -m pytest -q test_vsgrpo.py"
    assert f"```bash\n{command}\n```" in readme and ci.rstrip().endswith(command)
    # CI takes the set-up block out of the README and runs it: a fresh venv, then the installs.
    setup = subprocess.run(["awk", "/^## Set-up/ {s = 1} s && /^```bash/ {c = 1; next} c && /^```/ {exit} c",
                            os.path.join(HERE, "README.md")], capture_output=True, text=True).stdout
    assert setup.startswith("python3 -m venv .venv && . .venv/bin/activate\n")
    assert "pip install torch==2.13.0" in setup and "-r requirements.txt pytest" in setup
    assert 'eval "$setup"' in ci and "## Set-up" in ci


def test_the_readmes_reward_example_registers_and_scores_as_written(synthetic):
    readme = open(os.path.join(HERE, "README.md")).read()
    example = readme.split("## Adding a reward")[1].split("```python\n")[1].split("```")[0]
    flags = readme.split("## Adding a reward")[1].split("Then `")[1].split("`")[0].split()
    try:
        exec(example, vars(rewards))                                     # as if written into rewards.py
        args = vsgrpo.parse_args(["--data", synthetic["data"], *flags])          # --rewards accuracy brevity ...
        samples = [{"answer": "left", "kind": "word", "prompt_mode": "vanilla"}] * 2
        scores = rewards.score_completions(["left", "it is to the left"], samples, args.rewards, args.reward_weights)
    finally:
        rewards.REWARDS.pop("brevity", None)
    # accuracy, an exact word match: 1 and 0; brevity: 1 for one word, 0 for five; total = accuracy + 0.2 brevity.
    assert scores["brevity"] == [1.0, 0.0] and scores["total"] == [1.2, 0.0]


# ----------------------------------------------------------------------------- the offline demo
def test_no_video_baseline_is_the_best_single_answer_per_type():
    rows = [{"question_type": "count", "kind": "numeric", "answer": a} for a in ("2", "2", "4")] + \
           [{"question_type": "side", "kind": "word", "answer": a} for a in ("left", "right", "right", "right")]
    best = rewards.no_video_baseline(rows)
    # "2": MRA 1, 1, 0 (|2-4|/4 = 0.5 passes only theta 0.5: 0.1) -> (1 + 1 + 0.1) / 3 = 0.7; "4" scores 0 on the 2s
    assert best["count"] == pytest.approx(2.1 / 3)
    assert best["side"] == pytest.approx(0.75)


def test_the_demo_under_accelerate_launch_writes_its_files_once_and_prints_one_table(tmp_path):
    # One process writes the data and the model while the other waits: two writers could each truncate a file the
    # other is reading (a race this test cannot provoke on demand; it checks the demo runs under the launcher).
    # In Qwen3-VL: two processes train a family other than the paper's, and save it.
    done = run_processes([*LAUNCH_TWO, os.path.join(HERE, "vsgrpo.py"), "--demo", "--output-dir", str(tmp_path),
                          "--max-steps", "2", "--log-completions-every", "0", "--family", "qwen3_vl"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count("held-out accuracy (200 questions)") == 1
    assert [json.loads(line)["step"] for line in open(tmp_path / "run" / "metrics.jsonl")] == [1, 2]
    saved = vsgrpo.AutoModelForImageTextToText.from_pretrained(tmp_path / "run" / "checkpoint-000002")
    assert saved.config.model_type == "qwen3_vl"


def test_each_synthetic_answer_follows_from_the_pixels_drawn():
    rng, colours = np.random.default_rng(0), {name: np.array(rgb) for name, (_, rgb) in vsgrpo.COLOURS.items()}
    for question_type in vsgrpo.SYNTHETIC_TYPES * 30:
        frames, question, answer = vsgrpo.synthetic_scene(question_type, 2, rng)
        named = [name for name in colours if f" {name}" in question]
        found = {name: np.argwhere((frames[0] == colours[name]).all(-1)) for name in colours}  # [pixels, (y, x)]
        if question_type == "object_counting":  # 18x18 squares, at least 10 px apart: count them by area
            assert len(found[named[0]]) == 18 * 18 * int(answer)
        elif question_type == "object_rel_direction":  # in columns 28 px apart, less 4 px of jitter
            a, b = (found[name][:, 1].mean() for name in sorted(named, key=question.index))
            assert abs(a - b) >= 24 and answer == ("left" if a < b else "right")
        else:
            assert answer == vsgrpo.COLOURS[max(found, key=lambda name: len(found[name]))][0]


def test_the_same_seed_writes_byte_identical_videos(tmp_path):
    # The demo's outcome, and the README's table, must not hang on the encoder: under its default rate control
    # x264 wrote about one video in ten differently from one run to the next, pixels up to 7 levels apart.
    for name in ("a", "b"):  # two runs, as a user runs the demo twice
        subprocess.run([sys.executable, "-c", f"import vsgrpo; vsgrpo.write_synthetic_dataset({str(tmp_path / name)!r}, "
                        "150, seed=3)"], cwd=HERE, check=True)
    videos = sorted(os.listdir(tmp_path / "a" / "videos" / "synthetic"))
    assert len(videos) == 150
    differ = [v for v in videos if (tmp_path / "a" / "videos" / "synthetic" / v).read_bytes() !=
              (tmp_path / "b" / "videos" / "synthetic" / v).read_bytes()]
    assert differ == []


def test_the_demo_as_the_readme_runs_it_learns_to_see_colour_beyond_any_video_blind_answer(tmp_path, capsys,
                                                                                            monkeypatch):
    # The README's claim: colour, the one type a model can only answer by looking, ends well above the best
    # answer blind to the video (priors alone lift the other types, so a mean over types would not show it).
    monkeypatch.chdir(tmp_path)                                   # a fresh directory, no --output-dir: as written
    result = vsgrpo.main(["--demo"])
    demo = tmp_path / "runs" / "demo"
    for name in ("train.jsonl", "heldout.jsonl", "run/metrics.jsonl", "demo.json", "model/config.json",
                 "model/tokenizer.json", "run/checkpoint-000400/model.safetensors"):
        assert os.path.exists(demo / name), name
    assert len(os.listdir(demo / "videos" / "synthetic")) == 600
    assert len(open(demo / "run" / "metrics.jsonl").readlines()) == 400
    assert result["after"]["object_colour"] > result["no_video_best"]["object_colour"] + 0.2, result
    assert result["mean_after"] > result["mean_before"] + 0.3, result
    out = capsys.readouterr().out
    assert "held-out accuracy (200 questions)" in out and "A=" in out
    rewards = [json.loads(line)["reward"] for line in open(demo / "run" / "metrics.jsonl")]
    means = [f"{np.mean(rewards[i:i + 40]):.2f}" for i in range(0, 400, 40)]   # the reward rises: 10 means
    assert f"training reward, means of 40 steps: {' '.join(means)}" in out and means[-1] > means[0]
    assert re.search(r"object_colour .*<- sees the video", out)
    # The README's next command, the benchmark (here a short one), was refused: it wrote into runs/vsgrpo too.
    results = vsgrpo.main(["--benchmark", "tiny", "--max-steps", "2", "-G", "2", "--num-frames", "2", "--max-pixels",
                           str(56 * 56), "--max-completion-length", "2", "--batch-size", "1"])
    assert results["default"]["step_seconds"] > 0 and os.path.exists("runs/benchmark-tiny/benchmark.json")
    with pytest.raises(SystemExit) as stopped:                  # a second demo there is refused, as it was
        vsgrpo.main(["--demo"])
    assert str(stopped.value).startswith("error: --output-dir runs/demo holds an earlier run (demo.json, heldout")


# ----------------------------------------------------------------------------- long runs survive
TIMING_KEYS = ("seconds_", "generated_tokens_per_s", "policy_tokens_per_s", "peak_memory_gb")


def comparable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not k.startswith(TIMING_KEYS)}


class Killed(BaseException):
    """A process killed at that point: nothing of the program's runs after it."""


def fail_on_call(function, n: int):
    """`function`, except that its n-th call raises: a process killed at that point."""
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise Killed(f"killed at call {n}")
        return function(*args, **kwargs)
    return wrapped


def test_a_run_killed_after_a_checkpoint_and_resumed_reproduces_the_uninterrupted_run(synthetic, tmp_path, monkeypatch):
    flags = lambda out, *extra: training_flags(synthetic, out, "--max-steps", "4", "--save-every", "2",
                                               "--log-completions-every", "0", *extra)
    whole = vsgrpo.main(flags(tmp_path / "whole"))
    monkeypatch.setattr(vsgrpo, "optimise", fail_on_call(vsgrpo.optimise, 3))   # dies in step 3
    with pytest.raises(Killed):
        vsgrpo.main(flags(tmp_path / "split"))
    monkeypatch.undo()
    assert [os.path.basename(c) for c in vsgrpo.checkpoints(str(tmp_path / "split"))] == ["checkpoint-000002"]
    resumed = vsgrpo.main(flags(tmp_path / "split", "--resume"))
    expected = [comparable(json.loads(line)) for line in open(tmp_path / "whole" / "metrics.jsonl")]
    got = [comparable(json.loads(line)) for line in open(tmp_path / "split" / "metrics.jsonl")]
    assert [m["step"] for m in got] == [1, 2, 3, 4] and got == expected
    for (name, a), (_, b) in zip(whole.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), name


def test_a_save_interrupted_part_way_leaves_the_previous_checkpoint_as_the_latest(synthetic, tmp_path, monkeypatch):
    monkeypatch.setattr(vsgrpo, "save_file", fail_on_call(vsgrpo.save_file, 2))  # the 2nd save dies mid-way
    with pytest.raises(Killed):
        vsgrpo.main(training_flags(synthetic, tmp_path, "--max-steps", "4", "--save-every", "2"))
    assert [os.path.basename(c) for c in vsgrpo.checkpoints(str(tmp_path))] == ["checkpoint-000002"]
    assert os.path.isdir(tmp_path / "checkpoint-000004.partial")             # the torn save, never taken
    monkeypatch.undo()
    vsgrpo.main(training_flags(synthetic, tmp_path, "--max-steps", "4", "--save-every", "2", "--resume"))
    assert [os.path.basename(c) for c in vsgrpo.checkpoints(str(tmp_path))] == ["checkpoint-000002",
                                                                                 "checkpoint-000004"]


def test_only_the_newest_checkpoints_are_kept(synthetic, tmp_path):
    vsgrpo.main(training_flags(synthetic, tmp_path, "--max-steps", "3", "--save-every", "1", "--keep", "2"))
    assert [os.path.basename(c) for c in vsgrpo.checkpoints(str(tmp_path))] == ["checkpoint-000002",
                                                                                 "checkpoint-000003"]
    trainer = tmp_path / "checkpoint-000003" / "trainer"
    assert sorted(os.listdir(trainer)) == ["optimizer.pt", "rng-rank0.pt", "state.json", "trainable.safetensors"]


def plant_faults(synthetic, tmp_path) -> str:
    """Synthetic rows plus a missing video, a truncated mp4, a row without an answer, and a
    counting question answered with a word."""
    rows = list(synthetic["rows"][:4])
    good = os.path.join(synthetic["videos"], "synthetic", "train_00000.mp4")
    os.makedirs(tmp_path / "videos" / "synthetic")
    for r in rows:
        shutil.copy(os.path.join(synthetic["videos"], "synthetic", f"{r['scene_name']}.mp4"),
                    tmp_path / "videos" / "synthetic" / f"{r['scene_name']}.mp4")
    (tmp_path / "videos" / "synthetic" / "torn.mp4").write_bytes(open(good, "rb").read()[:1500])
    rows += [dict(rows[0], id="gone", scene_name="gone"), dict(rows[0], id="torn", scene_name="torn"),
             {k: v for k, v in rows[1].items() if k != "ground_truth"},
             dict(rows[0], id="wordy", question_type="object_counting", ground_truth="many")]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_each_printed_completion_shows_its_own_rewards_and_advantage(capsys):
    sample = {"source": "rows.jsonl row 3", "question": "How many?", "answer": "2"}
    ro = vsgrpo.argparse.Namespace(batch=vsgrpo.argparse.Namespace(samples=[sample]), completions=["2", "3"],
                                   rewards={"accuracy": torch.tensor([1.0, 0.5])}, advantages=torch.tensor([0.7, -0.7]))
    vsgrpo.print_completions(ro, vsgrpo.argparse.Namespace(num_generations=2, rewards=["accuracy"]))
    assert capsys.readouterr().out.splitlines()[-2:] == ["  [accuracy=1.00 A=+0.70] '2'", "  [accuracy=0.50 A=-0.70] '3'"]


def test_on_a_terminal_the_progress_line_is_rewritten_in_place_until_the_last_step(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stdout", Terminal())
    metrics = dict(loss=0.0, reward=0.5, kl=0.0, completion_length=3, zero_std_fraction=0.0)
    for step in (1, 2, 3):
        vsgrpo.log_step(vsgrpo.argparse.Namespace(output_dir=str(tmp_path)), step, 3, metrics, 60.0)
    shown = sys.stdout.getvalue()
    assert shown.count("\n") == 1 and shown.endswith("\033[K\n")             # one line, ended at the last step
    assert [line.split(" ")[1] for line in shown.split("\r")[1:]] == ["1/3", "2/3", "3/3"]
    assert re.findall(r"eta (\S+)min", shown) == ["2.0", "1.0", "0.0"]        # a minute a step, for the steps left


def test_training_refuses_bad_rows_before_loading_any_model(synthetic, tmp_path):
    rows = plant_faults(synthetic, tmp_path)
    with pytest.raises(SystemExit, match="2 bad row"):
        vsgrpo.main(["--model", "/no/such/model", "--data", rows, "--video-root", str(tmp_path / "videos")])


def test_a_file_of_only_bad_rows_lists_each_of_them_not_no_rows(synthetic, tmp_path, capsys):
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({k: v for k, v in ROW.items() if k != "question"}) + "\n"
                                                 for _ in range(2)))
    flags = ["--data", str(tmp_path / "rows.jsonl"), "--video-root", synthetic["videos"]]
    with pytest.raises(SystemExit, match="(?s)2 bad row.*row 1: missing field 'question'.*row 2: missing field"):
        vsgrpo.main(["--model", "/no/such/model", *flags])


def test_a_video_root_that_holds_none_of_the_videos_is_named_as_the_flag_at_fault(synthetic, tmp_path):
    # It said "12 of 12 videos missing, over --max-bad-video-fraction 0.5", pointing at the wrong flag.
    flags = training_flags(synthetic, tmp_path, "--video-root", str(tmp_path / "scannet"))
    with pytest.raises(SystemExit, match=f"--video-root {tmp_path / 'scannet'}: none of the 12 videos the rows name is "
                                         f"there \\(for example {tmp_path / 'scannet' / 'synthetic'}/train_00000.mp4\\)"):
        vsgrpo.main(flags)


def test_held_out_videos_missing_for_eval_every_stop_training_before_any_model_loads(synthetic, tmp_path):
    rows = tmp_path / "heldout.jsonl"
    rows.write_text(json.dumps({"dataset": "synthetic", "scene_name": "no_such_scene", "question_type": "object_counting",
                                "question": "How many chairs?", "ground_truth": "2"}) + "\n")
    with pytest.raises(SystemExit, match=f"(?s)--eval-data: 1 of 1 videos missing.*{rows} row 1: video not found"):
        vsgrpo.main(["--model", "/no/such/model", "--data", synthetic["data"], "--video-root", synthetic["videos"],
                     "--eval-every", "1", "--eval-data", str(rows), "--eval-video-root", synthetic["videos"]])


def test_held_out_rows_of_a_type_vsi_bench_does_not_score_stop_training_before_any_model_loads(synthetic, tmp_path):
    rows = tmp_path / "heldout.jsonl"  # counting is one of VSI-Bench's question types; the synthetic others are not
    rows.write_text("".join(json.dumps(row) + "\n" for row in synthetic["rows"][:3]))
    with pytest.raises(SystemExit, match=f"(?s)--eval-data: 2 of 3 rows are of question types VSI-Bench does not score.*"
                                         f"{rows} row 2: object_rel_direction\n  {rows} row 3: object_colour$"):
        vsgrpo.main(["--model", "/no/such/model", "--data", synthetic["data"], "--video-root", synthetic["videos"],
                     "--eval-every", "1", "--eval-data", str(rows), "--eval-video-root", synthetic["videos"]])


@rewards.reward("nan_on_step_2")
def nan_on_step_2(completions, samples, calls=[]):
    calls.append(1)
    return [float("nan") if len(calls) % 4 == 2 else float(len(c)) for c in completions]


@rewards.reward("always_nan")
def always_nan(completions, samples):
    return [float("nan")] * len(completions)


@rewards.reward("preempted_in_step_1")
def preempted_in_step_1(completions, samples):
    os.kill(os.getpid(), signal.SIGTERM)                  # as a scheduler does, while the step's answers are scored
    return [0.0] * len(completions)


def test_a_stop_signal_skips_the_scheduled_evaluation_and_saves_at_once(synthetic, tmp_path, capsys):
    # A scheduler's grace period covers the rest of a step and a save; an evaluation of all held-out questions
    # (--eval-limit 0) in between could outlast it and lose the step.
    rows = tmp_path / "heldout.jsonl"
    rows.write_text("".join(json.dumps(r) + "\n" for r in synthetic["rows"] if r["question_type"] == "object_counting"))
    with pytest.raises(SystemExit) as stopped:
        vsgrpo.main(training_flags(synthetic, tmp_path / "run", "--max-steps", "3", "--rewards", "preempted_in_step_1",
                                   "--eval-every", "1", "--eval-data", str(rows), "--eval-video-root", synthetic["videos"]))
    logged = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert stopped.value.code == 128 + signal.SIGTERM and "evaluated" not in capsys.readouterr().out
    assert "eval_avg" not in logged[0] and logged[1] == {"step": 2, "stopped": "stopped by SIGTERM"}
    assert vsgrpo.checkpoints(str(tmp_path / "run")) == [str(tmp_path / "run" / "checkpoint-000001")]


def test_a_stop_signal_during_an_evaluation_cuts_it_short_and_saves(synthetic, tmp_path, monkeypatch):
    rows = tmp_path / "heldout.jsonl"
    counting = [r for r in synthetic["rows"] if r["question_type"] == "object_counting"]
    rows.write_text("".join(json.dumps(dict(r, id=f"{r['id']}-{k}")) + "\n" for k in range(5) for r in counting))
    loaded, load_video = [], vsgrpo.load_video

    def preempted_while_evaluating(*args):  # the first held-out video: a scheduler's SIGTERM arrives
        if not loaded:
            os.kill(os.getpid(), signal.SIGTERM)
        loaded.append(1)
        return load_video(*args)
    monkeypatch.setattr(vsgrpo, "load_video", preempted_while_evaluating)
    with pytest.raises(SystemExit) as stopped:
        vsgrpo.main(training_flags(synthetic, tmp_path / "run", "--max-steps", "3", "--eval-every", "1", "--eval-data",
                                   str(rows), "--eval-video-root", synthetic["videos"], "--eval-batch-size", "1"))
    logged = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert stopped.value.code == 128 + signal.SIGTERM and len(loaded) == 1          # not all 20 held-out questions
    assert "eval_avg" not in logged[0] and logged[1] == {"step": 2, "stopped": "stopped by SIGTERM"}
    assert vsgrpo.checkpoints(str(tmp_path / "run")) == [str(tmp_path / "run" / "checkpoint-000001")]


def test_a_non_finite_step_is_skipped_and_counted(synthetic, tmp_path):
    nan_on_step_2.__defaults__[0].clear()
    policy = vsgrpo.main(training_flags(synthetic, tmp_path, "--max-steps", "10", "--rewards", "nan_on_step_2"))
    metrics = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [m["nonfinite"] for m in metrics] == [0, 1, 0, 0, 0, 1, 0, 0, 0, 1]       # 3, but never in a row: no stop
    assert any(v.abs().sum() > 0 for k, v in policy.state_dict().items() if k.endswith("lora_B"))


def test_non_finite_steps_in_a_row_stop_the_run_with_a_last_good_checkpoint(synthetic, tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        vsgrpo.main(training_flags(synthetic, tmp_path, "--max-steps", "10", "--rewards", "always_nan"))
    error = capsys.readouterr().err
    assert stop.value.code == 1 and "3 steps in a row had a non-finite loss or gradient" in error
    assert "saved " + str(tmp_path / "checkpoint-000003") in error and "--resume" in error
    good = load_file_from(tmp_path / "checkpoint-000003" / "trainer" / "trainable.safetensors")
    assert all(v.abs().sum() == 0 for k, v in good.items() if k.endswith("lora_B"))   # no NaN step was applied


def load_file_from(path):
    from safetensors.torch import load_file
    return load_file(str(path))


FAULTY = """
import os, sys
sys.path.insert(0, {here!r})
import rewards, vsgrpo
def faulty(completions, samples, calls=[]):
    calls.append(1)
    if os.environ["RANK"] == "1" and len(calls) == 2:
        raise ValueError("injected fault on rank 1")
    return [float(len(c)) for c in completions]
rewards.reward("digits")(faulty)
vsgrpo.main(sys.argv[1:])
"""


def test_an_error_on_one_process_ends_all_of_them_with_that_error(synthetic, tmp_path):
    script = tmp_path / "faulty.py"
    script.write_text(FAULTY.format(here=HERE))
    done = run_processes([*LAUNCH_TWO, str(script), *training_flags(synthetic, tmp_path / "run", "--max-steps", "5")],
                         timeout=120)
    assert done.returncode != 0 and "injected fault on rank 1" in done.stderr
    assert not os.path.exists(tmp_path / "run" / "checkpoint-000005")


def test_loading_is_safe_by_default():
    assert vsgrpo.build_parser().parse_args([]).trust_remote_code is False
    source = open(os.path.join(HERE, "vsgrpo.py")).read()
    loads = [line for line in source.splitlines() if "torch.load(" in line]
    assert loads and all("weights_only=True" in line for line in loads)


# ----------------------------------------------------------------------------- never lose a run
def checkpoint_files(path) -> dict:
    return {name: open(os.path.join(root, name), "rb").read() for root, _, names in os.walk(path) for name in names}


def test_a_second_run_into_a_used_output_dir_stops_before_loading_and_overwrite_says_what_it_deletes(
        synthetic, tmp_path, monkeypatch, capsys):
    flags = training_flags(synthetic, tmp_path, "--max-steps", "2", "--save-every", "1", "--log-completions-every", "0")
    vsgrpo.main(flags)
    before = checkpoint_files(tmp_path)
    monkeypatch.setattr(vsgrpo, "load_model", fail_on_call(vsgrpo.load_model, 1))   # loading would be too late
    for again in (flags, flags + ["--seed", "1"]):
        with pytest.raises(SystemExit, match="holds an earlier run .*: continue it with --resume.* --overwrite"):
            vsgrpo.main(again)
    assert checkpoint_files(tmp_path) == before                      # nothing touched
    monkeypatch.undo()
    capsys.readouterr()
    (tmp_path / "metrics.jsonl.bak").write_text("the user's own copy\n")  # named like a run's file, but not one
    vsgrpo.main(flags + ["--seed", "1", "--max-steps", "1", "--overwrite"])
    assert ("--overwrite: deleting args.json, checkpoint-000001, checkpoint-000002, metrics.jsonl from "
            f"{tmp_path}") in capsys.readouterr().err
    assert (tmp_path / "metrics.jsonl.bak").read_text() == "the user's own copy\n"
    assert len(open(tmp_path / "metrics.jsonl").readlines()) == 1 and not os.path.exists(tmp_path / "checkpoint-000002")
    assert json.load(open(tmp_path / "args.json"))["seed"] == 1


def test_the_trackers_logs_in_the_output_dir_belong_to_its_run(synthetic, tmp_path):
    os.makedirs(tmp_path / "vsgrpo")  # where --report-to tensorboard writes (tensorboard is not installed here)
    (tmp_path / "vsgrpo" / "events.out.tfevents.1").write_text("")
    flags = training_flags(synthetic, tmp_path, "--max-steps", "1", "--save-every", "0", "--log-completions-every", "0")
    with pytest.raises(SystemExit, match=r"holds an earlier run \(vsgrpo\)"):  # else its curves would mix with ours
        vsgrpo.main(flags)
    vsgrpo.main(flags + ["--overwrite"])
    assert not os.path.exists(tmp_path / "vsgrpo")                    # deleted with the rest of the earlier run


@pytest.mark.parametrize("tool, left", [("--demo", "run/metrics.jsonl"), ("--demo", "model/config.json"),
                                         ("--benchmark", "benchmark.json"), ("--benchmark", "videos/synthetic/a.mp4"),
                                         ("--eval-only", "metrics.json")])
def test_only_training_is_told_to_resume_an_earlier_run_in_its_output_dir(synthetic, tmp_path, tool, left):
    os.makedirs(os.path.dirname(tmp_path / left), exist_ok=True)
    (tmp_path / left).write_text("{}\n")
    flags = {"--demo": [], "--benchmark": ["tiny"], "--eval-only": ["--model", synthetic["model"], "--eval-data",
                                                                     synthetic["data"], "--eval-video-root",
                                                                     synthetic["videos"]]}[tool]
    with pytest.raises(SystemExit) as stopped:  # none of these tools can --resume: it would only repeat this message
        vsgrpo.main([tool, *flags, "--output-dir", str(tmp_path)])
    # It names the directory the user gave, and what of the earlier run is there; a tool's model and videos count.
    assert f"--output-dir {tmp_path} holds an earlier run ({left.split('/')[0]})" in str(stopped.value)
    assert "--resume" not in str(stopped.value)
    assert str(stopped.value).endswith("choose another --output-dir, or delete it with --overwrite")


def test_resume_with_nothing_to_resume_stops_and_changes_nothing(synthetic, tmp_path):
    flags = training_flags(synthetic, tmp_path, "--max-steps", "2", "--save-every", "0", "--log-completions-every", "0")
    vsgrpo.main(flags)
    before = checkpoint_files(tmp_path)
    with pytest.raises(SystemExit, match=f"--resume: no complete checkpoint in {tmp_path}; nothing was changed"):
        vsgrpo.main(flags + ["--resume"])
    assert checkpoint_files(tmp_path) == before


@pytest.mark.parametrize("max_steps", ["2", "1"])
def test_resume_from_the_last_step_or_past_it_says_there_is_nothing_to_train(synthetic, tmp_path, max_steps):
    flags = training_flags(synthetic, tmp_path, "--max-steps", "2", "--save-every", "2", "--log-completions-every", "0")
    vsgrpo.main(flags)
    before = checkpoint_files(tmp_path)
    with pytest.raises(SystemExit, match=f"checkpoint-000002 is at step 2 and this run has {max_steps} step"):
        vsgrpo.main(flags + ["--resume", "--max-steps", max_steps])  # before, it exited 0 having done nothing
    assert checkpoint_files(tmp_path) == before

def test_resume_drops_a_metrics_line_torn_by_a_full_disk_and_logs_the_redone_step(synthetic, tmp_path):
    flags = training_flags(synthetic, tmp_path, "--max-steps", "2", "--save-every", "2", "--log-completions-every", "0")
    vsgrpo.main(flags)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 0.')                                  # step 3's line, cut off mid-write
    vsgrpo.main(flags + ["--resume", "--max-steps", "3"])
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def test_resume_refuses_another_configuration_naming_the_flags_and_allows_a_longer_run(synthetic, tmp_path):
    flags = training_flags(synthetic, tmp_path, "--max-steps", "2", "--log-completions-every", "0")
    vsgrpo.main(flags)
    with pytest.raises(SystemExit) as stop:
        vsgrpo.main(flags + ["--resume", "--seed", "1", "-G", "3", "--max-steps", "3"])
    message = str(stop.value.code)
    assert "this run's settings differ from the checkpoint's: " in message
    assert "--num-generations 3 (checkpoint: 4)" in message and "--seed 1 (checkpoint: 0)" in message
    assert "--max-steps" not in message
    vsgrpo.main(flags + ["--resume", "--max-steps", "3", "--save-every", "3", "--log-completions-every", "1",
                         "--micro-batch-size", "4"])          # the same step in smaller pieces: on a smaller GPU
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def start(command: list[str], **kwargs) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True, **kwargs)


def wait_for_steps(process: subprocess.Popen, metrics, steps: int, timeout: float = 120) -> None:
    """Until `metrics` has `steps` lines (the run is training), or fail with the run's output."""
    deadline = time.monotonic() + timeout
    while not (os.path.exists(metrics) and len(open(metrics).readlines()) >= steps):
        if process.poll() is not None or time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGKILL)
            pytest.fail(f"the run ended or stalled before step {steps}:\n{process.communicate()[1][-3000:]}")
        time.sleep(0.1)


def finish(process: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        pytest.fail(f"did not stop within {timeout} s: {process.communicate()[1][-3000:]}")
    return process.returncode, out, err


def test_a_second_run_into_a_directory_in_use_stops_naming_the_lock_and_a_killed_runs_lock_is_free(
        synthetic, tmp_path):
    command = [sys.executable, os.path.join(HERE, "vsgrpo.py"), *training_flags(
        synthetic, tmp_path, "--max-steps", "1000", "--save-every", "1000", "--log-completions-every", "0",
        reward="accuracy")]
    first = start(command)
    wait_for_steps(first, tmp_path / "metrics.jsonl", 1)
    code, _, err = finish(start(command + ["--overwrite"]))
    assert code == 1 and first.poll() is None
    assert f"--output-dir {tmp_path} is in use by another run (it holds {tmp_path / 'run.lock'})" in err
    assert os.path.exists(tmp_path / "metrics.jsonl")                    # the first run's log survived --overwrite
    os.killpg(first.pid, signal.SIGKILL)                                   # dies holding the lock
    first.wait()
    assert os.path.exists(tmp_path / "run.lock")                           # its file stays; the kernel's lock went
    code, _, err = finish(start(command + ["--overwrite", "--max-steps", "1"]))
    assert code == 0, err[-3000:]
    assert not os.path.exists(tmp_path / "run.lock")                       # released at the end


def test_ctrl_c_before_a_step_names_the_checkpoint_to_resume_and_only_where_there_is_one(
        synthetic, tmp_path, monkeypatch):
    def ctrl_c(*args, **kwargs):  # Ctrl-C while the model loads: Python's own KeyboardInterrupt, no handler yet
        raise KeyboardInterrupt
    flags = training_flags(synthetic, tmp_path, "--max-steps", "2", "--save-every", "2", "--log-completions-every", "0")
    with monkeypatch.context() as patch:
        patch.setattr(vsgrpo, "load_model", ctrl_c)
        with pytest.raises(SystemExit) as stop:                     # a new run: nothing saved, nothing to resume
            vsgrpo.main(flags)
        assert stop.value.code == "interrupted"
    vsgrpo.main(flags)
    monkeypatch.setattr(vsgrpo, "load_model", ctrl_c)
    with pytest.raises(SystemExit) as stop:
        vsgrpo.main(flags + ["--resume", "--max-steps", "4"])
    assert stop.value.code == (f"interrupted; the newest complete checkpoint is {tmp_path / 'checkpoint-000002'}: "
                               "continue with --resume")
    with pytest.raises(SystemExit) as stop:                         # a tool never resumes
        vsgrpo.main(["--eval-only", "--model", synthetic["model"], "--eval-data", synthetic["data"],
                     "--eval-video-root", synthetic["videos"], "--output-dir", str(tmp_path / "eval")])
    assert stop.value.code == "interrupted"
    monkeypatch.setenv("RANK", "1")                                  # under accelerate launch, rank 0 alone says it
    with pytest.raises(SystemExit) as stop:
        vsgrpo.main(flags + ["--resume", "--max-steps", "4"])
    assert stop.value.code == 1


# Saving every step, the stop finds its step saved on schedule already, and must not write it again.
@pytest.mark.parametrize("signum, save_every", [(signal.SIGTERM, "1000"), (signal.SIGINT, "1")])
def test_a_signal_finishes_the_step_saves_it_and_says_how_to_resume(synthetic, tmp_path, signum, save_every):
    flags = training_flags(synthetic, tmp_path, "--max-steps", "1000", "--save-every", save_every,
                           "--log-completions-every", "0", reward="accuracy")
    run = start([sys.executable, os.path.join(HERE, "vsgrpo.py"), *flags])
    wait_for_steps(run, tmp_path / "metrics.jsonl", 2)
    os.kill(run.pid, signum)
    code, _, err = finish(run)
    logged = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    done = [m["step"] for m in logged if "stopped" not in m]
    name = signal.Signals(signum).name
    assert code == 128 + signum and "Traceback" not in err, err[-3000:]
    assert logged[-1] == {"step": done[-1] + 1, "stopped": f"stopped by {name}"}
    path = tmp_path / f"checkpoint-{done[-1]:06d}"
    assert f"saved {path}" in err and "run the same command with --resume" in err
    assert vsgrpo.checkpoint_problem(str(path)) is None
    vsgrpo.main(flags + ["--resume", "--max-steps", str(done[-1] + 1)])           # and it goes on from there
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == done + [done[-1] + 1]


def test_a_repeated_signal_changes_nothing_the_step_still_finishes_and_is_saved(synthetic, tmp_path):
    # Under accelerate launch one Ctrl-C reaches a worker twice: from the terminal, and forwarded by the launcher.
    flags = training_flags(synthetic, tmp_path, "--max-steps", "1000", "--save-every", "1000", "--num-iterations",
                           "300", "--log-completions-every", "0", reward="accuracy")
    run = start([sys.executable, os.path.join(HERE, "vsgrpo.py"), *flags])
    wait_for_steps(run, tmp_path / "metrics.jsonl", 1)
    time.sleep(1)                    # well into step 2 (300 passes take seconds), so that both signals reach it
    os.kill(run.pid, signal.SIGINT)
    time.sleep(0.1)
    os.kill(run.pid, signal.SIGINT)
    code, _, err = finish(run)
    done = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl") if "stopped" not in line]
    assert code == 128 + signal.SIGINT and "Traceback" not in err, err[-3000:]
    assert err.count("SIGINT: finishing this step, then saving it") == 1
    assert f"saved {tmp_path / f'checkpoint-{done[-1]:06d}'}" in err
    assert vsgrpo.checkpoint_problem(str(tmp_path / f"checkpoint-{done[-1]:06d}")) is None
    assert not os.path.exists(tmp_path / "run.lock")                    # released on the way out


def test_sigterm_to_two_processes_under_accelerate_launch_saves_one_agreed_step(synthetic, tmp_path):
    run = start([*LAUNCH_TWO, os.path.join(HERE, "vsgrpo.py"), *training_flags(
        synthetic, tmp_path, "--max-steps", "1000", "--save-every", "1000", "--log-completions-every", "0",
        reward="accuracy")])
    wait_for_steps(run, tmp_path / "metrics.jsonl", 2)
    os.killpg(run.pid, signal.SIGTERM)                            # as a scheduler does: the launcher and its workers
    code, _, err = finish(run)
    logged = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    last = logged[-2]["step"]
    assert code != 0 and logged[-1] == {"step": last + 1, "stopped": "stopped by SIGTERM"}, err[-3000:]
    assert err.count(f"saved {tmp_path / f'checkpoint-{last:06d}'}") == 1
    assert err.count("SIGTERM: finishing this step, then saving it") == 1             # said once, not per process
    assert vsgrpo.checkpoints(str(tmp_path)) == [str(tmp_path / f"checkpoint-{last:06d}")]
    trainer = os.listdir(tmp_path / f"checkpoint-{last:06d}" / "trainer")
    assert {"rng-rank0.pt", "rng-rank1.pt"} <= set(trainer)
    with pytest.raises(SystemExit, match=r"processes 1 \(checkpoint: 2\)"):       # the data order follows from both
        vsgrpo.main(training_flags(synthetic, tmp_path, "--max-steps", "1000", "--save-every", "1000",
                                   "--log-completions-every", "0", "--resume", reward="accuracy"))


@pytest.mark.parametrize("refusal", ["nothing to resume", "directory in use", "benchmark over an earlier one"])
def test_a_refusal_under_accelerate_launch_is_said_once_and_every_process_stops_with_it(synthetic, tmp_path, refusal):
    # The main process alone claims the output directory; the others used to wait for it and die with gloo's
    # "Connection closed by peer" traceback, after the one line that said what was wrong.
    flags = training_flags(synthetic, tmp_path, "--resume", reward="accuracy")
    message = f"--resume: no complete checkpoint in {tmp_path}"
    if refusal == "directory in use":
        holder = open(tmp_path / "run.lock", "a+")
        fcntl.lockf(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)                  # as a running process holds it
        flags, message = training_flags(synthetic, tmp_path, reward="accuracy"), f"--output-dir {tmp_path} is in use"
    if refusal == "benchmark over an earlier one":
        (tmp_path / "benchmark.json").write_text("{}")
        flags, message = ["--benchmark", "tiny", "--output-dir", str(tmp_path)], "benchmark.json"
    done = run_processes([*LAUNCH_TWO, os.path.join(HERE, "vsgrpo.py"), *flags])
    assert done.returncode == 1 and done.stderr.count(message) == 1, done.stderr[-3000:]
    assert "Connection closed" not in done.stderr and "[rank1]: Traceback" not in done.stderr, done.stderr[-3000:]


def test_a_flag_error_under_accelerate_launch_is_said_once(tmp_path):
    # Every process parses the flags: on an 8-GPU node a typo printed the usage and the error 8 times.
    done = run_processes([*LAUNCH_TWO, os.path.join(HERE, "vsgrpo.py"), "--demo", "--learning-rate", "-1",
                          "--output-dir", str(tmp_path)])
    assert done.returncode != 0 and done.stderr.count("--learning-rate must be positive, got -1.0") == 1
    assert "usage: " not in done.stderr, done.stderr[-3000:]


@pytest.mark.parametrize("flags, message", [
    (["--num-generations", "1"], "--num-generations must be at least 2, got 1"),
    (["-G", "many"], "argument --num-generations/-G: invalid int value: 'many'"),
    (["--prompt-mode", "chatty"], "argument --prompt-mode: invalid choice: 'chatty'")])
def test_a_flag_mistake_is_one_line_naming_the_flag_and_its_value(tmp_path, flags, message):
    # It followed the whole 29-line usage, where data and run errors print their one line alone.
    done = subprocess.run([sys.executable, os.path.join(HERE, "vsgrpo.py"), "--demo", *flags], capture_output=True,
                          text=True, cwd=tmp_path)
    assert done.returncode == 2 and done.stdout == "" and os.listdir(tmp_path) == []
    [line] = done.stderr.splitlines()
    assert line.startswith(f"error: {message}") and line.endswith("(see --help)")


FULL_DISK = """
import resource, signal, sys
sys.path.insert(0, {here!r})
import vsgrpo
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)     # a write past the limit then fails as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))
vsgrpo.main(sys.argv[1:])
"""


def test_a_save_that_cannot_be_written_says_what_and_where_removes_its_partial_files_and_keeps_the_last(
        synthetic, tmp_path):
    flags = training_flags(synthetic, tmp_path, "--max-steps", "2", "--save-every", "2", "--log-completions-every", "0",
                           reward="accuracy")
    vsgrpo.main(flags)
    script = tmp_path.parent / f"{tmp_path.name}-full_disk.py"
    script.write_text(FULL_DISK.format(here=HERE))
    code, _, err = finish(start([sys.executable, str(script), *flags, "--resume", "--max-steps", "4"]))
    assert code == 1 and "Traceback" not in err, err[-3000:]
    assert (f"error: could not write {tmp_path / 'checkpoint-000004'}: " in err and "File too large" in err and
            f"Its partial files were removed; the last complete checkpoint is {tmp_path / 'checkpoint-000002'}" in err)
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("checkpoint")) == ["checkpoint-000002"]
    assert vsgrpo.checkpoint_problem(str(tmp_path / "checkpoint-000002")) is None


ONE_PROCESS_FAILS_TO_SAVE = """
import os, sys, torch
sys.path.insert(0, {here!r})
import vsgrpo
save = torch.save


def save_but_not_rank_1s_random_state_at_step_2(state, path, *args, **kwargs):
    if os.environ["RANK"] == "1" and "checkpoint-000002" in str(path):  # its node's disk is full
        raise OSError(28, "No space left on device")
    return save(state, path, *args, **kwargs)


torch.save = save_but_not_rank_1s_random_state_at_step_2
vsgrpo.main(sys.argv[1:])
"""


def test_a_save_that_fails_in_one_process_stops_every_process_at_once_with_one_message(synthetic, tmp_path):
    # The failing process skipped the barrier the other waited in, and went on to the next collective: both
    # waited for ever, in different collectives, and the run's every step was lost.
    script = tmp_path.parent / f"{tmp_path.name}-fail_one_save.py"
    script.write_text(ONE_PROCESS_FAILS_TO_SAVE.format(here=HERE))
    started = time.perf_counter()
    done = run_processes([*LAUNCH_TWO, str(script), *training_flags(
        synthetic, tmp_path, "--max-steps", "2", "--save-every", "1", "--log-completions-every", "0",
        reward="accuracy")], timeout=180)
    assert done.returncode == 1 and time.perf_counter() - started < 120, done.stderr[-3000:]
    message = (f"error: could not write {tmp_path / 'checkpoint-000002'}: OSError on process 1 (")
    assert done.stderr.count(message) == 1 and "No space left on device" in done.stderr, done.stderr[-3000:]
    assert (f"Its partial files were removed; the last complete checkpoint is {tmp_path / 'checkpoint-000001'}"
            in done.stderr and "]: Traceback" not in done.stderr)                # none from a worker
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("checkpoint")) == ["checkpoint-000001"]
    assert vsgrpo.checkpoint_problem(str(tmp_path / "checkpoint-000001")) is None


ONE_NODE_OWN_DISK = """
import os, sys
sys.path.insert(0, {here!r})
import vsgrpo
argv = sys.argv[1:]
if os.environ["RANK"] == "1" and {differs!r} == "--output-dir":  # a second node with a disk of its own:
    argv[argv.index("--output-dir") + 1] += "-on-node-1"             # the same path is another directory
if os.environ["RANK"] == "1" and {differs!r} == "--data":
    argv[argv.index("--data") + 1] = {other_data!r}
vsgrpo.main(argv)
"""


@pytest.mark.parametrize("differs", ["--output-dir", "--data"])
def test_a_node_that_does_not_see_what_the_main_process_sees_stops_every_node_before_any_model_loads(
        synthetic, tmp_path, differs):
    # Nodes that did not share --output-dir trained, then hung at their first save, every step lost.
    rows = open(synthetic["data"]).readlines()
    other_data = tmp_path / "other.jsonl"
    other_data.write_text("".join(rows[:-1]))                                        # a row fewer there
    script = tmp_path / "own_disk.py"
    script.write_text(ONE_NODE_OWN_DISK.format(here=HERE, other_data=str(other_data), differs=differs))
    done = run_processes([*LAUNCH_TWO, str(script), *training_flags(synthetic, tmp_path / "run", "--max-steps", "2",
                                                                     reward="accuracy")], timeout=120)
    assert done.returncode == 1 and "Loading weights" not in done.stderr and done.stdout == "", done.stderr[-3000:]
    [line] = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    if differs == "--output-dir":
        assert line.startswith(f"error: --output-dir {tmp_path / 'run-on-node-1'}: process 1 (")
        assert "does not see the directory the main process made" in line and "one filesystem" in line
    else:
        assert line.startswith("error: process 1 (") and "other rows or videos than the main process" in line
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")


@pytest.mark.parametrize("damage, problem", [
    (lambda p: open(p / "model.safetensors", "r+b").truncate(1000), "model.safetensors has 1000 bytes, not "),
    (lambda p: (p / "trainer" / "state.json").write_text("{"), "state.json has 1 bytes, not "),
    (lambda p: os.remove(p / "trainer" / "optimizer.pt"), "optimizer.pt is missing"),
    (lambda p: os.remove(p / "sizes.json"), "sizes.json is missing or damaged"),
    (lambda p: (p / "sizes.json").write_text('{"model.safetensors": 1'), "sizes.json is missing or damaged"),
])
def test_resume_refuses_a_damaged_checkpoint_in_one_line_naming_the_file_and_the_newest_sound_one(
        synthetic, tmp_path, damage, problem):
    flags = training_flags(synthetic, tmp_path, "--max-steps", "3", "--save-every", "2", "--log-completions-every", "0")
    vsgrpo.main(flags)                                                  # checkpoints 2 and 3
    damage(tmp_path / "checkpoint-000003")
    before = checkpoint_files(tmp_path)
    with pytest.raises(SystemExit) as stop:
        vsgrpo.main(flags + ["--resume", "--max-steps", "4"])
    message = str(stop.value.code)
    assert problem in message and len(message.splitlines()) == 1
    assert message.endswith(f"move it aside to resume from the newest sound one, {tmp_path / 'checkpoint-000002'}")
    assert checkpoint_files(tmp_path) == before                         # nothing changed, nothing set aside


@rewards.reward("damage_videos_after_step_1")
def damage_videos_after_step_1(completions, samples, calls=[]):
    """Truncates every video but train_00000's and train_00001's after the first step: a disk failing mid-run."""
    calls.append(1)
    if len(calls) == 1:
        for path in DAMAGEABLE:
            if not path.endswith(("train_00000.mp4", "train_00001.mp4")):
                open(path, "r+b").truncate(2000)
    return [0.0] * len(completions)


DAMAGEABLE = []


def copy_dataset(synthetic, to) -> str:
    shutil.copytree(synthetic["videos"], to / "videos")
    return str(to / "videos")


def test_a_warning_every_process_reaches_is_said_once_under_accelerate_launch(synthetic, tmp_path):
    videos = copy_dataset(synthetic, tmp_path)
    os.remove(os.path.join(videos, "synthetic", "train_00007.mp4"))
    done = run_processes([*LAUNCH_TWO, os.path.join(HERE, "vsgrpo.py"), *training_flags(
        synthetic, tmp_path / "run", "--max-steps", "1", "--save-every", "0", reward="accuracy"), "--video-root", videos])
    assert done.returncode == 0 and done.stderr.count("1 video(s) missing; their rows are dropped") == 1, done.stderr


def test_one_bad_video_at_the_default_batch_size_is_skipped_for_the_whole_run(synthetic, tmp_path, capsys):
    videos = copy_dataset(synthetic, tmp_path)
    open(os.path.join(videos, "synthetic", "train_00003.mp4"), "r+b").truncate(1500)        # undecodable
    os.remove(os.path.join(videos, "synthetic", "train_00007.mp4"))                          # missing from the start
    flags = training_flags(synthetic, tmp_path / "run", "--max-steps", "22", "--batch-size", "1", "-G", "2",
                           "--log-completions-every", "0", "--save-every", "0")
    vsgrpo.main([*flags, "--video-root", videos])
    err = capsys.readouterr().err
    assert "1 video(s) missing; their rows are dropped, 11 rows left" in err and "train_00007.mp4" in err
    metrics = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert len(metrics) == 22 and sum(m["bad_videos"] for m in metrics) == 1      # two epochs: tried once, never again
    assert len([line for line in err.splitlines() if "skipped" in line and "train_00003.mp4" in line]) == 1


def test_videos_failing_mid_run_stop_it_over_the_fraction_saving_first_and_logging_the_step(synthetic, tmp_path,
                                                                                              capsys):
    videos = copy_dataset(synthetic, tmp_path)
    DAMAGEABLE[:] = [os.path.join(videos, "synthetic", n) for n in os.listdir(os.path.join(videos, "synthetic"))]
    damage_videos_after_step_1.__defaults__[0].clear()
    flags = training_flags(synthetic, tmp_path / "run", "--max-steps", "30", "--rewards", "damage_videos_after_step_1",
                           "--save-every", "100", "--log-completions-every", "0", "-G", "2")
    with pytest.raises(SystemExit) as stop:
        vsgrpo.main([*flags, "--video-root", videos])
    err = capsys.readouterr().err
    logged = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    failed, last = logged[-1]["step"], logged[-2]["step"]
    assert stop.value.code == 1 and failed == last + 1 and "distinct videos tried failed to decode" in logged[-1]["stopped"]
    assert f"saved {tmp_path / 'run' / f'checkpoint-{last:06d}'}" in err
    assert "over --max-bad-video-fraction 0.5" in err and last >= 1


@pytest.mark.parametrize("fraction, why", [("0.5", "over --max-bad-video-fraction 0.5"),
                                           ("1", "so many that a batch could not be filled")])
def test_a_run_stopped_before_its_first_step_finished_says_so_and_saves_nothing(synthetic, tmp_path, capsys, fraction,
                                                                                 why):
    videos = copy_dataset(synthetic, tmp_path)
    for name in os.listdir(os.path.join(videos, "synthetic")):
        (tmp_path / "videos" / "synthetic" / name).write_bytes(b"not a video")      # there, but undecodable
    with pytest.raises(SystemExit) as stop:                   # 1: never stop over a fraction, yet no batch can be filled
        vsgrpo.main([*training_flags(synthetic, tmp_path / "run", "--max-steps", "2", "--max-bad-video-fraction",
                                     fraction), "--video-root", videos])
    err = capsys.readouterr().err
    assert stop.value.code == 1 and "no step had finished, nothing to save" in err and "--resume" not in err
    assert re.search(f"stopped: (\\d+) of the \\1 distinct videos tried failed to decode, {why}", err), err
    assert vsgrpo.checkpoints(str(tmp_path / "run")) == []


def test_missing_videos_stop_a_run_before_it_starts_only_over_the_fraction(synthetic, tmp_path):
    videos = copy_dataset(synthetic, tmp_path)
    for i in range(6):
        os.remove(os.path.join(videos, "synthetic", f"train_{i:05d}.mp4"))
    args = make_args(synthetic, "--video-root", videos)
    assert len(vsgrpo.checked_samples(args)) == 6                     # 6 of 12: exactly the default 0.5, not over it
    os.remove(os.path.join(videos, "synthetic", "train_00006.mp4"))
    with pytest.raises(data.DataError, match="7 of 12 videos missing, over --max-bad-video-fraction 0.5"):
        vsgrpo.checked_samples(args)


def test_videos_failing_to_decode_stop_a_run_only_over_the_fraction_and_once_ten_are_tried(synthetic):
    args, accelerator, signals = make_args(synthetic), make_accelerator(), vsgrpo.StopSignals()
    tried = lambda good, bad: {**{f"good{i}.mp4": True for i in range(good)}, **{f"bad{i}.mp4": False for i in range(bad)}}
    try:
        assert vsgrpo.agreed_stop(accelerator, signals, tried(5, 5), False, args) is None     # exactly 0.5: not over
        reason, code = vsgrpo.agreed_stop(accelerator, signals, tried(4, 6), False, args)
        assert code == 1 and reason.startswith("stopped: 6 of the 10 distinct videos tried failed to decode")
        assert vsgrpo.agreed_stop(accelerator, signals, tried(0, 9), False, args) is None     # too few to judge
    finally:
        signals.restore()


