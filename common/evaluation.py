"""Held-out evaluation: mean next-token loss in nats per scored token (and perplexity), and for instruction data a
generation metric: greedy answers to held-out prompts scored against the reference answers by exact match and
ROUGE-L F1 (`rouge-score`), with a few sample answers."""

import json
import math

import torch
import torch.nn.functional as F

from feddem.common.chat_format import render, split_for_generation
from feddem.common.data import TokenBatch

LOGITS_BUDGET = 1 << 26  # float32 logits held at once in evaluation (256 MB): a large vocabulary gets fewer rows
SAMPLES = 3  # sample answers returned with the generation metric
SAMPLE_CHARS = 300  # each field of a sample is cut to this many characters


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, blocks: torch.Tensor | TokenBatch, pad_id: int | None,
                  device: torch.device, batch_size: int = 32) -> dict:
    """Mean loss over the scored tokens: of [n, seq_len] blocks every token but the pad ones (`pad_id`), of a
    `TokenBatch` the positions whose label is not -100 (chat data: the assistant tokens)."""
    if isinstance(blocks, TokenBatch):
        data = blocks
    else:
        data = TokenBatch.from_blocks(blocks)
        if pad_id is not None:
            data.labels[blocks == pad_id] = -100
    model.to(device).eval()
    vocab = model.get_output_embeddings().weight.shape[0] if model.get_output_embeddings() is not None else 1
    batch_size = max(1, min(batch_size, LOGITS_BUDGET // max(1, data.input_ids.shape[1] * vocab)))
    total, count = 0.0, 0
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    for start in range(0, len(data), batch_size):
        batch = data.rows(slice(start, start + batch_size))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = model(input_ids=batch.input_ids.to(device), attention_mask=batch.model_mask(device)).logits
        targets = batch.labels[:, 1:].to(device)
        losses = F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
            ignore_index=-100, reduction="sum",
        )
        total += losses.item()
        count += int((targets != -100).sum())
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count}


def _normalise(text: str) -> str:
    return " ".join(text.strip().lower().split())


@torch.no_grad()
def generation_metrics(model, tokenizer, conversations: list[list[dict]], device: torch.device, seq_len: int,
                       max_new_tokens: int = 32, prefix: str = "") -> dict:
    """Greedy answers to the prompts of `conversations` (each up to its last assistant turn), scored against that
    turn: `gen_exact_match` (share of answers equal to the reference after trimming, case and whitespace folding)
    and `gen_rouge_l` (mean ROUGE-L F1), and `samples`, a JSON list of the first few {prompt, reference, answer}.
    Key names get `prefix` (e.g. 'base_')."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    model.to(device).eval()
    eos = [t for t in {tokenizer.eos_token_id, *(_ids(model.generation_config.eos_token_id))} if t is not None]
    exact, rouge, samples = 0, 0.0, []
    for messages in conversations:
        prompt, reference = split_for_generation(messages)
        text = render(tokenizer, prompt, generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][:, -seq_len:].to(device)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=eos, pad_token_id=eos[0] if eos else None)
        answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        exact += _normalise(answer) == _normalise(reference)
        rouge += scorer.score(reference, answer)["rougeL"].fmeasure
        if len(samples) < SAMPLES:
            samples.append({"prompt": prompt[-1]["content"][:SAMPLE_CHARS], "reference": reference[:SAMPLE_CHARS],
                            "answer": answer[:SAMPLE_CHARS]})
    n = max(len(conversations), 1)
    return {f"{prefix}gen_exact_match": exact / n, f"{prefix}gen_rouge_l": rouge / n,
            f"{prefix}samples": json.dumps(samples, ensure_ascii=False), f"{prefix}gen_examples": len(conversations)}


def _ids(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]
