"""CI runs what README.md tells a user to run."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_commands():
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    setup_and_main_job, tests = blocks[0].strip(), blocks[1].strip()
    ci = (ROOT / ".ci" / "run").read_text()
    assert setup_and_main_job in ci.splitlines()
    assert f"{tests} || status=$?" in ci.splitlines()


def test_readme_lists_the_bug_catalog():
    from trt_layers.bugs import BUGS

    readme = (ROOT / "README.md").read_text()
    assert [name for name in BUGS if f"| `{name}` |" not in readme] == []
