"""vsGRPO's specification as tests: offline, CPU, a tiny random Qwen2-VL written to disk.

Expected values are computed by hand or by an independent formula inside each test.
"""
import json
import math
import os
import subprocess
import sys

import av
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2VLConfig, Qwen2VLForConditionalGeneration

import data
import rewards
import vsgrpo

HERE = os.path.dirname(os.path.abspath(__file__))
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
TAGS = ["<think>", "</think>", "<observe>", "</observe>", "<answer>", "</answer>"]


def write_tiny_checkpoint(path: str, texts: list[str], seed: int = 0) -> None:
    """A word-level tokenizer over `texts` and a 2-layer random Qwen2-VL, saved like a hub checkpoint."""
    split = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    words = sorted({w for t in texts + list(data.PROMPTS.values()) + ["system you are a helpful assistant user"]
                    for w, _ in split.pre_tokenize_str(t.lower())})
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]"] + words)}, unk_token="[UNK]"))
    backend.normalizer, backend.pre_tokenizer = normalizers.Lowercase(), split
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", additional_special_tokens=SPECIAL)
    tokenizer.add_tokens(TAGS)
    tokenizer.save_pretrained(path)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL}
    config = Qwen2VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=None,
                         eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                         rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3])),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True)
    torch.manual_seed(seed)
    Qwen2VLForConditionalGeneration(config).save_pretrained(path)


@pytest.fixture(scope="session")
def synthetic(tmp_path_factory):
    """A small synthetic dataset and a tiny checkpoint whose vocabulary covers it."""
    root = str(tmp_path_factory.mktemp("synthetic"))
    path = data.write_synthetic_dataset(root, 12, seed=0)
    rows = [json.loads(line) for line in open(path)]
    model_dir = os.path.join(root, "tiny-qwen2-vl")
    write_tiny_checkpoint(model_dir, [r["question"] + " " + r["ground_truth"] for r in rows])
    return {"root": root, "data": path, "videos": os.path.join(root, "videos"), "model": model_dir, "rows": rows}


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


def accuracy(completion, answer, kind="numeric", mode="vanilla"):
    return rewards.accuracy_reward([completion], [{"answer": answer, "kind": kind, "prompt_mode": mode}])[0]


def test_accuracy_scores_numbers_with_mra_and_unparseable_numbers_with_zero():
    assert accuracy("<think>x</think><answer>12</answer>", "10", mode="think") == pytest.approx(0.6)  # error .2
    assert accuracy("3.", "3") == 1.0
    assert accuracy("three", "3") == 0.0
    assert accuracy("nan", "3") == 0.0


def test_accuracy_of_words_ignores_case_surrounding_space_and_punctuation():
    assert accuracy(" Left. ", "left", kind="word") == 1.0
    assert accuracy("tv-stand", "TV stand", kind="word") == 1.0
    assert accuracy("right", "left", kind="word") == 0.0


def test_no_completion_crashes_scoring():
    odd = ["", "<answer>", "</answer><answer>", "9" * 5000, "<answer>1e999</answer>", "\x00\u2603", "<think>" * 1000]
    for mode in ("think", "observe", "vanilla"):
        for kind, answer in (("numeric", "4"), ("word", "left")):
            samples = [{"answer": answer, "kind": kind, "prompt_mode": mode}] * len(odd)
            for name in ("accuracy",) + (() if mode == "vanilla" else ("format",)):
                scores = rewards.REWARDS[name](odd, samples)
                assert len(scores) == len(odd) and all(0.0 <= s <= 1.0 for s in scores)


# ----------------------------------------------------------------------------- advantages and loss
def test_group_advantages_by_hand():
    rewards_ = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5])
    std = math.sqrt(4 * 0.5 ** 2 / 3)                          # sample std of [1, 0, 0, 1]
    a = 0.5 / (std + 1e-4)
    expected = [a, -a, -a, a] + [0.0] * 4                      # an all-equal group gets zero
    assert vsgrpo.group_advantages(rewards_, 4).tolist() == pytest.approx(expected)


def random_loss_inputs(n=3, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(n, c, generator=g) * 3
    old = logps + 0.4 * (torch.rand(n, c, generator=g) - 0.5)
    ref = logps + 0.4 * (torch.rand(n, c, generator=g) - 0.5)
    return logps, old, ref, torch.tensor([1.5, -0.7, 0.3]), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])


def test_loss_equals_eq1_written_token_by_token():
    logps, old, ref, adv, mask = random_loss_inputs()
    eps, beta = 0.2, 0.05
    token_loss, _, _ = vsgrpo.grpo_token_loss(logps, old, ref, adv, eps, beta)
    loss = vsgrpo.aggregate_loss(token_loss, mask.float(), "sequence", 3, int(mask.sum()))
    objective = 0.0
    for i in range(3):
        per_token = []
        for t in range(5):
            if mask[i, t]:
                rho = math.exp(logps[i, t] - old[i, t])
                surrogate = min(rho * adv[i], min(max(rho, 1 - eps), 1 + eps) * adv[i])
                r = math.exp(ref[i, t] - logps[i, t])
                per_token.append(surrogate - beta * (r - math.log(r) - 1))
        objective += sum(per_token) / len(per_token) / 3
    assert loss.item() == pytest.approx(-objective, rel=1e-5)


def test_token_aggregation_weighs_every_token_the_same():
    logps, old, ref, adv, mask = random_loss_inputs()
    token_loss, _, _ = vsgrpo.grpo_token_loss(logps, old, ref, adv, 0.2, 0.05)
    loss = vsgrpo.aggregate_loss(token_loss, mask.float(), "token", 3, 9)
    assert loss.item() == pytest.approx(token_loss[mask.bool()].sum().item() / 9, rel=1e-6)


def test_at_ratio_one_without_kl_the_gradient_is_minus_a_times_grad_log_p():
    _, _, _, adv, mask = random_loss_inputs()
    logps = (-torch.rand(3, 5)).requires_grad_()
    token_loss, _, _ = vsgrpo.grpo_token_loss(logps, logps.detach(), None, adv, 0.2, 0.0)
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
    token_loss, _, clipped = vsgrpo.grpo_token_loss(logps, old, None, adv, 0.2, 0.0)
    token_loss.sum().backward()
    assert logps.grad[:2].abs().sum() == 0
    assert logps.grad[2:].abs().min() > 0
    assert clipped.squeeze(1).tolist() == [True, True, False, False]


def test_masked_tokens_carry_no_gradient():
    logps, old, ref, adv, mask = random_loss_inputs()
    logps.requires_grad_()
    token_loss, _, _ = vsgrpo.grpo_token_loss(logps, old, ref, adv, 0.2, 0.1)
    vsgrpo.aggregate_loss(token_loss, mask.float(), "sequence", 3, 9).backward()
    assert logps.grad[mask == 0].abs().sum() == 0
    assert logps.grad[mask == 1].abs().min() > 0


def test_kl_is_zero_when_policy_equals_reference_and_positive_otherwise():
    logps, old, ref, adv, _ = random_loss_inputs()
    _, kl, _ = vsgrpo.grpo_token_loss(logps, old, logps.clone(), adv, 0.2, 0.1)
    assert kl.abs().max() == 0
    _, kl, _ = vsgrpo.grpo_token_loss(logps, old, ref, adv, 0.2, 0.1)
    assert (kl > 0).all()


def test_completion_mask_keeps_the_first_eos_even_when_pad_is_eos():
    eos = 7
    ids = torch.tensor([[3, 4, eos, eos, eos], [3, eos, 5, 6, eos], [3, 4, 5, 6, 2]])
    assert vsgrpo.completion_mask(ids, [eos]).tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]


# ----------------------------------------------------------------------------- video
def test_frames_are_sampled_uniformly_from_first_to_last(tmp_path):
    path = str(tmp_path / "ten.mp4")
    write_gray_video(path, [20 * i + 20 for i in range(10)])
    frames = data.read_frames(path, 4)
    assert frames.shape == (4, 32, 32, 3)
    levels = frames.reshape(4, -1).mean(1)
    assert np.abs(levels - [20, 80, 140, 200]).max() < 6      # frames 0, 3, 6, 9


def test_a_short_video_repeats_frames(tmp_path):
    path = str(tmp_path / "three.mp4")
    write_gray_video(path, [40, 120, 200])
    levels = data.read_frames(path, 5).reshape(5, -1).mean(1)
    # instants 0, 2, 4, 6, 8 (x 1/100 s) over frames at 0, 4, 8: nearest 0, 0 (tie: first), 4, 4, 8
    assert np.abs(levels - [40, 40, 120, 120, 200]).max() < 6


def test_variable_frame_rate_is_sampled_by_time_not_frame_number(tmp_path):
    path = str(tmp_path / "vfr.mp4")
    # six quick frames in the first 0.05 s, then one every second up to 3 s
    write_gray_video(path, [10, 20, 30, 40, 50, 60, 100, 160, 220], pts=[0, 1, 2, 3, 4, 5, 100, 200, 300])
    levels = data.read_frames(path, 4).reshape(4, -1).mean(1)
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


def test_smart_resize_by_hand():
    # 480x640 over budget 100352: scale = sqrt(480*640/100352) = 1.7496; floor(274.3/28)=9, floor(365.8/28)=13
    assert data.smart_resize(480, 640, 56 * 56, 128 * 28 * 28) == (9 * 28, 13 * 28)
    # 20x30 under 3136: scale = sqrt(3136/600) = 2.2862; ceil(45.7/28)=2, ceil(68.6/28)=3
    assert data.smart_resize(20, 30, 56 * 56, 128 * 28 * 28) == (56, 84)
    # in budget: rounded to multiples of 28
    assert data.smart_resize(100, 200, 56 * 56, 128 * 28 * 28) == (112, 196)


def test_patch_layout_groups_each_merged_2x2_block_contiguously():
    video = torch.randn(3, 3, 56, 84)                          # T=3 (odd), 4x6 patches of 14x14
    patches, thw = data.patchify(video)
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


def test_video_token_count_is_t_h_w_over_4(synthetic):
    tokenizer = vsgrpo.AutoTokenizer.from_pretrained(synthetic["model"])
    frames = data.read_frames(os.path.join(synthetic["videos"], "synthetic", "train_00000.mp4"), 5)
    pixels, thw = data.video_patches(frames, 56 * 56, 112 * 112)
    assert thw.tolist() == [3, 8, 8] and pixels.shape == (3 * 8 * 8, 1176)
    video_id = tokenizer.convert_tokens_to_ids("<|video_pad|>")
    ids = data.prompt_ids(tokenizer, "How many chairs?", thw, video_id)
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
    video_id, thw = tokenizer.convert_tokens_to_ids("<|video_pad|>"), torch.tensor([2, 4, 4])
    built_in = data.prompt_ids(tokenizer, "Is the lamp left?", thw, video_id)
    tokenizer.chat_template = QWEN2VL_TEMPLATE
    assert data.prompt_ids(tokenizer, "Is the lamp left?", thw, video_id) == built_in
