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
