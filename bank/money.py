"""Money is an `int` of minor units; these helpers keep bools and floats out."""

from typing import Annotated

from pydantic import Field

from bank.limits import AMOUNT_MAX

#: A single positive amount of money, in minor units (validated by pydantic).
Amount = Annotated[int, Field(ge=1, le=AMOUNT_MAX)]


def is_int(value: object) -> bool:
    """True for a real `int` (a `bool` is an int to Python, but never money)."""
    return type(value) is int


def format_minor(amount: int, *, currency: str = "") -> str:
    """Render minor units as `1,234.56` without ever going through float."""
    if not is_int(amount):
        raise TypeError(f"amount must be int minor units, got {type(amount).__name__}")
    sign = "-" if amount < 0 else ""
    whole, cents = divmod(abs(amount), 100)
    text = f"{sign}{whole:,}.{cents:02d}"
    return f"{text} {currency}".rstrip() if currency else text
