"""Tensor names: transformers' checkpoint keys and neoj's parameter names, one table for both families.

GPT-Neo nests q/k/v under attn.attention and calls its MLP c_fc/c_proj; GPT-J uses attn.q_proj and
fc_in/fc_out. neoj's own names follow GPT-J's. Checkpoints are read and written under transformers'
names, so that transformers loads what neoj writes and the other way round.
"""

from __future__ import annotations

import re

_HF_TO_NEOJ = [
    (re.compile(r"^transformer\.h\.(\d+)\."), r"blocks.\1."),
    (re.compile(r"^transformer\."), ""),
    (re.compile(r"\.attn\.attention\."), ".attn."),
    (re.compile(r"\.mlp\.c_fc\."), ".mlp.fc_in."),
    (re.compile(r"\.mlp\.c_proj\."), ".mlp.fc_out."),
]
# Causal-mask buffers that old checkpoints saved alongside the weights; they carry no information.
UNUSED_BUFFERS = re.compile(r"^blocks\.\d+\.attn\.(bias|masked_bias)$")


def hf_to_neoj_name(name: str) -> str:
    """Returns neoj's parameter name for a transformers checkpoint key."""
    for pattern, repl in _HF_TO_NEOJ:
        name = pattern.sub(repl, name)
    return name


def neoj_to_hf_name(name: str, model_type: str) -> str:
    """Returns the transformers checkpoint key for a neoj parameter name."""
    if name.startswith("lm_head."):
        return name
    m = re.match(r"^blocks\.(\d+)\.(.*)$", name)
    if not m:
        return "transformer." + name
    rest = m.group(2)
    if model_type == "gpt_neo":
        rest = re.sub(r"^attn\.", "attn.attention.", rest)
        rest = rest.replace("mlp.fc_in.", "mlp.c_fc.").replace("mlp.fc_out.", "mlp.c_proj.")
    return f"transformer.h.{m.group(1)}.{rest}"
