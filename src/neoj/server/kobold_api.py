"""The KoboldAI API (/api/v1 and koboldcpp's /api/extra), so SillyTavern, KoboldAI Lite and TavernAI connect."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter()
PATHS: tuple[str, ...] = ()
