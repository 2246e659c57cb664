"""What every script's error looks like (cli.py), for the tests: exit code 2 and one line
"error: ..." that names the flag, or the file and line, it is about."""


def assert_error(returncode, stderr, *named, alone=True):
    """Exit code 2, no traceback, and one line "error: ..." on stderr (the only line, or with
    alone=False the last: an error in mid-run) that contains each of `named`."""
    assert returncode == 2 and "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert lines and lines[-1].startswith("error: ") and sum(line.startswith("error: ") for line in lines) == 1, stderr
    assert len(lines) == 1 or not alone, stderr
    for name in named:
        assert str(name) in lines[-1], (name, stderr)
