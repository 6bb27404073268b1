"""Translation by few-shot prompting: a few sentences in both languages, then the text, one line at a time.

Base models translate a line following parallel examples far better than a paragraph; lines are
translated together in batches, blank lines are kept, and a line too long for the window is cut at
sentence boundaries first.
"""

from __future__ import annotations

from .chunking import JUNCTION_MARGIN, split_text
from .prompts import Prompts, resolve_prompts
from .runner import TaskError, as_runner, check_fits, task_params

# Codes accepted for language names (anything else is used as written: "Swedish", "Klingon").
LANGUAGE_CODES = {"en": "English", "fr": "French", "de": "German", "es": "Spanish", "it": "Italian",
                  "pt": "Portuguese", "nl": "Dutch", "zh": "Chinese", "ja": "Japanese", "ru": "Russian",
                  "pl": "Polish", "sv": "Swedish", "ko": "Korean", "ar": "Arabic", "tr": "Turkish"}


def language_name(lang: str) -> str:
    """Returns the language's name for the prompt: a known code expanded, a name capitalized."""
    if not isinstance(lang, str) or not lang.strip():
        raise TaskError("the language is empty; give a name such as French or a code such as fr")
    lang = lang.strip()
    return LANGUAGE_CODES.get(lang.lower(), lang[:1].upper() + lang[1:])


def few_shot_header(p: Prompts, source: str, target: str, shots: int) -> str:
    """Returns the prompt's header and up to `shots` example pairs (none when a language has no examples)."""
    examples = {k.lower(): v for k, v in p.translation_examples.items()}
    src, tgt = examples.get(source.lower()), examples.get(target.lower())
    out = p.render("translate_header", source=source, target=target)
    if src and tgt:
        for s, t in list(zip(src, tgt))[:shots]:
            out += p.render("translate_example", source=source, target=target, source_text=s, target_text=t)
    return out


def translate(lm, text: str, to: str, source: str = "English", *, shots: int = 3, max_new_tokens: int | None = None,
              prompts: Prompts | dict | None = None, batch_size: int = 8, progress: bool = False, **options) -> str:
    """Returns `text` translated from `source` into `to` (names or codes), line by line, by few-shot prompting.

    shots: example pairs in the prompt (0 for zero-shot). max_new_tokens: per line (default twice the
    line's tokens plus 16). Options go to generation (greedy by default).
    """
    runner = as_runner(lm)
    p = resolve_prompts(prompts)
    if not isinstance(text, str) or not text.strip():
        raise TaskError("there is no text to translate: the input is empty")
    if not 0 <= shots <= 16:
        raise TaskError(f"shots={shots} must be between 0 and 16")
    source, target = language_name(source), language_name(to)
    tok, n_pos = runner.tokenizer, runner.n_positions
    header = few_shot_header(p, source, target, shots)
    lines = text.splitlines()
    overhead = len(tok.encode(header + p.render("translate", source=source, target=target, text=""))) + JUNCTION_MARGIN
    room = (n_pos - overhead) // 3  # a piece, and room for a translation twice as long
    if room < 8:
        raise TaskError(f"the few-shot prompt leaves no room in this model's {n_pos}-token context; use fewer shots")
    pieces: list[tuple[int, str]] = []  # (line number, a piece of that line to translate)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        for chunk in split_text(line.strip(), tok, room):
            pieces.append((i, chunk.text.strip()))
    out: dict[int, list[str]] = {}
    bar = None
    if progress and len(pieces) > 1:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(pieces), unit="line", desc="translate", dynamic_ncols=True)
    try:
        for b in range(0, len(pieces), max(1, batch_size)):
            batch = pieces[b : b + batch_size]
            ids = [tok.encode(header + p.render("translate", source=source, target=target, text=piece))
                   for _, piece in batch]
            longest = max(len(tok.encode(piece)) for _, piece in batch)
            max_new = max_new_tokens or min(2 * longest + 16, n_pos - max(len(x) for x in ids))
            for x in ids:
                check_fits(len(x), max_new, n_pos, "a translation prompt")
            for (line_no, _), c in zip(batch, runner.generate(ids, task_params(max_new, p.translate_stop, **options))):
                out.setdefault(line_no, []).append(c.text.strip())
            if bar is not None:
                bar.update(len(batch))
    finally:
        if bar is not None:
            bar.close()
    return "\n".join(" ".join(out[i]) if i in out else "" for i in range(len(lines)))
