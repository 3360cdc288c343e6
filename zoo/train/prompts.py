"""What the teacher is asked to write, for `mla-zoo synth-data` (`synth.py`): the chat share's request set (request
kinds x broad topics: `build_prompts`) and the prompts the teacher writes in reply (`write_prompts`, cleaned by
`clean_prompt`), and the `text` share's plain-text openings (`build_openings`: prose on the topics, source code,
documentation, dialogue, news-like prose).

Nothing of the evaluation suite enters: the topics and request kinds are held out from data/eval by name
(tests/test_eval_data.py), and `held_out` drops a written prompt that equals or contains an evaluation prompt
(`evaluation_prompts`: data/eval's chat and behaviour prompts) at run time.
"""

from __future__ import annotations

import itertools
import random
import re

from .sampler import Sampler

# Broad subjects the teacher writes prompts about. Held out from data/eval by name: no evaluation chat
# prompt names one of them (tests/test_eval_data.py), and none is a source of an evaluation text.
TOPICS = [
    "photosynthesis", "black holes", "the French Revolution", "machine learning", "volcanoes",
    "the human immune system", "climate change", "the Roman Empire", "quantum computing", "honeybees",
    "the printing press", "plate tectonics", "jazz music", "the water cycle", "vaccines",
    "the stock market", "ancient Egypt", "renewable energy", "the internet", "coral reefs",
    "chess", "the Moon landing", "sleep", "coffee", "electric cars", "the Industrial Revolution",
    "dinosaurs", "the solar system", "gardening", "friendship", "recycling", "the Olympic Games",
    "bread baking", "mountain climbing", "the history of mathematics", "rainforests", "robots",
    "public libraries", "the ocean tides", "learning a new language",
    "databases", "web development", "programming in JavaScript", "data structures", "computer networks",
    "operating systems", "version control", "cybersecurity", "spreadsheets", "statistics",
    "algebra", "geometry", "probability", "personal finance", "starting a small business",
    "marketing", "job hunting", "public speaking", "time management", "parenting",
    "nutrition", "swimming", "yoga", "first aid", "mental health", "the human brain", "genetics",
    "evolution", "chemistry experiments", "electricity", "magnets", "light and colour", "sound",
    "weather forecasting", "earthquakes", "glaciers", "lakes and ponds", "birds", "insects", "whales", "trees",
    "the Renaissance", "ancient Greece", "the Silk Road", "the Cold War", "world religions", "philosophy",
    "ethics", "democracy", "economics", "architecture", "painting", "photography", "film making",
    "classical music", "poetry", "writing a novel", "board games", "video games", "football", "cycling",
    "home repairs", "cooking pasta", "travelling on a budget", "railways", "aviation", "space exploration",
]
COUNTRIES = [
    "Japan", "Brazil", "Kenya", "Canada", "Australia", "India", "Germany", "Mexico", "Egypt",
    "Italy", "Spain", "Norway", "Argentina", "China", "South Korea", "Peru", "Vietnam", "Morocco", "Greece",
    "Sweden", "Chile", "Turkey", "Thailand", "Nigeria", "Portugal", "Ireland", "New Zealand", "Poland", "Iceland",
]
# What the teacher is asked in order to write a prompt; {subject} is a topic or "the country X".
REQUESTS = [
    "Write one question that someone might ask an AI assistant about {subject}. Reply with the question only.",
    "Write one instruction asking an assistant to do a short writing task about {subject}. Reply with the "
    "instruction only.",
    "Write one question a curious student could ask about {subject}, as the student would ask it. Reply with the "
    "question only.",
    "Write a request for practical advice related to {subject}, as a user would type it. Reply with the request only.",
    "Write one hard question about {subject} that needs a careful explanation. Reply with the question only.",
]
# Plain-text openings the teacher continues (the `text` source; a base model's `chat` share too): generic
# first words of a kind of text, a few words each, never a passage of an evaluation text (tests/test_synth.py).
# TOPIC_OPENINGS are crossed with the topics; the others are used as they are (`build_openings`).
PROSE_OPENINGS = [
    "The", "The history of", "In the beginning,", "Once upon a time,", "Scientists have discovered that",
    "Here is a recipe for", "Chapter 1", "Dear friend,", "In this article, we", "It was a cold morning when",
    "The most important thing about", "Yesterday,", "According to recent research,", "Step 1:", "A long time ago",
]
TOPIC_OPENINGS = ["The", "The history of", "An introduction to", "Frequently asked questions about",
                  "A conversation about", "Notes on"]
CODE_OPENINGS = [
    "import os\n", "import sys\n", "import numpy as np\n", "from typing import", "#!/usr/bin/env python3\n",
    "# -*- coding: utf-8 -*-\n", '"""', "def main():\n", "class Config:\n", "if __name__ ==", "```python\n",
    "import unittest\n\n", "from collections import", "import logging\n\nlogger =", "@dataclass\nclass",
    "#include <stdio.h>\n", "#include <vector>\n", "package main\n\nimport", "public class", "using System;\n",
    "const express = require(", "function", "import React from", "<!DOCTYPE html>\n<html>", "SELECT", "CREATE TABLE",
    "#!/bin/bash\n", "fn main() {\n", "<?php\n", "// Copyright", "/*\n * ", "```javascript\n",
]
DOC_OPENINGS = [
    "Installation\n\n", "Usage\n\n", "## Getting started\n\n", "# Overview\n\n", "This module provides",
    "This document describes", "The following example shows how to", "Note:", "Parameters\n----------\n",
    "Returns:", "API Reference\n\n", "Troubleshooting\n\n", "Configuration options", "Changelog\n\n",
    "To install the package, run", "This tutorial explains", "Exceptions\n\n", "Options:\n",
]
TALK_OPENINGS = [
    "A: Hi, how are you?\nB:", "User:", "Q:", "Interviewer:", "\"Where are you going?\" she asked.", "Customer:",
    "Teacher: Good morning, class.\n", "Alice: Did you see", "Doctor:", "Moderator: Welcome to",
]
NEWS_OPENINGS = [
    "According to", "BREAKING:", "The city of", "In 1923,", "The population of", "The company announced",
    "Officials said", "(Reuters) -", "Born in", "The river", "The island of", "The election", "Marie Curie was",
]


def build_prompts(chat: bool, seed: int = 0) -> list[str]:
    """What the teacher is asked, shuffled: request kinds x (topics + countries) for an instruct model
    (its replies become the user prompts), or text openings for a base model (continued as they are)."""
    if not chat:
        return build_openings(seed)
    subjects = TOPICS + [f"the country {c}" for c in COUNTRIES]
    prompts = [r.format(subject=s) for s, r in itertools.product(subjects, REQUESTS)]
    random.Random(seed).shuffle(prompts)
    return prompts


def build_openings(seed: int = 0) -> list[str]:
    """The `text` source's openings, shuffled: a third prose on the topics, a quarter source code (the kind of
    text that chat answers and BOS samples reach least), then documentation, dialogue, news-like prose and
    other prose openings."""
    topical = [f"{o} {t}" for o, t in itertools.product(TOPIC_OPENINGS, TOPICS)]
    total = 3 * len(topical)
    kinds = ((CODE_OPENINGS, 0.25), (DOC_OPENINGS, 0.15), (TALK_OPENINGS, 0.12), (NEWS_OPENINGS, 0.08),
             (PROSE_OPENINGS, 0.07))
    openings = topical + [k[i % len(k)] for k, share in kinds for i in range(round(share * total))]
    random.Random(seed).shuffle(openings)
    return openings


def clean_prompt(reply: str) -> str | None:
    """The user prompt in a teacher's reply to a request: its first non-empty line, unquoted; None when
    it does not look like one (too short or long, or a refusal)."""
    line = next((x.strip() for x in reply.splitlines() if x.strip()), "")
    quoted = re.search(r':\s*"(.+?)("|$)', line)  # Here's a question a student could ask: "..."
    line = quoted[1] if quoted else line
    line = re.sub(r"^(question|instruction|request|prompt|ask)\s*\d*\s*:\s*", "", line, flags=re.IGNORECASE)
    line = line.strip().strip('"“”').strip()
    assistant_voice = r"(i'm|i am|i cannot|i can't|sure|here is|here's|certainly|of course|what a )"
    if not 12 <= len(line) <= 300 or re.match(assistant_voice, line, re.IGNORECASE):
        return None
    return line


def held_out(prompts: list[str], eval_prompts: list[str]) -> list[str]:
    """`prompts` without any that equals or contains an evaluation prompt (case and spacing ignored)."""
    def norm(text: str) -> str:
        return " ".join(text.lower().split())

    held = [norm(e) for e in eval_prompts]
    return [p for p, n in ((p, norm(p)) for p in prompts) if not any(e in n for e in held)]


def evaluation_prompts() -> list[str]:
    """The held-out chat and behaviour prompts of the repository's data/eval (none where it is absent)."""
    from mla_zoo.zoo.evaluate.metrics import load_behaviour
    from mla_zoo.zoo.evaluate.reports import DEFAULT_SUITE
    from mla_zoo.zoo.evaluate.suite import chat_prompts

    found = chat_prompts(DEFAULT_SUITE) if (DEFAULT_SUITE / "chat_prompts.txt").is_file() else []
    behaviour = DEFAULT_SUITE / "behaviour.jsonl"
    return found + ([b.prompt for b in load_behaviour(behaviour)] if behaviour.is_file() else [])


def chat_ids(tokenizer, prompt: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def write_prompts(sampler: Sampler, tokenizer, requests: list[str], pool: int, batch_size: int,
                  exclude: list[str], temperature: float) -> list[str]:
    """Up to `pool` distinct user prompts written by the teacher (at `temperature`) in reply to `requests`
    (cycled)."""
    found: dict[str, None] = {}
    order = itertools.cycle(requests)
    asked = 0
    limit = max(4 * pool, batch_size)  # requests: a model that cannot write prompts stops here
    answer_temperature, sampler.temperature = sampler.temperature, temperature
    while len(found) < pool and asked < limit:
        batch = [next(order) for _ in range(batch_size)]  # always full: one shape to compile (the last overshoots)
        asked += len(batch)
        replies = sampler([chat_ids(tokenizer, r) for r in batch], 64)
        cleaned = [clean_prompt(tokenizer.decode(a, skip_special_tokens=True)) for a in replies]
        for p in held_out([c for c in cleaned if c], exclude):
            found.setdefault(p, None)
    sampler.temperature = answer_temperature
    return list(found)[:pool]
