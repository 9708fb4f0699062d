"""Final-answer extraction and numeric comparison for GSM8K-style math.

Shared by `mlxpost eval --task math` and the math-correctness reward, so a
completion is judged the same way everywhere.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?"
MARKED = re.compile(r"####\s*(" + NUMBER + ")")
STATED = re.compile(r"answer is[:\s]*(" + NUMBER + ")", re.IGNORECASE)
ANY_NUMBER = re.compile(NUMBER)


def extract_answer(text: str) -> str | None:
    """The final number of a solution: after the last `####`, else after the last
    "The answer is", else the last number in the text; None if there is none."""
    for pattern in (MARKED, STATED):
        found = pattern.findall(text)
        if found:
            return normalise_number(found[-1])
    found = ANY_NUMBER.findall(text)
    return normalise_number(found[-1]) if found else None


def normalise_number(token: str) -> str | None:
    """'1,234.50' -> '1234.5', '$7' -> '7', '3.0' -> '3'; None if not a number."""
    cleaned = token.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(value.to_integral_value())
    return format(value.normalize(), "f")


def reference_answer(answer_field: str) -> str | None:
    """The gold number of a GSM8K `answer` field (its `#### N`), or of a bare number."""
    return extract_answer(answer_field)


def is_correct(completion: str, gold: str) -> bool:
    predicted = extract_answer(completion)
    expected = normalise_number(gold) if gold is not None else None
    return predicted is not None and expected is not None and predicted == expected
