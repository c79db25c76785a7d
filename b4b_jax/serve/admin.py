r"""Admin CLI of the served API (works on the workdir's database, with or without a running server).

  python -m b4b_jax.serve.admin --workdir=DIR create-key ACCOUNT [--quota-rows N] [--rate ROWS_PER_S]
  python -m b4b_jax.serve.admin --workdir=DIR revoke KEY_ID
  python -m b4b_jax.serve.admin --workdir=DIR set-limits ACCOUNT [--quota-rows N] [--rate R]
  python -m b4b_jax.serve.admin --workdir=DIR list [--url http://127.0.0.1:8000]
  python -m b4b_jax.serve.admin --workdir=DIR snapshot --url http://127.0.0.1:8000

A created key is printed once (only its salted hash is stored). `list` prints every account's counters
from the database; with --url it asks the running server (admin token from $B4B_ADMIN_TOKEN or
<workdir>/admin_token) and adds coverage and sigma. A running server sees a revocation within
config.limits.auth_cache_seconds and new limits within 5 s.
"""
import argparse
import json
import os
import sys

from b4b_jax.serve import store as store_lib


def _token(workdir: str) -> str:
  token = os.environ.get("B4B_ADMIN_TOKEN")
  if token:
    return token
  with open(os.path.join(workdir, "admin_token")) as f:
    return f.read().strip()


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m b4b_jax.serve.admin", description=__doc__.split("\n")[0])
  p.add_argument("--workdir", required=True)
  sub = p.add_subparsers(dest="command", required=True)
  c = sub.add_parser("create-key")
  c.add_argument("account")
  c.add_argument("--quota-rows", type=int, default=0)
  c.add_argument("--rate", type=float, default=0.0)
  r = sub.add_parser("revoke")
  r.add_argument("key_id")
  s = sub.add_parser("set-limits")
  s.add_argument("account")
  s.add_argument("--quota-rows", type=int)
  s.add_argument("--rate", type=float)
  ls = sub.add_parser("list")
  ls.add_argument("--url")
  sn = sub.add_parser("snapshot")
  sn.add_argument("--url", required=True)
  args = p.parse_args(argv)

  if args.command in ("list", "snapshot") and args.url:
    from b4b_jax.serve.client import AdminClient  # pylint: disable=g-import-not-at-top
    with AdminClient(args.url, _token(args.workdir)) as admin:
      out = admin.accounts() if args.command == "list" else admin.snapshot()
    print(json.dumps(out, indent=2, sort_keys=True))
    return 0
  path = os.path.join(args.workdir, store_lib.DB_NAME)
  try:
    st = store_lib.Store(path, create=args.command == "create-key")
  except (FileNotFoundError, store_lib.StoreError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  try:
    if args.command == "create-key":
      key_id, key = st.create_key(args.account, quota_rows=args.quota_rows,
                                  rate_rows_per_s=args.rate)
      print(json.dumps({"account": args.account, "key_id": key_id, "key": key}))
      print("the key is shown only this once; store it now", file=sys.stderr)
    elif args.command == "revoke":
      print(json.dumps({"key_id": args.key_id, "account": st.revoke_key(args.key_id),
                        "revoked": True}))
    elif args.command == "set-limits":
      st.set_limits(args.account, quota_rows=args.quota_rows, rate_rows_per_s=args.rate)
      print(json.dumps({args.account: st.account(args.account)}))
    elif args.command == "list":
      print(json.dumps({"accounts": st.accounts(), "journal": st.journal_stats()}, indent=2,
                       sort_keys=True))
  except (KeyError, ValueError) as e:
    print(f"error: {e.args[0] if e.args else e}", file=sys.stderr)
    return 2
  finally:
    st.close()
  return 0


if __name__ == "__main__":
  sys.exit(main())
