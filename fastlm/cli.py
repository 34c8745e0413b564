"""The `fastlm` command: generate, bench, train, eval, quantize.

Each subcommand lives beside the code it drives and registers itself here through `add_parser(subparsers)`
returning nothing; the parser's `func(args)` runs it. Any ValueError / FileNotFoundError raised by the
API becomes one line on stderr and exit code 2, never a traceback.
"""
import argparse
import importlib
import sys

# module path -> it defines add_parsers(subparsers) registering its subcommands
COMMAND_MODULES = ["fastlm.runtime.commands", "fastlm.training.commands", "fastlm.model.commands"]


class UsageError(ValueError):
    """A user error that the command line reports in one line (exit code 2)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastlm", description="Fast, hackable LLM generation.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module_name in COMMAND_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:  # a real import error inside an existing module
                raise
            continue
        module.add_parsers(subparsers)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except (ValueError, FileNotFoundError, NotADirectoryError) as exc:
        print(f"fastlm {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
