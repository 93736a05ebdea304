"""Click parameters whose format names come from the format registry (loraport/formats), read only when
click needs them (parsing that option, or showing help), so `import loraport.cli` loads no format module."""

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


class TargetsOption(click.Option):
    """An option whose help text lists the registry's convert targets where it says {targets}."""

    def get_help_record(self, ctx: click.Context):
        from loraport.formats import convert_targets

        help_text = self.help
        self.help = (help_text or "").replace("{targets}", ", ".join(convert_targets()))
        try:
            return super().get_help_record(ctx)
        finally:
            self.help = help_text
