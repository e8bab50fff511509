"""vsGRPO: R1-Zero-style GRPO training of Qwen2-VL on video questions about space (arXiv 2504.00883).

Part I, the method, follows the paper's section 3.2, up to train(), whose set-up sits in sight of its step
loop. Below a banner, the tools keep the run's books and hold evaluation, the demo, the benchmark and main:

    accelerate launch vsgrpo.py --model Qwen/Qwen2-VL-2B-Instruct --data "vsi100k/*.json" \\
        --video-root scannet_videos
"""
import itertools
import math
from contextlib import contextmanager, nullcontext
from copy import deepcopy
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from transformers import AutoModelForImageTextToText, AutoTokenizer, GenerationConfig
from transformers.models.qwen3_vl.modeling_qwen3_vl import BaseModelOutputWithDeepstackFeatures

from data import DataError, prompt_ids, question_text, video_format
from rewards import score_completions


# ======================================== 1. LoRA
class LoRALinear(nn.Linear):
    """W x + b + (alpha / r) B A x, with B = 0 at the start so training starts at the base model."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
        nn.Module.__init__(self)
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight  # the same frozen tensors, not copies
        self.bias = base.bias
        # float32 over bf16 weights too: AdamW moves an entry by ~lr (1e-5) a step, which bf16 rounds away.
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, dtype=torch.float32, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, dtype=torch.float32, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.scale = alpha / rank
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        if self.enabled:
            update = F.linear(F.linear(x.float(), self.lora_A), self.lora_B) * self.scale
            out = out + update.to(out.dtype)
        return out


def add_lora(language_model: nn.Module, rank: int, alpha: float) -> None:
    """Replace the attention and MLP projections of every decoder layer with LoRA layers."""
    targets = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    for module in list(language_model.modules()):
        for name, child in list(module.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                setattr(module, name, LoRALinear(child, rank, alpha))


@contextmanager
def lora_disabled(model: nn.Module):
    """The reference policy pi_ref: the same weights with every adapter switched off."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for layer in layers:
        layer.enabled = False
    try:
        yield
    finally:
        for layer in layers:
            layer.enabled = True


# ======================================== 2. the model
def load_model(args, device: torch.device, training: bool = True):
    """Policy pi_theta (LoRA adapters unless --lora-rank 0) and tokenizer; bf16 on a GPU, but float32 to
    train all weights: AdamW's steps of ~lr would round away in bf16."""
    full_fine_tuning = training and args.lora_rank == 0
    dtype = torch.bfloat16 if device.type == "cuda" and not full_fine_tuning else torch.float32
    video_format(args.model)  # Qwen2-VL, Qwen2.5-VL or Qwen3-VL, read from config.json; else one line stops
    # sdpa, transformers' default: flash_attention_2 takes no 4-D mask, and eager adds a boolean one.
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            args.model, dtype=dtype, attn_implementation="sdpa", trust_remote_code=args.trust_remote_code)
    except OSError as e:  # no checkpoint at that path, or no hub to give it: one line, naming the flag
        raise DataError(f"--model {args.model}: {str(e).splitlines()[0]}") from None
    model = model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    model.requires_grad_(False)
    # The vision tower stays frozen in both modes, as with the paper's LoRA on the language model.
    if args.lora_rank > 0:
        add_lora(model.model.language_model, args.lora_rank, args.lora_alpha)
    else:
        model.model.language_model.requires_grad_(True)
        model.lm_head.requires_grad_(True)
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    return model, tokenizer


def unwrapped(model):  # the Qwen-VL model inside the DDP wrapper that accelerator.prepare may add
    return getattr(model, "module", model)


# ======================================== 3. where each token sits: 3-D rotary positions (M-RoPE)
def rope_positions(config, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   videos: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Each prompt token's rotary position in (time, row, column): [3, B, P], 0 at padding; and the position
    the next token takes: [B]. The rule of Qwen-VL's authors: a text token at p sits at (p, p, p); a video's
    merged cell (t, y, x) sits at (s + t, s + y, s + x), s where the video starts; the text after the video
    resumes at the largest position so far + 1. For "a b <video> c", the video 2 frames of 2 x 2 cells:

        a (0, 0, 0)  b (1, 1, 1)
        frame 0: (2, 2, 2) (2, 2, 3) (2, 3, 2) (2, 3, 3)  frame 1: (3, 2, 2) (3, 2, 3) (3, 3, 2) (3, 3, 3)
        c (4, 4, 4)  the next token: 5

    transformers 5.3 to 5.25 resume at s + the larger of the rows and columns instead, frames left out:
    after 8 frames of 2 x 2 cells at 4, not 10, where the model never saw text in training. A frame here is
    a pair of frames, the tower's temporal patch."""
    merge = config.vision_config.spatial_merge_size
    positions = torch.zeros(3, *input_ids.shape, dtype=torch.long)
    next_position = torch.zeros(len(videos), dtype=torch.long)
    for row, video in enumerate(videos):
        rows, columns = (int(side) // merge for side in video.grid[1:])
        # Qwen2-VL counts frames. Qwen2.5-VL counts time: frame t sits at s + int(t x its seconds x
        # tokens_per_second), the fraction kept until the product (transformers#48669). Qwen3-VL gives each
        # frame a block of its own after its time in words, "<2.3 seconds>" (data.prompt_ids): t = 0 in each.
        step = 1.0
        if config.model_type == "qwen2_5_vl":
            step = video.seconds_per_patch * config.vision_config.tokens_per_second
        real = attention_mask[row].bool().cpu()
        parts = []
        start = 0
        tokens = input_ids[row][real].tolist()
        for is_video, run in itertools.groupby(tokens, key=lambda token: token == config.video_token_id):
            cell = torch.arange(len(list(run)))
            part = start + cell.expand(3, -1)                                  # text: [3, n]
            if is_video:  # merged cells, frame by frame, row by row
                t = ((cell // (rows * columns)).double() * step).long()
                part = torch.stack([start + t, start + cell // columns % rows, start + cell % columns])
            parts.append(part)
            start = int(part.max()) + 1
        positions[:, row, real] = torch.cat(parts, 1)
        next_position[row] = start
    return positions.to(input_ids.device), next_position.to(input_ids.device)


# ======================================== 4. a batch of questions and their video features
@dataclass
class Batch:
    """B questions, prompts left-padded (generation appends on the right)."""
    samples: list[dict]
    input_ids: torch.Tensor           # [B, P]
    attention_mask: torch.Tensor      # [B, P]
    positions: torch.Tensor           # [3, B, P]: rope_positions
    next_position: torch.Tensor       # [B]: where each prompt's first new token sits
    pixel_values: list[torch.Tensor]  # B x [t*h*w, 3*2*p*p]
    video_grid_thw: torch.Tensor      # [B, 3]
    video_features: list | None = None  # B x [[t*h*w/4, D], *DeepStack's], once encode_videos has run


def collate(samples: list[dict], texts: list[str], videos: list, tokenizer, config, device) -> Batch:
    """Questions as model inputs: prompts left-padded to one length, their positions, their videos."""
    prompts = [prompt_ids(tokenizer, text, video, config.video_token_id)
               for text, video in zip(texts, videos)]
    length = max(len(p) for p in prompts)
    padding = [length - len(p) for p in prompts]
    input_ids = [[tokenizer.pad_token_id] * pad + p for pad, p in zip(padding, prompts)]
    attention_mask = [[0] * pad + [1] * len(p) for pad, p in zip(padding, prompts)]
    input_ids = torch.tensor(input_ids, device=device)
    attention_mask = torch.tensor(attention_mask, device=device)
    positions, next_position = rope_positions(config, input_ids, attention_mask, videos)
    return Batch(samples, input_ids, attention_mask, positions, next_position,
                 [video.pixels.to(device) for video in videos],
                 torch.stack([video.grid for video in videos]).to(device))


def video_token_types(input_ids: torch.Tensor, model) -> torch.Tensor:
    """mm_token_type_ids, which transformers 5 needs with every video input: 2 on video tokens, else 0."""
    return (2 * (input_ids == unwrapped(model).config.video_token_id)).int()


@torch.no_grad()
def encode_videos(model, batch: Batch) -> list[list[torch.Tensor]]:
    """Each distinct video of the batch through the frozen vision tower, once: B x [[t*h*w/4, D], ...]. Every
    pass of the step (sampling, pi_old, pi_ref, pi_theta) takes these features, and questions about the same
    video (VSI-100k asks many per scene) share them."""
    qwen = unwrapped(model).model
    if any(p.requires_grad for p in qwen.visual.parameters()):  # a fork that trains the tower
        raise RuntimeError("a trainable vision tower changes its features in a step: use --straightforward")
    videos = [s["video"] for s in batch.samples]
    first = [videos.index(video) for video in dict.fromkeys(videos)]  # each distinct video's first question
    pixels = torch.cat([batch.pixel_values[i] for i in first])
    encoded = qwen.get_video_features(pixels, batch.video_grid_thw[first])
    # Per video, the features of its tokens and, in Qwen3-VL, DeepStack's: one [t*h*w/4, D] from each of some
    # tower layers, which the language model adds at the video's tokens in its first layers.
    layers = [encoded.pooler_output, *(getattr(encoded, "deepstack_features", None) or [])]  # each per video
    features = {videos[i]: [layer[j] for layer in layers] for j, i in enumerate(first)}
    return [features[video] for video in videos]


def video_inputs(batch: Batch, questions: list[int]) -> dict:
    """The videos of `questions`, in order: their features if encoded this step, else their pixels."""
    if batch.video_features is None:  # --straightforward: the model encodes every copy itself
        pixels = torch.cat([batch.pixel_values[q] for q in questions])
        return dict(pixel_values_videos=pixels, video_grid_thw=batch.video_grid_thw[questions])
    # mm_encoder_outputs: what the vision tower returns, passed instead of pixels so that it runs no more.
    layers = list(zip(*(batch.video_features[q] for q in questions)))  # per layer, a tensor per question
    features = BaseModelOutputWithDeepstackFeatures(pooler_output=layers[0], deepstack_features=layers[1:])
    return dict(mm_encoder_outputs={"video": features})


def banned_token_ids(model) -> list[int]:
    # A sampled video or image placeholder would break the next forward (features and placeholders no
    # longer match): sampling suppresses them and token_logps masks them, so both see one distribution.
    config = unwrapped(model).config
    return [config.video_token_id, config.image_token_id]


# ======================================== 5. log-probs
def token_logps(logits: torch.Tensor, ids: torch.Tensor, model, args) -> torch.Tensor:
    """log-probs [n, C] of `ids` under logits [n, C, V] / temperature, banned tokens masked: as sampled."""
    banned = torch.tensor(banned_token_ids(model), device=logits.device)
    logits = (logits.float() / args.temperature).index_fill(-1, banned, float("-inf"))   # [n, C, V]
    return logits.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - logits.logsumexp(-1)


def straightforward_logps(model, batch: Batch, completion_ids: torch.Tensor, mask: torch.Tensor,
                          rows: torch.Tensor, args) -> torch.Tensor:
    """log pi(o_t | q, o_<t) as a plain implementation computes it: each completion after its own copy of
    the left-padded prompt and video, at the positions that follow the prompt's: [n, C]."""
    questions = rows // args.num_generations
    input_ids = torch.cat([batch.input_ids[questions], completion_ids[rows]], 1)               # [n, P + C]
    attention_mask = torch.cat([batch.attention_mask[questions], mask[rows]], 1)               # [n, P + C]
    C = completion_ids.shape[1]
    after = batch.next_position[questions, None] + torch.arange(C, device=input_ids.device)    # [n, C]
    positions = torch.cat([batch.positions[:, questions], after.expand(3, -1, -1)], 2)        # [3, n, P + C]
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                   mm_token_type_ids=video_token_types(input_ids, model), use_cache=False,
                   logits_to_keep=C + 1, **video_inputs(batch, questions.tolist())).logits    # [n, C + 1, V]
    return token_logps(logits[:, :-1], completion_ids[rows], model, args)


# The shared prompt. A question's G completions share its prompt: ~1,000 video and question tokens at 16
# frames, against a few dozen per answer. So the default path packs k completions behind one copy of the
# prompt, [prompt, o_1, ..., o_k]. A 4-D mask lets each completion see the prompt and its own earlier
# tokens only, and each takes the positions after the prompt: every log-prob is the one a separate
# [prompt, o_i] sequence gives (tested against straightforward_logps above).
def packed_inputs(model, batch: Batch, completion_ids: torch.Tensor, rows: torch.Tensor, G: int) -> dict:
    """Model inputs of one forward: per question of `rows`, one sequence [prompt, its completions] (the
    batch's own padding dropped), left-padded to a common length L so that all end with their completions."""
    questions = (rows // G).unique().tolist()
    sequences, positions, parts = [], [], []
    for q in questions:
        real = batch.attention_mask[q].bool()
        prompt = batch.input_ids[q][real]                                                  # [P]
        answers = completion_ids[rows[rows // G == q]]                                     # [k, C]
        k, C = answers.shape
        P = len(prompt)
        sequences.append(torch.cat([prompt, answers.flatten()]))                           # [P + k*C]
        # Every completion takes the positions that follow the prompt, as it would alone after it.
        after = batch.next_position[q] + torch.arange(C, device=prompt.device).repeat(k)   # [k*C]
        positions.append(torch.cat([batch.positions[:, q, real], after.expand(3, -1)], 1))  # [3, P + k*C]
        # Which part each token is: 0 the prompt, j the completion o_j.
        parts.append(torch.arange(k + 1, device=prompt.device).repeat_interleave(
            torch.tensor([P] + [C] * k, device=prompt.device)))                            # [P + k*C]
    L = max(len(s) for s in sequences)
    input_ids = torch.stack([left_pad(s, L, 0) for s in sequences])                        # [n, L]
    part = torch.stack([left_pad(p, L, -1) for p in parts])                                # [n, L]
    return dict(input_ids=input_ids,
                position_ids=torch.stack([left_pad(p, L, 0) for p in positions], 1),       # [3, n, L]
                attention_mask=packed_attention_mask(part, unwrapped(model).dtype),        # [n, 1, L, L]
                mm_token_type_ids=video_token_types(input_ids, model),
                **video_inputs(batch, questions))


def left_pad(x: torch.Tensor, length: int, value: int) -> torch.Tensor:
    return F.pad(x, (length - x.shape[-1], 0), value=value)


def packed_attention_mask(part: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[n, L] parts (0 prompt, j completion o_j, -1 padding) -> an additive mask [n, 1, L, L]: query i
    sees key j <= i of the prompt or of its own part. A padding query sees itself, so no row is empty."""
    order = torch.arange(part.shape[1], device=part.device)
    causal = order[None, :] <= order[:, None]                                              # [L, L]
    key_in_prompt = part[:, None, :] == 0                                                  # [n, 1, L]
    same_part = part[:, None, :] == part[:, :, None]                                       # [n, L, L]
    sees = causal & (key_in_prompt | same_part)                                            # [n, L, L]
    # Additive, not boolean: eager attention adds the mask, so a boolean one would be silently wrong there.
    mask = torch.zeros(sees.shape, dtype=dtype, device=part.device).masked_fill(~sees, -torch.inf)
    return mask[:, None]


def completion_logps(model, batch: Batch, completion_ids: torch.Tensor, mask: torch.Tensor,
                     rows: torch.Tensor, args) -> torch.Tensor:
    """log pi(o_t | q, o_<t) of each token of completions `rows`, k per question, with the video: [n, C]."""
    if batch.video_features is None:  # --straightforward
        return straightforward_logps(model, batch, completion_ids, mask, rows, args)
    n, C = completion_ids[rows].shape
    k = n // len((rows // args.num_generations).unique())
    inputs = packed_inputs(model, batch, completion_ids, rows, args.num_generations)
    logits = model(**inputs, use_cache=False, logits_to_keep=k * C + 1).logits             # [n/k, 1 + k*C, V]
    # The logit at a token predicts the token after it. With k = 2 completions a, b of C = 3 tokens, the kept
    # logits sit at [p, a0, a1, a2, b0, b1, b2] = 0..6, p the prompt's last token: a's tokens are predicted at
    # [0, 1, 2] and b's at [0, 4, 5]. b0's is p's logit, not a2's: b sees the prompt, never a.
    at = torch.arange(C, device=logits.device) + C * torch.arange(k, device=logits.device)[:, None]  # [k, C]
    at = at.masked_fill(at % C == 0, 0)
    return token_logps(logits[:, at].flatten(0, 1), completion_ids[rows], model, args)


def micro_batches(num_questions: int, args) -> list[torch.Tensor]:
    """The rows of each forward: --micro-batch-size completions, whole questions when it is G or more."""
    G = args.num_generations
    size = args.micro_batch_size
    if size >= G:
        return list(torch.arange(num_questions * G).split(size // G * G))
    return [rows for q in range(num_questions) for rows in torch.arange(q * G, (q + 1) * G).split(size)]


@torch.no_grad()
def logps_of_all(model, batch: Batch, completion_ids: torch.Tensor, mask: torch.Tensor, args) -> torch.Tensor:
    """completion_logps of every completion, a micro-batch at a time: [B*G, C]."""
    chunks = [rows.to(completion_ids.device) for rows in micro_batches(len(batch.samples), args)]
    return torch.cat([completion_logps(model, batch, completion_ids, mask, rows, args) for rows in chunks])


# ======================================== 6. the rollout
@dataclass
class Rollout:
    """G completions of each of B questions: sequence i answers question i // G."""
    batch: Batch
    completion_ids: torch.Tensor      # [B*G, C]
    completion_mask: torch.Tensor     # [B*G, C]: 1 up to and including the first EOS
    truncated: torch.Tensor           # [B*G]: no EOS within --max-completion-length
    completions: list[str]
    rewards: dict[str, torch.Tensor]  # reward name -> [B*G]
    advantages: torch.Tensor          # [B*G]
    old_logps: torch.Tensor | None    # [B*G, C], pi_old; None when mu = 1 (then pi_old = pi_theta)
    ref_logps: torch.Tensor | None    # [B*G, C], pi_ref; None when beta = 0


def eos_token_ids(model, tokenizer) -> list[int]:
    """What ends a completion: the generation config's EOS ids and the tokenizer's."""
    ids = unwrapped(model).generation_config.eos_token_id
    return sorted({*(ids if isinstance(ids, list) else [ids]), tokenizer.eos_token_id} - {None})


def generation_config(model, tokenizer, max_new_tokens: int, num_return_sequences: int = 1,
                      temperature: float | None = None) -> GenerationConfig:
    """Sampling from the policy itself at `temperature` (no top-k, no top-p), or greedy when it is None."""
    # Every field that shapes it is set: generate() fills unset ones from the checkpoint (Qwen2-VL: top_k=1).
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    mode = sampling if temperature else dict(do_sample=False)
    return GenerationConfig(**mode, repetition_penalty=1.0, max_new_tokens=max_new_tokens,
                            num_return_sequences=num_return_sequences,
                            eos_token_id=eos_token_ids(model, tokenizer), pad_token_id=tokenizer.pad_token_id,
                            suppress_tokens=banned_token_ids(model))


@torch.no_grad()
def generate(model, batch: Batch, config: GenerationConfig) -> torch.Tensor:
    """Completions, question-major (q0 x G, q1 x G, ...): [B*G, C]. Each prompt is prefilled once, and
    its G continuations are sampled from copies of that state."""
    G = config.num_return_sequences
    P = batch.input_ids.shape[1]
    questions = list(range(len(batch.samples)))
    # New tokens take the positions after the prompt's last: generate() continues position_ids by 1 a token.
    inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                  position_ids=batch.positions, mm_token_type_ids=video_token_types(batch.input_ids, model))
    if batch.video_features is None:  # --straightforward: generate() takes G copies of each prompt
        return model.generate(**inputs, **video_inputs(batch, questions), generation_config=config)[:, P:]
    # Prefill all but each prompt's last token, which generate() feeds itself; then copy the cache G times.
    prefix = {name: value[..., :-1] for name, value in inputs.items()}                    # each [..., P - 1]
    cache = model(**prefix, use_cache=True, logits_to_keep=1, **video_inputs(batch, questions)).cache
    cache.batch_repeat_interleave(G)                                                       # B*G rows
    # Each input G times, question by question (the positions' rows are their second dimension).
    copies = {name: value.repeat_interleave(G, -2) for name, value in inputs.items()}     # each [..., B*G, P]
    one_each = GenerationConfig(**{**config.to_dict(), "num_return_sequences": 1})
    return model.generate(**copies, cache=cache, generation_config=one_each)[:, P:]


def completion_mask(completion_ids: torch.Tensor, eos_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask [n, C]: 1 up to and including the first EOS, found by position so that it counts even when
    pad == EOS; truncated [n]: True where no EOS came within the length limit)."""
    is_eos = torch.isin(completion_ids, torch.tensor(eos_ids, device=completion_ids.device))  # [n, C]
    length = completion_ids.shape[1]
    ended = is_eos.any(1)                                                                  # [n]
    first_eos = torch.where(ended, is_eos.int().argmax(1), length)                         # [n]
    mask = torch.arange(length, device=completion_ids.device)[None] <= first_eos[:, None]   # [n, C]
    return mask.long(), ~ended


def decode(tokenizer, completion_ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
    """Each completion's text up to its first EOS."""
    texts = [ids[:n] for ids, n in zip(completion_ids.tolist(), mask.sum(1).tolist())]
    return tokenizer.batch_decode(texts, skip_special_tokens=True)


def equal_reward_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """[B*G] -> [B]: True for a group whose rewards are all equal (it carries no signal)."""
    groups = rewards.view(-1, group_size)                                                  # [B, G]
    # Compared as values: float32 rewards such as 0.7 leave a std of ~1e-7, not 0.
    return (groups == groups[:, :1]).all(1)


def group_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """A_i = (r_i - mean(r_group)) / (std(r_group) + 1e-4): [B*G] -> [B*G]; exactly 0 for an all-equal
    group. std is the sample std, as in TRL's GRPO, which vsGRPO built on; 1e-4 keeps it finite."""
    groups = rewards.view(-1, group_size)                                                  # [B, G]
    advantages = (groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)
    return torch.where(equal_reward_groups(rewards, group_size)[:, None], 0.0, advantages).view(-1)


def rollout(policy, ref_model, batch: Batch, args, tokenizer) -> Rollout:
    """Sample G completions per question, score them, and compute A, pi_old and pi_ref."""
    policy.eval()
    G = args.num_generations
    with timed("vision"):
        batch.video_features = None if args.straightforward else encode_videos(policy, batch)
    with timed("generation"):
        config = generation_config(policy, tokenizer, args.max_completion_length, G, args.temperature)
        completion_ids = generate(policy, batch, config)                                   # [B*G, C]
        mask, truncated = completion_mask(completion_ids, config.eos_token_id)
    with timed("scoring"):
        completions = decode(tokenizer, completion_ids, mask)
        samples = [s for s in batch.samples for _ in range(G)]
        scores = score_completions(completions, samples, args.rewards, args.reward_weights)
        rewards = {name: torch.tensor(value, device=completion_ids.device) for name, value in scores.items()}
        advantages = group_advantages(rewards["total"], G)                                 # [B*G]
    with timed("logprob_passes"):
        old_logps = None  # pi_old is pi_theta at mu = 1
        if args.num_iterations > 1:
            old_logps = logps_of_all(policy, batch, completion_ids, mask, args)
        ref_logps = None
        if args.beta > 0:  # pi_ref: the frozen copy under full fine-tuning, else the policy without adapters
            with lora_disabled(policy) if ref_model is None else nullcontext():
                ref_logps = logps_of_all(ref_model or policy, batch, completion_ids, mask, args)
    return Rollout(batch, completion_ids, mask, truncated, completions, rewards, advantages, old_logps,
                   ref_logps)


# ======================================== 7. the objective (Eq. 1)
# GRPO (DeepSeekMath, arXiv 2402.03300), as vsGRPO trains it. For question q with completions o_1..o_G:
#
#   J(theta) = 1/G sum_i 1/|o_i| sum_t [ min( rho_it A_i, clip(rho_it, 1 - eps, 1 + eps) A_i ) - beta KL_it ]
#
#   rho_it = pi_theta(o_it | q, o_i<t) / pi_old(o_it | q, o_i<t)
#   KL_it  = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1       (the k3 estimator, always >= 0)
#
# We minimise -J. The per-token part is grpo_token_loss; the 1/G sum_i 1/|o_i| sum_t is aggregate_loss.
def grpo_token_loss(logps, old_logps, ref_logps, advantages, mask, clip_eps: float, beta: float):
    """-(clipped surrogate - beta * KL) per token, 0 at padding: [n, C]; also the KL [n, C] and where the
    clip bites. Padding is selected away (where), never multiplied by 0: an inf or NaN the model computed
    there would survive a product, in the loss or in exp's gradient."""
    real = mask.bool()                                                       # [n, C]
    ratio = torch.exp(torch.where(real, logps - old_logps, 0.0))             # rho, [n, C]
    advantage = advantages.unsqueeze(1)                                      # A, [n, 1]
    unclipped = ratio * advantage
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantage
    surrogate = torch.min(unclipped, clipped)
    if ref_logps is None:                                                    # beta = 0: no reference pass
        kl = torch.zeros_like(logps)
    else:
        log_ratio = torch.where(real, ref_logps - logps, 0.0)                # log(pi_ref / pi_theta)
        kl = torch.exp(log_ratio) - log_ratio - 1
    return torch.where(real, -(surrogate - beta * kl), 0.0), kl, (clipped < unclipped) & real


def aggregate_loss(token_loss, mask, aggregation: str, num_sequences: int, num_tokens: float) -> torch.Tensor:
    """This micro-batch's share of the step's loss (the shares of all micro-batches add up to it).
    sequence (Eq. 1): mean over each completion's tokens, then over completions, so short completions
    weigh more per token; token: every token of the step weighs the same."""
    if aggregation == "sequence":
        return (token_loss.sum(1) / mask.sum(1)).sum() / num_sequences
    return token_loss.sum() / num_tokens


# ======================================== 8. the optimisation step
def optimise(model, policy, optimizer, accelerator, ro: Rollout, args) -> dict:
    """mu optimiser steps on one rollout batch, gradients accumulated over micro-batches."""
    policy.train()  # only switches gradient checkpointing on: Qwen2-VL and our LoRA have no dropout
    num_sequences = len(ro.completion_ids)
    num_tokens = int(ro.completion_mask.sum())
    # DDP averages gradients over W processes: each divides by the step's token count / W, not by its own.
    step_tokens = accelerator.reduce(ro.completion_mask.sum(), "sum").item() / accelerator.num_processes
    chunks = [rows.to(ro.completion_ids.device) for rows in micro_batches(len(ro.batch.samples), args)]
    trainable = [p for p in policy.parameters() if p.requires_grad]
    stats = {"loss": 0.0, "kl": 0.0, "clip_fraction": 0.0}
    for _ in range(args.num_iterations):
        for i, rows in enumerate(chunks):
            mask = ro.completion_mask[rows]                                  # [n, C]
            last = i == len(chunks) - 1
            with nullcontext() if last else accelerator.no_sync(model):     # all-reduce once, at the last
                logps = completion_logps(model, ro.batch, ro.completion_ids, ro.completion_mask, rows, args)
                old_logps = logps.detach() if ro.old_logps is None else ro.old_logps[rows]
                ref_logps = None if ro.ref_logps is None else ro.ref_logps[rows]
                token_loss, kl, clipped = grpo_token_loss(logps, old_logps, ref_logps, ro.advantages[rows],
                                                          mask, args.clip_eps, args.beta)
                loss = aggregate_loss(token_loss, mask, args.loss_aggregation, num_sequences, step_tokens)
                accelerator.backward(loss)
            stats["loss"] += loss.item() / args.num_iterations
            stats["kl"] += kl.sum().item() / num_tokens / args.num_iterations
            stats["clip_fraction"] += clipped.sum().item() / num_tokens / args.num_iterations
        # The norm is taken after DDP's all-reduce, so every process makes the same choice.
        stats["grad_norm"] = float(accelerator.clip_grad_norm_(trainable, args.max_grad_norm))
        stats["nonfinite"] = float(not math.isfinite(stats["grad_norm"]))
        if not stats["nonfinite"]:
            optimizer.step()  # AdamW without weight decay (our choice), constant learning rate
        optimizer.zero_grad(set_to_none=True)
    return stats


# ======================================== 9. training
def reference_model(policy, args):
    """pi_ref under full fine-tuning: a frozen copy, made only when the KL term needs it. Under LoRA, None:
    pi_ref is the policy with its adapters off (lora_disabled)."""
    needed = args.lora_rank == 0 and args.beta > 0
    return deepcopy(policy).eval().requires_grad_(False) if needed else None


def train(args) -> nn.Module:
    """The whole run: set-up, then GRPO steps over the data; returns the trained policy (unwrapped)."""
    # On a CPU, Accelerator() alone would pick no process group, and each process would train alone.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), project_dir=args.output_dir,
                              log_with=None if args.report_to == "none" else args.report_to)
    # The run's books (see the tools) check the rows and claim --output-dir before any model loads.
    with RunBooks(args, accelerator) as books:
        set_seed(args.seed)  # the same LoRA initialisation on every process
        policy, tokenizer = load_model(args, accelerator.device)
        ref_model = reference_model(policy, args)
        trainable = [p for p in policy.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=args.learning_rate, weight_decay=0.0)
        model, optimizer = accelerator.prepare(policy, optimizer)  # DDP over the processes
        set_seed(args.seed, device_specific=True)  # but different samples on each process
        start = books.begin(policy, optimizer, tokenizer, ref_model)  # 0, or the checkpoint's step
        for step in range(start + 1, books.steps + 1):
            with timed("video_loading"):  # on a GPU, decoded in the background during the step before
                rows, videos = books.videos_for(step)
                batch = collate(rows, [question_text(r) for r in rows], videos, tokenizer, policy.config,
                                accelerator.device)
            ro = rollout(policy, ref_model, batch, args, tokenizer)
            with timed("optimisation"):
                stats = optimise(model, policy, optimizer, accelerator, ro, args)
            books.end_step(step, ro, stats)  # log; evaluate and save on schedule; stop safely
    return policy


# ======================================== Part II: the tools ========================================
# Nothing below is needed to follow a training step. train() uses two names from here: RunBooks, the run's
# books (rows checked, --output-dir claimed, the resume point, logs, evaluation, checkpoints, safe stops),
# and timed, the phase timer. Then VSI-Bench evaluation, synthetic data, the demo, the benchmark and main.
# The tools' own imports stand here, so that the list at the top shows what the method needs.
import argparse
import fcntl
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import sys
import time
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from pathlib import Path

import av
import numpy as np
from accelerate.tracking import get_available_trackers
from accelerate.utils import gather_object
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import AutoConfig, PreTrainedTokenizerFast
from transformers.utils import logging as transformers_logging

from data import (DECODED, FAMILIES, PROMPTS, batch_indices, benchmark_prompt, expand_paths,
                  load_batch, load_samples, load_video, missing_videos, read_rows)
from rewards import (BENCHMARK_TASKS, BENCHMARK_TYPES, DEFAULT_REWARDS, REWARDS, answer_score,
                     benchmark_score, clean_prediction, extract_answer, no_video_baseline, task_scores)

# ---------------------------------------------------------------------------- the run's books
PHASES: dict[str, float] = {}  # seconds per phase of the current step: timed() adds, end_step() reads


@contextmanager
def timed(phase: str):
    start = time.perf_counter()
    yield
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # charge queued GPU work to the phase that queued it
    PHASES[phase] = PHASES.get(phase, 0.0) + time.perf_counter() - start


MAX_NONFINITE_STEPS = 3  # in a row, then the run stops (our choice)


class RunBooks:
    """A training run's books. Before any model loads: the rows checked, --output-dir claimed and locked,
    the checkpoint to resume found. Then each step's videos (decoded a step ahead), its log, evaluation
    and saves on schedule, and safe stops. It keeps references to what it saves; it builds none of it."""

    def __init__(self, args, accelerator: Accelerator):
        if accelerator.mixed_precision == "fp16":  # its loss scaler backs off only in steps we skip
            raise DataError("accelerate launch --mixed_precision fp16 is not supported: Qwen2-VL, trained "
                            "in bf16, overflows fp16 (transformers#33294). Use bf16 or no")
        self.args = args
        self.accelerator = accelerator
        # Each process checks what it will read: one that fails, or sees another node's files, stops them all.
        checked = collectively(accelerator, self.check_data)
        other = next((place for digest, place in checked if digest != checked[0][0]), None)
        if other:
            raise DataError(f"{other} reads other rows or videos than the main process: every node needs the "
                            "same --data, --video-root, --eval-data and --model at the same paths")
        self.feed = VideoFeed(self.samples, args, accelerator, self.format)
        self.steps = args.max_steps or max(1, len(self.samples) // self.feed.questions_per_step)
        self.lock = None
        self.signals = None
        self.resume_from, claim = collectively(accelerator, self.claim_output_dir, main_only=True)[0]
        try:
            collectively(accelerator, lambda: see_output_dir(args.output_dir, claim, accelerator))
        except DataError:
            release_lock(self.lock)
            raise

    def check_data(self) -> tuple[str, str]:
        """This process's rows, held-out rows and checkpoint format, checked; a digest of them, and where."""
        self.samples = checked_samples(self.args)
        self.eval_rows = checked_eval_rows(self.args) if self.args.eval_every else []
        self.format = video_format(self.args.model)  # the checkpoint's family: before any model loads
        seen = json.dumps([self.samples, self.eval_rows, vars(self.format)])
        return hashlib.sha256(seen.encode()).hexdigest(), where(self.accelerator)

    def claim_output_dir(self) -> tuple[str | None, str]:
        """Lock --output-dir, then free it for a new run, or find the checkpoint --resume goes on from:
        (that checkpoint or None, the claim written in the lock file)."""
        claim = f"held by {where(self.accelerator)}, pid {os.getpid()}, since {time.ctime()}"
        self.lock = take_lock(self.args.output_dir, claim)
        try:
            if self.args.resume:
                return checkpoint_to_resume(self.args, self.accelerator.num_processes, self.steps), claim
            free_output_dir(self.args.output_dir, self.args.overwrite, resumable=True)
        except DataError:
            release_lock(self.lock)
            raise
        return None, claim

    def __enter__(self):
        return self

    def __exit__(self, *error):
        if self.signals:
            self.signals.restore()
        self.feed.close()
        for tracker in self.accelerator.trackers:  # not end_training(): evaluation may need the processes
            tracker.finish()
        # Drop the accelerator's references to the DDP model while the process group lives: if DDP's
        # destructor dropped the group's last reference, gloo could deadlock (pytorch/pytorch#56297).
        self.accelerator.free_memory()
        release_lock(self.lock)

    def begin(self, policy, optimizer, tokenizer, ref_model) -> int:
        """Restore a resumed run, open the logs, catch stop signals; the step to go on from (0: a new run)."""
        args = self.args
        self.policy = policy
        self.optimizer = optimizer
        self.tokenizer = tokenizer
        self.encodings = count_video_encodings([policy, ref_model])
        self.start = 0
        if self.resume_from:
            rank = self.accelerator.process_index
            self.start = restore_checkpoint(self.resume_from, policy, optimizer, rank)
        if self.accelerator.is_main_process:
            keep_metrics_up_to(os.path.join(args.output_dir, "metrics.jsonl"), self.start)
            if not self.resume_from:
                with open(os.path.join(args.output_dir, "args.json"), "w") as f:
                    json.dump(vars(args), f, indent=1)
            self.accelerator.init_trackers(PROJECT, config={k: str(v) for k, v in vars(args).items()})
            resumed = f"; resumed from {self.resume_from} at step {self.start}" if self.resume_from else ""
            print(f"{len(self.feed.samples)} questions, {self.accelerator.num_processes} process(es), "
                  f"{self.steps} step(s) of {self.feed.questions_per_step} question(s) x "
                  f"G={args.num_generations}; rewards {args.rewards}{resumed}")
        self.signals = StopSignals()
        self.nonfinite_in_a_row = 0
        self.started = time.perf_counter()
        peak_memory_gb(self.accelerator.device, reset=True)
        PHASES.clear()
        return self.start

    def videos_for(self, step: int) -> tuple[list, list]:
        """The rows and decoded videos of `step`; first, every process agrees on any stop."""
        self.loaded = self.feed.take(step, self.steps)
        stop = agreed_stop(self.accelerator, self.signals, self.loaded.decoded, self.loaded.short, self.args)
        if stop:
            self.stop(*stop, save_step=step - 1, failed_step=step)
        return self.loaded.rows, self.loaded.videos

    def end_step(self, step: int, ro, stats: dict) -> None:
        """Log the step, evaluate and save on schedule; stop, saved, after too many non-finite steps."""
        args = self.args
        accelerator = self.accelerator
        lr = self.optimizer.param_groups[0]["lr"]
        metrics = step_metrics(ro, args, stats, len(self.loaded.failures), lr)
        metrics["video_encodings"] = self.encodings["videos"]
        metrics["peak_memory_gb"] = peak_memory_gb(accelerator.device)
        metrics = average_over_processes(accelerator, metrics)
        # Not when the run is about to stop: a preemption's grace period covers the rest of a step and a save.
        if args.eval_every and step % args.eval_every == 0 and not self.signalled():
            self.feed.wait()  # evaluation decodes too, and the decoded-video cache is not shared by threads
            predictions, _ = evaluate(self.policy, self.tokenizer, self.eval_rows, args, accelerator,
                                      signals=self.signals)
            if not self.signalled():  # else cut short
                metrics["eval_avg"] = task_scores(predictions)["Avg"]
        if accelerator.is_main_process:
            seconds_per_step = (time.perf_counter() - self.started) / (step - self.start)
            log_step(args, step, self.steps, metrics, seconds_per_step)
            accelerator.log(metrics, step=step)
            if args.log_completions_every and step % args.log_completions_every == 0:
                print_completions(ro, args)
        self.nonfinite_in_a_row = self.nonfinite_in_a_row + 1 if stats["nonfinite"] else 0
        if self.nonfinite_in_a_row:
            warn(f"step {step} skipped: non-finite loss or gradient")
        if self.nonfinite_in_a_row >= MAX_NONFINITE_STEPS:  # updates skipped: these are the last good weights
            why = f"stopped: {MAX_NONFINITE_STEPS} steps in a row had a non-finite loss or gradient"
            self.stop(why, 1, step)
        if args.save_every and (step % args.save_every == 0 or step == self.steps):
            saving = time.perf_counter()
            path = self.save(step)
            if accelerator.is_main_process:
                show_progress(f"saved {path} ({time.perf_counter() - saving:.0f} s)")
        PHASES.clear()  # evaluation and saving are charged to no phase
        self.encodings["videos"] = 0

    def signalled(self) -> bool:  # a stop signal reached any process
        return agreed_stop(self.accelerator, self.signals, {}, False, self.args) is not None

    def save(self, step: int) -> str:
        path = os.path.join(self.args.output_dir, f"checkpoint-{step:06d}")
        # Saved already (a stop right after a scheduled save): every process sees it, as saves end together.
        if not os.path.isdir(path):
            save_checkpoint(self.accelerator, self.policy, self.optimizer, self.tokenizer, self.args, step)
        return path

    def stop(self, reason: str, code: int, save_step: int, failed_step: int | None = None):
        """Any stop the run handles itself: save `save_step`, log the step that failed, exit with `code`."""
        saved = "no step had finished, nothing to save"
        if save_step > 0:
            saved = f"saved {self.save(save_step)}. To continue, run the same command with --resume"
        if failed_step and self.accelerator.is_main_process:
            with open(os.path.join(self.args.output_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps({"step": failed_step, "stopped": reason}) + "\n")
        raise RunStopped(f"{reason} before step {failed_step or save_step + 1}; {saved}", code)


# A thread decodes the next step's videos while a GPU computes; not on 2 CPU cores (demo: 49 s with it, 35 s).
PREFETCH = torch.cuda.is_available()


# A step's rows and videos; those that failed, every video tried so far (True: it decoded), a short batch.
Loaded = namedtuple("Loaded", "rows videos failures decoded short")


class VideoFeed:
    """Each step's rows and decoded videos. A step's rows follow from (seed, step, process), so while step s
    trains, a thread decodes step s + 1 (PyAV and torch release the GIL). Each load starts after the one
    before has ended, so skipped videos and the record of bad ones are exactly those of loading in turn."""

    def __init__(self, samples: list[dict], args, accelerator: Accelerator, fmt):
        self.samples = samples
        self.args = args
        self.rank = accelerator.process_index
        self.world = accelerator.num_processes
        self.questions_per_step = args.batch_size * self.world
        self.format = fmt  # the checkpoint's: how its tower takes video
        self.decoded: dict[str, bool] = {}  # every video tried: True if it decoded
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="videos") if PREFETCH else None
        self.ahead = None  # (step, its load under way)

    def load(self, step: int) -> Loaded:
        args = self.args
        indices = batch_indices(step - 1, self.rank, self.world, args.batch_size, len(self.samples),
                                args.seed)
        rng = np.random.default_rng([args.seed, step, self.rank])
        rows, videos, failures = load_batch(self.samples, indices, args, rng, self.decoded, self.format)
        return Loaded(rows, videos, failures, dict(self.decoded), len(rows) < len(indices))

    def take(self, step: int, last_step: int) -> Loaded:
        """Step `step`'s load, waited for if under way; the next step's load starts."""
        loaded = self.ahead[1].result() if self.ahead and self.ahead[0] == step else self.load(step)
        self.ahead = None
        if self.pool and step < last_step:
            self.ahead = (step + 1, self.pool.submit(self.load, step + 1))
        return loaded

    def wait(self) -> None:
        if self.ahead:
            self.ahead[1].exception()  # waits; its result, or its error, is taken with its step

    def close(self) -> None:
        if self.pool:
            self.pool.shutdown(cancel_futures=True)


def collectively(accelerator, work, main_only: bool = False) -> list:
    """work() on every process, or the main one; then each gets all results or raises the first failure.
    Success and failure take the same collective: one that a process skipped would leave the rest waiting."""
    result = None
    failure = None
    try:
        result = work() if accelerator.is_main_process or not main_only else None
    except Exception as e:  # a DataError; an OSError of this node's disk
        failure = str(e) if isinstance(e, DataError) else f"{type(e).__name__} on {where(accelerator)}: {e}"
    outcomes = gather_object([(result, failure)])
    failures = [failure for _, failure in outcomes if failure]
    if failures:
        raise DataError(failures[0])
    return [result for result, _ in outcomes]


def where(accelerator) -> str:
    return f"process {accelerator.process_index} ({os.uname().nodename})"


def step_metrics(ro, args, stats: dict, num_bad: int, lr: float) -> dict:
    G = args.num_generations
    lengths = ro.completion_mask.sum(1).float()                              # [B*G]
    groups = ro.rewards["total"].view(-1, G)                                 # [B, G]
    seconds = {phase: max(PHASES.get(phase, 0.0), 1e-9) for phase in ("generation", "optimisation")}
    metrics = {**stats, "reward": groups.mean().item(), "reward_std": groups.std(1).mean().item(),
               "zero_std_fraction": equal_reward_groups(ro.rewards["total"], G).float().mean().item(),
               "completion_length": lengths.mean().item(), "completion_length_max": lengths.max().item(),
               "truncated_fraction": ro.truncated.float().mean().item(), "bad_videos": float(num_bad),
               "learning_rate": lr, "generated_tokens_per_s": lengths.sum().item() / seconds["generation"],
               "policy_tokens_per_s": policy_tokens(ro, args) / seconds["optimisation"]}
    metrics.update({f"reward_{name}": ro.rewards[name].mean().item() for name in args.rewards})
    return {**metrics, **{f"seconds_{phase}": t for phase, t in PHASES.items()}}


def policy_tokens(ro, args) -> int:
    """Tokens the step's pi_theta passes run through the language model: every completion (padded to C)
    and, on the default path, each prompt once per forward it is in; straightforward, once per completion."""
    num_completions, C = ro.completion_ids.shape
    if args.straightforward:
        prompts = num_completions * ro.batch.input_ids.shape[1]
    else:
        prompts = int(ro.batch.attention_mask.sum()) * math.ceil(args.num_generations / args.micro_batch_size)
    return (prompts + num_completions * C) * args.num_iterations


# How each metric combines over processes: counts add up, maxima and peaks take the max, the rest average.
REDUCE = {"bad_videos": torch.sum, "video_encodings": torch.sum, "completion_length_max": torch.max,
          "peak_memory_gb": torch.max}


def average_over_processes(accelerator, metrics: dict) -> dict:
    # In float64: float32 would log a learning rate of 1e-5 as 9.999999747378752e-06.
    mine = torch.tensor([list(metrics.values())], dtype=torch.float64, device=accelerator.device)
    values = accelerator.gather(mine)                                        # [W, k]
    return {key: REDUCE.get(key, torch.mean)(column).item() for key, column in zip(metrics, values.T)}


def count_video_encodings(models) -> dict:
    """A counter of the videos the models' vision towers encode (each call can take several)."""
    counter = {"videos": 0}

    def count(module, args, kwargs):
        counter["videos"] += len(kwargs["grid_thw"])
    for model in filter(None, models):
        model.model.visual.register_forward_pre_hook(count, with_kwargs=True)
    return counter


def peak_memory_gb(device: torch.device, reset: bool = False) -> float:
    """Peak GPU memory allocated by torch; on a CPU, the process's peak resident set (never reset)."""
    if device.type != "cuda":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux counts kilobytes
    if reset:
        torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.max_memory_allocated(device) / 2**30


def rank_zero() -> bool:  # under accelerate launch, what every process meets alike is said by rank 0 alone
    return os.environ.get("RANK", "0") == "0"


def warn(message: str) -> None:
    if rank_zero():
        print(f"warning: {message}", file=sys.stderr)


def show_progress(line: str, last: bool = True) -> None:
    """One progress line: rewritten in place on a terminal until the last; whole lines when piped."""
    tty = sys.stdout.isatty()
    print(f"\r{line}\033[K" if tty else line, end="" if tty and not last else "\n", flush=True)


def log_step(args, step: int, steps: int, metrics: dict, seconds_per_step: float) -> None:
    """Append the step to metrics.jsonl and show its progress line."""
    with open(os.path.join(args.output_dir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({"step": step, **metrics}) + "\n")
    bar = f"[{'#' * int(20 * step / steps):.<20}]"
    eta = seconds_per_step * (steps - step) / 60
    show_progress(f"{bar} {step}/{steps} {seconds_per_step:.1f}s/step eta {eta:.1f}min "
                  f"loss {metrics['loss']:+.4f} reward {metrics['reward']:.3f} kl {metrics['kl']:.2e} "
                  f"len {metrics['completion_length']:.0f} zero-std {metrics['zero_std_fraction']:.2f}",
                  last=step == steps)  # completions printed after it begin with a new line


def print_completions(ro, args) -> None:
    sample = ro.batch.samples[0]
    print(f"\n--- {sample['source']}: {sample['question']!r} (answer: {sample['answer']})")
    for i in range(args.num_generations):
        rewards = " ".join(f"{name}={ro.rewards[name][i].item():.2f}" for name in args.rewards)
        print(f"  [{rewards} A={ro.advantages[i].item():+.2f}] {ro.completions[i]!r}")


# ---------------------------------------------------------------------------- checkpoints, resume, safe stops
class RunStopped(Exception):
    """A stop the run handles itself (a signal, bad videos, non-finite steps, a failed save): exit `code`."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A plain Qwen-VL model's state: each W + (alpha / r) B A, summed in float32, stored in W's dtype."""
    state = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            merged = m.weight.float() + m.scale * (m.lora_B @ m.lora_A)
            state[f"{name}.weight"] = merged.to(m.weight.dtype).detach()
    return state


def save_checkpoint(accelerator, policy, optimizer, tokenizer, args, step: int) -> str:
    """checkpoint-N/: the merged model; in trainer/ what --resume needs; sizes.json, last. Written as .partial
    and renamed: a kill leaves no checkpoint that looks complete. A failed save (a full disk) removes its
    partial files and stops the run. The newest --keep are kept."""
    final = os.path.join(args.output_dir, f"checkpoint-{step:06d}")
    partial = final + ".partial"
    trainer = os.path.join(partial, "trainer")

    def fresh_directory():
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(trainer)

    def random_state():  # each process's own
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state()
        torch.save(rng, os.path.join(trainer, f"rng-rank{accelerator.process_index}.pt"))

    def model_and_trainer():  # after every process's random state: sizes.json lists them all
        transformers_logging.disable_progress_bar()  # its bar of shards says less than "saved PATH (N s)"
        policy.save_pretrained(partial, state_dict=merged_state_dict(policy))  # from_pretrained loads it
        tokenizer.save_pretrained(partial)
        trainable = {n: p.detach().contiguous() for n, p in policy.named_parameters() if p.requires_grad}
        save_file(trainable, os.path.join(trainer, "trainable.safetensors"))
        torch.save(optimizer.state_dict(), os.path.join(trainer, "optimizer.pt"))
        config = {**vars(args), "world_size": accelerator.num_processes}
        with open(os.path.join(trainer, "state.json"), "w") as f:
            json.dump({"step": step, "config": config}, f)
        with open(os.path.join(partial, "sizes.json"), "w") as f:
            json.dump(file_sizes(partial), f, indent=1)

    def into_place():
        os.rename(partial, final)
        for old in checkpoints(args.output_dir)[:-args.keep]:
            shutil.rmtree(old)

    try:  # each part, then one collective that every process takes, the part failed or not
        for part, main_only in ((fresh_directory, True), (random_state, False), (model_and_trainer, True)):
            collectively(accelerator, part, main_only)
    except DataError as e:
        if accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        last = (checkpoints(args.output_dir) or ["none"])[-1]
        raise RunStopped(f"could not write {final}: {e}. Its partial files were removed; the last complete "
                         f"checkpoint is {last}") from None
    collectively(accelerator, into_place, main_only=True)
    return final


def file_sizes(directory: str) -> dict[str, int]:
    """{file: bytes} under `directory`: enough to tell a checkpoint that was truncated or lost a file."""
    paths = [os.path.join(root, name) for root, _, names in os.walk(directory) for name in names]
    paths = [p for p in sorted(paths) if not p.endswith("sizes.json")]
    return {os.path.relpath(p, directory): os.path.getsize(p) for p in paths}


def checkpoint_problem(path: str) -> str | None:
    """What is wrong with a checkpoint, checked against its sizes.json, or None."""
    try:
        with open(os.path.join(path, "sizes.json")) as f:
            expected = json.load(f)
    except (OSError, ValueError):
        return f"{path}/sizes.json is missing or damaged"
    found = file_sizes(path)
    for name, size in expected.items():
        if name not in found:
            return f"{os.path.join(path, name)} is missing"
        if found[name] != size:
            return f"{os.path.join(path, name)} has {found[name]} bytes, not {size} (truncated?)"
    return None


def checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoints, oldest first (a .partial one never counts)."""
    names = os.listdir(output_dir) if os.path.isdir(output_dir) else []
    return [os.path.join(output_dir, n) for n in sorted(names) if re.fullmatch(r"checkpoint-\d+", n)]


# Flags a resumed run may change: none changes what a step computes.
MAY_CHANGE = {"max_steps", "save_every", "keep", "log_completions_every", "eval_every", "eval_limit",
              "eval_data", "eval_video_root", "eval_prompt", "eval_num_frames", "eval_batch_size", "resume",
              "overwrite", "micro_batch_size", "gradient_checkpointing", "straightforward", "report_to",
              "max_bad_video_fraction", "eval_only", "demo", "benchmark", "family", "trust_remote_code"}


def checkpoint_to_resume(args, world_size: int, steps: int) -> str:
    """The newest checkpoint in --output-dir, if sound, of a run with these settings, with steps left."""
    found = checkpoints(args.output_dir)
    if not found:
        raise DataError(f"--resume: no complete checkpoint in {args.output_dir}; nothing was changed "
                        "(start a new run without --resume)")
    problem = checkpoint_problem(found[-1])
    if problem:
        sound = next((c for c in reversed(found[:-1]) if not checkpoint_problem(c)), None)
        advice = f"move it aside to resume from the newest sound one, {sound}" if sound else "none is sound"
        raise DataError(f"--resume: {problem}; {advice}")
    path = found[-1]
    # The same settings, and as many processes: they set the data order.
    with open(os.path.join(path, "trainer", "state.json")) as f:
        state = json.load(f)
    now = {**json.loads(json.dumps(vars(args))), "world_size": world_size}
    differ = [f"{'processes' if k == 'world_size' else '--' + k.replace('_', '-')} {now.get(k)} "
              f"(checkpoint: {v})" for k, v in state["config"].items()
              if k not in MAY_CHANGE and now.get(k) != v]
    if differ:
        raise DataError(f"--resume {path}: this run's settings differ from the checkpoint's: "
                        f"{'; '.join(differ)}. Use the checkpoint's, or start a new run elsewhere")
    if state["step"] >= steps:
        raise DataError(f"--resume: {path} is at step {state['step']} and this run has {steps} step(s): "
                        "nothing to train. Raise --max-steps to go on")
    return path


def restore_checkpoint(path: str, policy, optimizer, rank: int) -> int:
    """Trainable weights, optimizer and this process's random state; returns the step to go on from."""
    trainer = os.path.join(path, "trainer")
    policy.load_state_dict(load_file(os.path.join(trainer, "trainable.safetensors")), strict=False)
    # To the CPU: saved from cuda:0, where each process would load a copy; load_state_dict moves it.
    state = torch.load(os.path.join(trainer, "optimizer.pt"), map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state)
    rng = torch.load(os.path.join(trainer, f"rng-rank{rank}.pt"), weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    with open(os.path.join(trainer, "state.json")) as f:
        return json.load(f)["step"]


def keep_metrics_up_to(path: str, step: int) -> None:
    """A resumed run keeps the log of the steps it does not redo; a new run starts an empty log."""
    lines = open(path).readlines() if step and os.path.exists(path) else []
    # Whole lines only: a full disk or a kill can cut off the last one mid-write.
    kept = [line for line in lines if line.endswith("\n") and json.loads(line)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(kept)


PROJECT = "vsgrpo"  # the trackers' project (--report-to); tensorboard logs into output_dir/PROJECT
RUN_FILES = rf"metrics\.jsonl|args\.json|checkpoint-.*|{PROJECT}"  # what a training run writes


def free_output_dir(output_dir: str, overwrite: bool, names: str = RUN_FILES, resumable: bool = False):
    """Before any model loads: make output_dir; stop if an earlier run is in it, or delete that run when
    --overwrite asks. Only a new training run can continue the earlier one instead (`resumable`)."""
    os.makedirs(output_dir, exist_ok=True)
    found = sorted(n for n in os.listdir(output_dir) if re.fullmatch(names, n))
    if found and not overwrite:
        choices = "continue it with --resume, choose" if resumable else "choose"
        listed = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        raise DataError(f"--output-dir {output_dir} holds an earlier run ({listed}): {choices} another "
                        "--output-dir, or delete it with --overwrite")
    if found:
        print(f"--overwrite: deleting {', '.join(found)} from {output_dir}", file=sys.stderr)
    for path in (os.path.join(output_dir, n) for n in found):
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def take_lock(output_dir: str, claim: str):
    """output_dir/run.lock, locked by the kernel until released or this process ends, however it ends: a
    second run into the directory stops here, and a killed run's lock is free again. It says `claim`."""
    os.makedirs(output_dir, exist_ok=True)
    lock = open(os.path.join(output_dir, "run.lock"), "a")
    try:
        fcntl.lockf(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise DataError(f"--output-dir {output_dir} is in use by another run (it holds {lock.name}). "
                        "Wait for it to end, or use another --output-dir") from None
    lock.truncate(0)
    lock.write(claim)
    lock.flush()
    return lock


def see_output_dir(output_dir: str, claim: str, accelerator) -> None:
    """Every other process must read the main process's claim in the lock file (the main one must not: closing
    a file releases its process's lockf locks). A run's nodes need --output-dir on one shared filesystem."""
    lock = Path(output_dir, "run.lock")
    if not accelerator.is_main_process and (not lock.is_file() or lock.read_text() != claim):
        raise DataError(f"--output-dir {output_dir}: {where(accelerator)} does not see the directory the "
                        "main process made: a run's nodes need --output-dir on one filesystem they share")


def release_lock(lock) -> None:
    if lock:
        with suppress(FileNotFoundError):  # removed by hand
            os.remove(lock.name)
        lock.close()


class StopSignals:
    """SIGTERM (a scheduler's notice of preemption) and SIGINT (Ctrl-C) stop the run after the current
    step, saved. A repeat changes nothing (the launcher forwards each signal to its workers, so one Ctrl-C
    can reach a worker twice): to stop at once, unsaved, send SIGKILL or SIGQUIT (Ctrl-\\)."""

    def __init__(self):
        self.received = 0
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGTERM, signal.SIGINT)}

    def handle(self, signum, frame):
        if not self.received and rank_zero():  # every process received it
            print(f"\n{signal.Signals(signum).name}: finishing this step, then saving it", file=sys.stderr,
                  flush=True)
        self.received = self.received or signum

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


MIN_VIDEOS_TRIED = 10  # before --max-bad-video-fraction applies: one bad video among the first is no verdict


def agreed_stop(accelerator, signals: StopSignals, decoded: dict, batch_short: bool, args) -> tuple | None:
    """(reason, exit code) when any process must stop; every process gets the same answer."""
    bad_videos = list(decoded.values()).count(False)
    mine = torch.tensor([[signals.received, len(decoded), bad_videos, batch_short]], dtype=torch.float64,
                        device=accelerator.device)
    received, tried, bad, short = accelerator.gather(mine).cpu().T            # each [W]
    if received.max() > 0:
        return f"stopped by {signal.Signals(int(received.max())).name}", 128 + int(received.max())
    over = tried.sum() >= MIN_VIDEOS_TRIED and bad.sum() > args.max_bad_video_fraction * tried.sum()
    if not over and not short.any():
        return None
    why = "so many that a batch could not be filled"
    if over:
        why = f"over --max-bad-video-fraction {args.max_bad_video_fraction}"
    return (f"stopped: {int(bad.sum())} of the {int(tried.sum())} distinct videos tried failed to decode, "
            f"{why} (the warnings above name them)"), 1


# ---------------------------------------------------------------------------- checking data
def checked_samples(args) -> list[dict]:
    """Every row of --data, checked before any model loads. Rows whose video is missing are dropped and
    counted; too many missing stop here."""
    errors = []
    samples = load_samples(args.data, args.video_root, args.prompt_mode, errors)
    if errors:
        raise DataError(f"{len(errors)} bad row(s):\n  " + "\n  ".join(errors))
    missing = missing_videos(samples, "--video-root", args.video_root)
    videos = len({s["video"] for s in samples})
    listed = "\n  ".join(list(missing.values())[:10])
    if len(missing) > args.max_bad_video_fraction * videos:
        raise DataError(f"{len(missing)} of {videos} videos missing, over --max-bad-video-fraction "
                        f"{args.max_bad_video_fraction}:\n  {listed}")
    if missing:
        samples = [s for s in samples if s["video"] not in missing]
        warn(f"{len(missing)} video(s) missing; their rows are dropped, {len(samples)} rows left:\n"
             f"  {listed}")
    return samples


def checked_eval_rows(args) -> list[dict]:
    """--eval-every's held-out rows, each one evaluation can score: else eval_avg would silently cover
    fewer."""
    rows = load_samples(args.eval_data, args.eval_video_root, args.eval_prompt)[:args.eval_limit or None]
    missing = list(missing_videos(rows).values())
    if missing:
        raise DataError(f"--eval-data: {len(missing)} of {len({r['video'] for r in rows})} videos "
                        "missing:\n  " + "\n  ".join(missing[:10]))
    unscored = [f"{r['source']}: {r['question_type']}" for r in rows
                if r["question_type"] not in BENCHMARK_TYPES]
    if unscored:
        raise DataError(f"--eval-data: {len(unscored)} of {len(rows)} rows are of question types VSI-Bench "
                        "does not score; eval_avg would leave them out:\n  " + "\n  ".join(unscored[:10]))
    return rows


# ---------------------------------------------------------------------------- evaluation on VSI-Bench
@torch.no_grad()
def evaluate(policy, tokenizer, rows: list[dict], args, accelerator, protocol="benchmark",
             signals=None) -> tuple[list, list]:
    """Greedy answers, scored: (predictions, rows not evaluated with the reason), all in row order on every
    process; each process answers every W-th row. protocol "benchmark": VSI-Bench's prompts, clean-up and
    metrics; "training": the training prompt and the accuracy reward (the demo). A stop signal ends it."""
    policy.eval()
    mine = list(range(accelerator.process_index, len(rows), accelerator.num_processes))
    benchmark = protocol == "benchmark"
    # VSI-Bench decodes 16 new tokens; a think or observe prompt needs the training length.
    new_tokens = 16 if benchmark and args.eval_prompt == "vanilla" else args.max_completion_length
    config = generation_config(policy, tokenizer, new_tokens)
    fmt = video_format(args.model)
    predictions, skipped = [], []
    for start in range(0, len(mine), args.eval_batch_size):
        if signals and signals.received:
            break
        chunk = []  # videos are decoded a batch at a time: all of VSI-Bench's would not fit in memory
        for i in mine[start:start + args.eval_batch_size]:
            try:
                if benchmark and rows[i]["question_type"] not in BENCHMARK_TYPES:
                    raise DataError(f"unknown question_type {rows[i]['question_type']!r}")
                chunk.append((i, load_video(rows[i]["video"], args.eval_num_frames, args.max_pixels, fmt)))
            except DataError as e:
                skipped.append({"index": i, "id": rows[i]["id"], "source": rows[i]["source"],
                                "reason": str(e)})
        if chunk:
            predictions += answer(policy, tokenizer, rows, chunk, config, args, benchmark)
        done = min(start + args.eval_batch_size, len(mine))
        # Each batch's progress on a terminal; piped, a line every 50 batches and at the end.
        if accelerator.is_main_process and (sys.stdout.isatty() or done == len(mine) or
                                            done % (50 * args.eval_batch_size) == 0):
            show_progress(f"  evaluated {done} of this process's {len(mine)} questions",
                          last=done == len(mine))
    return [sorted(gather_object(items), key=lambda item: item["index"]) for items in (predictions, skipped)]


def answer(policy, tokenizer, rows: list[dict], chunk: list, config, args, benchmark: bool) -> list[dict]:
    """The scored predictions of one batch of (row index, decoded video)."""
    questions = [rows[i] for i, _ in chunk]
    texts = [benchmark_prompt(q, args.eval_prompt) if benchmark else question_text(q) for q in questions]
    batch = collate(questions, texts, [video for _, video in chunk], tokenizer, policy.config, policy.device)
    batch.video_features = encode_videos(policy, batch)
    completion_ids = generate(policy, batch, config)
    outputs = decode(tokenizer, completion_ids, completion_mask(completion_ids, config.eos_token_id)[0])
    predictions = []
    for (i, _), row, text, raw in zip(chunk, questions, texts, outputs):
        if benchmark:
            prediction = clean_prediction(raw, args.eval_prompt)
        else:
            prediction = extract_answer(raw, row["prompt_mode"])
        score = (benchmark_score if benchmark else answer_score)(prediction, row)
        predictions.append({"index": i, "id": row["id"], "question_type": row["question_type"],
                            "prompt": text, "raw_output": raw, "prediction": prediction,
                            "ground_truth": row["answer"], "score": score})
    return predictions


def write_evaluation(predictions: list[dict], skipped: list[dict], args) -> dict:
    """predictions.jsonl, metrics.json and the paper's table, x100."""
    scores = task_scores(predictions)
    covered = len(scores) - 1  # the tasks with at least one question; "Avg" is their mean
    questions = {task: sum(p["question_type"] in types for p in predictions)
                 for task, types in BENCHMARK_TASKS.items()}
    settings = {"model": args.model, "prompt": args.eval_prompt, "num_frames": args.eval_num_frames,
                "max_pixels": args.max_pixels}
    metrics = {"scores": scores, "tasks_in_avg": covered, "evaluated": len(predictions),
               "not_evaluated": skipped, "questions": questions, "settings": settings}
    with open(os.path.join(args.output_dir, "predictions.jsonl"), "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in predictions)
    with open(os.path.join(args.output_dir, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=1)
    columns = ["Avg" if covered == 8 else f"Avg({covered}/8)"] + list(BENCHMARK_TASKS)
    print(" | ".join(f"{c:>8}" for c in columns))
    print(" | ".join(f"{100 * scores[c]:8.1f}" if c in scores else f"{'-':>8}"
                     for c in ["Avg"] + columns[1:]))
    if covered < 8:
        print(f"Avg covers {covered} of VSI-Bench's 8 tasks: it is not comparable with the paper's overall "
              "score")
    print(f"{len(predictions)} questions scored, {len(skipped)} not evaluated; {args.eval_num_frames} "
          f"frames, max {args.max_pixels} pixels per frame, {args.eval_prompt} prompt")
    for item in skipped[:10]:  # not thousands of lines after the table when a video directory is missing
        print(f"  not evaluated: {item['source']}: {item['reason']}", file=sys.stderr)
    if len(skipped) > 10:
        print(f"  ... and {len(skipped) - 10} more: {args.output_dir}/metrics.json lists every row not "
              "evaluated", file=sys.stderr)
    return metrics


def run_evaluation(args) -> dict:
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    rows = load_samples(args.eval_data, args.eval_video_root, args.eval_prompt)
    missing_videos(rows, "--eval-video-root", args.eval_video_root)  # a few are reported, unscored
    types = sorted({r["question_type"] for r in rows})  # a few unknown are reported; all is a mistake
    if not BENCHMARK_TYPES & set(types):
        raise DataError(f"--eval-data: none of the {len(rows)} rows is of a question type VSI-Bench scores "
                        f"(found: {', '.join(types[:10])})")
    collectively(accelerator, lambda: free_output_dir(args.output_dir, args.overwrite,
                                                      r"predictions\.jsonl|metrics\.json"), main_only=True)
    args.lora_rank = 0  # a checkpoint is scored as saved: merged, no adapters
    policy, tokenizer = load_model(args, accelerator.device, training=False)
    predictions, skipped = evaluate(policy, tokenizer, rows, args, accelerator)
    return write_evaluation(predictions, skipped, args) if accelerator.is_main_process else {}


# ---------------------------------------------------------------------------- synthetic data and models
# Small scenes of coloured squares ("objects") seen by a slowly panning camera, with questions whose
# answers follow from how the scene was drawn, in VSI-Bench's format: the demo, benchmark and tests use them.
COLOURS = {"chair": ("red", (220, 40, 40)), "table": ("blue", (40, 80, 230)),
           "sofa": ("green", (40, 200, 60)), "lamp": ("yellow", (240, 220, 40))}
SYNTHETIC_TYPES = ("object_counting", "object_rel_direction", "object_colour")
GRID = 4  # objects sit in distinct cells of a 4x4 grid of 28-pixel cells: a 112x112 room
CELL = 28


def synthetic_scene(question_type: str, num_frames: int, rng: np.random.Generator) -> tuple:
    """Frames [T, 112, 112, 3] of a random room seen by a camera panning 8 px, a question and its answer."""
    a, b = (str(name) for name in rng.permutation(list(COLOURS))[:2])
    free = [(int(c) // GRID, int(c) % GRID) for c in rng.permutation(GRID * GRID)]
    if question_type == "object_counting":
        count = int(rng.integers(1, 5))
        cells = {a: free[:count], b: free[count:count + 2]}
        question, answer = f"How many {a}(s) are in this room?", str(count)
    elif question_type == "object_rel_direction":
        other = next(cell for cell in free if cell[1] != free[0][1])  # a different column
        cells = {a: [free[0]], b: [other]}
        question = f"Is the {a} to the left or to the right of the {b}?"
        answer = "left" if free[0][1] < other[1] else "right"
    else:  # object_colour: one large object (2x2 cells), so its colour fills whole video tokens
        row, col = (int(x) for x in rng.integers(0, GRID - 1, 2))
        cells = {a: [(row + i, col + j) for j in (0, 1) for i in (0, 1)]}
        question, answer = "What colour is the object in this room?", COLOURS[a][0]
    room = np.full((GRID * CELL + 8, GRID * CELL + 8, 3), 90, np.uint8)  # a 4 px margin for jitter and pan
    for name, positions in cells.items():
        for row, col in positions:
            y, x = row * CELL + 4 + rng.integers(0, 5), col * CELL + 4 + rng.integers(0, 5)
            room[y:y + 18, x:x + 18] = COLOURS[name][1]
    pans = np.linspace(0, 8, num_frames).round().astype(int)
    return np.stack([room[4:4 + GRID * CELL, p:p + GRID * CELL] for p in pans]), question, answer


def write_video(path: str, frames: np.ndarray, fps: int = 4) -> None:
    """Near-lossless H.264 at a constant quantiser: the same bytes every run, as crf's rate control is not."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=fps, options={"qp": "10"})
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())


def write_synthetic_dataset(out_dir: str, num_questions: int, seed: int = 0, num_frames: int = 8,
                            name: str = "train", scale: int = 1) -> str:
    """Videos under out_dir/videos and rows in out_dir/{name}.jsonl (the path returned). `scale` enlarges the
    frames (4: 448x448, enough to fill Qwen2-VL's usual pixel budget)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(num_questions):
        question_type = SYNTHETIC_TYPES[i % len(SYNTHETIC_TYPES)]
        scene = f"{name}_{i:05d}"
        frames, question, answer = synthetic_scene(question_type, num_frames, rng)
        video = frames.repeat(scale, 1).repeat(scale, 2)
        write_video(os.path.join(out_dir, "videos", "synthetic", f"{scene}.mp4"), video)
        rows.append({"id": scene, "dataset": "synthetic", "scene_name": scene, "question_type": question_type,
                     "question": question, "ground_truth": answer, "options": []})
    with open(os.path.join(out_dir, f"{name}.jsonl"), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    return os.path.join(out_dir, f"{name}.jsonl")


SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]


# A random model's shape: its language model's width, MLP, layers, heads, KV heads and vocabulary (0: the
# tokenizer's); its vision tower's depth, width, MLP and heads; whether the output head is the input
# embedding; the heads' width (0: width / heads); Qwen3-VL's DeepStack layers of the tower.
Shape = namedtuple("Shape", "hidden mlp layers heads kv_heads vocab depth width vision_mlp vision_heads tied "
                   "head_dim deepstack", defaults=(True, 0, ()))
# tiny is the demo's; small is Qwen2-VL-2B's layout at about a sixth of its widths and vocabulary, 4 + 4
# layers, so a CPU runs it in minutes. Both are built in every family; the others are the real shapes, from
# each checkpoint's config.json on the hub (Qwen/Qwen2-VL-2B-Instruct, ...), measured with nothing downloaded.
TINY = Shape(64, 128, 2, 4, 2, 0, 2, 32, 64, 2, deepstack=(1,))
SMALL = Shape(256, 1536, 4, 4, 2, 25344, 4, 224, 896, 4, deepstack=(1, 2, 3))
SIZES = {
    "qwen2_vl": {"tiny": TINY, "small": SMALL,
                 "2b": Shape(1536, 8960, 28, 12, 2, 151936, 32, 1280, 5120, 16),
                 "7b": Shape(3584, 18944, 28, 28, 4, 152064, 32, 1280, 5120, 16, tied=False)},
    "qwen2_5_vl": {"tiny": TINY, "small": SMALL,
                   "3b": Shape(2048, 11008, 36, 16, 2, 151936, 32, 1280, 3420, 16),
                   "7b": Shape(3584, 18944, 28, 28, 4, 152064, 32, 1280, 3420, 16, tied=False)},
    "qwen3_vl": {"tiny": TINY, "small": SMALL,
                 "2b": Shape(2048, 6144, 28, 16, 8, 151936, 24, 1024, 4096, 16, deepstack=(5, 11, 17)),
                 "4b": Shape(2560, 9728, 36, 32, 8, 151936, 24, 1024, 4096, 16, True, 128, (5, 11, 17)),
                 "8b": Shape(4096, 12288, 36, 32, 8, 151936, 27, 1152, 4304, 16, False, 128, (8, 16, 24))},
}


def word_level_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    """One token per word of `texts`, plus Qwen2-VL's special tokens and the prompts' tags. The small
    vocabulary makes the demo learnable: a random model's one-word guesses are right often enough."""
    split = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    words = sorted({w for text in texts for w, _ in split.pre_tokenize_str(text.lower())})
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["[UNK]"] + words)}, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = split
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", additional_special_tokens=SPECIAL_TOKENS)
    tokenizer.add_tokens(["<think>", "</think>", "<observe>", "</observe>", "<answer>", "</answer>"])
    return tokenizer


def model_config(family: str, size: str, tokenizer):
    """The config of a random model of `family` and `size`; the real sizes keep their real vocabulary."""
    shape = SIZES[family][size]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = shape.head_dim or shape.hidden // shape.heads
    # M-RoPE splits each head's rotary frequencies over (time, height, width): 16, 24, 24 of 64 in Qwen2-VL
    # and Qwen2.5-VL; Qwen3-VL interleaves them, 24, 20, 20.
    rope = dict(rope_type="default", mrope_section=[head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16])
    if family == "qwen3_vl":
        sections = [head_dim // 2 - 2 * (5 * head_dim // 32), 5 * head_dim // 32, 5 * head_dim // 32]
        rope = dict(rope_type="default", mrope_section=sections, mrope_interleaved=True)
    rope["rope_theta"] = 1e4 if size == "tiny" else 5e6 if family == "qwen3_vl" else 1e6
    text = dict(hidden_size=shape.hidden, intermediate_size=shape.mlp, num_hidden_layers=shape.layers,
                num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, head_dim=head_dim,
                vocab_size=shape.vocab or len(tokenizer), rope_parameters=rope, bos_token_id=None,
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    # Each family's merger gives the language model's width; Qwen2-VL's tower names its sizes otherwise.
    vision = dict(depth=shape.depth, num_heads=shape.vision_heads, hidden_size=shape.width,
                  intermediate_size=shape.vision_mlp, out_hidden_size=shape.hidden)
    if family == "qwen2_vl":
        vision = dict(depth=shape.depth, num_heads=shape.vision_heads, embed_dim=shape.width,
                      mlp_ratio=shape.vision_mlp // shape.width, hidden_size=shape.hidden)
    if family == "qwen2_5_vl":
        vision["tokens_per_second"] = 2  # the released checkpoints' (the config class says 4)
    if family == "qwen3_vl":
        vision["deepstack_visual_indexes"] = list(shape.deepstack)
    return AutoConfig.for_model(family, text_config=text, vision_config=vision,
                                tie_word_embeddings=shape.tied, image_token_id=ids["<|image_pad|>"],
                                video_token_id=ids["<|video_pad|>"],
                                vision_start_token_id=ids["<|vision_start|>"],
                                vision_end_token_id=ids["<|vision_end|>"])


def build_random_model(path: str, texts: list[str], size: str = "tiny", seed: int = 0,
                       family: str = "qwen2_vl") -> None:
    """A word-level tokenizer over `texts` and a random model of `family` and `size`, saved as a hub
    checkpoint is. The full sizes are built on the GPU when there is one, and saved in bf16."""
    tokenizer = word_level_tokenizer(texts)
    tokenizer.save_pretrained(path)
    config = model_config(family, size, tokenizer)
    large = config.text_config.hidden_size >= 1024
    torch.manual_seed(seed)
    with torch.device("cuda" if large and torch.cuda.is_available() else "cpu"):
        model = AutoModelForImageTextToText.from_config(config)
    model.to(torch.bfloat16 if large else torch.float32).save_pretrained(path)


def synthetic_setup(out: str, family: str, size: str, num_questions: int, seed: int = 0, **video) -> list:
    """Synthetic rows and videos under `out`, and a random model of `family` and `size` over their words in
    out/model. The prompts' instructions stay out of the vocabulary: fewer words, more right guesses to learn
    from. Qwen3-VL's prompt names the time of each pair of frames ("<0.5 seconds>")."""
    rows = read_rows(write_synthetic_dataset(out, num_questions, seed, **video))
    texts = [r["question"] + " " + r["ground_truth"] for r in rows] + ["system you are a helpful assistant"]
    texts += ["<seconds> 0 1 2 3 4 5 6 7 8 9 ."] if family == "qwen3_vl" else []
    build_random_model(os.path.join(out, "model"), texts, size, family=family)
    return rows


# ---------------------------------------------------------------------------- the demo
def demo_flags(out: str, family: str) -> list[str]:
    """The demo's settings; flags given after --demo override them. At --learning-rate 1e-3, 2 of seeds 0
    to 4 settled on one answer to every colour question before learning to see colour; at 5e-4, 1 of 10.
    Frames of four tokens: 56x56 pixels in Qwen2-VL and Qwen2.5-VL, 64x64 in Qwen3-VL."""
    pixels = (2 * FAMILIES[family].patch * FAMILIES[family].merge) ** 2
    return ["--model", f"{out}/model", "--data", f"{out}/train.jsonl", "--video-root", f"{out}/videos",
            "--eval-data", f"{out}/heldout.jsonl", "--eval-video-root", f"{out}/videos", "--num-frames", "4",
            "--eval-num-frames", "4", "--max-pixels", str(pixels), "--max-completion-length", "1",
            "--lora-rank", "0", "--learning-rate", "5e-4", "-G", "8", "--batch-size", "16",
            "--micro-batch-size", "128", "--max-steps", "400", "--save-every", "400",
            "--log-completions-every", "100", "--eval-batch-size", "50"]


def accuracy_per_type(policy, tokenizer, rows: list[dict], args, accelerator) -> dict[str, float]:
    """Mean accuracy reward of greedy answers to held-out `rows`, per question type."""
    predictions = evaluate(policy, tokenizer, rows, args, accelerator, protocol="training")[0]
    types = sorted({p["question_type"] for p in predictions})
    return {t: float(np.mean([p["score"] for p in predictions if p["question_type"] == t])) for t in types}


def run_demo(argv: list[str]) -> dict:
    """Write synthetic data and a tiny model, score held-out questions, train with GRPO, score again."""
    demo = parse_args(argv)
    out = demo.output_dir
    started = time.perf_counter()
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    transformers_logging.disable_progress_bar()  # the demo saves and loads its model several times

    def write_data():  # one writer (under accelerate launch); the other processes wait for the files
        free_output_dir(out, demo.overwrite, r"run|model|videos|(train|heldout)\.jsonl|demo\.json")
        synthetic_setup(out, demo.family, "tiny", 400)
        write_synthetic_dataset(out, 200, seed=1, name="heldout")
    collectively(accelerator, write_data, main_only=True)
    flags = demo_flags(out, demo.family) + [a for a in argv if a != "--demo"]
    args = parse_args(flags + ["--output-dir", f"{out}/run"])
    held_out = load_samples(args.eval_data, args.eval_video_root, args.prompt_mode)
    policy, tokenizer = load_model(args, accelerator.device)  # loaded back as a real checkpoint is
    before = accuracy_per_type(policy, tokenizer, held_out, args, accelerator)
    after = accuracy_per_type(train(args), tokenizer, held_out, args, accelerator)
    blind = no_video_baseline(held_out)
    result = {"before": before, "after": after, "no_video_best": blind,
              "seconds": time.perf_counter() - started, "mean_before": float(np.mean(list(before.values()))),
              "mean_after": float(np.mean(list(after.values())))}
    if accelerator.is_main_process:
        print(f"\nheld-out accuracy ({len(held_out)} questions), greedy answers\n"
              f"{'question type':24} {'before':>7} {'after':>7} {'best without video':>19}")
        for t in before:
            sees = "  <- sees the video" if after[t] > blind[t] else ""
            print(f"{t:24} {before[t]:7.2f} {after[t]:7.2f} {blind[t]:19.2f}{sees}")
        metrics = Path(args.output_dir, "metrics.jsonl").read_text().splitlines()
        tenth = max(1, len(metrics) // 10)
        rewards = [json.loads(line)["reward"] for line in metrics]
        means = " ".join(f"{np.mean(rewards[i:i + tenth]):.2f}" for i in range(0, len(rewards), tenth))
        print(f"{'mean':24} {result['mean_before']:7.2f} {result['mean_after']:7.2f}\n\ntraining reward, "
              f"means of {tenth} steps: {means}\n{result['seconds']:.0f} s in all")
        with open(os.path.join(out, "demo.json"), "w") as f:
            json.dump(result, f, indent=1)
    return result


# ---------------------------------------------------------------------------- the benchmark
VSI_100K_QUESTIONS = 117_000  # about; the paper's training set
# Dense bf16 peaks in TFLOP/s, from NVIDIA's datasheets (without sparsity), for model-FLOPs utilisation.
PEAK_BF16_TFLOPS = {"H100": 989, "H200": 989, "A100": 312}


def run_benchmark(argv: list[str]) -> dict:
    """--benchmark SIZE: the same steps, seed and videos on the default path, then the straightforward one."""
    args = parse_args(argv)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    steps = args.max_steps or 4
    out = args.output_dir
    transformers_logging.disable_progress_bar()

    def write_data():  # one writer; the other processes wait for the files
        free_output_dir(out, args.overwrite, r"benchmark\.jsonl?|straightforward|default|model|videos")
        questions = args.batch_size * accelerator.num_processes * steps
        synthetic_setup(out, args.family, args.benchmark, questions, args.seed, num_frames=args.num_frames,
                        name="benchmark", scale=4)
    collectively(accelerator, write_data, main_only=True)
    results = {"straightforward": {}, "default": {}}
    # The default path first: on a CPU, peak memory is the process's peak so far, so each path's is its own.
    for path in ("default", "straightforward"):
        run = parse_args(["--model", f"{out}/model", "--data", f"{out}/benchmark.jsonl", "--video-root",
                          f"{out}/videos", "--save-every", "0", "--log-completions-every", "0", *argv,
                          "--max-steps", str(steps), "--output-dir", os.path.join(out, path)])
        run.straightforward = path == "straightforward"
        DECODED.clear()  # each path decodes its videos, as a run of its own does: not the other path's cache
        try:
            results[path] = path_figures(run, train(run), accelerator.num_processes)
        except torch.OutOfMemoryError as e:  # reported as such; the other path is still measured
            results[path] = {"out_of_memory": str(e).splitlines()[0]}
            torch.cuda.empty_cache()
    if accelerator.is_main_process:
        print_benchmark(results, args, accelerator.num_processes, steps)
        with open(os.path.join(out, "benchmark.json"), "w") as f:
            json.dump({"settings": vars(args), "results": results}, f, indent=1)
    return results


def path_figures(run, policy, processes: int) -> dict:
    """A path's means over steps 2 onwards (step 1 warms up), what they make of a VSI-100k epoch, and the
    model-FLOPs utilisation of the pi_theta passes: 6 FLOPs per language-model parameter and token."""
    measured = [json.loads(line) for line in open(os.path.join(run.output_dir, "metrics.jsonl"))][1:]
    kept = ("generated_tokens_per_s", "policy_tokens_per_s", "video_encodings")
    mean = {k: float(np.mean([m.get(k, 0.0) for m in measured])) for k in measured[0]
            if k.startswith("seconds_") or k in kept}
    step_seconds = sum(v for k, v in mean.items() if k.startswith("seconds_"))
    questions_per_s = run.batch_size * processes / step_seconds
    figures = {"step_seconds": step_seconds, **mean, "questions_per_s": questions_per_s,
               "epoch_device_hours": VSI_100K_QUESTIONS / questions_per_s * processes / 3600,
               "peak_memory_gb": max(m["peak_memory_gb"] for m in measured)}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    peak = next((tflops for name, tflops in PEAK_BF16_TFLOPS.items() if name in device), None)
    if peak:
        language_model = policy.model.language_model.named_parameters()
        parameters = sum(p.numel() for name, p in language_model if "lora_" not in name)
        figures["policy_mfu"] = 6 * parameters * mean["policy_tokens_per_s"] / (peak * 1e12)
    return figures


def print_benchmark(results: dict, args, processes: int, steps: int) -> None:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"\nbenchmark: {args.benchmark}, {processes} x {device}, {args.batch_size} question(s) x "
          f"G={args.num_generations} per process, {args.num_frames} frames of at most {args.max_pixels} "
          f"pixels, {args.max_completion_length} new tokens, LoRA rank {args.lora_rank}; means of steps 2 "
          f"to {steps}\n\n| | straightforward | default |\n|---|---:|---:|")
    for key in dict.fromkeys(k for figures in results.values() for k in figures):
        label = f"- {key[8:]} (s)" if key.startswith("seconds_") else key.replace("_", " ")
        cells = [figures.get(key, "-") for figures in results.values()]
        print(f"| {label} | " + " | ".join(f"{c:.4g}" if isinstance(c, float) else c for c in cells) + " |")
    plain, default = (results[path].get("step_seconds") for path in ("straightforward", "default"))
    if plain and default:
        print(f"\nsteps per second, default / straightforward: {plain / default:.2f}x")
    if "policy_mfu" not in results["default"]:
        print("model-FLOPs utilisation: not computed (on a CPU, or a GPU whose bf16 peak is not listed)")


# ---------------------------------------------------------------------------- flags, and main
class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):  # no "(default: None)" (such flags say it in words) or switch's False
        if action.default is None or action.nargs == 0:
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """A flag mistake in one line, as a data error is, without the whole usage before it; exit 2."""
        if rank_zero():  # under accelerate launch each process parses the flags; one says why
            print(f"error: {message} (see --help)", file=sys.stderr)
        self.exit(2)


def build_parser() -> argparse.ArgumentParser:
    """Every flag with its default's source: "paper" is 2504.00883; "open recipes" are the open video-GRPO
    recipes for Qwen2-VL, for what the paper leaves out; "our choice" where neither says."""
    # allow_abbrev=False: a prefix of a flag (--learning for --learning-rate) is a mistake, not that flag.
    parser = Parser(description="GRPO for Qwen-VL models on video spatial questions (vsGRPO).",
                    formatter_class=HelpFormatter, allow_abbrev=False)
    a = parser.add_argument_group("the method").add_argument
    a("--model", default="Qwen/Qwen2-VL-2B-Instruct", help="hub name or path (paper: Qwen2-VL-2B/7B)")
    a("--data", nargs="+", help="training rows: JSON or JSONL files or globs (paper: VSI-100k)")
    a("--video-root", default=".", help="directory the rows' video paths are relative to")
    a("--prompt-mode", choices=list(PROMPTS), default="vanilla", help="paper's best model, vsGRPO-V: vanilla")
    a("--num-frames", type=int, default=16, help="frames per video (open recipes: 16)")
    a("--max-pixels", type=int, default=128 * 28 * 28, help="pixels per frame, at most (open recipes), in "
      "every family (Qwen3-VL's own processor budgets the whole clip)")
    a("--rewards", nargs="+", choices=sorted(REWARDS), help="default: accuracy, plus format outside vanilla")
    a("--reward-weights", nargs="+", type=float, help="one per reward (default: all 1)")
    a("--num-generations", "-G", type=int, default=14, help="completions per question G (paper: 14)")
    a("--temperature", type=float, default=1.0, help="sampling temperature (paper: 1.0)")
    a("--max-completion-length", type=int, default=512, help="new tokens per completion (open recipes: 512+)")
    a("--beta", type=float, default=1e-4, help="KL coefficient (paper: 1e-4; 0 skips the reference pass)")
    a("--clip-eps", type=float, default=0.2, help="ratio clip epsilon (PPO and GRPO's usual; paper silent)")
    a("--num-iterations", type=int, default=1, help="optimisation passes mu over each rollout batch (GRPO)")
    a("--loss-aggregation", choices=["sequence", "token"], default="sequence",
      help="sequence: Eq. 1's 1/G sum_i 1/|o_i| sum_t; token: every token of a step weighs the same")
    a("--learning-rate", type=float, default=1e-5, help="paper: 1e-5 for 2B, 5e-6 for 7B; constant")
    a("--max-grad-norm", type=float, default=1.0, help="gradient clipping (our choice)")
    a("--batch-size", type=int, default=16, help="questions per process per optimizer step (our choice, "
      "measured: on one H200 at the paper's 2B setting, 16 ran 12x more questions/s than 1, in 28 GB)")
    a("--micro-batch-size", type=int, default=14, help="completions per forward: G (14) is one question; "
      "a multiple of G packs several (faster, more memory), less than G splits one (long completions)")
    a("--max-steps", type=int, default=0, help="optimisation steps (0 = one pass over the data)")
    a("--lora-rank", type=int, default=64, help="0: full fine-tuning (paper: LoRA, rank unsaid)")
    a("--lora-alpha", type=float, default=128, help="LoRA scale is alpha / rank (our choice)")
    a("--gradient-checkpointing", action="store_true", help="trade compute for memory (open recipes use it)")
    a("--seed", type=int, default=0, help="seeds LoRA initialisation, data order and sampling")
    a = parser.add_argument_group("running, saving and evaluating").add_argument
    a("--straightforward", action="store_true", help="every pass takes each completion with its own copy "
      "of the prompt and video, and encodes that video again (slow; for the tests and the benchmark)")
    a("--output-dir", help="metrics.jsonl, args.json and checkpoints go here (default: runs/vsgrpo; the "
      "demo's runs/demo, the benchmark's runs/benchmark-SIZE)")
    a("--resume", action="store_true", help="continue the run in --output-dir from its newest checkpoint")
    a("--overwrite", action="store_true", help="delete the earlier run in --output-dir: metrics, checkpoints")
    a("--save-every", type=int, default=500, help="checkpoint every N steps and at the end (0: on a stop)")
    a("--keep", type=int, default=3, help="checkpoints kept, the newest (our choice)")
    a("--log-completions-every", type=int, default=10, help="print a question's G completions every N steps")
    a("--report-to", default="none", help="also log to accelerate's trackers, when installed: tensorboard...")
    a("--max-bad-video-fraction", type=float, default=0.5, help="stop when more of the distinct videos tried "
      f"fail to decode (after {MIN_VIDEOS_TRIED} tried; our choice)")
    a("--trust-remote-code", action="store_true", help="let the checkpoint run its own code (off: safe)")
    a("--eval-only", action="store_true", help="score --model on --eval-data (VSI-Bench) and exit")
    a("--eval-data", nargs="+", help="VSI-Bench rows: JSON or JSONL with the benchmark's field names")
    a("--eval-video-root", default=".", help="a row's video is {root}/{dataset}/{scene_name}.mp4")
    a("--eval-prompt", choices=list(PROMPTS), default="vanilla", help="vanilla: the benchmark's own protocol")
    a("--eval-num-frames", type=int, default=32, help="VSI-Bench gave open models 32 frames")
    a("--eval-batch-size", type=int, default=8, help="questions per generate call (our choice)")
    a("--eval-every", type=int, default=0, help="in training, score --eval-limit held-out questions every N")
    a("--eval-limit", type=int, default=0, help="questions scored by --eval-every (0 = all)")
    a("--demo", action="store_true", help="offline, on a CPU: synthetic videos, a tiny model, GRPO, scores")
    a("--benchmark", choices=sorted({size for sizes in SIZES.values() for size in sizes}),
      help="time --max-steps steps (default 4) of a random model of this size, both paths, synthetic videos")
    a("--family", choices=list(SIZES), default="qwen2_vl", help="the random model's of --demo, --benchmark")
    return parser


# The range of every numeric flag: (lowest, highest); a float 0.0 as the lowest means "positive".
RANGES = {
    "num_generations": (2, None), "num_frames": (1, None), "eval_num_frames": (1, None),
    "max_pixels": (28 * 28, None), "max_completion_length": (1, None), "temperature": (0.0, None),
    "beta": (0, None), "clip_eps": (0.0, 1), "num_iterations": (1, None), "learning_rate": (0.0, None),
    "max_grad_norm": (0.0, None), "batch_size": (1, None), "micro_batch_size": (1, None),
    "max_steps": (0, None), "lora_rank": (0, None), "lora_alpha": (0.0, None), "seed": (0, None),
    "max_bad_video_fraction": (0, 1), "log_completions_every": (0, None), "save_every": (0, None),
    "keep": (1, None), "eval_batch_size": (1, None), "eval_every": (0, None), "eval_limit": (0, None),
}


def flag_problems(args) -> list[str]:
    """What is wrong with the flags' values and how they combine, checked before anything loads."""
    problems = []
    for name, (low, high) in RANGES.items():
        flag = "--" + name.replace("_", "-")
        value = getattr(args, name)
        if low == 0.0 and isinstance(low, float) and not value > 0:  # "not >" catches nan too
            problems.append(f"{flag} must be positive, got {value}")
        elif not value >= low:
            patch = " (one 28x28 patch)" if name == "max_pixels" else ""
            problems.append(f"{flag} must be at least {low}{patch}, got {value}")
        elif high is not None and not value <= high:
            problems.append(f"{flag} must be at most {high}, got {value}")
    trackers = {t.value for t in get_available_trackers()} | {"none", "all"}
    existing = os.path.abspath(args.output_dir)
    while not os.path.exists(existing):  # the output directory's nearest existing ancestor decides
        existing = os.path.dirname(existing)
    return problems + [problem for bad, problem in [
        (len(args.reward_weights) != len(args.rewards),
         f"--reward-weights has {len(args.reward_weights)} values for {len(args.rewards)} rewards"),
        (not all(map(math.isfinite, args.reward_weights)), "--reward-weights must be finite numbers"),
        ("format" in args.rewards and args.prompt_mode == "vanilla",
         "the format reward needs --prompt-mode think or observe: the vanilla prompt asks for no tags"),
        (not args.data and not (args.eval_only or args.demo or args.benchmark),
         "--data is required (no data yet? try --demo)"),
        (args.benchmark and args.max_steps == 1, "--benchmark needs --max-steps of 2 or more: 1 warms up"),
        (args.benchmark and args.benchmark not in SIZES[args.family],
         f"--benchmark {args.benchmark}: {args.family} comes in {', '.join(SIZES[args.family])}"),
        ((args.eval_only or args.eval_every) and not args.eval_data,
         "--eval-only and --eval-every need --eval-data"),
        (args.report_to not in trackers,
         f"--report-to {args.report_to}: not installed (choices here: {sorted(trackers)})"),
        (not os.path.isdir(existing),
         f"--output-dir {args.output_dir}: {existing} is a file, not a directory"),
        (os.path.isdir(existing) and not os.access(existing, os.W_OK | os.X_OK),
         f"--output-dir {args.output_dir}: {existing} is not writable"),
    ] if bad]


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and check the flags; every mistake stops here, before a model is loaded."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.rewards = args.rewards or DEFAULT_REWARDS[args.prompt_mode]
    args.reward_weights = args.reward_weights or [1.0] * len(args.rewards)
    # The demo and the benchmark have directories of their own: neither refuses to run after the other.
    tool = "demo" if args.demo else f"benchmark-{args.benchmark}" if args.benchmark else "vsgrpo"
    args.output_dir = args.output_dir or f"runs/{tool}"
    for problem in flag_problems(args):
        parser.error(problem)
    try:
        for paths in (args.data, args.eval_data):
            expand_paths(paths or [])
    except DataError as e:
        parser.error(str(e))
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if not rank_zero():  # one bar while a model loads, not one per process
        transformers_logging.disable_progress_bar()
    try:
        if args.demo:
            result = run_demo(argv)
        elif args.benchmark:
            result = run_benchmark(argv)
        elif args.eval_only:
            result = run_evaluation(args)
        else:
            result = train(args)
    except DataError as e:  # every process stops alike; one says why
        sys.exit(f"error: {e}" if rank_zero() else 1)
    except RunStopped as e:
        if rank_zero():
            print(f"error: {e}", file=sys.stderr)
        sys.exit(e.code)
    except KeyboardInterrupt:  # Ctrl-C before the run's handlers are in place, or in the tools
        newest = [] if args.demo or args.benchmark or args.eval_only else checkpoints(args.output_dir)
        resume = f"; the newest complete checkpoint is {newest[-1]}: continue with --resume" if newest else ""
        sys.exit(f"interrupted{resume}" if rank_zero() else 1)
    if torch.distributed.is_initialized():  # once, after every pass that needed the processes
        torch.distributed.destroy_process_group()
    return result


if __name__ == "__main__":
    main()
