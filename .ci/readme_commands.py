"""Prints the README's Quick start commands, each ended by a NUL byte: CI runs exactly what a new user is told to run.

README.md is the one source: the first two ```bash blocks under "## Quick start" are the install-and-run
command and the install-and-test command.
"""

import re
import sys
from pathlib import Path

readme = Path(__file__).resolve().parents[1] / "README.md"
section = readme.read_text(encoding="utf-8").split("## Quick start", 1)[1].split("\n## ", 1)[0]
blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
if len(blocks) < 2:
    sys.exit("README.md: the Quick start section must hold two ```bash blocks (run, then test)")
for block in blocks[:2]:
    sys.stdout.write(block.strip() + "\0")
