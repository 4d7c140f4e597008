"""Missing-modality test settings, spelled as DeMo spells them (``TEST.MISS``).

The letters name the modalities that are **missing** at test time, as in the published DeMo
code: ``r`` = RGB missing, ``n`` = near-infrared (NI) missing, ``t`` = thermal (TI) missing,
``rn`` = RGB and NI missing (only TI left), ``rt``, ``nt``. ``"nothing"`` (DeMo's configs),
``"none"`` and ``""`` mean every modality is present. Letters are case- and order-insensitive
(``NR`` = ``rn``); anything else is refused when the config is loaded.

DeMo's missing-modality table has one column per setting in :data:`DEMO_TABLE_SETTINGS`'s
order, headed ``M (RGB)`` ... ``M (NIR+TIR)``.
"""

from __future__ import annotations

from utils.modalities import MODALITIES

#: TEST.MISS letter -> the modality it removes.
MISS_LETTERS = {"r": "RGB", "n": "NI", "t": "TI"}
#: Values meaning "every modality present".
ALL_PRESENT = ("", "nothing", "none")
#: DeMo's missing-modality table, in its column order.
DEMO_TABLE_SETTINGS = ("r", "n", "t", "rn", "rt", "nt")
_DEMO_NAMES = {"RGB": "RGB", "NI": "NIR", "TI": "TIR"}


def missing_modalities(code: str) -> tuple[str, ...]:
    """The modalities a ``TEST.MISS`` value removes, in modality order (``()`` for all present).

    Raises ``ValueError`` naming the key for an unknown letter or when nothing would remain.
    """
    text = code.strip().lower()
    if text in ALL_PRESENT:
        return ()
    unknown = sorted(set(text) - set(MISS_LETTERS))
    if unknown or len(set(text)) != len(text):
        raise ValueError(
            f"TEST.MISS '{code}' is not a missing-modality setting: use the letters of the modalities that are "
            f"missing (DeMo's meaning), one of {', '.join(DEMO_TABLE_SETTINGS)}, or 'nothing' for all present"
        )
    missing = tuple(MISS_LETTERS[letter] for letter in MISS_LETTERS if letter in text)
    if len(missing) == len(MODALITIES):
        raise ValueError(f"TEST.MISS '{code}' removes every modality; at most two of r, n, t can be missing")
    return missing


def present_modalities(code: str) -> tuple[str, ...]:
    """The modalities left at test time under ``TEST.MISS`` ``code``, in modality order."""
    missing = missing_modalities(code)
    return tuple(m for m in MODALITIES if m not in missing)


def canonical(code: str) -> str:
    """``code`` in DeMo's spelling (``"NR"`` -> ``"rn"``; all present -> ``"nothing"``)."""
    missing = missing_modalities(code)
    if not missing:
        return "nothing"
    return "".join(letter for letter, m in MISS_LETTERS.items() if m in missing)


def table_label(code: str) -> str:
    """Column heading of DeMo's table: ``"M (RGB+NIR)"`` for ``rn``; ``"all present"`` for none."""
    missing = missing_modalities(code)
    return f"M ({'+'.join(_DEMO_NAMES[m] for m in missing)})" if missing else "all present"
