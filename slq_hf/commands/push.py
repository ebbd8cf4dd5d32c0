"""`slq-hf push`: upload a hub-ready SLQ folder with huggingface_hub."""

from __future__ import annotations

import argparse

from .reporting import report

DESCRIPTION = """\
Upload a folder made by `slq-hf export` to a Hugging Face Hub model repository (created if missing), in one
commit. Only the SLQ files go up: config.json, the queries-only model.safetensors, code, processor and
sentence-transformers files, README.md. The upload is refused before any network call if the folder holds
anything that looks like backbone weights (another *.safetensors, *.bin/*.pt/*.gguf..., shard indexes, a
model.safetensors with tensors other than SLQ's, files over 256 MiB). Hidden files (.git, .cache) are skipped.

Authentication: `hf auth login` beforehand, the HF_TOKEN environment variable, or --token.
"""

EPILOG = """\
example:
  slq-hf push hub/slq-qwen3vl-2b --repo-id my-org/slq-qwen3vl-2b --private
  slq-hf push hub/slq-qwen3vl-2b --repo-id my-org/slq-qwen3vl-2b --dry-run   # list the files only
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("push", help="upload a hub-ready folder to the Hugging Face Hub",
                                   description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument("hub_dir", metavar="HUB_DIR", help="folder written by `slq-hf export`")
    parser.add_argument("--repo-id", required=True, metavar="ORG/NAME", help="target model repository")
    parser.add_argument("--private", action="store_true", help="create the repository as private (if it is new)")
    parser.add_argument("--revision", metavar="BRANCH", help="branch to commit to (default: main)")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    parser.add_argument("--commit-message", help="commit message (default: 'Upload SLQ model (queries only)')")
    parser.add_argument("--token", help="Hub token (default: the stored login or HF_TOKEN)")
    parser.add_argument("--dry-run", action="store_true", help="check the folder and list the files; upload nothing")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from ..hub import check_repo_id, collect_upload_files, push

    def upload() -> None:
        check_repo_id(args.repo_id)  # a dry run too: it answers whether the real push would go through
        files = collect_upload_files(args.hub_dir)
        print(f"{len(files)} files to upload from {args.hub_dir} to {args.repo_id}:")
        print("".join(f"  {name}\n" for name in files), end="")
        if not args.dry_run:
            commit = push(args.hub_dir, args.repo_id, private=args.private or None, token=args.token,
                          revision=args.revision, create_pr=args.create_pr, commit_message=args.commit_message)
            print(f"Pushed: {getattr(commit, 'commit_url', commit)}")

    return report("push", upload)
