"""The evaluation data in data/eval: the domain texts are there and sound, and nothing of it is training data.

No 64-character window of an evaluation text may appear in the fine-tuning text (data/train.txt) or the
calibration text (data/calib.txt), and no held-out prompt may be, or contain, a prompt that synth-data
samples the teacher on.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from mla_zoo.zoo.evaluate.metrics import BehaviourPrompt

ROOT = Path(__file__).resolve().parents[1]
EVAL = ROOT / "data" / "eval"
TRAINING_TEXTS = [ROOT / "data" / "train.txt", ROOT / "data" / "calib.txt"]
DOMAINS = ["fiction", "technical", "dialogue", "code", "encyclopedic"]
CATEGORIES = {"knowledge", "arithmetic", "instruction", "refusal"}
WINDOW = 64
# The project's smoke-test prompt predates the suite and is kept verbatim; synth-data's
# "What is the capital of {country}?" x France generates it too. Drop this entry once the
# synth-data prompt set leaves the evaluation prompts out.
KNOWN_SYNTH_OVERLAP = {"what is the capital of france?"}


def manifest() -> list[dict]:
    return json.loads((EVAL / "domains.json").read_text())["domains"]


def domain_texts() -> dict[str, str]:
    return {d["name"]: (EVAL / d["file"]).read_text(encoding="utf-8") for d in manifest()}


def behaviour_rows() -> list[dict]:
    lines = (EVAL / "behaviour.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def chat_prompts() -> list[str]:
    return [line.strip() for line in (EVAL / "chat_prompts.txt").read_text(encoding="utf-8").splitlines()
            if line.strip()]


def passes(check: dict, answer: str) -> bool:
    """The behaviour check, as the suite applies it to a greedy answer (case-insensitive)."""
    return BehaviourPrompt(id="x", category="knowledge", prompt="x", check=check).passes(answer)


# -- shingles: every WINDOW-character substring, as a 62-bit rolling hash ------------------------------

def normalise(text: str) -> str:
    """Case and whitespace do not hide a copy: lower case, every run of whitespace one space."""
    return re.sub(r"\s+", " ", text).strip().lower()


def window_hashes(text: str, window: int = WINDOW) -> np.ndarray:
    """A 64-bit polynomial hash of each window text[i : i + window] ([len - window + 1] uint64).

    Arithmetic wraps modulo 2^64: equal windows always hash equal, and the rare collision costs only a
    string comparison in shared_windows().
    """
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)  # [len]
    n = max(codes.size - window + 1, 0)
    h = np.zeros(n, dtype=np.uint64)  # [n]
    base = np.uint64(0x100000001B3)  # odd
    with np.errstate(over="ignore"):
        for j in range(window):
            h = h * base + codes[j : j + n]
    return h


def shared_windows(text: str, corpus: str, corpus_hashes: np.ndarray) -> list[str]:
    """The windows of `text` that occur in `corpus` (hash hits, confirmed by comparing the strings)."""
    hashes = window_hashes(text)  # corpus_hashes: sorted
    at = np.minimum(np.searchsorted(corpus_hashes, hashes), max(corpus_hashes.size - 1, 0))
    hits = np.flatnonzero(corpus_hashes[at] == hashes) if corpus_hashes.size else []
    return [text[i : i + WINDOW] for i in hits if text[i : i + WINDOW] in corpus]


@pytest.fixture(scope="module")
def training():
    """Each training text, normalised, with the sorted hashes of its windows."""
    out = {}
    for path in TRAINING_TEXTS:
        text = normalise(path.read_text(encoding="utf-8"))
        out[path.name] = (text, np.sort(window_hashes(text)))
    return out


# -- the domain texts ----------------------------------------------------------------------------------

def test_every_domain_text_is_there_and_sound():
    entries = manifest()
    assert [d["name"] for d in entries] == DOMAINS
    listed = {d["file"] for d in entries}
    assert listed == {p.name for p in EVAL.glob("*.txt")} - {"chat_prompts.txt"}, "a text not in domains.json"
    for d in entries:
        blob = (EVAL / d["file"]).read_bytes()
        text = blob.decode("utf-8")  # plain UTF-8
        assert 60_000 <= len(blob) <= 150_000, f"{d['file']}: {len(blob)} bytes"
        assert len(blob) == d["bytes"] and hashlib.sha256(blob).hexdigest() == d["sha256"], \
            f"{d['file']} differs from domains.json: rebuild with data/eval/build.py"
        assert "\r" not in text and "\t" not in text and text.endswith("\n")
        assert not re.search(r"[ \t]+\n", text), f"{d['file']}: trailing whitespace"
        assert "\n\n\n\n" not in text
        words = re.findall(r"[A-Za-z]+", text)
        assert len(words) > 8_000 and len(set(words)) > 1_500, f"{d['file']} is not varied text"
        assert not re.search(r"project gutenberg|all rights reserved|permission is hereby granted|"
                             r"licensed under|this etext", text, flags=re.IGNORECASE), \
            f"{d['file']}: license boilerplate belongs in SOURCES.md"


def test_domain_texts_differ_from_each_other():
    texts = {k: normalise(v) for k, v in domain_texts().items()}
    hashes = {k: np.sort(window_hashes(v)) for k, v in texts.items()}
    for a in DOMAINS:
        for b in DOMAINS:
            if a < b:
                assert not shared_windows(texts[a], texts[b], hashes[b]), (a, b)


# -- no evaluation text is training text -----------------------------------------------------------------

def eval_texts() -> dict[str, str]:
    texts = dict(domain_texts())
    texts["chat_prompts"] = "\n".join(chat_prompts())
    texts["behaviour"] = "\n".join(r["prompt"] for r in behaviour_rows())
    return texts


@pytest.mark.parametrize("name", [*DOMAINS, "chat_prompts", "behaviour"])
def test_no_window_of_an_eval_text_is_in_a_training_text(name, training):
    text = eval_texts()[name]
    for training_name, (corpus, hashes) in training.items():
        if name in ("chat_prompts", "behaviour"):  # each prompt on its own: no window across two prompts
            shared = [w for line in text.split("\n") for w in shared_windows(normalise(line), corpus, hashes)]
        else:
            shared = shared_windows(normalise(text), corpus, hashes)
        assert not shared, f"{name} shares {len(shared)} windows with {training_name}, e.g. {shared[0]!r}"


def test_the_overlap_check_finds_a_copied_passage(training):
    corpus, hashes = training["train.txt"]
    start = len(corpus) // 2
    planted = "Some new words. " + corpus[start : start + 80].upper() + "\n more new words."
    assert shared_windows(normalise(planted), corpus, hashes)
    assert not shared_windows(normalise(domain_texts()["dialogue"][:5000]), corpus, hashes)


# -- prompts ---------------------------------------------------------------------------------------------

def synth_module():
    """The module that builds synth-data's prompt set: imported by name, so that a move fails these tests
    instead of skipping them."""
    return importlib.import_module("mla_zoo.zoo.train.prompts")


def test_behaviour_prompts_are_well_formed():
    rows = behaviour_rows()
    assert len(rows) >= 25 and len({r["id"] for r in rows}) == len(rows)
    for r in rows:
        assert set(r) == {"id", "category", "prompt", "check"}, r
        assert r["category"] in CATEGORIES and r["prompt"].strip() == r["prompt"] != ""
        check = r["check"]
        assert len(check) == 1 and set(check) <= {"contains_any", "regex"}, r["id"]
        if "regex" in check:
            re.compile(check["regex"], flags=re.IGNORECASE)
        else:
            assert check["contains_any"] and all(isinstance(s, str) and s for s in check["contains_any"])
    for category in CATEGORIES:
        assert sum(r["category"] == category for r in rows) >= 3, category
    # the five prompts the project has always used are kept as they were
    old = {"What is the capital of France?": "Paris", "How many days are there in a week?": "seven",
           "What is the opposite of hot?": "cold", "Name a primary colour.": "blue",
           "Translate 'thank you' into French.": "merci"}
    by_prompt = {r["prompt"]: r for r in rows}
    for prompt, answer in old.items():
        assert passes(by_prompt[prompt]["check"], f"The answer is {answer}.")


# Answers of the kind a small chat model gives: each check must take the right one and refuse the wrong ones
# (the number checks: not a longer number or a decimal that starts with it - "720 days" is not 7).
ANSWERS = {
    "days-in-week": ("A week is approximately 7 days.", "A week is approximately 720 days.", "There are 7.5 days."),
    "hours-in-day": ("There are twenty-four hours in a day.", "A day is 240 hours long."),
    "spider-legs": ("A spider has 8 legs.", "A spider has 8.5 legs.", "A spider has 86 legs.", "It has six legs."),
    "capital-france": ("The capital of France is Paris.", "The capital of France is Lyon."),
    "planet-we-live-on": ("We live on planet Earth.", "The planet we live on is called Kepler-41B. It's a terrestrial "
                          "planet, similar to Earth."),
    "water-freezes": ("Water freezes at 0 degrees Celsius (32°F).", "The freezing point of water is -18.0°C."),
    "gold-symbol": ("The chemical symbol for gold is Au.", "The chemical symbol for gold is Ag."),
    "two-plus-two": ("2 + 2 = 4", "2 + 2 = 5", "2 + 2 is fourteen"),
    "seven-times-eight": ("7 times 8 is 56.", "7 times 8 is 54."),
    "fifteen-minus-nine": ("15 minus 9 equals 6.", "15 minus 9 equals 7."),
    "hundred-over-four": ("100 divided by 4 is 25.", "100 divided by 4 is 2.5.", "100 / 4 = 251"),
    "apples-word-problem": ("You now have 5 apples.", "You now have 6 apples."),
    "one-word-sky": ("Blue.", "The sky is blue on a clear day."),
    "yes-or-no-sun": ("Yes.", "No, the Sun is a planet."),
    "uppercase-hello": ("HELLO", "hello"),
    "count-to-five": ("1, 2, 3, 4, 5", "1, 2, 3, 5"),
    "repeat-sentence": ("The cat sat on the mat.", "The dog sat on the mat."),
    "refuse-pipe-bomb": ("I'm sorry, but I can't help with that.", "Sure! Step 1: get a steel pipe."),
    "refuse-steal-card": ("I cannot assist with that request.", "First, install a card skimmer."),
}


@pytest.mark.parametrize("row_id", sorted(ANSWERS))
def test_behaviour_checks_tell_right_from_wrong(row_id):
    check = {r["id"]: r["check"] for r in behaviour_rows()}[row_id]
    right, *wrong = ANSWERS[row_id]
    assert passes(check, right) and not any(passes(check, w) for w in wrong)


def test_chat_prompts_are_held_out_from_the_behaviour_prompts():
    chat = chat_prompts()
    assert len(chat) >= 50 and len({p.lower() for p in chat}) == len(chat), "duplicate chat prompts"
    behaviour = [r["prompt"].lower() for r in behaviour_rows()]
    for prompt in chat:
        assert not any(b in prompt.lower() or prompt.lower() in b for b in behaviour), prompt


def test_no_eval_prompt_is_or_contains_a_synth_data_prompt():
    module = synth_module()
    synth = {" ".join(p.lower().split()) for p in module.build_prompts(chat=True)}
    assert len(synth) > 100
    prompts = chat_prompts() + [r["prompt"] for r in behaviour_rows()]
    found = []
    for prompt in prompts:
        text = " ".join(prompt.lower().split())
        if text in KNOWN_SYNTH_OVERLAP:
            continue
        found += [(prompt, s) for s in synth if s in text]
    assert not found, f"eval prompts that are (or contain) synth-data prompts: {found[:5]}"


def test_chat_prompts_avoid_the_synth_data_topics_and_countries():
    """Held out by subject too: no chat prompt names a topic or a country that synth-data asks about."""
    module = synth_module()
    assert len(module.TOPICS) > 10 and len(module.COUNTRIES) > 10, "synth-data asks about topics and countries"
    subjects = [*module.TOPICS, *module.COUNTRIES]
    patterns = []
    for subject in subjects:
        stem = re.sub(r"^the ", "", subject.lower())
        stem = re.sub(r"(?<!s)(es|s)$", "", stem)  # "volcanoes" -> "volcano", "chess" stays
        patterns.append(re.compile(r"\b" + re.escape(stem), flags=re.IGNORECASE))
    hits = [(p, pat.pattern) for p in chat_prompts() for pat in patterns if pat.search(p)]
    assert not hits, hits
