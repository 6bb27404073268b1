"""The task subcommands of `neoj`: summarize, ask, translate, classify, complete-code, chat, batch.

neoj.cli.build_parser calls add_task_commands(subparsers). Each command is a thin shell over the
function of the same name in neoj.tasks; results go to stdout, progress bars and notes to stderr.
`neoj batch` lives in neoj.tasks.batch_cli; what the commands share, in neoj.tasks.cli_common.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

from ..checks import check_utf8_text, not_utf8_error, read_stdin, read_stdin_line
from ..cli_options import add_task_args, task_sampling_options
from ..errors import NeojError
from .batch_cli import add_batch_command
from .cli_common import FORMATTER, TASK_EPILOG, load_model, show_progress


def _read(source: str, what: str) -> str:
    """Returns the UTF-8 text of a file, or of standard input for "-"; raises NeojError naming what is wrong."""
    if source == "-":
        return read_stdin()
    try:
        raw = Path(source).read_bytes()
        try:
            return raw.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
        except UnicodeDecodeError as exc:
            raise not_utf8_error(f"{what} {source!r}", raw[exc.start], exc.start) from None
    except FileNotFoundError:
        raise NeojError(f"{what} {source!r} does not exist") from None
    except IsADirectoryError:
        raise NeojError(f"{what} {source!r} is a directory, not a file") from None
    except OSError as exc:
        raise NeojError(f"cannot read {what} {source!r}: {exc.strerror or exc}") from None


def _prompts(args):
    from .prompts import Prompts

    return Prompts.load(args.prompts) if args.prompts else None


def cmd_summarize(args) -> int:
    from .summarize import summarize

    text, prompts = _read(args.input, "input"), _prompts(args)
    result = summarize(load_model(args), text, length=args.length, max_new_tokens=args.max_new_tokens,
                       overlap=args.overlap, prompts=prompts, batch_size=args.batch_size, progress=show_progress(args),
                       **task_sampling_options(args))
    if args.json:
        print(json.dumps({"summary": result.text, "chunks": result.chunks, "rounds": result.rounds},
                         indent=2, ensure_ascii=False))
    else:
        print(result.text)
    return 0


def cmd_ask(args) -> int:
    from .ask import ask

    context = _read(args.context, "context file") if args.context else None
    answer = ask(load_model(args), args.question, context, max_new_tokens=args.max_new_tokens, rank=args.rank,
                 passage_tokens=args.passage_tokens, prompts=_prompts(args), progress=show_progress(args),
                 **task_sampling_options(args))
    if args.json:
        print(json.dumps({"answer": answer.text, "passages_total": answer.passages_total,
                          "passages": [vars(passage) for passage in answer.passages]}, indent=2, ensure_ascii=False))
        return 0
    print(answer.text)
    if args.show_passages:
        for passage in answer.passages:
            score = f", score {passage.score:.3f}" if passage.score is not None else ""
            print(f"--- passage: tokens {passage.start}-{passage.end}{score} ---\n{passage.text}", file=sys.stderr)
    return 0


def cmd_translate(args) -> int:
    from .translate import translate

    text = read_stdin() if args.text == "-" else args.text
    print(translate(load_model(args), text, to=args.to, source=args.source, shots=args.shots,
                    max_new_tokens=args.max_new_tokens, prompts=_prompts(args), progress=show_progress(args),
                    **task_sampling_options(args)))
    return 0


def _read_texts(source: str) -> list[str]:
    """Returns the texts of a file: one per line, or the "text" field of each JSONL line."""
    lines = [ln for ln in _read(source, "file").splitlines() if ln.strip()]
    if not source.endswith(".jsonl"):
        return lines
    texts = []
    for n, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
        except ValueError as exc:
            raise NeojError(f"{source}: record {n} is not JSON: {exc}") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
            raise NeojError(f"{source}: record {n} has no \"text\" string")
        texts.append(rec["text"])
    return texts


def _read_examples(source: str) -> list[tuple[str, str]]:
    """Returns (text, label) pairs from a JSONL file of {"text", "label"} objects."""
    out = []
    for n, line in enumerate((ln for ln in _read(source, "examples file").splitlines() if ln.strip()), 1):
        try:
            rec = json.loads(line)
            out.append((rec["text"], rec["label"]))
        except (ValueError, KeyError, TypeError):
            raise NeojError(f"{source}: example {n} must be a JSON object with \"text\" and \"label\"") from None
    return out


def cmd_classify(args) -> int:
    from .classify import classify

    if (args.text is None) == (args.file is None):
        raise NeojError("give a TEXT to classify, or --file FILE (one text per line, or .jsonl with \"text\")")
    texts = _read_texts(args.file) if args.file else [read_stdin() if args.text == "-" else args.text]
    if not texts:
        raise NeojError(f"{args.file} holds no text to classify")
    examples = _read_examples(args.examples) if args.examples else None
    results = classify(load_model(args), texts, args.labels, examples=examples, normalize=args.normalize,
                       prompts=_prompts(args), batch_size=args.batch_size, progress=show_progress(args))
    if args.json or args.file:
        for r in results:
            print(json.dumps(r.to_dict(), ensure_ascii=False))
        return 0
    r = results[0]
    print(r.label)
    for label, prob in sorted(r.probabilities.items(), key=lambda kv: -kv[1]):
        print(f"  {label}: {prob:.4f} (log-likelihood {r.logprobs[label]:.3f})", file=sys.stderr)
    return 0


def cmd_complete_code(args) -> int:
    from .code import stream_code

    code = _read(args.input, "input")
    out = sys.stdout
    if args.echo:
        out.write(code)
    for piece in stream_code(load_model(args), code, scope=args.scope, language=args.language,
                             filename=None if args.input == "-" else args.input, max_new_tokens=args.max_new_tokens,
                             prompts=_prompts(args), **task_sampling_options(args)):
        out.write(piece)
        out.flush()
    out.write("\n")
    return 0


CHAT_HELP = "commands: /reset (forget the conversation), /save FILE (write it as JSON), /exit (or Ctrl-D)"


def _read_chat_line(interactive: bool) -> str | None:
    """Returns the user's next message ("" when there is none to answer), or None at the end of input."""
    if not interactive:
        return read_stdin_line() or None
    try:
        return check_utf8_text(input("you> "), "your message")
    except EOFError:
        return None
    except (NeojError, UnicodeDecodeError) as exc:  # a terminal not set to UTF-8: say so, keep chatting
        if isinstance(exc, UnicodeDecodeError):
            exc = not_utf8_error("your message", exc.object[exc.start], exc.start)
        print(f"neoj: error: {exc}", file=sys.stderr)
        return ""


def _run_chat_command(session, command: str, rest: str) -> bool:
    """Runs /reset, /save FILE or /help (any other /word shows the help); returns False for a message."""
    if command == "/reset":
        session.reset()
        print("(conversation reset)", file=sys.stderr)
    elif command == "/save" and not rest.strip():
        print("neoj: /save needs a file name: /save chat.json", file=sys.stderr)
    elif command == "/save":
        try:
            print(f"(saved to {session.save(rest.strip())})", file=sys.stderr)
        except NeojError as exc:
            print(f"neoj: error: {exc}", file=sys.stderr)
    elif command == "/help" or (command.startswith("/") and command[1:].isalpha()):
        print(CHAT_HELP, file=sys.stderr)
    else:
        return False
    return True


def _stream_reply(session, message: str, interactive: bool) -> None:
    """Streams the reply to `message` to stdout; an error or (interactive) Ctrl-C ends the reply, not the chat."""
    out = sys.stdout
    if interactive:
        out.write("assistant> ")
    try:
        for piece in session.stream(message):
            out.write(piece)
            out.flush()
    except NeojError as exc:  # a message too long for the context: say so, keep chatting
        print(f"\nneoj: error: {exc}", file=sys.stderr)
    except KeyboardInterrupt:  # stops this reply (not kept in the history), not the chat
        if not interactive:
            raise
        print("\n(reply interrupted)", file=sys.stderr)
    out.write("\n")
    out.flush()
    if session.last is not None and session.last.dropped:
        print(f"(the {session.last.dropped} oldest messages no longer fit the context)", file=sys.stderr)


def cmd_chat(args) -> int:
    from .chat import ChatSession

    session = ChatSession(load_model(args), system=args.system, max_new_tokens=args.max_new_tokens,
                          prompts=_prompts(args), **task_sampling_options(args))
    if args.load:
        session.load(args.load)
    interactive = sys.stdin.isatty()
    if interactive:
        try:  # line editing and history for input(), where the platform has readline
            importlib.import_module("readline")
        except ImportError:
            pass
        print(f"neoj chat: {CHAT_HELP}; Ctrl-C stops a reply", file=sys.stderr)
    while True:
        line = _read_chat_line(interactive)
        if line is None:
            break
        line = line.strip()
        if not line:
            continue
        command, _, rest = line.partition(" ")
        if command in ("/exit", "/quit"):
            break
        if not _run_chat_command(session, command, rest):
            _stream_reply(session, line, interactive)
    return 0


def _add_summarize_command(sub) -> None:
    parser = sub.add_parser("summarize", help="summarize a document of any length (map-reduce over chunks)",
                            description="Summarize FILE (or standard input with -). A document longer than the context "
                            "is cut into chunks on a token budget, at paragraph or sentence boundaries, with overlap; "
                            "each chunk is summarized, then the summaries, until one prompt holds them all.",
                            epilog=TASK_EPILOG, formatter_class=FORMATTER)
    parser.add_argument("input", metavar="FILE", help="the document, or - for standard input")
    parser.add_argument("--length", choices=["short", "medium", "long"], default="medium",
                        help="summary length: 64, 128 or 256 tokens, at most a quarter of the context (default medium)")
    parser.add_argument("--overlap", type=int, default=None,
                        help="tokens consecutive chunks share (default 64 or less)")
    parser.add_argument("--batch-size", type=int, default=4, help="chunks summarized together (default 4)")
    parser.add_argument("--json", action="store_true", help="print the summary and every round's summaries as JSON")
    add_task_args(parser, "per summary: set by --length")
    parser.set_defaults(func=cmd_summarize)


def _add_ask_command(sub) -> None:
    parser = sub.add_parser("ask", help="answer a question, from the model alone or from a document",
                            description="Answer QUESTION. With --context FILE, the document's passages most relevant "
                            "to the question (ranked by the model's likelihood of the question after each, or by "
                            "embedding similarity) are placed in the context window, in document order.",
                            epilog=TASK_EPILOG, formatter_class=FORMATTER)
    parser.add_argument("question", metavar="QUESTION")
    parser.add_argument("--context", "-c", default=None, metavar="FILE", help="a document to answer from (- for stdin)")
    parser.add_argument("--rank", choices=["likelihood", "embedding"], default="likelihood",
                        help="how passages of a long document are ranked (default likelihood)")
    parser.add_argument("--passage-tokens", type=int, default=None, help="passage size in tokens (default up to 256)")
    parser.add_argument("--show-passages", action="store_true", help="print the passages used, to stderr")
    parser.add_argument("--json", action="store_true", help="print the answer and passages as JSON")
    add_task_args(parser, 64)
    parser.set_defaults(func=cmd_ask)


def _add_translate_command(sub) -> None:
    parser = sub.add_parser("translate", help="translate text by few-shot prompting",
                            description="Translate TEXT (or standard input with -) into --to LANG, one line at a "
                            "time, after a few example sentence pairs (English, French, German, Spanish, Italian, "
                            "Portuguese, Dutch, Chinese, Japanese have built-in examples; other languages go "
                            "zero-shot).",
                            epilog=TASK_EPILOG, formatter_class=FORMATTER)
    parser.add_argument("text", metavar="TEXT", help="the text, or - for standard input")
    parser.add_argument("--to", required=True, metavar="LANG", help="target language: a name (French) or a code (fr)")
    parser.add_argument("--from", dest="source", default="English", metavar="LANG", help="source language (English)")
    parser.add_argument("--shots", type=int, default=3, help="example pairs in the prompt (default 3; 0 = zero-shot)")
    add_task_args(parser, "per line: twice the line's tokens plus 16")
    parser.set_defaults(func=cmd_translate)


def _add_classify_command(sub) -> None:
    parser = sub.add_parser("classify", help="classify text by comparing the likelihood of each label",
                            description="Classify TEXT (or each line of --file) into one of --labels by the model's "
                            "log-likelihood of each label after the prompt, turned into probabilities; nothing is "
                            "generated. Prints the label (probabilities to stderr), or one JSON line per text.",
                            epilog=TASK_EPILOG, formatter_class=FORMATTER)
    parser.add_argument("text", metavar="TEXT", nargs="?", default=None, help="the text, or - for standard input")
    parser.add_argument("--labels", "-l", default="positive,negative",
                        help="comma-separated labels (default positive,negative: sentiment)")
    parser.add_argument("--file", "-f", default=None, help="classify each line (or each .jsonl \"text\") of FILE")
    parser.add_argument("--examples", default=None, metavar="FILE",
                        help="few-shot examples: JSONL with \"text\" and \"label\" per line")
    parser.add_argument("--normalize", choices=["sum", "mean"], default="sum",
                        help="score a label by its total log-likelihood (sum, default) or per token (mean)")
    parser.add_argument("--batch-size", type=int, default=16, help="texts scored together (default 16)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    add_task_args(parser, None, generation=False)  # nothing is generated: labels are scored
    parser.set_defaults(func=cmd_classify)


def _add_complete_code_command(sub) -> None:
    parser = sub.add_parser("complete-code", help="complete code up to the end of the current function or block",
                            description="Complete the code in FILE (or standard input with -) from its end, and stop "
                            "where the current function (or, with --scope block, block) ends: Python by indentation, "
                            "C-like languages by braces (detected from the file name or the code).",
                            epilog=TASK_EPILOG, formatter_class=FORMATTER)
    parser.add_argument("input", metavar="FILE", help="the code, or - for standard input")
    parser.add_argument("--scope", choices=["function", "block"], default="function",
                        help="stop at the end of the enclosing function (default) or the innermost block")
    parser.add_argument("--language", choices=["python", "braces"], default=None,
                        help="how blocks are delimited (default: from the file name, else guessed)")
    parser.add_argument("--echo", action="store_true", help="print the code before its completion")
    add_task_args(parser, "256, at most half the context", progress=False)
    parser.set_defaults(func=cmd_complete_code)


def _add_chat_command(sub) -> None:
    parser = sub.add_parser("chat", help="chat in the terminal, replies streamed",
                            description="Chat with the model: type a message, get a streamed reply. The prompt holds "
                            "a persona (--system) and as much of the conversation as fits the context, oldest messages "
                            "dropped first. " + CHAT_HELP + ". Reads standard input, so it can be scripted.",
                            epilog=TASK_EPILOG, formatter_class=FORMATTER)
    parser.add_argument("--system", default=None, help="persona / system text (default: a helpful assistant)")
    parser.add_argument("--load", default=None, metavar="FILE", help="continue a conversation saved with /save")
    add_task_args(parser, "per reply: 256, at most half the context", temperature=0.7, progress=False)
    parser.set_defaults(func=cmd_chat)


def add_task_commands(sub) -> None:
    """Registers summarize, ask, translate, classify, complete-code, chat and batch on the subcommand parser."""
    for add_command in (_add_summarize_command, _add_ask_command, _add_translate_command, _add_classify_command,
                        _add_complete_code_command, _add_chat_command, add_batch_command):
        add_command(sub)
