"""Click parameters whose format names come from the format registry (loraport/formats), read only when click
parses that option (help names `loraport formats` instead of listing them), so `import loraport.cli` and
`--help` load no format module."""

from __future__ import annotations

import click


class FormatChoice(click.Choice):
    """A choice among the registered formats that `pick(format_class)` accepts."""

    def __init__(self, pick) -> None:
        self._pick = pick
        super().__init__(())

    @property
    def choices(self) -> tuple[str, ...]:
        from loraport.formats import formats

        return tuple(n for n, f in formats().items() if self._pick(f))

    @choices.setter
    def choices(self, _value) -> None:  # click.Choice.__init__ assigns it; the registry is the source
        pass

    def get_metavar(self, param, ctx=None) -> str:  # help shows no list: listing would import every format module
        return "FORMAT"                             # (and torch): `--help` stays fast; `loraport formats` lists them
