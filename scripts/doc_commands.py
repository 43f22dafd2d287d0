#!/usr/bin/env python3
"""Runs the commands the docs show, so the docs cannot drift from the system (make test).

A fenced ```sh block whose preceding line is exactly `<!-- runs in make test -->` is run. The
blocks of one file run in order in one bash shell (`set -euo pipefail`), from the repository
root, with the environment of the stack `make test` brought up and `.venv/bin` first on PATH
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
import subprocess
import sys

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


def run(path, found):
    script = ["set -euo pipefail"]
    for n, (line, code) in enumerate(found):
        script += [f"echo '{BEGIN.format(n)}'", code, f"echo '{END.format(n)}'"]
    env = dict(os.environ)
    env["PATH"] = f"{ROOT / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    done = subprocess.run(
        ["bash", "-c", "\n".join(script)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
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
