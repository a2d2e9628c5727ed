"""Benchmark: fine-tuning throughput of feddem's loop (`common.training.train_causal_lm`) against Hugging Face
`Trainer`, on the same Llama-style model (built from a config, no download), the same batch, sequence length,
optimizer settings (AdamW, warm-up + cosine, clipping) and precision (bf16 autocast on CUDA, fp32 on CPU), in one
run. Each side starts from the same initial weights and is timed from the end of its first optimizer step to the
end of its last (the first step holds allocator warm-up and compilation).

Model FLOPs utilisation: 6 x parameters per token (tied embeddings: the matrix counts once, as the output
projection), plus the causal
attention matmuls (6 x layers x seq_len x hidden per token, half of the full 12 for the causal mask), divided by the
device's peak dense bf16 FLOP/s (known GPUs, or `--peak-tflops`). On a CPU there is no meaningful peak: MFU is
printed only when `--peak-tflops` is given.

    python bench/train.py                          # ~0.5B parameters, seq 1024, batch 8 (a GPU)
    python bench/train.py --preset small           # a small model for a CPU: seq 256, batch 4
    python bench/train.py --preset small --gradient-checkpointing --json out.json
"""

import argparse
import copy
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRESETS = {  # Llama-style, tied embeddings, head dim 64
    "0.5b": dict(model=dict(hidden_size=1280, intermediate_size=3456, num_hidden_layers=22, num_attention_heads=20,
                            num_key_value_heads=4, vocab_size=32000), seq_len=1024, batch_size=8, steps=30),
    "small": dict(model=dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=8000), seq_len=256, batch_size=4, steps=12),
}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}


def build(preset: dict):
    from transformers import LlamaConfig

    from feddem.common.modeling import build_model

    config = LlamaConfig(**preset["model"], tie_word_embeddings=True, max_position_embeddings=max(2048,
                                                                                                 preset["seq_len"]))
    return build_model(config, seed=0)


def flops_per_token(model, seq_len: int) -> float:
    cfg = model.config
    # every parameter is in one matmul per token: the tied embedding matrix counts once, as the output projection
    # (the input lookup costs no FLOPs), which is the parameter count with tied embeddings
    matmul_params = sum(p.numel() for p in model.parameters())
    attention = 6 * cfg.num_hidden_layers * seq_len * cfg.hidden_size
    return 6 * matmul_params + attention


def peak_flops(device, given: float) -> float | None:
    import torch

    if given:
        return given * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tflops in PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return None


def run_feddem(model, blocks, args, device) -> dict:
    from feddem.common.training import TrainSettings, train_causal_lm

    marks = []

    def on_step(step, loss):
        if device.type == "cuda":
            import torch

            torch.cuda.synchronize(device)
        marks.append(time.perf_counter())

    settings = TrainSettings(steps=args.steps, lr=1e-4, batch_size=args.batch_size, seed=0,
                             gradient_checkpointing=args.gradient_checkpointing,
                             compile_backend="inductor" if args.compile else "")
    stats = train_causal_lm(model, blocks, settings, device, on_step)
    return {"seconds": marks[-1] - marks[0], "steps": len(marks) - 1, "train_loss": stats["train_loss"]}


def run_trainer(model, blocks, args, device) -> dict:
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    marks = []

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            marks.append(time.perf_counter())

    cuda = device.type == "cuda"
    train_args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="feddem-trainer-"), per_device_train_batch_size=args.batch_size,
        max_steps=args.steps, learning_rate=1e-4, lr_scheduler_type="cosine", warmup_steps=0.1, weight_decay=0.0,
        max_grad_norm=1.0, bf16=cuda and torch.cuda.is_bf16_supported(), optim="adamw_torch_fused" if cuda else
        "adamw_torch", save_strategy="no", report_to=[], logging_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, use_cpu=not cuda, gradient_checkpointing=args.gradient_checkpointing,
        torch_compile=args.compile, seed=0)
    data = [{"input_ids": b, "labels": b} for b in blocks]
    trainer = Trainer(model=model, args=train_args, train_dataset=data, callbacks=[Clock()])
    result = trainer.train()
    return {"seconds": marks[-1] - marks[0], "steps": len(marks) - 1, "train_loss": result.training_loss}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(PRESETS), default="0.5b")
    parser.add_argument("--seq-len", type=int, default=0, help="default: the preset's")
    parser.add_argument("--batch-size", type=int, default=0, help="default: the preset's")
    parser.add_argument("--steps", type=int, default=0, help="default: the preset's")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile on both sides")
    parser.add_argument("--peak-tflops", type=float, default=0.0, help="the device's peak FLOP/s, for MFU")
    parser.add_argument("--json", default="", help="also write the figures to this file")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    args.seq_len = args.seq_len or preset["seq_len"]
    args.batch_size = args.batch_size or preset["batch_size"]
    args.steps = max(3, args.steps or preset["steps"])

    import torch

    from feddem.common.devices import resolve_device

    device = resolve_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    model = build(preset)
    params = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(3, model.config.vocab_size, (args.batch_size * args.steps, args.seq_len), generator=gen)
    tokens_per_step = args.batch_size * args.seq_len
    fpt = flops_per_token(model, args.seq_len)
    peak = peak_flops(device, args.peak_tflops)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"{params / 1e6:.1f}M parameters, seq {args.seq_len}, batch {args.batch_size}, {args.steps} steps, "
          f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'} on {name}", flush=True)
    rows = {}
    for label, run in (("feddem", run_feddem), ("trainer", run_trainer)):
        figures = run(copy.deepcopy(model).to(device), blocks, args, device)
        tps = figures["steps"] * tokens_per_step / figures["seconds"]
        rows[label] = figures | {"tokens_per_s": tps, "mfu": tps * fpt / peak if peak else None}
        if device.type == "cuda":
            torch.cuda.empty_cache()
        mfu = f"{rows[label]['mfu']:.1%}" if peak else "n/a (no peak FLOP/s for this device; --peak-tflops)"
        print(f"{label:8s} {tps:12.0f} tokens/s   MFU {mfu}   loss {figures['train_loss']:.4f}", flush=True)
    ratio = rows["feddem"]["tokens_per_s"] / rows["trainer"]["tokens_per_s"]
    print(f"feddem / Trainer tokens/s: {ratio:.3f}")
    report = {"device": name, "parameters": params, "seq_len": args.seq_len, "batch_size": args.batch_size,
              "steps": args.steps, "flops_per_token": fpt, "peak_flops": peak, "feddem": rows["feddem"],
              "trainer": rows["trainer"], "feddem_over_trainer": ratio,
              "gradient_checkpointing": args.gradient_checkpointing, "compile": args.compile}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
