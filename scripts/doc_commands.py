#!/usr/bin/env python3
"""Runs the commands the docs show, so the docs cannot drift from the system (make test).

A fenced ```sh block whose preceding line is exactly `<!-- runs in make test -->` is run. The
blocks of one file run in order in one bash shell (`set -euo pipefail`), from the repository
root, with the environment of the stack `make test` brought up (it refuses to run unless AWS, the API
and the sandbox are on loopback) and `.venv/bin` first on PATH
(so `python` has boto3 and `aws` is the AWS CLI). A comment line `# → <text>` states output
that must appear in that block's standard output, in order; `…` matches anything on a line.

It also checks that every page in docs/ names its reader: the first paragraph after the title
starts with "For ".

    scripts/doc_commands.py [FILE.md ...]    default: README.md and docs/*.md
    scripts/doc_commands.py --list           print the runnable blocks, run nothing
"""

import argparse
import os
import pathlib
import re
import signal
import subprocess
import sys
import urllib.parse

ROOT = pathlib.Path(__file__).resolve().parent.parent
MARKER = "<!-- runs in make test -->"
EXPECT = re.compile(r"^\s*# → (.*)$")
BEGIN, END = "@@doc-block-begin {}@@", "@@doc-block-end {}@@"


def shown(path):
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def blocks(path):
    """(line number, code) of each runnable block of `path`."""
    lines = path.read_text().splitlines()
    found = []
    for i, line in enumerate(lines):
        if line.strip() != MARKER:
            continue
        fence = lines[i + 1] if i + 1 < len(lines) else ""
        if fence.strip() != "```sh":
            sys.exit(f"{path}:{i + 1}: the marker must be followed by a ```sh fence")
        end = next((j for j in range(i + 2, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            sys.exit(f"{path}:{i + 2}: unclosed ```sh block")
        found.append((i + 3, "\n".join(lines[i + 2 : end])))
    return found


def expectations(code):
    return [m.group(1).strip() for m in map(EXPECT.match, code.splitlines()) if m]


def pattern(expected):
    parts = (re.escape(part) for part in expected.split("…"))
    return re.compile(".*?".join(parts))


def audience_problems(paths):
    problems = []
    for path in paths:
        if path.parent.name != "docs":
            continue
        paragraphs = [p.strip() for p in path.read_text().split("\n\n") if p.strip()]
        first = next((p for p in paragraphs if not p.startswith("#")), "")
        if not first.startswith("For "):
            problems.append(f"{shown(path)}: the first paragraph does not name its reader ('For …')")
    return problems


def local_only():
    """The blocks put secrets and call the API: refuse to run them against anything but a local
    stack, whatever else the shell holds (real AWS credentials, a deployed secret's ARN)."""
    problems = []
    for name in ("AWS_ENDPOINT_URL", "LOCAL_API_URL", "KLAVIYO_SANDBOX_URL"):
        host = urllib.parse.urlsplit(os.environ.get(name, "")).hostname
        if host not in ("127.0.0.1", "localhost", "::1"):
            problems.append(f"{name} must point at a local stack (loopback), not {host or 'nothing'}")
    return problems


def run(path, found):
    script = ["set -euo pipefail"]
    for n, (line, code) in enumerate(found):
        script += [f"echo '{BEGIN.format(n)}'", code, f"echo '{END.format(n)}'"]
    # Only AWS_ENDPOINT_URL, checked above, may say where AWS is: no per-service endpoints.
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith("AWS_ENDPOINT_URL_") and name != "AWS_IGNORE_CONFIGURED_ENDPOINT_URLS"
    }
    env["PATH"] = f"{ROOT / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    # Its own process group, so a block's background processes go with it on a timeout.
    process = subprocess.Popen(
        ["bash", "-c", "\n".join(script)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        try:
            stdout, stderr = process.communicate(timeout=10)
        except subprocess.TimeoutExpired:  # a descendant that left the group holds the pipes
            stdout, stderr = "", ""
        stderr += "\n(timed out after 900 s)"
    done = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    failures = []
    for n, (line, code) in enumerate(found):
        where = f"{shown(path)}:{line}"
        begin, end = BEGIN.format(n), END.format(n)
        if begin not in done.stdout:
            failures.append(f"{where}: not reached (an earlier block failed)")
            continue
        output = done.stdout.split(begin, 1)[1]
        if end not in output:
            failures.append(
                f"{where}: the block failed (exit {done.returncode})\n--- output ---\n{output}"
                f"\n--- stderr (last 40 lines) ---\n" + "\n".join(done.stderr.splitlines()[-40:])
            )
            continue
        output = output.split(end, 1)[0]
        at = 0
        for expected in expectations(code):
            match = pattern(expected).search(output, at)
            if match is None:
                failures.append(f"{where}: expected output not found after position {at}: {expected}\n--- output ---\n{output}")
                break
            at = match.end()
    return failures


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", type=pathlib.Path)
    parser.add_argument("--list", action="store_true", help="print the runnable blocks, run nothing")
    args = parser.parse_args()
    paths = [p.resolve() for p in args.files] or [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    problems = audience_problems(paths)
    if not args.list:
        refused = local_only()
        if refused:
            for problem in refused:
                print(f"FAIL {problem}", file=sys.stderr)
            return 1
    total = checked = 0
    for path in paths:
        found = blocks(path)
        if not found:
            continue
        total += len(found)
        checked += sum(len(expectations(code)) for _, code in found)
        if args.list:
            for line, code in found:
                print(f"--- {shown(path)}:{line}\n{code}")
            continue
        print(f"{shown(path)}: {len(found)} blocks", flush=True)
        problems += run(path, found)
    for problem in problems:
        print(f"FAIL {problem}", file=sys.stderr)
    verb = "listed" if args.list else "ran"
    print(f"{total} doc blocks {verb}, {checked} expected outputs, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
