"""The error hierarchy. Every user-facing failure is a LoraportError with a message a user can act on;
the CLI prints it as one line and exits with `exit_code` (2 = bad input / usage, 1 = failure)."""

from __future__ import annotations


class LoraportError(Exception):
    exit_code = 2
    # (flag, what it does): a hint the CLI appends only when the command that failed has that flag, so a shared
    # reader's error never tells `convert` or `validate` users about an option only `merge` takes
    flag_hint: tuple[str, str] | None = None

    def hint(self, flag: str, does: str) -> LoraportError:
        self.flag_hint = (flag, does)
        return self


class BadInputError(LoraportError):
    """A file or argument we were given is unusable (missing, malformed, unsupported)."""


class UnsafeInputError(BadInputError):
    """An input would need code execution (a pickle beyond weights_only) to load."""


class Inexpressible(BadInputError):
    """The target format has no exact form for an update; `loraport convert --lossy` may re-factor it."""


class PlanError(BadInputError):
    """The adapter(s) and base do not fit together (unmatched targets, shape mismatch, duplicates)."""


class OutputError(LoraportError):
    """The output cannot be written where asked (exists, inside an input, no space)."""


class ValidationFailed(LoraportError):
    """An artifact's outputs disagree with the reference beyond tolerance."""

    exit_code = 1
