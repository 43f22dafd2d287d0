#!/usr/bin/env python3
"""Compares what each function was allowed to do with what it did, over a whole test run.

The local stack's moto (scripts/moto_iam_server.py) logs every authorization decision to
MOTO_IAM_AUDIT_LOG. After `make test` has driven every function through its paths, this fails
if any function was refused an action (its policy in template.yaml lacks something it does,
which AWS would refuse too, even where the code swallows the error), or if an action the
template grants a function was never used (a permission nobody needs, or a path no test takes).

    scripts/iam_audit.py AUDIT_LOG [--template template.yaml]
"""

import argparse
import json
import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from provision import function_policies, load_template  # noqa: E402


def granted_actions(template):
    """{binary: {action}} from each function's Allow statements (as provisioned)."""
    granted = {}
    for binary, policy in function_policies(template, resolve=lambda value: value).items():
        actions = set()
        for statement in policy["Statement"]:
            if statement.get("Effect") == "Allow":
                action = statement["Action"]
                actions.update(action if isinstance(action, list) else [action])
        granted[binary] = actions
    return granted


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("audit_log")
    parser.add_argument("--template", default="template.yaml")
    args = parser.parse_args()
    granted = granted_actions(load_template(args.template))

    used = defaultdict(set)
    refused = defaultdict(set)
    with open(args.audit_log) as f:
        for line in f:
            entry = json.loads(line)
            user = entry["user"].rsplit("/", 1)[-1]
            if user == "klaviyo-connect-nobody":
                binary = "nobody"
            elif user.removeprefix("klaviyo-connect-") in granted:
                binary = user.removeprefix("klaviyo-connect-")
            else:  # the admin (tests, provisioning) and the deliberate `secrets-only` user
                continue
            (used if entry["allowed"] else refused)[binary].add((entry["action"], entry["resource"]))

    problems = []
    for action, resource in sorted(refused.pop("nobody", ())):
        problems.append(
            f"a function ran without its profile and was refused {action} on {resource}: give it "
            "`AWS_PROFILE` in `[workspace.metadata.lambda.bin.<name>.env]` in Cargo.toml"
        )
    for binary in sorted(set(refused)):
        for action, resource in sorted(refused[binary]):
            problems.append(f"{binary}: was refused {action} on {resource} (template.yaml does not grant it)")
    for binary, actions in sorted(granted.items()):
        done = {action.lower() for action, _ in used[binary]}
        for action in sorted(actions):
            if action.lower() not in done:
                problems.append(f"{binary}: is granted {action} but no test made it use it")
        print(f"{binary}: {len(actions)} granted, all used" if not any(
            p.startswith(f"{binary}:") for p in problems) else f"{binary}: see below", file=sys.stderr)
    if problems:
        print("IAM audit failed:\n  " + "\n  ".join(problems), file=sys.stderr)
        sys.exit(1)
    print("IAM audit: every function used every action it is granted, and was refused none.", file=sys.stderr)


if __name__ == "__main__":
    main()
