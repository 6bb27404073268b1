"""Zero- and few-shot classification by likelihood: each label is scored as the continuation of the prompt.

No text is generated and nothing is parsed: the model's log-probability of each label after the prompt
(summed over the label's tokens, or averaged with normalize="mean" when labels differ in length) goes
through a softmax over the labels, so the answer is always one of them, with probabilities summing to 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .prompts import Prompts, resolve_prompts
from .runner import TaskError, as_runner, continuation_logprobs

SENTIMENT = ("positive", "negative")
MAX_LABELS = 64


@dataclass
class Classification:
    """The most likely label, each label's probability, and the log-likelihoods they come from."""

    label: str
    probabilities: dict[str, float]
    logprobs: dict[str, float]  # log P(label | prompt), summed over the label's tokens
    text: str = ""

    def to_dict(self) -> dict:
        """Returns a JSON-ready dict."""
        return {"text": self.text, "label": self.label, "probabilities": self.probabilities, "logprobs": self.logprobs}


def check_labels(labels) -> tuple[str, ...]:
    """Returns the labels, stripped; raises TaskError for fewer than 2, empty or repeated ones."""
    if isinstance(labels, str):
        labels = labels.split(",")
    labels = tuple(str(x).strip() for x in labels)
    if len(labels) < 2:
        raise TaskError(f"classification needs at least 2 labels, got {list(labels)}; e.g. positive,negative")
    if len(labels) > MAX_LABELS:
        raise TaskError(f"{len(labels)} labels is more than the {MAX_LABELS} supported")
    if any(not x for x in labels):
        raise TaskError(f"a label is empty in {list(labels)}; separate labels with single commas")
    repeated = sorted({x for x in labels if labels.count(x) > 1})
    if repeated:
        raise TaskError(f"label(s) {repeated} appear more than once")
    return labels


def classification_prompt(p: Prompts, text: str, labels: tuple[str, ...],
                          examples: list[tuple[str, str]] | None = None) -> str:
    """Returns the prompt each label is scored after: header, examples, then the text."""
    joined = ", ".join(labels)
    out = p.render("classify_header", labels=joined)
    for ex_text, ex_label in examples or []:
        out += p.render("classify_example", labels=joined, text=ex_text.strip(), label=ex_label)
    return out + p.render("classify", labels=joined, text=text.strip())


def classify(lm, texts: str | list[str], labels=SENTIMENT, *, examples: list[tuple[str, str]] | None = None,
             normalize: str = "sum", prompts: Prompts | dict | None = None, batch_size: int = 16,
             progress: bool = False) -> Classification | list[Classification]:
    """Returns the Classification of a text (or a list, for a list of texts) among `labels`.

    labels: a list or a comma-separated string (default positive, negative). examples: (text, label)
    pairs for few-shot prompts. normalize: "sum" (the label's total log-likelihood) or "mean" (per token).
    A text longer than the window keeps its end (the prompt's last tokens).
    """
    runner = as_runner(lm)
    p = resolve_prompts(prompts)
    labels = check_labels(labels)
    if normalize not in ("sum", "mean"):
        raise TaskError(f"normalize={normalize!r} must be 'sum' or 'mean'")
    for ex_text, ex_label in examples or []:
        if ex_label not in labels:
            raise TaskError(f"example label {ex_label!r} is not one of the labels {list(labels)}")
    single = isinstance(texts, str)
    texts = [texts] if single else list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t.strip():
            raise TaskError("the text to classify is empty" + ("" if single else f" (item {i})"))
    tok = runner.tokenizer
    label_ids = [tok.encode(p.render("classify_label", label=x)) for x in labels]
    bar = None
    if progress and len(texts) > 1:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(texts), unit="text", desc="classify", dynamic_ncols=True)
    results = []
    try:
        for b in range(0, len(texts), max(1, batch_size)):
            batch = texts[b : b + batch_size]
            contexts = [tok.encode(classification_prompt(p, t, labels, examples)) for t in batch]
            pairs = [(ctx, ids) for ctx in contexts for ids in label_ids]
            scores = continuation_logprobs(runner, pairs)
            for j, t in enumerate(batch):
                lps = scores[j * len(labels) : (j + 1) * len(labels)]
                results.append(_result(t, labels, lps, [len(x) for x in label_ids], normalize))
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
    return results[0] if single else results


def _result(text: str, labels: tuple[str, ...], lps: list[float], lengths: list[int], normalize: str) -> Classification:
    scores = [lp / n for lp, n in zip(lps, lengths)] if normalize == "mean" else lps
    top = max(scores)
    exp = [math.exp(s - top) for s in scores]  # softmax, shifted so the largest term is 1
    total = sum(exp)
    probs = {x: e / total for x, e in zip(labels, exp)}
    return Classification(max(probs, key=probs.get), probs, dict(zip(labels, lps)), text)
