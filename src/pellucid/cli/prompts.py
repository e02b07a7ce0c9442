"""pellucid prompt (list, show, diff, save), render, count and budget."""

from __future__ import annotations
