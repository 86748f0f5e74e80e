"""What every act of the demo shares: numbered steps, indented output, checks marked [ok]/[FAILED]."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

Say = Callable[[str], None]
IND = "      "


class Act:
    """An act of the demo: ``NAME`` prefixes its steps and its failures, ``STEPS`` counts them."""

    NAME: ClassVar[str]
    STEPS: ClassVar[int]

    def __init__(self, say: Say) -> None:
        self.say = say
        self.failures: list[str] = []
        self._step = 0

    def step(self, title: str, expect: str) -> None:
        self._step += 1
        self.say("")
        self.say(f"[{self.NAME} {self._step}/{self.STEPS}] {title}")
        self.say(f"{IND}you should see: {expect}")

    def out(self, line: str) -> None:
        self.say(IND + line)

    def check(self, ok: bool, line: str, failure: str | None = None) -> bool:
        if not ok:
            self.failures.append(f"{self.NAME} act step {self._step}: {failure or line}")
        self.out(f"{line}  [{'ok' if ok else 'FAILED'}]")
        return ok

    def show_yaml(self, text: str) -> None:
        for line in text.rstrip().splitlines():
            self.out(f"| {line}")
