"""`python -m job.demo`: see job/demo/__init__.py."""

import argparse
import sys

from . import create, summary

parser = argparse.ArgumentParser(prog="python -m job.demo",
                                 description="Create the demo database and its items, or summarise it.")
parser.add_argument("count", type=int, nargs="?", default=3000, help="items to generate")
parser.add_argument("--db", help="SQLite file to (re)create; the items go to stdout")
parser.add_argument("--summary", metavar="DB", help="print what the load left in this database")
args = parser.parse_args()
if args.summary:
    print(summary(args.summary))
elif args.db:
    for line in create(args.db, args.count):
        sys.stdout.write(line + "\n")
else:
    parser.error("give --db PATH or --summary PATH")
