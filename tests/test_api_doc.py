"""docs/api.md runs as written: its Python blocks, in order, in one namespace (tiny models, offline)."""

import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def test_api_doc_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert len(blocks) >= 6
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), namespace)
    assert namespace["report"].verdict == "far"  # noise 1.0: cosine ~ 1/sqrt(2) per weight, below 0.85
    assert namespace["bias"].num_tensors == 2 * 10  # 2 layers x (q, k, v, o + 3 biases + gate, up, down)
    assert namespace["result"].steps == 2 and namespace["result"].drift_tensors == 20
    assert namespace["scores"].examples == 4
    assert any("drift_cos" in h for h in namespace["trainer"].state.log_history)
