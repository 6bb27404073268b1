"""Tokenization routes: vLLM's /tokenize and /detokenize, and TGI's /tokenize."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
PATHS: tuple[str, ...] = ()
