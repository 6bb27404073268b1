"""Tasks done by prompting a base model right: summarize, ask, translate, classify, complete code, chat, batch.

Each task is one function over a LanguageModel (or a Runner: the server passes one that runs on its
engine), used alike by the `neoj` commands and the /v1/tasks/* routes of `neoj serve`:

    import neoj, neoj.tasks as tasks
    lm = neoj.load("EleutherAI/gpt-neo-1.3B")
    tasks.summarize(lm, open("report.txt").read(), length="short").text   # map-reduce over chunks
    tasks.ask(lm, "Who wrote it?", context=document).text                  # best passages in the window
    tasks.translate(lm, "Good morning", to="French")                       # few-shot, line by line
    tasks.classify(lm, "I loved it", labels=["positive", "negative"]).probabilities   # by likelihood
    tasks.complete_code(lm, "def add(a, b):\\n")                            # stops where the function ends
    chat = tasks.ChatSession(lm, system="You are a pirate."); chat.send("Hello")
    tasks.run_batch(lm, "prompts.jsonl", "out.jsonl")                       # resumable bulk generation

Every prompt lives in neoj.tasks.prompts (Prompts); pass prompts=Prompts(...), a dict of overrides or a
file path to any task. Generation is greedy unless options (temperature, top_p, seed, ...) say otherwise.
"""

from .ask import Answer, Passage, ask, rank_passages
from .batch import BatchResult, MergeResult, merge_batch, run_batch
from .chat import ChatReply, ChatSession, chat_reply, fit_history
from .chunking import Chunk, split_text
from .classify import SENTIMENT, Classification, classify
from .code import complete_code, stream_code
from .prompts import DEFAULT_PROMPTS, Prompts, resolve_prompts
from .runner import EngineRunner, LocalRunner, Runner, TaskError, continuation_logprobs
from .summarize import Summary, summarize
from .translate import translate

__all__ = [
    "summarize", "Summary", "ask", "Answer", "Passage", "rank_passages", "translate", "classify",
    "Classification", "SENTIMENT", "complete_code", "stream_code", "ChatSession", "ChatReply", "chat_reply",
    "fit_history", "run_batch", "BatchResult", "merge_batch", "MergeResult", "split_text", "Chunk", "Prompts",
    "DEFAULT_PROMPTS",
    "resolve_prompts", "Runner", "LocalRunner", "EngineRunner", "TaskError", "continuation_logprobs",
]
