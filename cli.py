"""
cli.py: what the command line of every script shares: the parser, the one-line error, the exit
codes and the choice of device.

    import cli
    ap = cli.ArgumentParser(__doc__, __file__)   # a usage error prints "error: ..." and exits 2
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    try:
        device = cli.pick_device(args.device)
        ...
    except (ValueError, DataError) as e:      # the user's to fix: one line, not a traceback
        cli.fail(e)

Exit codes, the same for every script (README.md, "Command lines"):
  0    done
  1    not everything could be done and a rerun may finish it (generate.py: some generations
       are in the failures file), or a bug, with its traceback
  2    an error of the user's to fix: bad flags, input, settings or server, printed as one line
       "error: ..." that names the flag, or the file and line; nothing was written half-way
  130  interrupted (Ctrl-C): a rerun of the same command resumes

Reads and writes nothing. Imports torch only to pick a device.
"""
import argparse
import os
import sys

OK, INCOMPLETE, USER_ERROR, INTERRUPTED = 0, 1, 2, 130


def fail(message, code=USER_ERROR):
    """Stop with one line "error: MESSAGE" on stderr (a message of several lines is joined into
    one) and exit code 2."""
    print("error: " + " ".join(str(message).splitlines()), file=sys.stderr, flush=True)
    raise SystemExit(code)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's conventions: the script's docstring as its --help text, laid out
    as written; no abbreviated flags (a prefix such as --out is not taken for --out_jsonl); and a
    usage error is one line "error: ..." with exit code 2, like every other error. script: the
    script's __file__, which names it in usage lines (also when its main() is called from Python)."""

    def __init__(self, description=None, script=None, **kwargs):
        if script:
            kwargs.setdefault("prog", os.path.basename(script))
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(description=description, **kwargs)

    def error(self, message):
        fail(f"{message} (see python {self.prog} --help)")


def pick_device(name):
    """The torch device named by --device: "auto" is cuda when this machine has a GPU, else cpu;
    any other name must be a device this machine has (cpu, cuda, cuda:N, mps, ...). A ValueError
    that names --device otherwise. CUDA is checked without touching a GPU (torchrun's processes
    each pick theirs later)."""
    import torch
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device name (auto, cpu, cuda, cuda:N, mps, ...)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count():
            raise ValueError(f"--device {name!r} is not available here ({torch.cuda.device_count()} CUDA devices)")
        return name
    try:
        torch.empty(1, device=device)
    except Exception as e:   # AssertionError, RuntimeError or NotImplementedError, by device and build
        raise ValueError(f"--device {name!r} is not available here ({str(e).splitlines()[0][:200]})") from None
    return name
