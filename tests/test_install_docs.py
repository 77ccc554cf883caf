"""docs/install.md's table of extras names every extra pyproject.toml defines (it lacked `cost`, which
docs/costmodel.md tells users to install)."""
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_extra_is_in_the_install_table():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    table = (ROOT / "docs" / "install.md").read_text()
    missing = [name for name in extras if name != "all" and f"| `{name}` |" not in table]
    assert missing == []
