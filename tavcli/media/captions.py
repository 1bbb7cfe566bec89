"""Text on pictures (captions, plot titles): a font that has the prompt's characters where one is installed,
and whatever no font here can draw written as its code point (`[U+718A]`), never as empty boxes.

Pillow's built-in font covers ASCII only (not even `é`), so common system fonts are tried first.
"""

from __future__ import annotations

import functools

from PIL import Image, ImageFont

__all__ = ["drawable", "font_has"]

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont

# Found by file name in the system's font folders, broadest coverage of Latin, Greek and Cyrillic first,
# then CJK; Pillow's own font last.
FONT_FILES = (
    "DejaVuSans.ttf",
    "NotoSans-Regular.ttf",
    "NotoSansCJK-Regular.ttc",
    "NotoSansCJKsc-Regular.otf",
    "wqy-microhei.ttc",
    "wqy-zenhei.ttc",
    "Arial Unicode.ttf",
    "msyh.ttc",
)
NOT_A_CHARACTER = "\ue000"  # a private-use code point: every font draws it as its missing-glyph box


def drawable(text: str, size: int = 12) -> tuple[str, Font]:
    """`text` and the font to draw it in: the first font that has all of it, else the one that has most, with
    the characters it lacks written as `[U+XXXX]`."""
    fonts = _fonts(size)
    missing = [[ch for ch in text if not font_has(font, ch)] for font in fonts]
    best = min(range(len(fonts)), key=lambda index: len(missing[index]))  # first among equals
    lacking = set(missing[best])
    return "".join(f"[U+{ord(ch):04X}]" if ch in lacking else ch for ch in text), fonts[best]


def font_has(font: Font, character: str) -> bool:
    """Whether `font` draws `character` as itself rather than its missing-glyph box."""
    return character.isspace() or _mask(font, character) != _mask(font, NOT_A_CHARACTER)


def _mask(font: Font, character: str) -> tuple[tuple[int, int], bytes]:
    mask = font.getmask(character)
    if mask.size[0] * mask.size[1] == 0:
        return mask.size, b""
    return mask.size, Image.frombytes("L", mask.size, bytes(mask)).tobytes()


@functools.lru_cache(maxsize=4)
def _fonts(size: int) -> tuple[Font, ...]:
    found: list[Font] = []
    for name in FONT_FILES:
        try:
            found.append(ImageFont.truetype(name, size))
        except OSError:  # not installed here
            continue
    return (*found, ImageFont.load_default(size=size))
