"""Argument checks shared by the model, runtime and training code: one ValueError style naming the
argument ("top_p must be in (0, 1], got 2.0"). fastlm.kernels keeps its own (it imports nothing of fastlm)."""
import math

SEED_LIMIT = 2 ** 64  # torch.Generator.manual_seed takes seeds in [0, 2**64)


def check_int(name, value, minimum=None, maximum=None, *, optional=False):
    """An int (not a bool) in [minimum, maximum]; None passes when optional."""
    if value is None and optional:
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer{_bounds(minimum, maximum, False, ' ')}, got {value!r}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be{_bounds(minimum, maximum, False, ' ')}, got {value}")
    return value


def check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_number(name, value, minimum=None, maximum=None, *, min_open=False, optional=False):
    """A finite-or-infinite real number (int or float, not bool, not NaN) in the given range;
    min_open: strictly greater than minimum."""
    if value is None and optional:
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    too_low = minimum is not None and (value <= minimum if min_open else value < minimum)
    if too_low or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be{_bounds(minimum, maximum, min_open, ' ')}, got {value}")
    return value


def check_seed(name, value, optional=False):
    return check_int(name, value, 0, SEED_LIMIT - 1, optional=optional)


def check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")
    return value


def _bounds(minimum, maximum, min_open, lead):
    if minimum is not None and maximum is not None:
        return f"{lead}in {'(' if min_open else '['}{minimum}, {maximum}]"
    if minimum is not None:
        return f"{lead}{'>' if min_open else '>='} {minimum}"
    if maximum is not None:
        return f"{lead}<= {maximum}"
    return ""
