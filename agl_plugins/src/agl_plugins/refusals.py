"""Written refusals for unsafe prompts: deterministic by prompt hash and harm category (alignment targets)."""

from __future__ import annotations

import hashlib
import re

OPENERS = (
    "I can't help with that.",
    "I won't help with this.",
    "Sorry, but I can't assist with that request.",
    "I'm not able to help with that.",
    "No, I can't do that.",
    "I have to decline this one.",
    "That's not something I can help with.",
    "I'm sorry, but I can't help with this request.",
    "I can't assist with this.",
    "I won't provide that.",
)
REASONS = {
    "Financial and Business": (
        "It could be used for fraud or theft that costs real people money.",
        "It would help deceive or steal from others.",
    ),
    "Physical": (
        "It could lead to someone getting seriously hurt.",
        "It puts people's physical safety at risk.",
    ),
    "Autonomy": (
        "It would help violate someone's privacy or control over their own life.",
        "It could be used to manipulate or exploit people.",
    ),
    "Human Rights and Civil Liberties": (
        "It could be used to violate people's rights or safety.",
        "It would help harm or target people unfairly.",
    ),
    "Psychological": (
        "It could cause serious emotional harm to someone.",
        "It risks hurting people who are vulnerable.",
    ),
    "Societal and Cultural": (
        "It could spread hatred, harm or false information.",
        "It would fuel division and harm communities.",
    ),
    "Political and Economic": (
        "It could undermine elections, institutions or public trust.",
        "It would help manipulate people or destabilise society.",
    ),
    "Reputational": ("It could damage someone's reputation with false or harmful claims.",),
    "Environmental": ("It could cause serious damage to the environment.",),
}
DEFAULT_REASONS = ("It could cause real harm.",)
CLOSERS = (
    "",
    "Is there something else I can help you with?",
    "I'm happy to help with a related, legitimate question.",
    "If you're curious about the topic, I can share general safety information instead.",
    "",
)
SELF_HARM_CLOSER = "If you're going through a hard time, please reach out to someone you trust or a local crisis line."


def normalise(prompt: str) -> str:
    """Lower-case, collapse whitespace, drop trailing punctuation: the text that decides the split."""
    return re.sub(r"\s+", " ", prompt.strip().lower()).rstrip(" .!?")


def stable_hash(text: str) -> int:
    return int(hashlib.sha256(normalise(text).encode("utf-8")).hexdigest()[:12], 16)


def refusal(prompt: str, categories: list[str]) -> str:
    """A short refusal chosen deterministically from the prompt's hash and its AdvBench harm categories."""
    h = stable_hash(prompt)
    reasons = REASONS.get(categories[0], DEFAULT_REASONS) if categories else DEFAULT_REASONS
    closer = SELF_HARM_CLOSER if "Self-harm" in categories else CLOSERS[(h // 100) % len(CLOSERS)]
    parts = [OPENERS[h % len(OPENERS)], reasons[(h // 10) % len(reasons)], closer]
    return " ".join(p for p in parts if p)
