"""The `fastlm` command: generate, bench, serve, train, eval, quantize.

Each subcommand lives beside the code it drives and registers itself here through
`add_parsers(subparsers)` (one function per module, returning nothing); the parser's `func(args)` runs
it. Whatever happens, the command prints at most one line on stderr, never a traceback:
- a ValueError / FileNotFoundError raised by the API (a user error): its message, exit code 2;
- RankFailed (another rank of a distributed run died or stopped answering): its message, exit code 1;
- Ctrl-C (also while the modules are still being imported): exit code 130;
- a closed output pipe (`fastlm generate ... | head -c 20`): quiet, exit code 141 like Unix tools
  killed by SIGPIPE; another OSError (disk full, a permission): its reason, exit code 1.
"""
import sys

# module path -> it defines add_parsers(subparsers) registering its subcommands
COMMAND_MODULES = ["fastlm.runtime.commands", "fastlm.serve.commands", "fastlm.training.commands",
                   "fastlm.model.commands"]
EXIT_INTERRUPTED = 130  # 128 + SIGINT
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE


def build_parser():
    import argparse
    import importlib

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
    try:
        args = build_parser().parse_args(argv)
        from fastlm.model.collectives import RankFailed

        try:
            result = args.func(args)
            sys.stdout.flush()  # write errors (a closed pipe, a full disk) surface here, not at exit
        except (ValueError, FileNotFoundError, NotADirectoryError) as exc:
            print(f"fastlm {args.command}: error: {exc}", file=sys.stderr)
            return 2
        except RankFailed as exc:  # another process of a distributed run died or stopped answering
            print(f"fastlm {args.command}: error: {exc}", file=sys.stderr)
            return 1
        return int(result or 0)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    except OSError as exc:  # the environment, not a bug: a full disk (also for the output), a permission...
        _silence_stdout()  # if the output failed, the interpreter's last flush must not fail (and print) again
        where = f": {exc.filename}" if exc.filename else ""
        print(f"fastlm: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush does not fail (and print) again."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
