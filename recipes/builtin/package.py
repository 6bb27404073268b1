"""Copies a finished `neoj train` run into src/neoj/builtin and writes its MODEL_CARD.md.

Usage: python recipes/builtin/package.py RUN_DIR PACKAGE_DIR --data FILE --steps N --autocast MODE
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
from pathlib import Path

import torch

FILES = ("config.json", "model.safetensors", "vocab.json", "merges.txt")
PROMPTS = ["The list type", "To open a file for reading,", "def fibonacci(n):"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run")
    p.add_argument("package")
    p.add_argument("--data", required=True)
    p.add_argument("--steps", required=True)
    p.add_argument("--autocast", default="bf16")
    args = p.parse_args()
    run, pkg = Path(args.run), Path(args.package)
    pkg.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        shutil.copyfile(run / name, pkg / name)
    results = json.loads((run / "train_results.json").read_text())
    state = torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)
    targs = state["args"]
    log = [json.loads(x) for x in (run / "train_log.jsonl").read_text().splitlines()]
    evals = [r for r in log if "val_loss" in r]

    import neoj

    lm = neoj.load(pkg, dtype="float32", device="cpu")
    params = lm.model.num_parameters()
    samples = []
    for prompt in PROMPTS:
        text = lm.generate(prompt, max_new_tokens=60, temperature=0.7, top_p=0.95, repetition_penalty=1.2, seed=0)
        samples.append((prompt, text))

    data_blocks = state.get("samples", 0)
    size_mb = (pkg / "model.safetensors").stat().st_size / 1e6
    lines = [
        "# neoj built-in model: a small GPT-Neo trained on the Python documentation",
        "",
        "The default model of `neoj` (`neoj generate \"The list type\"` with no `--model`). It exists so that",
        "neoj works out of the box, offline, on any machine; it is far too small to be useful beyond that.",
        "It writes documentation-flavoured English and reStructuredText, not reliable facts.",
        "",
        "## Architecture",
        "",
        f"GPT-Neo (`GPTNeoForCausalLM` loads it unchanged): {lm.config.n_layers} layers alternating global and",
        f"local attention (window {lm.config.window_size}), hidden size {lm.config.hidden_size}, "
        f"{lm.config.n_heads} heads, context {lm.config.n_positions} tokens,",
        f"GPT-2 tokenizer (50257 tokens, embeddings tied to the LM head). {params:,} parameters;",
        f"weights stored in float16 ({size_mb:.1f} MB).",
        "",
        "## Training",
        "",
        "- Data: `pydocs-train.jsonl`, the reStructuredText sources of the Python 3.11 documentation (Debian package",
        "  python3.11-doc, PSF licence), 476 documents. 5% of the documents (chosen with seed 0) are held out for",
        "  validation and never trained on.",
        f"- Steps: {results['step']} optimizer steps of {targs['global_batch']} blocks x {targs['seq_len']} tokens "
        f"= {results['tokens']:,} training tokens",
        f"  ({data_blocks:,} blocks drawn from a seeded per-epoch shuffle).",
        f"- Optimizer: AdamW, peak LR {targs['lr']:g}, {targs['warmup_steps']} warmup steps, cosine decay to "
        f"{targs['min_lr_ratio']:g}x, weight decay {targs['weight_decay']:g}, betas {tuple(targs['adam_betas'])}, "
        f"gradient clipping {targs['clip']:g}; autocast {args.autocast} (fp32 master weights).",
        f"- Wall time: {results['wall_seconds'] / 60:.1f} minutes on {platform.machine()} CPU "
        f"({torch.get_num_threads()} threads, a shared 2-core machine, at nice 19).",
        f"- Final training loss: {results['train_loss']:.3f}.",
        f"- **Validation loss {results['val_loss']:.3f}, perplexity {results['val_perplexity']:.1f}** over all "
        "held-out documents (GPT-2 tokens).",
        "",
        "Validation during training:",
        "",
        "| step | validation loss | perplexity |",
        "| ---: | ---: | ---: |",
    ]
    lines += [f"| {r['step']} | {r['val_loss']:.3f} | {r['val_perplexity']:.1f} |" for r in evals]
    lines += [
        f"| {results['step']} (all held-out blocks) | {results['val_loss']:.3f} | {results['val_perplexity']:.1f} |",
        "",
        "## Reproduce",
        "",
        "From the repository root, with the shared data beside it (`../shared/data/pydocs-train.jsonl`):",
        "",
        "```",
        "bash recipes/builtin/train.sh",
        "```",
        "",
        "which runs exactly:",
        "",
        "```",
        f"neoj train --config recipes/builtin/config.json --data {args.data} --out build/builtin-run \\",
        f"    --seed 0 --val-fraction 0.05 --seq-len 512 --batch-size 8 --max-steps {args.steps} \\",
        "    --lr 1.5e-3 --warmup-steps 30 --min-lr-ratio 0.1 --weight-decay 0.1 --adam-beta2 0.95 --clip 1.0 \\",
        f"    --autocast {args.autocast} --save-every 25 --eval-every 100 --eval-blocks 32 --save-dtype float16 \\",
        "    --threads 2 --resume",
        "python recipes/builtin/package.py build/builtin-run src/neoj/builtin ...",
        "```",
        "",
        "It resumes from its last checkpoint if interrupted. Timing varies with the machine; the result is",
        "deterministic for a given machine and thread count.",
        "",
        "## Samples",
        "",
        "`temperature=0.7, top_p=0.95, repetition_penalty=1.2, seed=0`, 60 new tokens (without a repetition",
        "penalty this small model soon falls into runs of blank lines and spaces, which fill its training text):",
        "",
    ]
    for prompt, text in samples:
        lines += ["```", prompt + text, "```", ""]
    lines += ["## Licence", "", "Weights: trained by neoj on PSF-licensed documentation. Tokenizer files: GPT-2's "
              "(MIT, see neoj/assets/gpt2).", ""]
    (pkg / "MODEL_CARD.md").write_text("\n".join(lines))
    print((pkg / "MODEL_CARD.md").read_text())


if __name__ == "__main__":
    main()
