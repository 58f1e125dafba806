"""The one error type users see for bad settings and bad input."""


class ConfigError(ValueError):
    """A setting or input is invalid; the message is one line naming the value and the choices."""


def choices_error(kind: str, value: object, choices: list) -> ConfigError:
    """Build the standard one-line error for an unknown name among valid choices (booleans as YAML writes them)."""
    names = sorted(str(c).lower() if isinstance(c, bool) else str(c) for c in choices)
    return ConfigError(f"unknown {kind} {value!r}; valid choices: {', '.join(names)}")
