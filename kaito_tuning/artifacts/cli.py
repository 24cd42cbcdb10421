"""``kaito-tuning push`` and ``kaito-tuning pull``: print the result as JSON (no torch, no training libraries)."""

from __future__ import annotations

import json

from kaito_tuning.artifacts.errors import InvalidAnnotation
from kaito_tuning.artifacts.transfer import pull_adapter, push_adapter


def parse_annotations(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InvalidAnnotation(f"--annotation {item!r}: write KEY=VALUE")
        out[key.strip()] = value
    return out


def cli_push(args) -> int:
    result = push_adapter(args.dir, args.image, auth_file=args.auth_file, plain_http=args.plain_http,
                          annotations=parse_annotations(args.annotation))
    print(json.dumps(result.to_dict(), indent=2))
    return 0


def cli_pull(args) -> int:
    result = pull_adapter(args.image, args.dir, auth_file=args.auth_file, plain_http=args.plain_http)
    print(json.dumps(result.to_dict(), indent=2))
    return 0
