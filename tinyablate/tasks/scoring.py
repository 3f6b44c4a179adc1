"""The one scorer, used both as the RL reward and for evaluation.

Two ways to read a model's answer:
- strict: the content of the last `\\boxed{...}`, else what follows the last `#### `;
- flexible: the last number anywhere in the text.
Both are compared with the gold answer after `normalize_number`, which maps "$1,234.00",
"1{,}234", "\\text{1234} dollars" and "1234." to the same canonical string "1234".
"""

import re
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction
from typing import Callable, Optional, Union

SCORE_KINDS = ("strict", "flexible")

_BOXED_START = re.compile(r"\\(?:boxed|fbox)\s*\{")
_HASH_ANSWER = re.compile(r"####[ \t]*([^\n]*)")
# A number as written in prose: optional minus (not a hyphen glued to a word), optional "$",
# digits with optional thousands separators, optional decimals.
_PROSE_NUMBER = re.compile(
    r"(?:(?<![\w)])[-\u2212])?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?:(?<![\w)])[-\u2212])?\$?\.\d+"
)
# A number once LaTeX, currency and separators are gone; a simple fraction "a/b" counts as one.
_PLAIN_NUMBER = re.compile(r"-?(?:\d+(?:\.\d+)?|\.\d+)(?:\s*/\s*-?(?:\d+(?:\.\d+)?|\.\d+))?")
_LATEX_FRACTION = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_LATEX_TEXT = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_LATEX_SPACES = re.compile(r"\\[,!;:> ]")


@dataclass(frozen=True)
class Score:
    """Whether a completion is right, under both readings, and what each reading extracted."""

    strict: bool  # the boxed (or "#### ") answer equals the gold answer
    flexible: bool  # the last number in the completion equals the gold answer
    extracted_strict: Optional[str]  # raw text read by extract_strict, None if nothing found
    extracted_flexible: Optional[str]  # raw text read by extract_flexible, None if no number


def extract_strict(text: str) -> Optional[str]:
    """The content of the last complete `\\boxed{...}`, else the text after the last `#### `."""
    boxed = _last_boxed_content(text)
    if boxed is not None:
        return boxed.strip()
    hash_answers = _HASH_ANSWER.findall(text)
    if hash_answers and hash_answers[-1].strip():
        return hash_answers[-1].strip()
    return None


def _last_boxed_content(text: str) -> Optional[str]:
    """Content of the last non-empty `\\boxed{...}` whose braces close; nested braces kept whole.

    An empty `\\boxed{}` (e.g. the instruction echoed back) is skipped.
    """
    for match in reversed(list(_BOXED_START.finditer(text))):
        content = _until_matching_brace(text, match.end())
        if content is not None and content.strip():
            return content
    return None


def _until_matching_brace(text: str, start: int) -> Optional[str]:
    """The text from `start` up to the brace closing an already-open `{`, None if unclosed."""
    depth = 1
    for index in range(start, len(text)):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                return text[start:index]
    return None


def extract_flexible(text: str) -> Optional[str]:
    """The last number in the text ("1,234", "-5", "$3.50", ...), None if there is none."""
    numbers = _PROSE_NUMBER.findall(text.replace("{,}", ","))
    return numbers[-1] if numbers else None


def normalize_number(text: Optional[Union[str, int, float]]) -> Optional[str]:
    """Canonical form of the one number in `text`, or None if it holds no number or several.

    "$1,234.00" -> "1234", "3.50" -> "3.5", "\u22125" -> "-5", "\\frac{1}{2}" -> "0.5",
    "18 dollars" -> "18", "x = 7" -> "7" (only what follows the last "=" is read).
    """
    if text is None:
        return None
    plain = _strip_formatting(str(text))
    if "=" in plain:
        plain = plain.rsplit("=", 1)[1]
    numbers = _PLAIN_NUMBER.findall(plain)
    if len(numbers) != 1:
        return None
    return _canonical(numbers[0])


def _strip_formatting(text: str) -> str:
    """Drop LaTeX wrappers, currency and percent signs, thousands separators; unify minus."""
    text = text.replace("\u2212", "-").replace("{,}", ",")
    text = _LATEX_FRACTION.sub(r"\1/\2", text)
    previous = None
    while previous != text:  # unwrap nested \text{\textbf{...}}
        previous, text = text, _LATEX_TEXT.sub(r"\1", text)
    text = _LATEX_SPACES.sub("", text)
    for symbol in ("\\$", "$", "\\%", "%", "{", "}"):
        text = text.replace(symbol, "")
    return _THOUSANDS_COMMA.sub("", text)


def _canonical(number: str) -> Optional[str]:
    """Integers without decimals, decimals without trailing zeros, other fractions as "p/q"."""
    parts = [part.strip() for part in number.split("/")]
    value = Fraction(Decimal(parts[0]))
    if len(parts) == 2:
        denominator = Fraction(Decimal(parts[1]))
        if denominator == 0:
            return None
        value /= denominator
    return _format_fraction(value)


def _format_fraction(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    if _has_finite_decimal(value.denominator):
        decimal = Decimal(value.numerator) / Decimal(value.denominator)
        return format(decimal.normalize(), "f")
    return f"{value.numerator}/{value.denominator}"


def _has_finite_decimal(denominator: int) -> bool:
    for prime in (2, 5):
        while denominator % prime == 0:
            denominator //= prime
    return denominator == 1


def score(completion: str, answer: Union[str, int, float]) -> Score:
    """Score a completion against a gold answer (any form `normalize_number` reads)."""
    gold = normalize_number(answer)
    if gold is None:
        raise ValueError(f"gold answer {answer!r} does not hold exactly one number")
    strict_text = extract_strict(completion)
    flexible_text = extract_flexible(completion)
    return Score(
        strict=strict_text is not None and normalize_number(strict_text) == gold,
        flexible=flexible_text is not None and normalize_number(flexible_text) == gold,
        extracted_strict=strict_text,
        extracted_flexible=flexible_text,
    )


def completion_text(completion: Union[str, list]) -> str:
    """The text of a completion: a string, or TRL's conversational list of message dicts."""
    if isinstance(completion, str):
        return completion
    texts = [_message_text(message) for message in completion if message.get("role", "assistant") == "assistant"]
    return "\n".join(texts)


def _message_text(message: dict) -> str:
    content = message.get("content") or ""
    if isinstance(content, str):
        return content
    # Multimodal content: a list of parts such as {"type": "text", "text": "..."}.
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))


def reward_fn(kind: str = "strict") -> Callable[..., list]:
    """A TRL GRPOTrainer reward function: 1.0 per correct completion, 0.0 otherwise.

    TRL calls it as `f(prompts=..., completions=..., completion_ids=..., answer=..., **other
    dataset columns and trainer extras)`, so the dataset needs an `answer` column.
    """
    if kind not in SCORE_KINDS:
        raise ValueError(f"reward kind {kind!r} is invalid: expected one of {', '.join(SCORE_KINDS)}.")

    def reward(completions: list, answer: list, **kwargs) -> list:
        scores = (score(completion_text(c), gold) for c, gold in zip(completions, answer, strict=True))
        return [1.0 if getattr(result, kind) else 0.0 for result in scores]

    reward.__name__ = reward.__qualname__ = f"{kind}_accuracy"
    return reward
