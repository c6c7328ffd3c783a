"""The examples in docs/training.md run as written (against the session's phantom run)."""
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "training.md"


def blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def test_the_doc_has_its_examples():
    assert len(blocks()) == 4


@pytest.mark.parametrize("number", range(4))
def test_training_doc_examples_run(pipeline, features, number, capsys):
    work = str(Path(pipeline["cfg"].workdir))
    code = blocks()[number].replace("runs/demo", work)
    exec(compile(code, f"{DOC.name} example {number + 1}", "exec"), {})
    assert capsys.readouterr().out.strip()
