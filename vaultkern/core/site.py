"""A patched module: where captured calls are attributed (names in errors, ``vk.summary``)."""
from __future__ import annotations

from typing import Set


class Site:
    """One module whose forward runs under capture: its path, class and what it consumed."""

    def __init__(self, path: str, type_name: str, owned: Set[str]):
        self.path = path or "<root>"
        self.type_name = type_name
        self.owned = owned          # names of the trainable parameters the module owns
        self.kinds: Set[str] = set()  # how its parameters were consumed (seen in forward)

    def describe(self) -> str:
        return f"'{self.path}' ({self.type_name})"
